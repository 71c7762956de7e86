"""The pieces of a trial, pure functions of its study's spec.

Resolve the hyperparameters (searched + fixed), prepare the data, train under the study's
validation scheme (``fit``), read the objective values, compute the study's classical
baselines. ``worker.runner`` assembles them into one trial run, the slot's and
``run_optuna``'s (an Optuna trial, for tests and notebooks) alike.

``fit`` holds the validation scheme: one hold-out split, or walk-forward folds trained one
after another, each with its own scaler, reported to the pruner as one continuous run of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from seqtune.spec import Categorical, IntRange, StudySpec
from worker import baselines
from worker.engine import Hyper, InitModel, TrainConfig, TrialResult, train
from worker.preprocessing import Prepared, fill_missing, prepare, split_bounds

OnEpoch = Callable[[int, dict[str, float]], bool]


def monitor_of(spec: StudySpec) -> tuple[str, str]:
    """The validation metric that early stopping and pruning watch, and its direction:
    the first objective when it is a validation metric, else the validation loss."""
    first = spec.objectives[0]
    if first.metric.startswith("val_"):
        return first.metric, spec.directions[0]
    return "val_loss", "minimize"


def resolve(spec: StudySpec, params: dict[str, Any]) -> Hyper:
    """The trial's full hyperparameters: fixed values and defaults, then the sampled ones."""
    return Hyper.from_params({**spec.fixed_config(), **params})


def prepare_for(
    spec: StudySpec, hp: Hyper, frame: pd.DataFrame, device: str, fold: int | None = None
) -> Prepared:
    """The trial's data: the hold-out split, or walk-forward fold ``fold`` (0-based)."""
    return prepare(
        frame,
        task=spec.task,
        seq_len=hp.seq_len,
        horizon=spec.horizon,
        fractions=(spec.splits.train, spec.splits.val, spec.splits.test),
        scaler=hp.scaler,
        target=spec.target,
        features=spec.features,
        missing=spec.missing,
        device=device,
        target_transform=hp.target_transform if spec.task == "forecast" else "none",
        fold=None if fold is None else (fold, spec.n_folds),
        gap=spec.validation.gap if fold is not None else 0,
    )


