"""Studies: create, list, read, steer, delete; best trial and parameter importances.

Reads never count or scan trials: per-state counters live on the study row, and the best trial
comes from the (study_id, state, value) index.
"""

from __future__ import annotations

import contextlib
import json
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import optuna
from sqlalchemy import Connection, bindparam, case, select
from sqlalchemy.orm import Session

from service.db import Database
from service.errors import AlreadyExists, Conflict, Invalid, NotFound
from service.models import Study, Trial, utcnow
from service.spec import StudySpec, UploadedData
from service.views import BestView, Page, StudyView, TrialCounts, TrialView

_STUDIES = Study.__table__  # Core tables for the hot reads
_TRIALS = Trial.__table__
_TRIAL_COLS = [c for c in _TRIALS.c if c.name != "curve"]

STATUSES = ("running", "paused", "stopped", "completed", "timed_out")
TERMINAL = ("stopped", "timed_out")


def optuna_name(tenant: str, name: str) -> str:
    """The Optuna study name behind a seqtune study: tenant-qualified, so tenants never clash."""
    return f"{tenant}/{name}"


def study_view(row: Any) -> StudyView:
    """The view of a study row (ORM object or Core row namespace)."""
    finished = row.n_complete + row.n_pruned + row.n_failed
    return StudyView(
        name=row.name, tenant=row.tenant, status=row.status, task=row.task,
        optuna_study_name=row.optuna_study_name,
        optuna_study_id=getattr(row, "optuna_study_id", None), directions=row.directions,
        priority=row.priority, spec=row.spec, created_at=row.created_at,
        updated_at=row.updated_at, finished_at=row.finished_at,
        trials=TrialCounts(
            waiting=row.n_waiting, running=row.n_running, complete=row.n_complete,
            pruned=row.n_pruned, failed=row.n_failed, finished=finished, budget=row.n_trials,
            remaining=max(0, row.n_trials - row.n_claimed - row.n_waiting),
        ),
    )


def study_row(s: Session, tenant: str, name: str, *, lock: bool = False) -> Study:
    """The tenant's study called ``name``; another tenant's study is NotFound too."""
    q = select(Study).where(Study.tenant == tenant, Study.name == name)
    if lock:
        q = q.with_for_update()
    row = s.scalar(q)
    if row is None:
        raise NotFound(f"no study named '{name}'; list yours with GET /v1/studies")
    return row


def create_study(db: Database, storage: optuna.storages.BaseStorage, *, tenant: str,
                 spec: StudySpec) -> StudyView:
    """Create the Optuna study and seqtune's record of it. The spec must be checked already.

    Raises AlreadyExists when the tenant has a study of that name (or the storage an Optuna
    study of the qualified name).
    """
    oname = optuna_name(tenant, spec.name)
    directions = spec.directions
    created: list[int] = []  # the Optuna study made by an earlier (retried) attempt

    def txn(s: Session) -> StudyView:
        if s.scalar(select(Study.id).where(Study.tenant == tenant, Study.name == spec.name)):
            raise AlreadyExists(f"a study named '{spec.name}' exists; choose another name or "
                                "DELETE /v1/studies/" + spec.name)
        if not created:
            try:
                created.append(storage.create_new_study(
                    directions=[optuna.study.StudyDirection[d.upper()] for d in directions],
                    study_name=oname))
            except optuna.exceptions.DuplicatedStudyError:
                raise AlreadyExists(f"the storage already holds an Optuna study named "
                                    f"'{oname}'; delete it or choose another name") from None
            metrics = [o.metric for o in spec.objectives]
            storage.set_study_system_attr(created[0], "study:metric_names", metrics)
            storage.set_study_user_attr(created[0], "seqtune_spec",
                                        json.loads(spec.model_dump_json()))
        row = Study(
            tenant=tenant, name=spec.name, optuna_study_name=oname,
            optuna_study_id=created[0], status="running", task=spec.task,
            spec=json.loads(spec.model_dump_json()), directions=directions,
            n_trials=spec.budget.n_trials, priority=spec.priority,
            dataset_id=spec.dataset.id if isinstance(spec.dataset, UploadedData) else None,
            n_waiting=0, n_running=0, n_complete=0, n_pruned=0, n_failed=0, n_claimed=0,
            max_concurrent=spec.budget.max_concurrent_trials,
            lease_timeout_s=spec.budget.lease_timeout_s, max_retries=spec.budget.max_retries,
            deadline=(utcnow() + timedelta(seconds=spec.budget.timeout_s)
                      if spec.budget.timeout_s else None),
        )
        s.add(row)
        s.flush()
        return study_view(row)

    try:
        return db.run(txn)
    except BaseException:
        if created:  # our record did not land: take the Optuna study back out
            # Best effort: the original error is the one worth raising.
            with contextlib.suppress(Exception):
                storage.delete_study(created[0])
        raise


