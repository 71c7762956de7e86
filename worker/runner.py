"""The trial runner: a study spec, a trial's parameters and its data in, an ``Outcome`` out.

- ``train_config``: the one assembly of the engine's config from a spec (monitored metric,
  early stopping, seed, device, time limit).
- ``run``: resolves the hyperparameters, trains under the study's validation scheme
  (``worker.objective.fit``) and classifies the result.
- ``Hooks``: what a caller plugs in. The slot reports each epoch under its lease, asks the
  study's pruner, snapshots, and stops on a signal; ``run_optuna`` (tests, notebooks)
  reports to a plain Optuna trial. Both go through ``run``.
- ``classify``: the one place that decides how an attempt ended, from its result or from
  what it raised: finished (COMPLETE, PRUNED or FAIL with a reason), handed back for another
  attempt, or abandoned because another attempt holds the lease.

No database, no signals, no Optuna here: those come in through the hooks (``run_optuna``
takes an Optuna trial but only calls its methods). Importing this module loads neither
SQLAlchemy, Optuna nor ``service``: ``Fenced`` is seqtune's vocabulary (``seqtune.errors``).
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from seqtune.errors import Fenced
from seqtune.spec import StudySpec
from seqtune.states import TrialState
from worker.admission import TooBig, Withdrawn
from worker.engine import Hyper, InitModel, TrainConfig, TrialResult
from worker.objective import fit, monitor_of, objective_values, resolve
from worker.preprocessing import DataError

if TYPE_CHECKING:  # only for the annotation: run_optuna calls the trial's methods
    import optuna

# reason of a trial a pruner stopped, or one stopped for diverging (recorded PRUNED, not FAIL:
# a configuration the search should steer away from, not a broken one)
PRUNED_REASONS = frozenset({"pruned", "diverged"})


class Action(StrEnum):
    """What the caller does with an attempt once it has ended."""

    FINISH = "finish"  # record the trial's end (``Outcome.state``): no attempt follows
    HAND_BACK = "hand_back"  # release the lease: another attempt resumes the trial
    ABANDON = "abandon"  # the lease is another attempt's: write nothing


@dataclass(frozen=True)
class Outcome:
    """How one attempt of a trial ended, as ``classify`` decided it.

    ``state`` and ``reason`` are what to record when ``action`` is FINISH; ``values`` the
    objective values of a COMPLETE trial; ``error`` what went wrong (FAIL) or why the lease
    was lost (ABANDON); ``result`` the training's result when training ran to an end."""

    action: Action
    state: TrialState | None = None
    reason: str | None = None
    values: tuple[float, ...] | None = None
    error: str | None = None
    result: TrialResult | None = field(default=None, repr=False)
    # COMPLETE and PRUNED trials of a study with constraints: each constraint's violation
    # (<= 0: met; ``constraint_violations``).
    constraints: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Hooks:
    """Callbacks ``run`` calls while it trains; each is optional.

    ``report(step, record, value)`` runs after each epoch's validation; ``value`` is the
    monitored metric for a single-objective study, None otherwise (Optuna prunes
    single-objective studies only). It may raise (``Fenced``) to abandon the attempt.
    ``should_prune()`` is asked after each report of a single-objective study; leave it None
    for a trial that must run to its end. ``should_stop``, ``on_step``, ``on_snapshot`` and
    ``snapshot_every_s`` are ``engine.train``'s."""

    report: Callable[[int, dict[str, float], float | None], None] | None = None
    should_prune: Callable[[], bool] | None = None
    should_stop: Callable[[], bool] | None = None
    on_step: Callable[[], None] | None = None
    on_snapshot: Callable[[dict[str, Any]], None] | None = None
    snapshot_every_s: float = 30.0


def train_config(spec: StudySpec, hp: Hyper, *, seed: int, device: str) -> TrainConfig:
    """The engine's config for a trial of ``spec`` with hyperparameters ``hp``."""
    monitor, direction = monitor_of(spec)
    return TrainConfig(
        hp=hp,
        monitor=monitor,
        direction=direction,
        patience=spec.early_stopping.patience,
        min_delta=spec.early_stopping.min_delta,
        seed=seed,
        device=device,
        timeout_s=spec.budget.trial_timeout_s,
    )


def run(
    spec: StudySpec,
    params: dict[str, Any],
    frame: pd.DataFrame,
    *,
    seed: int,
    device: str = "cpu",
    hooks: Hooks | None = None,
    resume: dict[str, Any] | None = None,
    init: InitModel | None = None,
) -> Outcome:
    """Train the trial ``params`` (the sampled hyperparameters) of ``spec`` on ``frame``,
    from the snapshot ``resume`` when given, starting from the pretrained model ``init``
    (the study's ``init_from``, loaded by the caller) when given, and classify how it ended.

    Raises what training and the hooks raise (a data error, CUDA out of memory, ``Fenced``
    from a report): ``classify(spec, exc)`` is their outcome, decided by the caller, which
    knows what else could fail around the run (loading the data, GPU admission)."""
    h = hooks or Hooks()
    hp = resolve(spec, params)
    cfg = train_config(spec, hp, seed=seed, device=device)
    single = len(spec.objectives) == 1

    def on_epoch(step: int, record: dict[str, float]) -> bool:
        if h.report is not None:
            h.report(step, record, record[cfg.monitor] if single else None)
        return single and h.should_prune is not None and h.should_prune()

    result = fit(
        spec,
        hp,
        frame,
        cfg,
        on_epoch=on_epoch,
        resume=resume,
        should_stop=h.should_stop,
        on_step=h.on_step,
        on_snapshot=h.on_snapshot,
        snapshot_every_s=h.snapshot_every_s,
        init=init,
    )
    return classify(spec, result)


