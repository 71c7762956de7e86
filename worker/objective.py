"""From a study spec and an Optuna trial to a trained, reported trial.

This is the objective every worker slot runs: resolve the hyperparameters (searched + fixed),
prepare the data, train with per-epoch reporting to Optuna's pruner, and return the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
import pandas as pd

from service.spec import StudySpec
from worker.engine import Hyper, TrainConfig, TrialResult, train
from worker.preprocessing import Prepared, prepare


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


def prepare_for(spec: StudySpec, hp: Hyper, frame: pd.DataFrame, device: str) -> Prepared:
    return prepare(frame, task=spec.task, seq_len=hp.seq_len, horizon=spec.horizon,
                   fractions=(spec.splits.train, spec.splits.val, spec.splits.test),
                   scaler=hp.scaler, target=spec.target, features=spec.features,
                   missing=spec.missing, device=device)


def run(spec: StudySpec, trial: optuna.Trial, frame: pd.DataFrame, *, device: str = "cpu",
        seed: int | None = None,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> TrialResult:
    """Train the trial's hyperparameters on ``frame``; report each epoch's monitored metric to
    Optuna (single objective) and stop when its pruner says so."""
    hp = resolve(spec, trial.params)
    data = prepare_for(spec, hp, frame, device)
    monitor, direction = monitor_of(spec)
    single = len(spec.objectives) == 1

    def report(epoch: int, record: dict[str, float]) -> bool:
        if on_epoch is not None:
            on_epoch(epoch, record)
        if not single:  # Optuna prunes single-objective studies only
            return False
        trial.report(record[monitor], epoch)
        return trial.should_prune()

    cfg = TrainConfig(hp=hp, monitor=monitor, direction=direction,
                      patience=spec.early_stopping.patience,
                      min_delta=spec.early_stopping.min_delta,
                      seed=trial.number if seed is None else seed, device=device,
                      timeout_s=spec.budget.trial_timeout_s)
    return train(cfg, data, on_epoch=report)


def objective_values(spec: StudySpec, result: TrialResult) -> list[float]:
    return [result.metric(o.metric) for o in spec.objectives]