def list_studies(db: Database, *, tenant: str, status: str | None, limit: int,
                 offset: int) -> Page[StudyView]:
    if status is not None and status not in STATUSES:
        raise Invalid(f"status must be one of {list(STATUSES)}",
                      details=[{"field": "status", "reason": "unknown status"}])

    def txn(s: Session) -> Page[StudyView]:
        q = select(Study).where(Study.tenant == tenant)
        if status is not None:
            q = q.where(Study.status == status)
        rows = s.scalars(q.order_by(Study.id.desc()).limit(limit + 1).offset(offset)).all()
        more = len(rows) > limit
        return Page(items=[study_view(r) for r in rows[:limit]],
                    next_offset=offset + limit if more else None)

    return db.run(txn)


_GET_STMT = select(_STUDIES).where(_STUDIES.c.tenant == bindparam("tenant"),
                                   _STUDIES.c.name == bindparam("name"))


def get_study(db: Database, *, tenant: str, name: str) -> StudyView:
    """One study and its counters: a single indexed row read. Raises NotFound."""

    def read(conn: Connection) -> StudyView:
        row = conn.execute(_GET_STMT, {"tenant": tenant, "name": name}).one_or_none()
        if row is None:
            raise NotFound(f"no study named '{name}'; list yours with GET /v1/studies")
        return study_view(SimpleNamespace(**row._mapping))

    return db.read(read)


def update_study(db: Database, *, tenant: str, name: str, status: str | None = None,
                 n_trials: int | None = None, priority: int | None = None) -> StudyView:
    """Pause, resume or stop a study, change its budget or priority.

    Raises Conflict for a transition its status does not allow (a stopped or timed-out study
    stays so) or a budget below the trials already started or queued.
    """

    def txn(s: Session) -> StudyView:
        row = study_row(s, tenant, name, lock=True)
        started = row.n_claimed + row.n_waiting
        if n_trials is not None:
            if n_trials < started:
                raise Conflict(f"{started} trials already started or queued; n_trials must be "
                               f">= {started}")
            row.n_trials = n_trials
            if row.status == "completed" and n_trials > started:
                row.status, row.finished_at = "running", None
        if priority is not None:
            row.priority = priority
        if status is not None and status != row.status:
            allowed = {
                "paused": ("running",),
                "running": ("paused",),
                "stopped": ("running", "paused", "completed"),
            }.get(status)
            if allowed is None:
                raise Invalid("status can be set to 'running', 'paused' or 'stopped'",
                              details=[{"field": "status", "reason": "not settable"}])
            if row.status not in allowed:
                hint = " (raise n_trials to resume it)" if row.status == "completed" else ""
                raise Conflict(f"study '{name}' is {row.status}; it cannot become "
                               f"{status}{hint}")
            row.status = status
            if status == "stopped":
                row.finished_at = utcnow()
        row.updated_at = utcnow()
        s.flush()
        return study_view(row)

    return db.run(txn)


def delete_study(db: Database, storage: optuna.storages.BaseStorage, *, tenant: str,
                 name: str, force: bool = False) -> None:
    """Delete a study, its trials and its Optuna study. Raises Conflict while trials run,
    unless ``force``."""

    def txn(s: Session) -> None:
        row = study_row(s, tenant, name, lock=True)
        if row.status == "running" and row.n_running > 0 and not force:
            raise Conflict(f"study '{name}' has {row.n_running} running trial(s); stop it "
                           "first (PATCH status=stopped) or pass ?force=true")
        # Optuna's side first: on SQLite it cannot write while this transaction holds the lock.
        with contextlib.suppress(KeyError):  # already gone from Optuna's side
            storage.delete_study(row.optuna_study_id)
        s.delete(row)

    db.run(txn)