def fit(
    spec: StudySpec,
    hp: Hyper,
    frame: pd.DataFrame,
    cfg: TrainConfig,
    *,
    on_epoch: OnEpoch | None = None,
    resume: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[], None] | None = None,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
    snapshot_every_s: float = 30.0,
    init: InitModel | None = None,
) -> TrialResult:
    """Train one trial under the study's validation scheme (arguments as ``engine.train``;
    with ``init``, every fold starts from that pretrained model).

    Walk-forward: fold k trains on everything before its validation block (less the gap) and
    validates on the block. ``on_epoch`` sees step ``k * max_epochs + epoch`` and records with
    ``fold`` and ``fold_epoch``, so a pruner compares trials fold by fold and a poor trial stops
    in its first fold. The objective is the mean of the folds' best-epoch validation metrics;
    the test metrics and the model are the last fold's (trained on the most data).

    A stop (``should_stop``) between two folds, i.e. in an epoch that ended its fold by early
    stopping, is honoured at that boundary: a snapshot whose next fold starts afresh
    (``state`` None, ``epoch`` the boundary's last step), then reason ``interrupted``, rather
    than one more epoch of the next fold first."""
    if spec.n_folds == 1:
        data = prepare_for(spec, hp, frame, cfg.device)
        return train(
            cfg,
            data,
            on_epoch,
            resume=resume,
            should_stop=should_stop,
            on_step=on_step,
            on_snapshot=on_snapshot,
            snapshot_every_s=snapshot_every_s,
            init=init,
        )

    folds: list[dict[str, Any]] = list(resume["folds_done"]) if resume else []
    inner = resume["state"] if resume else None
    curve: list[dict[str, Any]] = list(resume["curve"]) if resume else []
    results: list[TrialResult] = []
    for k in range(len(folds), spec.n_folds):
        data = prepare_for(spec, hp, frame, cfg.device, fold=k)
        base = k * hp.max_epochs

        def step(epoch: int, record: dict[str, float], k: int = k, base: int = base) -> bool:
            rec = {**record, "epoch": base + epoch, "fold": k, "fold_epoch": epoch}
            curve.append(rec)
            return on_epoch is not None and on_epoch(base + epoch, rec)

        def snapshot(state: dict[str, Any], k: int = k, base: int = base) -> None:
            if on_snapshot is not None:
                on_snapshot(
                    {
                        "epoch": base + state["epoch"],
                        "fold": k,
                        "folds_done": folds,
                        "curve": curve,
                        "state": state,
                    }
                )

        r = train(
            cfg,
            data,
            step,
            resume=inner,
            should_stop=should_stop,
            on_step=on_step,
            on_snapshot=snapshot,
            snapshot_every_s=snapshot_every_s,
            init=init,
        )
        inner = None
        results.append(r)
        folds.append(
            {
                "fold": k,
                "reason": r.reason,
                "epochs": r.epochs,
                "val": r.val,
                "train_seconds": r.train_seconds,
                "n_train": int(len(data.train.x)),
                "val_origins": [int(data.val.origins[0]), int(data.val.origins[-1])],
            }
        )
        if r.reason not in ("early_stopped", "max_epochs"):
            break
        if k + 1 < spec.n_folds and should_stop is not None and should_stop():
            boundary = (k + 1) * hp.max_epochs - 1  # the claim keeps every record up to here
            if on_snapshot is not None:
                on_snapshot(
                    {
                        "epoch": boundary,
                        "fold": k + 1,
                        "folds_done": folds,
                        "curve": curve,
                        "state": None,
                    }
                )
            return replace(
                r,
                reason="interrupted",
                curve=curve,
                epochs=len(curve),
                folds=folds,
                checkpoint=None,
            )
    last = results[-1]
    complete = [f for f in folds if f["val"]]
    val = {
        key: float(np.mean([f["val"][key] for f in complete]))
        for key in (complete[-1]["val"] if complete else {})
    }
    if complete:
        val["val_n_targets"] = float(sum(f["val"]["val_n_targets"] for f in complete))
    return replace(
        last,
        val=val,
        curve=curve,
        epochs=len(curve),
        folds=folds,
        best_epoch=None
        if last.best_epoch is None
        else (len(folds) - 1) * hp.max_epochs + last.best_epoch,
        train_seconds=sum(f["train_seconds"] for f in folds),
        wall_seconds=sum(r.wall_seconds for r in results),
    )


def study_baselines(spec: StudySpec, frame: pd.DataFrame) -> dict[str, Any]:
    """The study's classical baselines (``worker.baselines``), scored on the targets its
    trials are scored on: the same columns, missing-value handling, splits and horizon.
    Classification windows take the study's fixed ``seq_len``, or the searched range's
    geometric middle (the baselines are computed once, not per trial)."""
    fractions = (spec.splits.train, spec.splits.val, spec.splits.test)
    if spec.task == "forecast":
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        targets = spec.target or numeric[:1]
        filled = fill_missing(frame, spec.missing, targets, fractions)
        values = filled[targets].to_numpy(dtype=np.float64)
        return baselines.forecast_baselines(
            values, split_bounds(len(values), fractions), spec.horizon, season=spec.season
        )
    dist = spec.search_space.get("seq_len")
    seq_len = int(spec.fixed_config().get("seq_len", 24))  # type: ignore[arg-type]
    if isinstance(dist, IntRange):
        seq_len = int(round(math.sqrt(max(dist.low, 1) * dist.high)))
    elif isinstance(dist, Categorical):
        seq_len = int(dist.choices[0])  # type: ignore[arg-type]
    data = prepare(
        frame,
        task="classify",
        seq_len=seq_len,
        horizon=1,
        fractions=fractions,
        target=spec.target,
        features=spec.features,
        missing=spec.missing,
    )
    assert data.test is not None
    parts = [
        (s.x.numpy().astype(np.float64), s.y.numpy()) for s in (data.train, data.val, data.test)
    ]
    out = baselines.classify_baselines(parts[0], parts[1], parts[2], len(data.classes))
    return {**out, "seq_len": seq_len}


def objective_values(spec: StudySpec, result: TrialResult) -> list[float]:
    """The trial's value of each of the study's objectives, in the spec's order."""
    return [result.metric(o.metric) for o in spec.objectives]
