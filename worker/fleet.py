"""``seqtune worker``: one spawned process per slot, pinned to its GPU, supervised.

Slots: ``--gpus all`` (every visible GPU; CPU when there is none), ``none`` (CPU) or a list
such as ``0,2``; ``--slots-per-gpu K`` runs K trials per GPU (or K CPU slots). Children are
spawned, never forked: CUDA and database connections do not survive a fork.

Settings: this process reads them once (``run``'s ``settings``) and hands them to every slot,
which gets its timing (heartbeat, poll, reap interval, orphan grace) from them.

No orphans: each slot watches this process and stops within seconds once it is gone
(``kill -9`` of ``seqtune worker``; see ``worker.signals.ParentWatch``). With
``--exit-with-pid`` (``seqtune up`` passes its own pid), this process likewise stops its
slots and exits once that process is gone.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

from service.settings import Settings
from worker.signals import STOP_SIGNAL
from worker.slot import SlotConfig, slot_main

log = logging.getLogger("seqtune.fleet")
# The supervision loop's tick: how soon a dead slot is restarted and a gone --exit-with-pid
# noticed. Not a setting: it polls local processes only (no database), and the escalation
# that follows is timed by Settings.orphan_grace_s.
SUPERVISE_TICK_S = 0.2


def plan(gpus: str, slots_per_gpu: int) -> list[tuple[str, str | None]]:
    """``(device, CUDA_VISIBLE_DEVICES)`` for each slot."""
    ids: list[str]
    if gpus == "none":
        ids = []
    elif gpus == "all":
        import torch

        ids = (
            [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        )
    else:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not all(g.isdigit() for g in ids):
            raise ValueError("--gpus takes 'all', 'none' or a list of GPU indices like 0,2")
    if not ids:
        return [("cpu", "")] * slots_per_gpu
    return [("cuda", g) for g in ids for _ in range(slots_per_gpu)]


def run(
    base: SlotConfig,
    *,
    gpus: str = "all",
    slots_per_gpu: int = 1,
    exit_with: int | None = None,
    settings: Settings | None = None,
) -> int:
    """Start the slots and supervise them until they all end. Returns an exit code.

    ``settings`` (default: read from the environment, once, here) go to every slot.
    ``exit_with`` (``--exit-with-pid``; None: none) is the pid of the process this worker
    lives for: when it is gone, the slots are stopped as by SIGTERM (a second SIGTERM after
    ``settings.orphan_grace_s``, SIGKILL after as long again) and this process exits."""
    settings = settings or Settings()
    slots = plan(gpus, slots_per_gpu)
    cpu_slots = sum(1 for d, _ in slots if d == "cpu")
    threads = base.threads or (max(1, (os.cpu_count() or 1) // cpu_slots) if cpu_slots else None)
    ctx = mp.get_context("spawn")
    # Each slot watches this pid and stops once it is gone: its supervisor died with it.
    configs = [
        replace(
            base,
            slot=i,
            device=dev,
            threads=threads if dev == "cpu" else None,
            slots_on_device=slots_per_gpu,
            parent_pid=os.getpid(),
        )
        for i, (dev, _) in enumerate(slots)
    ]
    visible = [cuda for _, cuda in slots]
    procs: dict[int, mp.process.BaseProcess] = {}
    stopping = {"count": 0}

    def start(i: int) -> None:
        old = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible[i] is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[i] or ""
        try:
            # The Settings object pickles across spawn: a slot never re-reads the environment.
            p = ctx.Process(target=slot_main, args=(configs[i], settings), name=f"seqtune-slot{i}")
            p.start()
        finally:
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old
        procs[i] = p
        log.info(
            "slot %d on %s%s: pid %s",
            i,
            configs[i].device,
            f" (GPU {visible[i]})" if visible[i] else "",
            p.pid,
        )

    def forward(signum: int, _frame: FrameType | None) -> None:
        # One STOP_SIGNAL per request: a slot ignores the SIGTERM/SIGINT copies that reach it
        # directly (the terminal's process group, a supervisor signalling every process), so
        # one request never counts twice (see worker.signals.Signals).
        stopping["count"] += 1
        for p in procs.values():
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, STOP_SIGNAL)

    signal.signal(signal.SIGTERM, forward)
    # Under `seqtune up` (exit_with), Ctrl+C's SIGINT reaches this process too, and up stops
    # this worker with one SIGTERM once its server is down: the terminal's copy must not count
    # as a request of its own, or up's SIGTERM would be the second one, "stop now".
    signal.signal(signal.SIGINT, signal.SIG_IGN if exit_with is not None else forward)
    for i in range(len(configs)):
        start(i)
    finite = base.burst or base.max_trials is not None or base.max_idle_s is not None
    watch = (
        _ExitWith(exit_with, forward, grace_s=settings.orphan_grace_s)
        if exit_with is not None
        else None
    )
    while procs:
        if watch is not None:
            watch.check(procs)
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
        time.sleep(SUPERVISE_TICK_S)
    return 0


class _ExitWith:
    """Supervision of the process this worker lives for (``seqtune up``): once it is gone
    (this process was re-parented), send the slots a stop request as for a SIGTERM (finish
    the epoch, hand back), a second one after ``grace_s`` (hand back now), then SIGKILL what
    is left after as long again (the reaper recovers its trial). ``check`` runs in the
    supervision loop."""

    def __init__(
        self, pid: int, forward: Callable[[int, FrameType | None], None], *, grace_s: float
    ) -> None:
        self.pid, self.forward, self.grace_s = pid, forward, grace_s
        self.gone_at: float | None = None
        self.steps = 0  # escalation steps taken

    def check(self, procs: dict[int, mp.process.BaseProcess]) -> None:
        now = time.monotonic()
        if self.gone_at is None:
            if os.getppid() == self.pid:
                return
            log.warning(
                "process %d, which started this worker, is gone: stopping the slots", self.pid
            )
            self.gone_at, self.steps = now, 1
            self.forward(signal.SIGTERM, None)
            return
        due = 1 + int((now - self.gone_at) // self.grace_s)
        if due > self.steps and self.steps == 1:
            self.steps = 2
            self.forward(signal.SIGTERM, None)  # the second: hand the trial back now
        elif due > self.steps:
            self.steps = due
            for p in procs.values():
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGKILL)
