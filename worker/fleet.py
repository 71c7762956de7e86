"""``seqtune worker``: one spawned process per slot, pinned to its GPU, supervised.

Slots: ``--gpus all`` (every visible GPU; CPU when there is none), ``none`` (CPU) or a list
such as ``0,2``; ``--slots-per-gpu K`` runs K trials per GPU (or K CPU slots). Children are
spawned, never forked: CUDA and database connections do not survive a fork.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import replace
from types import FrameType

from worker.slot import SlotConfig, slot_main

log = logging.getLogger("seqtune.fleet")


def plan(gpus: str, slots_per_gpu: int) -> list[tuple[str, str | None]]:
    """``(device, CUDA_VISIBLE_DEVICES)`` for each slot."""
    ids: list[str]
    if gpus == "none":
        ids = []
    elif gpus == "all":
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
    else:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not all(g.isdigit() for g in ids):
            raise ValueError("--gpus takes 'all', 'none' or a list of GPU indices like 0,2")
    if not ids:
        return [("cpu", "")] * slots_per_gpu
    return [("cuda", g) for g in ids for _ in range(slots_per_gpu)]


def run(base: SlotConfig, *, gpus: str = "all", slots_per_gpu: int = 1) -> int:
    """Start the slots and supervise them until they all end. Returns an exit code."""
    slots = plan(gpus, slots_per_gpu)
    cpu_slots = sum(1 for d, _ in slots if d == "cpu")
    threads = base.threads or (max(1, (os.cpu_count() or 1) // cpu_slots) if cpu_slots else None)
    ctx = mp.get_context("spawn")
    configs = [replace(base, slot=i, device=dev, threads=threads if dev == "cpu" else None,
                       slots_on_device=slots_per_gpu)
               for i, (dev, _) in enumerate(slots)]
    visible = [cuda for _, cuda in slots]
    procs: dict[int, mp.process.BaseProcess] = {}
    stopping = {"count": 0}

    def start(i: int) -> None:
        old = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible[i] is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[i] or ""
        try:
            p = ctx.Process(target=slot_main, args=(configs[i],), name=f"seqtune-slot{i}")
            p.start()
        finally:
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old
        procs[i] = p
        log.info("slot %d on %s%s: pid %s", i, configs[i].device,
                 f" (GPU {visible[i]})" if visible[i] else "", p.pid)

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping["count"] += 1
        for p in procs.values():
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for i in range(len(configs)):
        start(i)
    finite = base.burst or base.max_trials is not None or base.max_idle_s is not None
    while procs:
        for i, p in list(procs.items()):
            if p.is_alive():
                continue
            p.join()
            del procs[i]
            if p.exitcode not in (0, None) and not stopping["count"]:
                log.warning("slot %d exited with %s; restarting it", i, p.exitcode)
                start(i)
            elif p.exitcode == 0 and not finite and not stopping["count"]:
                start(i)
        time.sleep(0.2)
    return 0
