"""The training engine: every option runs, determinism, early stopping, divergence, pruning,
checkpoints, and a small search on sunspots that beats the persistence forecast."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from seqtune.spec import SyntheticData, parse_spec
from service.store.optuna import distributions, make_pruner
from worker import datasets
from worker.engine import Hyper, Predictor, TrainConfig, train
from worker.objective import objective_values
from worker.preprocessing import prepare
from worker.runner import run_optuna

F = (0.7, 0.15, 0.15)


@pytest.fixture(scope="module")
def sun():  # type: ignore[no-untyped-def]
    return prepare(
        datasets.builtin("sunspots"), task="forecast", seq_len=12, horizon=2, fractions=F
    )


@pytest.fixture(scope="module")
def waves():  # type: ignore[no-untyped-def]
    frame = datasets.generate(
        SyntheticData(
            kind="synthetic", generator="waveforms", n_points=1500, options={"segment": 40}
        )
    )
    return prepare(frame, task="classify", seq_len=16, horizon=1, fractions=F)


def fast(**kw) -> Hyper:  # type: ignore[no-untyped-def]
    return Hyper(**{"hidden_size": 8, "max_epochs": 2, "batch_size": 64, **kw})


@pytest.mark.parametrize("opt", ["adam", "adamw", "rmsprop", "sgd"])
@pytest.mark.parametrize(
    "sched", ["none", "plateau", "exponential", "step", "cosine", "onecycle", "cyclic"]
)
def test_every_optimizer_and_scheduler_runs(sun, opt: str, sched: str) -> None:  # type: ignore[no-untyped-def]
    r = train(TrainConfig(hp=fast(optimizer=opt, scheduler=sched, nesterov=True)), sun)
    assert r.reason == "max_epochs" and r.epochs == 2 and math.isfinite(r.val["val_rmse"])
    assert len({c["lr"] for c in r.curve}) >= 1


@pytest.mark.parametrize(
    "kw",
    [
        {"loss": "mae"},
        {"loss": "huber"},
        {"init": "xavier"},
        {"init": "orthogonal"},
        {"num_layers": 2, "dropout": 0.2},
        {"bidirectional": True, "head_dropout": 0.3},
        {"clip_norm": 0.0, "clip_value": 0.5},
        {"noise_std": 0.1},
        {"curriculum": True},
        {"scaler": "minmax"},
        {"precision": "bf16"},
    ],
)
def test_model_and_training_options_run(sun, kw: dict) -> None:  # type: ignore[no-untyped-def]
    r = train(TrainConfig(hp=fast(**kw)), sun)
    assert r.reason == "max_epochs" and math.isfinite(r.test["test_rmse"])
    assert r.precision == "fp32"  # CPU trains in fp32 whatever was asked


def test_classification_metrics(waves) -> None:  # type: ignore[no-untyped-def]
    r = train(
        TrainConfig(
            hp=fast(max_epochs=15, hidden_size=24, lr=0.01),
            monitor="val_accuracy",
            direction="maximize",
            patience=None,
        ),
        waves,
    )
    assert set(r.val) >= {"val_loss", "val_accuracy", "val_f1", "val_cross_entropy"}
    assert 0 <= r.test["test_f1"] <= 1
    assert r.val["val_accuracy"] > 0.5  # 4 classes: chance is 0.25


def test_same_seed_same_metrics_on_cpu(sun) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(hp=fast(max_epochs=4, dropout=0.0, noise_std=0.05), seed=7)
    a, b = train(cfg, sun), train(cfg, sun)
    assert [c["val_rmse"] for c in a.curve] == [c["val_rmse"] for c in b.curve]
    assert a.test == b.test
    c = train(dataclasses.replace(cfg, seed=8), sun)
    assert [x["val_rmse"] for x in c.curve] != [x["val_rmse"] for x in a.curve]


def test_early_stopping_restores_the_best_epoch(sun) -> None:  # type: ignore[no-untyped-def]
    # A high, constant learning rate makes validation worsen after an early best.
    r = train(
        TrainConfig(
            hp=fast(max_epochs=200, lr=0.05, hidden_size=32), monitor="val_rmse", patience=5, seed=1
        ),
        sun,
    )
    assert r.reason == "early_stopped"
    best = min(range(len(r.curve)), key=lambda i: r.curve[i]["val_rmse"])
    assert r.best_epoch == best and r.epochs == best + 1 + 5
    assert r.val["val_rmse"] == r.curve[best]["val_rmse"]
    # The checkpoint holds the best epoch's weights: its validation predictions reproduce it.
    pred = Predictor(r.checkpoint)  # type: ignore[arg-type]
    a, b, c, _ = sun.bounds
    frame = datasets.builtin("sunspots")
    out = pred.predict(frame.iloc[b - 12 : c])  # validation windows reach back into training
    n = len(sun.val.x)
    truth = sun.val.truth
    rmse = float(np.sqrt(np.mean((out[:n] - truth) ** 2)))
    assert rmse == pytest.approx(r.val["val_rmse"], rel=1e-4)


def test_nan_loss_ends_the_trial_as_diverged_at_once(sun) -> None:  # type: ignore[no-untyped-def]
    import copy

    bad = copy.copy(sun)
    bad.train = copy.copy(sun.train)
    bad.train.x = sun.train.x.clone()
    bad.train.x[5, 3, 0] = float("nan")
    r = train(TrainConfig(hp=fast(max_epochs=50)), bad)
    assert r.reason == "diverged" and r.epochs == 1 and r.checkpoint is None


def test_exploding_gradients_end_as_diverged(sun) -> None:  # type: ignore[no-untyped-def]
    r = train(
        TrainConfig(
            hp=fast(
                max_epochs=30,
                optimizer="sgd",
                lr=10.0,
                momentum=0.99,
                clip_norm=0.0,
                hidden_size=64,
            )
        ),
        sun,
    )
    assert r.reason == "diverged" and r.epochs < 30


def test_pruning_callback_stops_the_trial(sun) -> None:  # type: ignore[no-untyped-def]
    seen = []
    r = train(
        TrainConfig(hp=fast(max_epochs=20)), sun, on_epoch=lambda e, rec: seen.append(e) or e == 2
    )
    assert r.reason == "pruned" and r.epochs == 3 and seen == [0, 1, 2]


def test_timeout_ends_the_trial(sun) -> None:  # type: ignore[no-untyped-def]
    r = train(TrainConfig(hp=fast(max_epochs=10_000), timeout_s=0.3, patience=None), sun)
    assert r.reason == "timeout" and r.epochs < 10_000 and r.checkpoint is not None


def test_checkpoint_round_trip_predicts_the_same(sun, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = train(TrainConfig(hp=fast(max_epochs=3)), sun)
    path = tmp_path / "model.pt"
    torch.save(r.checkpoint, path)
    frame = datasets.builtin("sunspots").iloc[-40:]
    a = Predictor(r.checkpoint).predict(frame)  # type: ignore[arg-type]
    b = Predictor.load(str(path)).predict(frame)
    assert a.shape == (40 - 12 + 1, 2, 1) and np.array_equal(a, b)
    # Test RMSE recomputed from the checkpoint on raw data equals the engine's.
    _, _, c, d = sun.bounds
    out = Predictor.load(str(path)).predict(datasets.builtin("sunspots").iloc[c - 12 : d])
    out = out[: len(sun.test.x)]
    assert float(np.sqrt(np.mean((out - sun.test.truth) ** 2))) == pytest.approx(
        r.test["test_rmse"], rel=1e-4
    )
    assert r.test["test_n_targets"] == d - c - 2 + 1  # every test origin, fixed by the study


@pytest.mark.parametrize("transform", ["none", "diff", "window_norm", "residual"])
def test_each_target_transform_round_trips_through_predict(transform: str, tmp_path: Path) -> None:
    co2 = datasets.builtin("co2").interpolate()
    data = prepare(
        co2, task="forecast", seq_len=16, horizon=3, fractions=F, target_transform=transform
    )
    r = train(TrainConfig(hp=fast(max_epochs=2, target_transform=transform)), data)
    path = tmp_path / "m.pt"
    torch.save(r.checkpoint, path)
    _, _, c, d = data.bounds
    out = Predictor.load(str(path)).predict(co2.iloc[c - 16 : d])[: data.test.n_targets]
    assert data.test is not None and data.test.truth is not None
    rmse = float(np.sqrt(np.mean((out - data.test.truth) ** 2)))
    assert rmse == pytest.approx(r.test["test_rmse"], rel=1e-4)
    assert r.checkpoint["target_transform"]["kind"] == transform  # type: ignore[index]


def test_walk_forward_reports_fold_by_fold_and_averages_the_folds() -> None:
    spec = parse_spec(
        {
            "name": "wf",
            "dataset": {"kind": "builtin", "name": "sunspots"},
            "search_space": {},
            "fixed": {"max_epochs": 4, "hidden_size": 8, "seq_len": 8},
            "early_stopping": {"patience": None},
            "validation": {"scheme": "walk_forward", "folds": 3, "gap": 2},
            "pruner": {"name": "none"},
        }
    )
    steps: list[tuple[int, int]] = []
    study = optuna.create_study()
    r = run_optuna(
        spec,
        study.ask(),
        datasets.builtin("sunspots"),
        on_epoch=lambda e, rec: steps.append((e, int(rec["fold"]))),
    )
    assert steps == [(k * 4 + e, k) for k in range(3) for e in range(4)]
    assert r.folds is not None and [f["fold"] for f in r.folds] == [0, 1, 2]
    mean = np.mean([f["val"]["val_rmse"] for f in r.folds])
    assert r.val["val_rmse"] == pytest.approx(mean)
    assert r.test["test_rmse"] > 0 and r.checkpoint is not None
    # A pruner sees the steps: a poor trial stops inside its first fold.
    pruned = parse_spec(
        {**spec.model_dump(), "pruner": {"name": "threshold", "options": {"upper": 1.0}}}
    )
    study = optuna.create_study(pruner=make_pruner(pruned.pruner))
    r = run_optuna(pruned, study.ask(), datasets.builtin("sunspots"))
    assert r.reason == "pruned" and r.folds is not None and len(r.folds) == 1


def test_optuna_pruner_prunes_through_the_objective() -> None:
    spec = parse_spec(
        {
            "name": "p",
            "dataset": {"kind": "builtin", "name": "sunspots"},
            "objectives": [{"metric": "val_rmse"}],
            "fixed": {"max_epochs": 30, "hidden_size": 8, "seq_len": 8},
            "pruner": {"name": "threshold", "options": {"upper": 1.0}},
        }
    )
    study = optuna.create_study(pruner=make_pruner(spec.pruner))
    trial = study.ask()
    r = run_optuna(spec, trial, datasets.builtin("sunspots"))
    assert r.reason == "pruned" and r.epochs == 1  # val RMSE (~30 sunspots) is over 1.0


def test_small_search_on_sunspots_beats_persistence() -> None:
    spec = parse_spec(
        {
            "name": "sun",
            "dataset": {"kind": "builtin", "name": "sunspots"},
            "objectives": [{"metric": "val_rmse"}],
            "search_space": {
                "hidden_size": {"type": "int", "low": 16, "high": 64, "log": True},
                "lr": {"type": "float", "low": 0.002, "high": 0.03, "log": True},
                "seq_len": {"type": "int", "low": 8, "high": 20, "step": 4},
            },
            "fixed": {"max_epochs": 60, "batch_size": 32},
            "early_stopping": {"patience": 8},
            "sampler": {"name": "tpe", "seed": 0},
            "pruner": {"name": "none"},
        }
    )
    frame = datasets.builtin("sunspots")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    results = {}
    for _ in range(6):
        trial = study.ask(distributions(spec))
        r = run_optuna(spec, trial, frame)
        study.tell(trial, objective_values(spec, r)[0])
        results[trial.number] = r
    best = results[study.best_trial.number]
    assert best.test["test_rmse"] < best.test["test_persistence_rmse"], best.test


def test_stop_snapshot_resume_equals_one_uninterrupted_run(sun) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(
        hp=fast(max_epochs=6, noise_std=0.05, scheduler="cosine"), patience=None, seed=3
    )
    straight = train(cfg, sun)
    snaps: list[dict] = []
    stop_after = {"epochs": 0}

    def stop() -> bool:
        stop_after["epochs"] += 1
        return stop_after["epochs"] == 3  # asked at the end of the third epoch

    first = train(cfg, sun, should_stop=stop, on_snapshot=snaps.append, snapshot_every_s=1e9)
    assert first.reason == "interrupted" and first.epochs == 3 and first.checkpoint is None
    assert len(snaps) == 1 and snaps[0]["epoch"] == 2
    resumed = train(cfg, sun, resume=snaps[0])
    assert [c["epoch"] for c in resumed.curve] == list(range(6))
    assert [c["val_rmse"] for c in resumed.curve] == [c["val_rmse"] for c in straight.curve]
    assert resumed.test == straight.test and resumed.reason == "max_epochs"


def test_classifier_checkpoint_loads_as_plain_data(waves, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A downloaded model is loaded with weights_only=True: it must hold data only."""
    r = train(TrainConfig(hp=fast(), monitor="val_accuracy", direction="maximize", seed=0), waves)
    path = tmp_path / "clf.pt"
    torch.save(r.checkpoint, path)
    frame = datasets.generate(
        SyntheticData(
            kind="synthetic", generator="waveforms", n_points=200, seed=5, options={"segment": 40}
        )
    )
    labels = Predictor.load(str(path)).predict(frame)
    assert len(labels) == 200 - 16 + 1
    assert set(labels.tolist()) <= set(r.checkpoint["classes"])  # type: ignore[index]
