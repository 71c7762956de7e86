"""GPU admission: whether, and when, a trial may start on a GPU that several slots share.

A slot estimates the trial's GPU memory (``estimate``, a value it keeps and records in the
trial's ``info`` beside the measured peak), then trains inside ``gpu_room``: on a GPU shared
by several slots that waits until the estimate fits beside the other slots' reservations in
the GPU's ledger (``worker.gpu_memory.Ledger``), and refuses a trial that could never fit.
A slot alone on its device, or on the CPU, is admitted at once. The estimate itself and the
ledger file live in ``worker.gpu_memory``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from worker import gpu_memory
from worker.engine import Hyper
from worker.preprocessing import Prepared

# How often a waiting slot asks the ledger again. Not a setting: the ledger is a local file
# under a lock, cheap to read, and a trial waits for another one's whole training anyway.
WAIT_POLL_S = 0.5


class TooBig(Exception):
    """The trial's estimated GPU memory exceeds what one slot may ever use."""


class Withdrawn(Exception):
    """A stop was requested while the trial waited for GPU memory: it never started, and is
    handed back untouched."""


def estimate(hp: Hyper, data: Prepared, device: str) -> int:
    """Bytes the trial ``hp`` needs on the GPU when trained on ``data`` on ``device``."""
    return gpu_memory.estimate_bytes(gpu_memory.shape_of(hp, data, device))


@contextmanager
def gpu_room(
    need: int,
    *,
    device: str,
    slots_on_device: int,
    ledger_dir: Path,
    slot: int,
    should_stop: Callable[[], bool],
    on_wait: Callable[[], None],
) -> Iterator[None]:
    """Hold ``need`` bytes of the GPU's ledger for the duration of the block.

    Only on a CUDA device shared by several slots (``slots_on_device`` > 1): waits, calling
    ``on_wait`` each round, until the reservation fits beside the other live slots' ones,
    and frees it on leaving. Raises TooBig at once when ``need`` exceeds what one slot may
    ever reserve, and Withdrawn when ``should_stop()`` turns true while waiting. Elsewhere
    it admits at once and reserves nothing."""
    if not device.startswith("cuda") or slots_on_device <= 1:
        yield
        return
    # The fleet pins each slot to one GPU through CUDA_VISIBLE_DEVICES: its ledger is that
    # GPU's, shared with the other slots on it.
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0") or "0"
    ledger = gpu_memory.Ledger(ledger_dir / f"{gpu}.json", gpu_memory.gpu_capacity(slots_on_device))
    if not ledger.fits_at_all(need):
        raise TooBig(
            f"the trial needs about {need / 2**30:.2f} GiB of GPU memory and "
            f"a slot may use {ledger.capacity / 2**30:.2f} GiB; lower batch_size, "
            "hidden_size or seq_len, or run fewer slots per GPU"
        )
    owner = f"{os.getpid()}:{slot}"  # the ledger drops reservations of dead pids
    while not ledger.reserve(owner, need):
        on_wait()
        if should_stop():
            raise Withdrawn("stopping while waiting for GPU memory")
        time.sleep(WAIT_POLL_S)
    try:
        yield
    finally:
        ledger.release(owner)
