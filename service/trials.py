"""Trials: listing, enqueueing given hyperparameters, and the lifecycle records workers write.

Optuna holds each trial's params and values (its tools read them there); ``seqtune_trials``
holds seqtune's record beside it: curves, stop reason, worker, attempts, test metrics. The
study's per-state counters move in the same transaction as the trial's state, so they never
drift from the rows.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import select, update
from sqlalchemy.orm import Session, defer

from service.db import Database
from service.errors import Conflict, Invalid, NotFound
from service.models import Study, Trial, utcnow
from service.optuna_bridge import distributions
from service.spec import StudySpec
from service.studies import study_row, trial_view
from service.views import Page, TrialView

STATES = ("WAITING", "RUNNING", "COMPLETE", "PRUNED", "FAIL")
_COUNTER = {"WAITING": "n_waiting", "RUNNING": "n_running", "COMPLETE": "n_complete",
            "PRUNED": "n_pruned", "FAIL": "n_failed"}
_SORTS = {"number": Trial.number, "value": Trial.value, "started_at": Trial.started_at,
          "finished_at": Trial.finished_at}


def list_trials(db: Database, *, tenant: str, name: str, state: str | None, sort: str,
                limit: int, offset: int) -> Page[TrialView]:
    """One page of a study's trials (without curves). ``sort`` is a field, '-' for descending."""
    if state is not None and state.upper() not in STATES:
        raise Invalid(f"state must be one of {list(STATES)}",
                      details=[{"field": "state", "reason": "unknown state"}])
    key = sort.lstrip("-")
    if key not in _SORTS:
        raise Invalid(f"sort must be one of {sorted(_SORTS)}, optionally prefixed with '-'",
                      details=[{"field": "sort", "reason": "unknown sort key"}])
    col = _SORTS[key]

    def txn(s: Session) -> Page[TrialView]:
        study = study_row(s, tenant, name)
        q = select(Trial).options(defer(Trial.curve)).where(Trial.study_id == study.id)
        if state is not None:
            q = q.where(Trial.state == state.upper())
        order = col.desc().nulls_last() if sort.startswith("-") else col.asc().nulls_last()
        rows = s.scalars(q.order_by(order, Trial.number).limit(limit + 1).offset(offset)).all()
        more = len(rows) > limit
        return Page(items=[trial_view(t) for t in rows[:limit]],
                    next_offset=offset + limit if more else None)

    return db.run(txn)


def get_trial(db: Database, *, tenant: str, name: str, number: int) -> TrialView:
    """One trial with its per-epoch learning curve."""

    def txn(s: Session) -> TrialView:
        study = study_row(s, tenant, name)
        t = s.scalar(select(Trial).where(Trial.study_id == study.id, Trial.number == number))
        if t is None:
            raise NotFound(f"study '{name}' has no trial {number}")
        return trial_view(t, with_curve=True)

    return db.run(txn)


def _check_params(spec: StudySpec, params: dict[str, Any]) -> None:
    dists = distributions(spec)
    errors = []
    for key, value in params.items():
        dist = dists.get(key)
        if dist is None:
            reason = ("is fixed by the study, not searched" if key in spec.fixed_config()
                      else "is not in the study's search space")
            errors.append({"field": f"params.{key}", "reason": f"'{key}' {reason}"})
            continue
        if isinstance(value, float) and not math.isfinite(value):
            errors.append({"field": f"params.{key}", "reason": "must be finite"})
            continue
        try:
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                ok = any(type(value) is type(c) and value == c for c in dist.choices)
            elif isinstance(value, bool) or not isinstance(value, int | float) or (
                isinstance(dist, optuna.distributions.IntDistribution)
                and not isinstance(value, int)
            ):
                ok = False
            else:
                ok = dist._contains(dist.to_internal_repr(value))
        except (ValueError, TypeError):
            ok = False
        if not ok:
            errors.append({"field": f"params.{key}", "reason": f"{value!r} is outside {dist}"})
    if errors:
        raise Invalid(f"{len(errors)} parameter(s) do not fit the search space", details=errors)


def enqueue_trial(db: Database, storage: optuna.storages.BaseStorage, *, tenant: str,
                  name: str, params: dict[str, Any]) -> TrialView:
    """Queue a trial with given hyperparameters (warm start); it runs before sampled ones.

    Parameters left out are sampled. Raises Invalid for parameters outside the space and
    Conflict when the study is finished or has no budget left for it.
    """

    def txn(s: Session) -> TrialView:
        study = study_row(s, tenant, name, lock=True)
        if study.status not in ("running", "paused"):
            raise Conflict(f"study '{name}' is {study.status}; it takes no more trials")
        spec = StudySpec.model_validate(study.spec)
        _check_params(spec, params)
        used = (study.n_complete + study.n_pruned + study.n_failed + study.n_running
                + study.n_waiting)
        if used >= study.n_trials:
            raise Conflict(f"the budget of {study.n_trials} trials is spent; raise it with "
                           "PATCH {\"n_trials\": ...} first")
        # Optuna's own enqueue path: a WAITING trial whose fixed_params ask() will honour.
        template = optuna.trial.create_trial(state=TrialState.WAITING,
                                             system_attrs={"fixed_params": params})
        trial_id = storage.create_new_trial(study.optuna_study_id, template_trial=template)
        number = storage.get_trial_number_from_id(trial_id)
        row = Trial(study_id=study.id, number=number, optuna_trial_id=trial_id,
                    state="WAITING", params=params, curve=[], epochs=0, info={}, attempts=0,
                    on_front=False)
        s.add(row)
        _count(s, study.id, None, "WAITING")
        s.flush()
        return trial_view(row)

    return db.run(txn)


