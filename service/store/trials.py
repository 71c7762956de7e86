"""Trials: listing, enqueueing given hyperparameters; counters and Pareto flags shared with
``service.store.leases``, ``budget`` and ``recovery``, which move trials through their lifecycle.

Optuna holds each trial's params and values (its tools read them there); ``seqtune_trials``
holds seqtune's record beside it: curves, stop reason, worker, attempts, test metrics. The
study's per-state counters move in the same transaction as the trial's state, so they never
drift from the rows.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optuna
from sqlalchemy import select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, defer

from seqtune.errors import Conflict, Invalid, NotFound
from seqtune.spec import StudySpec
from seqtune.states import ACTIVE_STATUSES, TrialState
from seqtune.views import TRIAL_SORT_KEYS, Page, TrialView
from service.hints import hint
from service.store import buffer
from service.store.db import Database, page
from service.store.optuna import distributions
from service.store.studies import best_trial, study_row, study_row_for_optuna, trial_view
from service.store.tables import Checkpoint, Study, Trial

# The study row's counter of trials in each state.
_COUNTER = {
    TrialState.WAITING: "n_waiting",
    TrialState.RUNNING: "n_running",
    TrialState.COMPLETE: "n_complete",
    TrialState.PRUNED: "n_pruned",
    TrialState.FAIL: "n_failed",
}
# The columns the listing sorts on: each sort key is the name of the trial row's column.
_SORTS: dict[str, InstrumentedAttribute[Any]] = {
    key: getattr(Trial, key) for key in TRIAL_SORT_KEYS
}


def list_trials(
    db: Database, *, tenant: str, name: str, state: str | None, sort: str, limit: int, offset: int
) -> Page[TrialView]:
    """One page of a study's trials (without curves). ``sort`` is a field, '-' for descending."""
    if state is not None and state.upper() not in set(TrialState):
        raise Invalid(
            f"state must be one of {[s.value for s in TrialState]}",
            details=[{"field": "state", "reason": "unknown state"}],
        )
    key = sort.lstrip("-")
    if key not in _SORTS:
        raise Invalid(
            f"sort must be one of {sorted(_SORTS)}, optionally prefixed with '-'",
            details=[{"field": "sort", "reason": "unknown sort key"}],
        )
    col = _SORTS[key]

    def txn(s: Session) -> Page[TrialView]:
        study = study_row(s, tenant, name)
        q = select(Trial).options(defer(Trial.curve)).where(Trial.study_id == study.id)
        if state is not None:
            q = q.where(Trial.state == state.upper())
        order = col.desc().nulls_last() if sort.startswith("-") else col.asc().nulls_last()
        rows = s.scalars(q.order_by(order, Trial.number).limit(limit + 1).offset(offset)).all()
        space = study.spec.get("search_space")
        return page(rows, limit, offset, lambda t: trial_view(t, space=space))

    return db.run(txn)


def get_trial(db: Database, *, tenant: str, name: str, number: int) -> TrialView:
    """One trial with its per-epoch learning curve."""

    def txn(s: Session) -> TrialView:
        study = study_row(s, tenant, name)
        t = s.scalar(select(Trial).where(Trial.study_id == study.id, Trial.number == number))
        if t is None:
            raise NotFound(f"study '{name}' has no trial {number}")
        return trial_view(t, with_curve=True, space=study.spec.get("search_space"))

    return db.run(txn)


class TrialModel(NamedTuple):
    """A trial's trained model: its number and the torch checkpoint's bytes."""

    number: int
    data: bytes


def model_checkpoint(
    db: Database, *, tenant: str, name: str, number: int | None = None
) -> TrialModel:
    """The trained model of trial ``number``, or of the best trial when None. Raises NotFound
    (no such study/trial) and Conflict (no model yet: no completed trial or none saved, or the
    best of a multi-objective study)."""

    if number is None:
        # The trial GET /best shows (the final phase's winner included): one definition of
        # "best" for the view and the model.
        number = best_trial(db, tenant=tenant, name=name).number

    def txn(s: Session) -> TrialModel:
        study = study_row(s, tenant, name)
        t = s.scalar(select(Trial).where(Trial.study_id == study.id, Trial.number == number))
        if t is None:
            raise NotFound(f"study '{name}' has no trial {number}")
        data = s.scalar(
            select(Checkpoint.data).where(Checkpoint.trial_id == t.id, Checkpoint.kind == "best")
        )
        if data is None:
            raise Conflict(
                f"trial {t.number} of '{name}' has no saved model (state {t.state}; "
                "models are kept for trials that trained at least one epoch)"
            )
        return TrialModel(t.number, bytes(data))

    return db.run(txn)


