"""The checkpoint codec: the bytes a worker stores for a trial, and how it reads them back.

Two kinds, both ``torch.save`` bytes in the trial's checkpoint rows:

- ``resume`` snapshots: the training state that ``objective.fit`` hands to ``on_snapshot``
  (weights, optimizer and RNG state, the curve so far, the folds done). Only workers read
  them, to resume an interrupted attempt after its last snapshot epoch.
- ``best`` models: ``engine.make_checkpoint``'s plain data (tensors, dicts, lists), stored
  with the trial's result by ``leases.finish(model=...)`` and downloaded by users, who load
  them with ``weights_only=True`` (``engine.Predictor.load``). A study with ``init_from``
  starts its trials from one (``decode_model``: a trial's, or a model a user uploaded).

Every write goes through the lease (``service.store.leases``): a stale attempt's snapshot is
refused with ``Fenced``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

from service.store import leases
from service.store.db import Database

RESUME = "resume"


@dataclass(frozen=True)
class Snapshot:
    """A resume snapshot read back: the last epoch it covers and the training state."""

    epoch: int
    state: dict[str, Any] = field(repr=False)


def encode(obj: dict[str, Any]) -> bytes:
    """The bytes stored for a snapshot's state or a model checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def decode_snapshot(data: bytes) -> dict[str, Any]:
    """A snapshot's training state from its stored bytes. Not ``weights_only``: the state
    holds more than tensors (RNG states, numpy values), and only workers wrote it. On the
    CPU: a GPU worker's snapshot holds CUDA tensors (the optimizer's state), and the worker
    that resumes it may have no GPU; ``train`` moves the state to its own device."""
    state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    return state


def decode_model(data: bytes) -> dict[str, Any]:
    """A ``best`` model's checkpoint from its bytes (a trial's, or an uploaded model's).
    ``weights_only``: the bytes may come from a user's upload, so only plain data loads."""
    ckpt: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return ckpt


def save_snapshot(db: Database, c: leases.Claim, state: dict[str, Any]) -> None:
    """Store ``state`` (with its ``epoch``) as the trial's resume snapshot, replacing the
    previous one. Raises Fenced when this attempt no longer holds the lease."""
    leases.save_checkpoint(db, claim=c, kind=RESUME, epoch=state["epoch"], data=encode(state))


def load_resume(db: Database, *, trial_row_id: int) -> Snapshot | None:
    """The trial's resume snapshot, or None when no attempt stored one."""
    found = leases.load_checkpoint(db, trial_row_id=trial_row_id, kind=RESUME)
    if found is None:
        return None
    epoch, data = found
    return Snapshot(epoch=epoch, state=decode_snapshot(data))
