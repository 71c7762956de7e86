"""Several trials on one GPU: estimate what a trial needs, and start it only when it fits.

The estimate counts what the engine keeps on the device: the parameters with their gradients
and optimizer state (and the copy of the best weights early stopping keeps), what a training
step of cuDNN's LSTM holds over a batch of ``seq_len`` steps (saved for backward, its
workspaces, the gradients of the gates), the trial's windows (the engine keeps every split on
the device), cuBLAS's workspaces, which live as long as the slot process, and fixed cuDNN
buffers. Evaluation needs no term of its own: on CUDA the engine evaluates a training batch at
a time, which holds less than a training step. The step's and the fixed terms' sizes were
measured (``tests/gpu/peaks.py`` on an H100, torch 2.11, cuDNN 9.19: 0.87x to 1.09x of the
peak for the shapes there); the estimate is recorded in each trial's ``info`` beside the
measured peak (BENCHMARKS.md, "GPU").

Slots of one machine share a ledger file per GPU (``<data_dir>/gpu/<index>.json``, guarded by
``flock``): a slot reserves its trial's estimate before training and frees it after, and a
trial starts only when the reservations of the other live slots plus its own fit in the GPU's
memory less a margin. Reservations of dead processes are dropped.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONTEXT_BYTES = 600 * 2**20  # the CUDA context and cuDNN handles of one slot process
# cuBLAS's and cuBLASLt's workspaces (32 MiB each on Hopper), allocated through torch's
# allocator at a process's first matrix product and kept: they count in every trial's peak.
BLAS_WORKSPACES = 64 * 2**20
FIXED_BYTES = 14 * 2**20  # cuDNN's buffers that do not grow with the trial's shape
# A training step, per window, time step, layer and direction, in activation-sized values:
# STEP_PER_UNIT for each hidden unit (the four gates and their gradients) plus STEP_FIXED.
STEP_PER_UNIT = 8
STEP_FIXED = 650


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    seq_len: int
    batch: int
    n_in: int = 1
    n_out: int = 1
    bidirectional: bool = False
    n_windows: int = 0  # windows of all splits, kept on the device
    optimizer: str = "adam"
    half: bool = False  # bf16/fp16 autocast


def param_count(s: Shape) -> int:
    dirs = 2 if s.bidirectional else 1
    n, inp = 0, s.n_in
    for _ in range(s.layers):
        n += dirs * (4 * s.hidden * (inp + s.hidden) + 8 * s.hidden)
        inp = s.hidden * dirs
    return n + inp * s.n_out + s.n_out


def estimate_bytes(s: Shape) -> int:
    """Bytes one training trial of this shape needs on the GPU, the context excluded."""
    p = param_count(s)
    states = {"adam": 2, "adamw": 2, "rmsprop": 1, "sgd": 1}.get(s.optimizer, 2)
    params = 4 * p * (1 + 1 + states + 1)  # weights, grads, optimizer state, best copy
    act = 2 if s.half else 4  # autocast runs cuDNN's LSTM in fp16, for bf16 too
    dirs = 2 if s.bidirectional else 1
    step = s.batch * s.seq_len * s.layers * dirs * (STEP_PER_UNIT * s.hidden + STEP_FIXED) * act
    io = s.batch * s.seq_len * s.n_in * 4 * 3  # input, its noise copy, its grad path
    data = s.n_windows * (s.seq_len * s.n_in + s.n_out) * 4
    return int(BLAS_WORKSPACES + FIXED_BYTES + params + step + io + data)


def shape_of(hp: Any, data: Any, device: str = "cuda") -> Shape:
    """The shape of a resolved trial (``worker.engine.Hyper``) on prepared data."""
    precision = getattr(hp, "precision", "auto")
    half = precision in ("bf16", "fp16") or (precision == "auto" and device.startswith("cuda"))
    n_windows = sum(len(split.x) for split in (data.train, data.val, data.test))
    return Shape(
        hidden=hp.hidden_size,
        layers=hp.num_layers,
        seq_len=data.seq_len,
        batch=hp.batch_size,
        n_in=len(data.features),
        n_out=int(np.prod(data.train.y.shape[1:]))
        if data.task == "forecast"
        else len(data.classes or [0, 1]),
        bidirectional=bool(getattr(hp, "bidirectional", False)),
        n_windows=n_windows,
        optimizer=hp.optimizer,
        half=half,
    )


class Ledger:
    """Reservations of the slots that share one GPU, in a locked JSON file."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path, self.capacity = path, capacity
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)

    @contextmanager
    def _locked(self) -> Any:
        with self.path.open("r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                text = fh.read()
                book: dict[str, int] = json.loads(text) if text.strip() else {}
                book = {k: v for k, v in book.items() if _alive(int(k.split(":")[0]))}
                yield book
                fh.seek(0)
                fh.truncate()
                fh.write(json.dumps(book))
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def fits_at_all(self, need: int) -> bool:
        return need <= self.capacity

    def reserve(self, owner: str, need: int) -> bool:
        """Reserve ``need`` bytes for ``owner`` ("<pid>:<slot>") if they fit beside the others."""
        with self._locked() as book:
            used = sum(v for k, v in book.items() if k != owner)
            if used + need > self.capacity:
                return False
            book[owner] = need
            return True

    def release(self, owner: str) -> None:
        with self._locked() as book:
            book.pop(owner, None)

    def reserved(self) -> int:
        with self._locked() as book:
            return sum(book.values())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gpu_capacity(slots_on_gpu: int, margin: float = 0.9) -> int:
    """What trials on the current GPU may reserve: its memory less a margin and one context
    per slot process."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return max(int(total * margin) - slots_on_gpu * CONTEXT_BYTES, 0)