def run_optuna(
    spec: StudySpec,
    trial: optuna.Trial,
    frame: pd.DataFrame,
    *,
    device: str = "cpu",
    seed: int | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    init: InitModel | None = None,
) -> TrialResult:
    """Train the trial's hyperparameters on ``frame`` through ``run``, as a worker slot does;
    report each step's monitored metric to Optuna (single objective) and stop when its pruner
    says so. ``on_epoch(step, record)`` sees every step. Returns the training's result
    (``classify`` tells what a slot would record); raises what the training raises. The seed
    is the trial's number unless given. ``init``: the pretrained model to start from (a
    study with ``init_from``; ``InitModel.from_file`` reads a downloaded model). For tests
    and notebooks: no database involved."""

    def report(step: int, record: dict[str, float], value: float | None) -> None:
        if on_epoch is not None:
            on_epoch(step, record)
        if value is not None:
            trial.report(value, step)

    outcome = run(
        spec,
        trial.params,
        frame,
        seed=trial.number if seed is None else seed,
        device=device,
        hooks=Hooks(report=report, should_prune=trial.should_prune),
        init=init,
    )
    assert outcome.result is not None  # a run that returns has trained to an end
    return outcome.result


def classify(spec: StudySpec, ended: TrialResult | Exception) -> Outcome:
    """The outcome of an attempt that returned ``ended`` (a result) or raised it.

    Results: ``interrupted`` (a stop request) is handed back; ``pruned`` and ``diverged``
    are PRUNED; non-finite objective values FAIL (``nan_objective``); the rest COMPLETE.
    Errors: ``Fenced`` abandons; a stop while waiting for GPU memory hands back; a data
    error, a trial too big for a slot's GPU share, CUDA out of memory and any other error
    FAIL with reasons ``data_error``, ``too_big``, ``oom`` and ``error``."""
    if isinstance(ended, Exception):
        return _failure(ended)
    r = ended
    if r.reason == "interrupted":
        return Outcome(Action.HAND_BACK, reason=r.reason, result=r)
    violations = constraint_violations(spec, r)
    if r.reason in PRUNED_REASONS:
        return Outcome(
            Action.FINISH, TrialState.PRUNED, reason=r.reason, result=r, constraints=violations
        )
    values = objective_values(spec, r)
    if not all(math.isfinite(v) for v in values):
        return Outcome(
            Action.FINISH,
            TrialState.FAIL,
            reason="nan_objective",
            result=r,
            error=f"objective values {values} are not finite",
        )
    return Outcome(
        Action.FINISH,
        TrialState.COMPLETE,
        reason=r.reason,
        values=tuple(values),
        result=r,
        constraints=violations,
    )


def constraint_violations(spec: StudySpec, r: TrialResult) -> tuple[float, ...] | None:
    """Each of the study's constraints' violation for result ``r`` (<= 0: met), None for a
    study without constraints. A metric the trial never measured (a pruned trial's validation
    metric before its first epoch) or a non-finite one counts as violated (1.0)."""
    if not spec.constraints:
        return None
    out = []
    for c in spec.constraints:
        try:
            value = r.metric(c.metric)
        except KeyError:
            value = math.nan
        out.append(c.violation(value) if math.isfinite(value) else 1.0)
    return tuple(out)


def _failure(exc: Exception) -> Outcome:
    if isinstance(exc, Fenced):
        return Outcome(Action.ABANDON, reason="fenced", error=exc.message)
    if isinstance(exc, Withdrawn):
        return Outcome(Action.HAND_BACK, reason="interrupted", error=str(exc))
    if isinstance(exc, DataError):
        return _failed("data_error", str(exc))
    if isinstance(exc, TooBig):
        return _failed("too_big", str(exc))
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return _failed("oom", error_text(exc))
    return _failed("error", error_text(exc))


def _failed(reason: str, error: str) -> Outcome:
    return Outcome(Action.FINISH, TrialState.FAIL, reason=reason, error=error)


def trial_info(
    r: TrialResult, *, device: str, gpu_mem_estimate_bytes: int | None
) -> dict[str, Any]:
    """What a finished trial records about its run beside its metrics (``Trial.info``)."""
    info: dict[str, Any] = {
        "best_epoch": r.best_epoch,
        "param_count": r.param_count,
        "train_seconds": r.train_seconds,
        "wall_seconds": r.wall_seconds,
        "samples_per_s": r.samples_per_s,
        "peak_gpu_mem_bytes": r.peak_gpu_mem_bytes,
        "precision": r.precision,
        "device": device,
        "val": r.val,
        "gpu_mem_estimate_bytes": gpu_mem_estimate_bytes,
    }
    if r.folds is not None:
        info["folds"] = r.folds
    if r.checkpoint is not None:  # the shape a later study's init_from is checked against
        info["model"] = r.checkpoint["model"]
    if r.lineage is not None:
        info["lineage"] = r.lineage
    return info


def error_text(exc: BaseException) -> str:
    """``exc`` as one line of its type and message (no traceback), cut to 2000 characters:
    what a failed trial or baseline computation records as its error."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]
