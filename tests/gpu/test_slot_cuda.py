"""A worker slot on the GPU, on the embedded SQLite store: a real CUDA out-of-memory ends the
trial as ``oom`` and the slot goes on with its memory given back; the per-GPU ledger refuses a
trial that cannot fit and makes one wait while another slot's reservation leaves no room."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from service.settings import Settings
from tests.gpu.slots import create_study, run_slot, trials_of
from worker import admission, gpu_memory

pytestmark = pytest.mark.gpu

# Far past the card: the LSTM's saved activations alone are about 100 GiB in fp32 (B 256 x
# L 1024 x 4 layers x 6 x H 4096 x 4 bytes), and its weights take 1.9 GB before the first step.
HUGE = {
    "dataset": {"kind": "synthetic", "generator": "mackey_glass", "n_points": 4000},
    "objectives": [{"metric": "val_rmse"}],
    "search_space": {},
    "fixed": {
        "hidden_size": 4096,
        "num_layers": 4,
        "seq_len": 1024,
        "batch_size": 256,
        "precision": "fp32",
        "max_epochs": 1,
    },
    "pruner": {"name": "none"},
    "budget": {"n_trials": 1},
}
SMALL = {
    "dataset": {"kind": "builtin", "name": "sunspots"},
    "objectives": [{"metric": "val_rmse"}],
    "search_space": {},
    "fixed": {"hidden_size": 16, "seq_len": 8, "max_epochs": 3},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 1},
}


def _free_cache() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


def test_a_real_cuda_oom_fails_the_trial_and_the_slot_goes_on(
    sqlite_settings: Settings,
) -> None:
    create_study(sqlite_settings, "oom", HUGE)  # created first: claimed first
    create_study(sqlite_settings, "after", SMALL)
    reserved = _free_cache()
    # One slot on the GPU (slots_on_device=1) is admitted at once, as `seqtune worker` runs
    # a lone slot: the allocation itself fails.
    assert run_slot(sqlite_settings) == 2
    (t,) = trials_of(sqlite_settings, "oom")
    assert t.state == "FAIL" and t.reason == "oom", (t.state, t.reason, t.error)
    assert "out of memory" in (t.error or "").lower()
    (u,) = trials_of(sqlite_settings, "after")
    assert u.state == "COMPLETE", (u.state, u.reason, u.error)
    assert t.finished_at is not None and u.started_at is not None
    assert t.finished_at <= u.started_at  # the slot went on after the OOM
    assert u.info["device"] == "cuda" and u.info["peak_gpu_mem_bytes"] > 0
    # The failed trial's 1.9 GB of weights went back to the device, not into this process's
    # allocator cache, where the other slots on the GPU could not have them.
    assert torch.cuda.memory_reserved() - reserved < 2**30


def test_the_ledger_refuses_a_trial_that_can_never_fit(sqlite_settings: Settings) -> None:
    create_study(sqlite_settings, "huge", HUGE)
    create_study(sqlite_settings, "fits", SMALL)
    assert run_slot(sqlite_settings, slots_on_device=2) == 2  # one of two slots on this GPU
    (t,) = trials_of(sqlite_settings, "huge")
    assert t.state == "FAIL" and t.reason == "too_big", (t.state, t.reason, t.error)
    assert "GiB of GPU memory" in (t.error or "")
    (u,) = trials_of(sqlite_settings, "fits")
    assert u.state == "COMPLETE", (u.state, u.reason, u.error)
    est, peak = u.info["gpu_mem_estimate_bytes"], u.info["peak_gpu_mem_bytes"]
    assert peak > 0 and abs(est / peak - 1) <= 0.25, (est, peak)


def _room(need: int, tmp: Path, stop: Any, waits: list[int]) -> Any:
    return admission.gpu_room(
        need,
        device="cuda",
        slots_on_device=2,
        ledger_dir=tmp,
        slot=0,
        should_stop=stop,
        on_wait=lambda: waits.append(1),
    )


def test_a_trial_waits_while_another_slots_reservation_leaves_no_room(tmp_path: Path) -> None:
    cap = gpu_memory.gpu_capacity(2)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    assert 0.8 * total - 2 * gpu_memory.CONTEXT_BYTES < cap < total
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0") or "0"
    ledger = gpu_memory.Ledger(tmp_path / f"{gpu}.json", cap)
    other = f"{os.getpid()}:1"  # the other slot on this GPU (a live process)
    assert ledger.reserve(other, int(0.6 * cap))
    waits: list[int] = []
    with (
        pytest.raises(admission.Withdrawn),
        _room(int(0.5 * cap), tmp_path, lambda: len(waits) >= 3, waits),
    ):
        pytest.fail("admitted beside a reservation it does not fit with")
    assert len(waits) == 3 and ledger.reserved() == int(0.6 * cap)
    ledger.release(other)
    with _room(int(0.5 * cap), tmp_path, lambda: False, waits):
        assert ledger.reserved() == int(0.5 * cap)
    assert ledger.reserved() == 0
    with pytest.raises(admission.TooBig), _room(cap + 1, tmp_path, lambda: False, waits):
        pytest.fail("admitted a trial larger than a slot's share")