# ---- lifecycle records, written by whoever runs the trial -----------------------------------


def _count(s: Session, study_id: int, old: str | None, new: str | None) -> None:
    """Move one trial between state counters, atomically in SQL (no lost updates)."""
    values: dict[str, Any] = {}
    if old is not None:
        values[_COUNTER[old]] = getattr(Study, _COUNTER[old]) - 1
    if new is not None:
        values[_COUNTER[new]] = getattr(Study, _COUNTER[new]) + 1
    if values:
        s.execute(update(Study).where(Study.id == study_id).values(**values))


def open_trial(db: Database, *, study_id: int, number: int, optuna_trial_id: int,
               params: dict[str, Any], worker: str | None) -> None:
    """Record that an attempt of trial ``number`` started running (its first or a retry)."""

    def txn(s: Session) -> None:
        t = s.scalar(select(Trial).where(Trial.study_id == study_id, Trial.number == number)
                     .with_for_update())
        now = utcnow()
        if t is None:
            t = Trial(study_id=study_id, number=number, optuna_trial_id=optuna_trial_id,
                      state="RUNNING", params=params, curve=[], epochs=0, info={}, attempts=1,
                      on_front=False, worker=worker, started_at=now)
            s.add(t)
            _count(s, study_id, None, "RUNNING")
            return
        _count(s, study_id, t.state, "RUNNING")
        t.state, t.params, t.worker = "RUNNING", params, worker
        t.optuna_trial_id = optuna_trial_id
        t.attempts += 1
        t.started_at = t.started_at or now

    db.run(txn)


def record_epoch(db: Database, *, study_id: int, number: int, record: dict[str, Any]) -> None:
    """Append one epoch's metrics to the trial's learning curve."""

    def txn(s: Session) -> None:
        t = s.scalar(select(Trial).where(Trial.study_id == study_id, Trial.number == number)
                     .with_for_update())
        if t is None:
            raise NotFound(f"trial {number} of study {study_id} was never opened")
        t.curve = [*t.curve, record]
        t.epochs = len(t.curve)

    db.run(txn)


def close_trial(db: Database, *, study_id: int, number: int, state: str,
                values: list[float] | None = None, reason: str | None = None,
                test_metrics: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
                curve: list[dict[str, Any]] | None = None, error: str | None = None) -> None:
    """Record a trial's end: state (COMPLETE, PRUNED, FAIL), values, reason, metrics.

    For several objectives, keeps the study's Pareto front flags (``on_front``) up to date
    under a lock on the study row, so the front is read by index and never recomputed.
    """
    if state not in ("COMPLETE", "PRUNED", "FAIL"):
        raise Invalid(f"a trial cannot end as {state}")

    def txn(s: Session) -> None:
        study = s.scalar(select(Study).where(Study.id == study_id).with_for_update())
        if study is None:
            raise NotFound(f"no study {study_id}")
        t = s.scalar(select(Trial).where(Trial.study_id == study_id, Trial.number == number)
                     .with_for_update())
        if t is None:
            raise NotFound(f"trial {number} of study {study_id} was never opened")
        _count(s, study_id, t.state, state)
        t.state, t.reason, t.error = state, reason, error
        t.values = list(values) if values is not None else None
        t.value = values[0] if values else None
        t.test_metrics = test_metrics
        t.info = info or {}
        if curve is not None:
            t.curve, t.epochs = curve, len(curve)
        t.finished_at = utcnow()
        if state == "COMPLETE" and values and len(study.directions) > 1:
            _update_front(s, study, t)

    db.run(txn)


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    x = [v * sg for v, sg in zip(a, signs, strict=True)]
    y = [v * sg for v, sg in zip(b, signs, strict=True)]
    return all(p <= q for p, q in zip(x, y, strict=True)) and x != y


def _update_front(s: Session, study: Study, new: Trial) -> None:
    assert new.values is not None
    front = s.scalars(select(Trial).where(Trial.study_id == study.id,
                                          Trial.on_front.is_(True))).all()
    if any(_dominates(f.values or [], new.values, study.directions) for f in front):
        new.on_front = False
        return
    for f in front:
        if _dominates(new.values, f.values or [], study.directions):
            f.on_front = False
    new.on_front = True