def trial_view(t: Any, *, with_curve: bool = False) -> TrialView:
    """The view of a trial row (ORM object or Core row namespace)."""
    duration = None
    if t.started_at is not None and t.finished_at is not None:
        duration = (t.finished_at - t.started_at).total_seconds()
    return TrialView(
        number=t.number, state=t.state, params=t.params, value=t.value, values=t.values,
        reason=t.reason, test_metrics=t.test_metrics, info=t.info or {},
        curve=t.curve if with_curve else None, epochs=t.epochs, worker=t.worker,
        attempts=t.attempts, error=t.error, created_at=t.created_at, started_at=t.started_at,
        finished_at=t.finished_at, duration_s=duration,
    )




def _best_id(descending: bool) -> Any:
    """Correlated subquery: the id of the study's best COMPLETE trial in one direction."""
    bt = _TRIALS.alias("bt")
    order = bt.c.value.desc() if descending else bt.c.value.asc()
    return (select(bt.c.id)
            .where(bt.c.study_id == _STUDIES.c.id, bt.c.state == "COMPLETE",
                   bt.c.value.is_not(None))
            .order_by(order, bt.c.number).limit(1)
            .correlate(_STUDIES).scalar_subquery())


# One statement, two index lookups: the study by (tenant, name), then the first row of the
# (study_id, state, value) index in the study's direction. Never reads the other trials.
_BEST_STMT = (
    select(_STUDIES.c.id.label("study_pk"), _STUDIES.c.directions,
           _STUDIES.c.spec["objectives"].label("objectives"), *_TRIAL_COLS)
    .select_from(_STUDIES.outerjoin(_TRIALS, _TRIALS.c.id == case(
        (_STUDIES.c.directions[0].as_string() == "maximize", _best_id(True)),
        else_=_best_id(False))))
    .where(_STUDIES.c.tenant == bindparam("tenant"), _STUDIES.c.name == bindparam("name"))
)


def best(db: Database, *, tenant: str, name: str) -> BestView:
    """The best trial (one objective) or the Pareto front (several), read by index.

    Raises NotFound for an unknown study and until a trial has completed.
    """

    def read(conn: Connection) -> BestView:
        row = conn.execute(_BEST_STMT, {"tenant": tenant, "name": name}).one_or_none()
        if row is None:
            raise NotFound(f"no study named '{name}'; list yours with GET /v1/studies")
        m = row._mapping
        directions, metrics = m["directions"], [o["metric"] for o in m["objectives"]]
        if len(directions) == 1:
            if m["id"] is None:
                raise NotFound(f"study '{name}' has no completed trial yet")
            return BestView(study=name, directions=directions, metrics=metrics,
                            best=trial_view(SimpleNamespace(**m, curve=None)))
        front = conn.execute(select(*_TRIAL_COLS).where(
            _TRIALS.c.study_id == m["study_pk"], _TRIALS.c.state == "COMPLETE",
            _TRIALS.c.on_front.is_(True)).order_by(_TRIALS.c.number)).all()
        if not front:
            raise NotFound(f"study '{name}' has no completed trial yet")
        return BestView(study=name, directions=directions, metrics=metrics,
                        pareto_front=[trial_view(SimpleNamespace(**f._mapping, curve=None))
                                      for f in front])

    return db.read(read)


MIN_TRIALS_FOR_IMPORTANCE = 4


def importance(db: Database, storage: optuna.storages.BaseStorage, *, tenant: str, name: str,
               objective: int = 0) -> dict[str, Any]:
    """Parameter importances (Optuna's default evaluator, PED-ANOVA in Optuna 5).

    Raises Conflict until ``MIN_TRIALS_FOR_IMPORTANCE`` trials completed, Invalid for a bad
    objective index. Reads the study's trials: meant for people, not for hot paths.
    """
    view = get_study(db, tenant=tenant, name=name)
    if not 0 <= objective < len(view.directions):
        raise Invalid(f"objective must be between 0 and {len(view.directions) - 1}")
    if view.trials.complete < MIN_TRIALS_FOR_IMPORTANCE:
        raise Conflict(f"importances need {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
                       f"'{name}' has {view.trials.complete}")
    if not view.spec.get("search_space"):
        raise Conflict("the study searches no hyperparameter")
    study = optuna.load_study(study_name=view.optuna_study_name, storage=storage)
    target = None if len(view.directions) == 1 else (lambda t: t.values[objective])
    try:
        imp = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as exc:
        raise Conflict(f"importances cannot be computed yet: {exc}") from None
    metric = view.spec["objectives"][objective]["metric"]
    return {"study": name, "metric": metric, "evaluator": "PedAnovaImportanceEvaluator",
            "n_trials": view.trials.complete, "importances": dict(imp)}
