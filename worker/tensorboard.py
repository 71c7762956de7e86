"""TensorBoard event files of a slot's trials, when ``Settings.tensorboard_dir`` is set.

One directory per attempt of a trial, ``<dir>/<study>/trial-<number>-a<attempt>``, with one
scalar per field of each epoch's record. Optional: without the ``tensorboard`` package the
slot trains as usual and says once per trial why nothing is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

# The slot's logger: the warning belongs to the slot's log.
log = logging.getLogger("seqtune.worker")


def writer(root: Path | None, *, study: str, number: int, attempt: int) -> Any:
    """A TensorBoard ``SummaryWriter`` for this attempt of trial ``number`` of ``study``, or
    None when ``root`` is None or the tensorboard package is missing (logged). The caller
    closes it."""
    if root is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(
            "SEQTUNE_TENSORBOARD_DIR is set but the tensorboard package is missing: "
            "pip install 'seqtune[tensorboard]'"
        )
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in study)
    return SummaryWriter(log_dir=str(root / safe / f"trial-{number:05d}-a{attempt}"))


def add_record(tb: Any, step: int, record: dict[str, float]) -> None:
    """Write one epoch's ``record`` at ``step``: each numeric field but ``epoch`` (the step
    itself), then flush, so that a live TensorBoard shows the epoch at once."""
    for k, v in record.items():
        if k != "epoch" and isinstance(v, int | float):
            tb.add_scalar(k, v, step)
    tb.flush()
