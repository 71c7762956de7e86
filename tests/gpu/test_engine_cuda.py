"""The training engine on CUDA: every precision (fp16 with its GradScaler), every optimizer
and scheduler, divergence, and checkpoints and resume snapshots, also across devices."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worker import checkpoints, datasets
from worker.engine import Hyper, Predictor, TrainConfig, train
from worker.preprocessing import prepare

pytestmark = pytest.mark.gpu

F = (0.7, 0.15, 0.15)
ROOT = Path(__file__).resolve().parents[2]
LABEL = {"fp32": "fp32", "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS = list(LABEL)


@pytest.fixture(scope="module")
def sun():  # type: ignore[no-untyped-def]
    return prepare(
        datasets.builtin("sunspots"),
        task="forecast",
        seq_len=12,
        horizon=2,
        fractions=F,
        device="cuda",
    )


def fast(**kw) -> Hyper:  # type: ignore[no-untyped-def]
    return Hyper(**{"hidden_size": 8, "max_epochs": 2, "batch_size": 64, **kw})


def on_cuda(hp: Hyper, **kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    return TrainConfig(hp=hp, device="cuda", **kw)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_trains_and_its_checkpoint_predicts_on_a_cpu(sun, precision: str) -> None:  # type: ignore[no-untyped-def]
    r = train(on_cuda(fast(precision=precision, max_epochs=3, hidden_size=16)), sun)
    assert r.reason == "max_epochs" and r.epochs == 3, r.curve
    assert r.precision == LABEL[precision]
    assert math.isfinite(r.val["val_rmse"]) and math.isfinite(r.test["test_rmse"])
    assert r.peak_gpu_mem_bytes is not None and r.peak_gpu_mem_bytes > 0
    assert r.checkpoint is not None
    state = r.checkpoint["state_dict"]
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())
    # The model file, rebuilt on a CPU in fp32, scores the test split as the GPU did.
    _, _, c, d = sun.bounds
    out = Predictor(r.checkpoint).predict(datasets.builtin("sunspots").iloc[c - 12 : d])
    rmse = float(np.sqrt(np.mean((out[: len(sun.test.x)] - sun.test.truth) ** 2)))
    assert rmse == pytest.approx(r.test["test_rmse"], rel=1e-2 if precision == "fp32" else 5e-2)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("opt", ["adam", "adamw", "rmsprop", "sgd"])
@pytest.mark.parametrize(
    "sched", ["none", "plateau", "exponential", "step", "cosine", "onecycle", "cyclic"]
)
def test_every_optimizer_and_scheduler_runs_on_cuda(
    sun, opt: str, sched: str, precision: str
) -> None:  # type: ignore[no-untyped-def]
    hp = fast(optimizer=opt, scheduler=sched, nesterov=True, precision=precision, max_epochs=3)
    r = train(on_cuda(hp, patience=None), sun)
    assert r.reason == "max_epochs" and r.epochs == 3, r.curve
    assert math.isfinite(r.val["val_rmse"]) and r.precision == LABEL[precision]
    lrs = [c["lr"] for c in r.curve]
    if sched in ("exponential", "cosine", "onecycle"):
        assert len(set(lrs)) == 3  # the schedule moved the rate each epoch
    elif sched == "cyclic":  # up for two epochs' steps, then down: 1st and 3rd epochs end alike
        assert lrs[1] > lrs[0] and lrs[2] < lrs[1]


def test_fp16_steps_that_overflow_are_skipped_not_called_divergence() -> None:
    """Targets in raw units (sunspots up to ~250): the first loss-scaled gradients overflow
    fp16, as they do in real fp16 training. The GradScaler skips those steps and lowers its
    scale; the trial must train on, not end as diverged at the first infinite norm."""
    raw = prepare(
        datasets.builtin("sunspots"),
        task="forecast",
        seq_len=12,
        horizon=2,
        fractions=F,
        scaler="none",
        device="cuda",
    )
    snaps: list[dict] = []
    r = train(
        on_cuda(fast(precision="fp16", max_epochs=3, hidden_size=16), patience=None),
        raw,
        on_snapshot=snaps.append,
        snapshot_every_s=0.0,
    )
    assert r.reason == "max_epochs", r.curve
    assert math.isfinite(r.val["val_rmse"])
    # Steps did overflow (and were skipped): the scale came down from its initial 2**16.
    assert snaps and snaps[-1]["grad_scaler"]["scale"] < 2.0**16


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_nan_loss_still_ends_the_trial_as_diverged(sun, precision: str) -> None:  # type: ignore[no-untyped-def]
    bad = copy.copy(sun)
    bad.train = copy.copy(sun.train)
    bad.train.x = sun.train.x.clone()
    bad.train.x[5, 3, 0] = float("nan")
    r = train(on_cuda(fast(max_epochs=50, precision=precision)), bad)
    assert r.reason == "diverged" and r.epochs == 1 and r.checkpoint is None


@pytest.mark.parametrize("precision", PRECISIONS)
def test_exploding_training_still_ends_as_diverged(sun, precision: str) -> None:  # type: ignore[no-untyped-def]
    hp = fast(
        max_epochs=30,
        optimizer="sgd",
        lr=10.0,
        momentum=0.99,
        clip_norm=0.0,
        hidden_size=64,
        precision=precision,
    )
    r = train(on_cuda(hp), sun)
    assert r.reason == "diverged" and r.epochs < 30


def _interrupted(cfg: TrainConfig, data, after: int) -> dict:  # type: ignore[no-untyped-def]
    """Train until a stop request at the end of epoch ``after`` (1-based); the snapshot
    taken then, through the bytes a slot stores and reads back."""
    snaps: list[dict] = []
    asked = {"n": 0}

    def stop() -> bool:
        asked["n"] += 1
        return asked["n"] == after

    r = train(cfg, data, should_stop=stop, on_snapshot=snaps.append, snapshot_every_s=1e9)
    assert r.reason == "interrupted" and r.epochs == after and len(snaps) == 1
    return checkpoints.decode_snapshot(checkpoints.encode(snaps[0]))


def _tensors(obj) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


@pytest.mark.parametrize("precision", PRECISIONS)
def test_snapshot_and_resume_on_cuda_continues_the_same_run(sun, precision: str) -> None:  # type: ignore[no-untyped-def]
    hp = fast(max_epochs=6, noise_std=0.05, scheduler="cosine", precision=precision)
    cfg = on_cuda(hp, patience=None, seed=3)
    straight = train(cfg, sun)
    state = _interrupted(cfg, sun, after=3)
    assert state["epoch"] == 2
    # Read back on the CPU whatever device wrote it (the optimizer's state was on the GPU).
    assert all(t.device.type == "cpu" for t in _tensors(state))
    resumed = train(cfg, sun, resume=state)
    assert resumed.reason == "max_epochs"
    assert [c["epoch"] for c in resumed.curve] == list(range(6))
    tol = 1e-3 if precision == "fp32" else 2e-2
    assert [c["val_rmse"] for c in resumed.curve] == pytest.approx(
        [c["val_rmse"] for c in straight.curve], rel=tol
    )
    assert resumed.test["test_rmse"] == pytest.approx(straight.test["test_rmse"], rel=tol)


def test_a_gpu_snapshot_resumes_on_a_worker_without_a_gpu(sun, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A GPU worker hands a trial back; a CPU-only worker of the same fleet claims it and
    resumes it from the stored snapshot."""
    hp = fast(max_epochs=5, noise_std=0.05, precision="fp16", optimizer="adamw")
    state = _interrupted(on_cuda(hp, patience=None, seed=3), sun, after=2)
    (tmp_path / "snap.pt").write_bytes(checkpoints.encode(state))
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "import torch\n"
        "assert not torch.cuda.is_available()\n"
        "from worker import checkpoints, datasets\n"
        "from worker.engine import Hyper, TrainConfig, train\n"
        "from worker.preprocessing import prepare\n"
        "state = checkpoints.decode_snapshot(Path(sys.argv[1]).read_bytes())\n"
        "data = prepare(datasets.builtin('sunspots'), task='forecast', seq_len=12, horizon=2,"
        " fractions=(0.7, 0.15, 0.15))\n"
        "hp = Hyper(hidden_size=8, max_epochs=5, batch_size=64, noise_std=0.05,"
        " precision='fp16', optimizer='adamw')\n"
        "r = train(TrainConfig(hp=hp, patience=None, seed=3), data, resume=state)\n"
        "print(json.dumps({'reason': r.reason, 'epochs': [c['epoch'] for c in r.curve],"
        " 'rmse': r.test['test_rmse']}))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "snap.pt")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["reason"] == "max_epochs" and out["epochs"] == list(range(5))
    assert math.isfinite(out["rmse"])


def test_a_cpu_snapshot_resumes_in_fp16_on_cuda() -> None:
    """The other way: a CPU worker's snapshot (no loss scaler there) resumed by a GPU worker
    that trains the same trial in fp16 with a GradScaler."""
    frame = datasets.builtin("sunspots")
    cpu = prepare(frame, task="forecast", seq_len=12, horizon=2, fractions=F)
    gpu = prepare(frame, task="forecast", seq_len=12, horizon=2, fractions=F, device="cuda")
    hp = fast(max_epochs=5, precision="fp16")
    state = _interrupted(TrainConfig(hp=hp, patience=None, seed=3), cpu, after=2)
    assert state["grad_scaler"] == {}  # the CPU trained in fp32: nothing was scaled
    r = train(on_cuda(hp, patience=None, seed=3), gpu, resume=state)
    assert r.reason == "max_epochs" and [c["epoch"] for c in r.curve] == list(range(5))
    assert r.precision == "float16" and math.isfinite(r.test["test_rmse"])