def _check_params(spec: StudySpec, params: dict[str, Any]) -> None:
    dists = distributions(spec)
    errors = []
    for key, value in params.items():
        dist = dists.get(key)
        if dist is None:
            reason = (
                "is fixed by the study, not searched"
                if key in spec.fixed_config()
                else "is not in the study's search space"
            )
            errors.append({"field": f"params.{key}", "reason": f"'{key}' {reason}"})
            continue
        if isinstance(value, float) and not math.isfinite(value):
            errors.append({"field": f"params.{key}", "reason": "must be finite"})
            continue
        try:
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                ok = any(type(value) is type(c) and value == c for c in dist.choices)
            elif (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (
                    isinstance(dist, optuna.distributions.IntDistribution)
                    and not isinstance(value, int)
                )
            ):
                ok = False
            else:
                ok = dist._contains(dist.to_internal_repr(value))
        except (ValueError, TypeError):
            ok = False
        if not ok:
            errors.append({"field": f"params.{key}", "reason": f"{value!r} is outside {dist}"})
    on = spec.active(params)
    for key in params:
        when = spec.search_space[key].when if key in spec.search_space else None
        # Judged only when every ancestor is given: a parent left out is sampled later.
        if when and not on.get(key, True) and spec.ancestors(key) <= set(params):
            need = " and ".join(f"{p} in {list(v)}" for p, v in when.items())
            errors.append(
                {"field": f"params.{key}", "reason": f"'{key}' is inactive here; it needs {need}"}
            )
    if errors:
        raise Invalid(f"{len(errors)} parameter(s) do not fit the search space", details=errors)


def enqueue_trial(
    db: Database,
    storage: optuna.storages.BaseStorage,
    *,
    tenant: str,
    name: str,
    params: dict[str, Any],
) -> TrialView:
    """Queue a trial with given hyperparameters (warm start); it runs before sampled ones.

    Parameters left out are sampled. Raises Invalid for parameters outside the space and
    Conflict when the study is finished or has no budget left for it. When the last slots
    are held by suggestions asked ahead (``service.store.buffer``), the newest one gives its
    slot up: a queued trial comes before sampled ones.
    """
    cancelled: list[int] = []

    def txn(s: Session) -> TrialView:
        cancelled.clear()
        study = study_row_for_optuna(s, tenant, name)
        if study.status not in ACTIVE_STATUSES:
            raise Conflict(f"study '{name}' is {study.status}; it takes no more trials")
        spec = StudySpec.model_validate(study.spec)
        _check_params(spec, params)
        if study.n_claimed + study.n_waiting >= study.n_trials:
            raise Conflict(
                f"the budget of {study.n_trials} trials is spent; " + hint("raise_budget")
            )
        free = study.n_trials - study.n_claimed - study.n_waiting - study.n_buffered
        if free <= 0:
            cancelled.extend(buffer.cancel(s, study, keep=study.n_buffered + free - 1))
        # Optuna's own enqueue path: a WAITING trial whose fixed_params ask() will honour.
        template = optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, system_attrs={"fixed_params": params}
        )
        trial_id = storage.create_new_trial(study.optuna_study_id, template_trial=template)
        number = storage.get_trial_number_from_id(trial_id)
        row = Trial(
            study_id=study.id,
            number=number,
            optuna_trial_id=trial_id,
            state=TrialState.WAITING,
            params=params,
            curve=[],
            epochs=0,
            info={},
            attempts=0,
            on_front=False,
        )
        s.add(row)
        count_move(s, study.id, None, TrialState.WAITING)
        s.flush()
        return trial_view(row)

    view = db.run(txn)
    buffer.fail_cancelled(storage, cancelled)
    return view


# ---- helpers shared with service.store.leases, budget and recovery -------------------------------


def count_move(s: Session, study_id: int, old: str | None, new: str | None) -> None:
    """Move one trial between state counters, atomically in SQL (no lost updates)."""
    values = count_deltas(old, new)
    if values:
        s.execute(update(Study).where(Study.id == study_id).values(**values))


def count_deltas(old: str | None, new: str | None) -> dict[str, Any]:
    """The SET clause that moves one trial from state ``old`` to ``new`` in its study's
    counters (``count_move``)."""
    values: dict[str, Any] = {}
    if old is not None:
        values[_COUNTER[TrialState(old)]] = getattr(Study, _COUNTER[TrialState(old)]) - 1
    if new is not None:
        values[_COUNTER[TrialState(new)]] = getattr(Study, _COUNTER[TrialState(new)]) + 1
    return values


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    x = [v * sg for v, sg in zip(a, signs, strict=True)]
    y = [v * sg for v, sg in zip(b, signs, strict=True)]
    return all(p <= q for p, q in zip(x, y, strict=True)) and x != y


def update_front(s: Session, study: Study, new: Trial) -> None:
    """Keep the Pareto-front flags right after ``new`` completed (study row locked)."""
    assert new.values is not None
    if new.feasible is False:  # an infeasible trial is never on the front
        new.on_front = False
        return
    front = s.scalars(
        select(Trial).where(Trial.study_id == study.id, Trial.on_front.is_(True))
    ).all()
    if any(_dominates(f.values or [], new.values, study.directions) for f in front):
        new.on_front = False
        return
    for f in front:
        if _dominates(new.values, f.values or [], study.directions):
            f.on_front = False
    new.on_front = True
