"""Studies: create, list, read, steer, delete; best trial and parameter importances.

Reads never count or scan trials: per-state counters live on the study row, and the best trial
comes from the (study_id, state, value) index.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import Container
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, NoReturn

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Connection, bindparam, case, func, select
from sqlalchemy.orm import Session

from seqtune.errors import AlreadyExists, Conflict, Invalid, NotFound
from seqtune.spec import StudySpec, UploadedData
from seqtune.states import SETTABLE_STATUSES, StudyPhase, StudyStatus, study_transition
from seqtune.states import TrialState as State
from seqtune.views import BestView, ImportanceView, Page, StudyView, TrialCounts, TrialView
from service.hints import hint
from service.store import buffer
from service.store.baselines import verdict
from service.store.db import Database, page
from service.store.tables import Study, Trial, utcnow

_STUDIES = Study.__table__  # Core tables for the hot reads
_TRIALS = Trial.__table__
_TRIAL_COLS = [c for c in _TRIALS.c if c.name != "curve"]


def optuna_name(tenant: str, name: str) -> str:
    """The Optuna study name behind a seqtune study: tenant-qualified, so tenants never clash."""
    return f"{tenant}/{name}"


def study_view(row: Any) -> StudyView:
    """The view of a study row (ORM object or Core row namespace)."""
    finished = row.n_complete + row.n_pruned + row.n_failed
    return StudyView(
        name=row.name,
        tenant=row.tenant,
        status=row.status,
        task=row.task,
        optuna_study_name=row.optuna_study_name,
        optuna_study_id=getattr(row, "optuna_study_id", None),
        directions=row.directions,
        priority=row.priority,
        spec=row.spec,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        baselines=row.baselines,
        phase=row.phase or StudyPhase.SEARCH,
        stop_reason=getattr(row, "stop_reason", None),
        trials=TrialCounts(
            waiting=row.n_waiting,
            running=row.n_running,
            complete=row.n_complete,
            pruned=row.n_pruned,
            failed=row.n_failed,
            finished=finished,
            budget=row.n_trials,
            remaining=max(0, row.n_trials - row.n_claimed - row.n_waiting),
            buffered=row.n_buffered,
        ),
    )


def study_row(s: Session, tenant: str, name: str, *, lock: bool = False) -> Study:
    """The tenant's study called ``name``; another tenant's study is NotFound too."""
    q = select(Study).where(Study.tenant == tenant, Study.name == name)
    if lock:
        q = q.with_for_update()
    row = s.scalar(q)
    if row is None:
        raise NotFound(f"no study named '{name}'; {hint('list_studies')}")
    return row


def study_row_for_optuna(s: Session, tenant: str, name: str) -> Study:
    """The study's row, locked, for a transaction that then writes to the study in Optuna
    (creates or deletes trials there): the study's ask lock is taken first. A claim holds
    that lock while it writes its trials to Optuna and then updates the study's row; taking
    the row first and Optuna's lock second here would close a cycle Postgres cannot see (one
    side waits on Optuna's own connection), stalling both until a timeout."""
    buffer.ask_lock(s, study_row(s, tenant, name).id, wait=True)
    row = s.scalar(
        select(Study)
        .where(Study.tenant == tenant, Study.name == name)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if row is None:
        raise NotFound(f"no study named '{name}'; {hint('list_studies')}")
    return row


def create_study(
    db: Database, storage: optuna.storages.BaseStorage, *, tenant: str, spec: StudySpec
) -> StudyView:
    """Create the Optuna study and seqtune's record of it. The spec must be checked already.

    Raises AlreadyExists when the tenant has a study of that name (or the storage an Optuna
    study of the qualified name).
    """
    oname = optuna_name(tenant, spec.name)
    directions = spec.directions
    created: list[int] = []  # the Optuna study made by an earlier (retried) attempt

    def txn(s: Session) -> StudyView:
        if s.scalar(select(Study.id).where(Study.tenant == tenant, Study.name == spec.name)):
            raise AlreadyExists(
                f"a study named '{spec.name}' exists; choose another name or "
                + hint("delete_study", study=spec.name)
            )
        if not created:
            try:
                created.append(
                    storage.create_new_study(
                        directions=[optuna.study.StudyDirection[d.upper()] for d in directions],
                        study_name=oname,
                    )
                )
            except optuna.exceptions.DuplicatedStudyError:
                raise AlreadyExists(
                    f"the storage already holds an Optuna study named "
                    f"'{oname}'; delete it or choose another name"
                ) from None
            metrics = [o.metric for o in spec.objectives]
            storage.set_study_system_attr(created[0], "study:metric_names", metrics)
            storage.set_study_user_attr(
                created[0], "seqtune_spec", json.loads(spec.model_dump_json())
            )
        row = Study(
            tenant=tenant,
            name=spec.name,
            optuna_study_name=oname,
            optuna_study_id=created[0],
            status=StudyStatus.RUNNING,
            task=spec.task,
            spec=json.loads(spec.model_dump_json()),
            directions=directions,
            n_trials=spec.budget.n_trials,
            priority=spec.priority,
            dataset_id=spec.dataset.id if isinstance(spec.dataset, UploadedData) else None,
            n_waiting=0,
            n_running=0,
            n_complete=0,
            n_pruned=0,
            n_failed=0,
            n_claimed=0,
            max_concurrent=spec.budget.max_concurrent_trials,
            lease_timeout_s=spec.budget.lease_timeout_s,
            max_retries=spec.budget.max_retries,
            deadline=(
                utcnow() + timedelta(seconds=spec.budget.timeout_s)
                if spec.budget.timeout_s
                else None
            ),
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


def list_studies(
    db: Database, *, tenant: str, status: str | None, limit: int, offset: int
) -> Page[StudyView]:
    if status is not None and status not in set(StudyStatus):
        raise Invalid(
            f"status must be one of {[s.value for s in StudyStatus]}",
            details=[{"field": "status", "reason": "unknown status"}],
        )

    def txn(s: Session) -> Page[StudyView]:
        q = select(Study).where(Study.tenant == tenant)
        if status is not None:
            q = q.where(Study.status == status)
        rows = s.scalars(q.order_by(Study.id.desc()).limit(limit + 1).offset(offset)).all()
        return page(rows, limit, offset, study_view)

    return db.run(txn)


_GET_STMT = select(_STUDIES).where(
    _STUDIES.c.tenant == bindparam("tenant"), _STUDIES.c.name == bindparam("name")
)


def get_study(db: Database, *, tenant: str, name: str) -> StudyView:
    """One study and its counters: a single indexed row read. Raises NotFound."""

    def read(conn: Connection) -> StudyView:
        row = conn.execute(_GET_STMT, {"tenant": tenant, "name": name}).one_or_none()
        if row is None:
            raise NotFound(f"no study named '{name}'; {hint('list_studies')}")
        return study_view(SimpleNamespace(**row._mapping))

    return db.read(read)


def update_study(
    db: Database,
    *,
    tenant: str,
    name: str,
    status: str | None = None,
    n_trials: int | None = None,
    priority: int | None = None,
    storage: optuna.storages.BaseStorage | None = None,
) -> StudyView:
    """Pause, resume or stop a study, change its budget or priority.

    Suggestions asked ahead (``service.store.buffer``) that the study no longer has room for
    (paused, stopped, or a lower budget) are cancelled with the change, and failed in Optuna
    through ``storage`` once it is committed (without it, the reaper's orphan sweep fails them).

    Raises Conflict for a transition its status does not allow (a stopped or timed-out study
    stays so) or a budget below the trials already started or queued.
    """
    cancelled: list[int] = []

    def txn(s: Session) -> StudyView:
        cancelled.clear()
        row = study_row(s, tenant, name, lock=True)
        started = row.n_claimed + row.n_waiting
        if n_trials is not None:
            if n_trials < started:
                raise Conflict(
                    f"{started} trials already started or queued; n_trials must be >= {started}"
                )
            row.n_trials = n_trials
            if n_trials > started and row.stop_reason is not None:
                # More budget after an automatic stop: the search goes on, and the count of
                # trials without improvement starts again.
                row.stop_reason, row.stop_stale = None, 0
            if row.status == StudyStatus.COMPLETED and n_trials > started:
                row.status = study_transition("extend", row.status, name=name)
                row.finished_at = None
        if priority is not None:
            row.priority = priority
        if status is not None and status != row.status:
            action = next((a for st, a in SETTABLE_STATUSES.items() if st == status), None)
            if action is None:
                settable = [f"'{s}'" for s in SETTABLE_STATUSES]
                raise Invalid(
                    f"status can be set to {', '.join(settable[:-1])} or {settable[-1]}",
                    details=[{"field": "status", "reason": "not settable"}],
                )
            row.status = study_transition(action, row.status, name=name)
            if row.status == StudyStatus.STOPPED:
                row.finished_at = utcnow()
        if row.n_buffered > buffer.keep_for(row):
            cancelled.extend(buffer.cancel(s, row, keep=buffer.keep_for(row)))
        row.updated_at = utcnow()
        s.flush()
        return study_view(row)

    view = db.run(txn)
    if cancelled and storage is not None:
        buffer.fail_cancelled(storage, cancelled)
    return view


def delete_study(
    db: Database,
    storage: optuna.storages.BaseStorage,
    *,
    tenant: str,
    name: str,
    force: bool = False,
) -> None:
    """Delete a study, its trials and its Optuna study. Raises Conflict while trials run,
    or while a running or paused study of the tenant fine-tunes from one of its models
    (``init_from.study``), unless ``force``."""

    def txn(s: Session) -> None:
        row = study_row_for_optuna(s, tenant, name)
        if row.status == StudyStatus.RUNNING and row.n_running > 0 and not force:
            raise Conflict(
                f"study '{name}' has {row.n_running} running trial(s); "
                + hint("stop_or_force", study=name)
            )
        users = list(
            s.scalars(
                select(Study.name).where(
                    Study.tenant == tenant,
                    Study.status.in_((StudyStatus.RUNNING, StudyStatus.PAUSED)),
                    Study.spec["init_from"]["study"].as_string() == name,
                )
            )
        )
        if users and not force:
            raise Conflict(
                f"studies {users} start their trials from a model of '{name}'; stop them "
                "first (their later trials would fail without it), or force it"
            )
        # Optuna's side first: on SQLite it cannot write while this transaction holds the lock.
        with contextlib.suppress(KeyError):  # already gone from Optuna's side
            storage.delete_study(row.optuna_study_id)
        s.delete(row)

    db.run(txn)


def inactive_params(space: dict[str, Any] | None, params: dict[str, Any]) -> list[str]:
    """The conditional parameters of the stored search space ``space`` that a trial with
    ``params`` left out: those whose condition did not hold."""
    return [n for n, d in (space or {}).items() if d.get("when") and n not in params]


def trial_view(
    t: Any, *, with_curve: bool = False, space: dict[str, Any] | None = None
) -> TrialView:
    """The view of a trial row (ORM object or Core row namespace); ``space``, the study's
    stored search space, tells which of its parameters were inactive in the trial."""
    duration = None
    if t.started_at is not None and t.finished_at is not None:
        duration = (t.finished_at - t.started_at).total_seconds()
    return TrialView(
        number=t.number,
        state=t.state,
        params=t.params,
        value=t.value,
        values=t.values,
        reason=t.reason,
        test_metrics=t.test_metrics,
        info=t.info or {},
        curve=t.curve if with_curve else None,
        epochs=t.epochs,
        worker=t.worker,
        attempts=t.attempts,
        error=t.error,
        created_at=t.created_at,
        started_at=t.started_at,
        finished_at=t.finished_at,
        duration_s=duration,
        final_of=t.final_of,
        feasible=t.feasible,
        inactive=inactive_params(space, t.params or {}) if t.state != State.WAITING else [],
    )


def _best_id(descending: bool) -> Any:
    """Correlated subquery: the id of the study's best COMPLETE search trial (final-phase
    re-trains excluded) in one direction."""
    bt = _TRIALS.alias("bt")
    order = bt.c.value.desc() if descending else bt.c.value.asc()
    return (
        select(bt.c.id)
        .where(
            bt.c.study_id == _STUDIES.c.id,
            bt.c.state == State.COMPLETE,
            bt.c.value.is_not(None),
            bt.c.final_of.is_(None),
            bt.c.feasible.is_not(False),
        )
        .order_by(order, bt.c.number)
        .limit(1)
        .correlate(_STUDIES)
        .scalar_subquery()
    )


def _has_final() -> Any:
    """Correlated EXISTS: the study has a COMPLETE final-phase re-train. Served by the
    (study_id, final_of) index, so a study without re-trains costs one index probe."""
    ft = _TRIALS.alias("ft")
    return (
        select(ft.c.id)
        .where(
            ft.c.study_id == _STUDIES.c.id, ft.c.final_of.is_not(None), ft.c.state == State.COMPLETE
        )
        .correlate(_STUDIES)
        .exists()
    )


# One statement, two index lookups: the study by (tenant, name), then the first row of the
# (study_id, state, value) index in the study's direction (plus one probe of the
# (study_id, final_of) index). Never reads the other trials.
_BEST_STMT = (
    select(
        _STUDIES.c.id.label("study_pk"),
        _STUDIES.c.directions,
        _STUDIES.c.spec["objectives"].label("objectives"),
        _STUDIES.c.spec["search_space"].label("search_space"),
        _STUDIES.c.task.label("study_task"),
        _STUDIES.c.phase.label("study_phase"),
        _STUDIES.c.baselines.label("study_baselines"),
        _has_final().label("has_final"),
        *_TRIAL_COLS,
    )
    .select_from(
        _STUDIES.outerjoin(
            _TRIALS,
            _TRIALS.c.id
            == case(
                (_STUDIES.c.directions[0].as_string() == "maximize", _best_id(True)),
                else_=_best_id(False),
            ),
        )
    )
    .where(_STUDIES.c.tenant == bindparam("tenant"), _STUDIES.c.name == bindparam("name"))
)


def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the SD is None below two values."""
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _finite_num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def final_summary(
    phase: str, directions: list[str], rows: list[tuple[int, float | None, dict[str, Any] | None]]
) -> dict[str, Any]:
    """The final phase's re-trains grouped by the search trial they re-train.

    ``rows`` are ``(final_of, value, test_metrics)`` of COMPLETE re-trains. Returns::

        {"phase": "search" | "final",
         "groups": [{"trial": N, "n": count, "value_mean": float | None,
                     "value_sd": float | None,
                     "test": {"test_rmse": {"mean": float, "sd": float | None}, ...}}, ...],
         "winner": N | None}

    Groups come best first (by ``value_mean`` in the study's direction, then trial number);
    ``value`` is the first objective's. SDs are sample SDs, None with one re-train. ``test``
    holds the numeric test metrics (nested dicts skipped), each over the re-trains that report
    it. ``winner`` is the best group's trial, single-objective studies only (else None).
    """
    by: dict[int, list[tuple[float | None, dict[str, Any]]]] = {}
    for final_of, value, tm in rows:
        by.setdefault(final_of, []).append((_finite_num(value), tm or {}))
    groups: list[dict[str, Any]] = []
    for trial, members in by.items():
        mean, sd = _mean_sd([v for v, _ in members if v is not None])
        test: dict[str, dict[str, float | None]] = {}
        keys = sorted({k for _, tm in members for k in tm})
        for k in keys:
            xs = [x for _, tm in members if (x := _finite_num(tm.get(k))) is not None]
            if xs:
                km, ksd = _mean_sd(xs)
                test[k] = {"mean": km, "sd": ksd}
        groups.append(
            {"trial": trial, "n": len(members), "value_mean": mean, "value_sd": sd, "test": test}
        )
    sign = -1.0 if directions and directions[0] == "maximize" else 1.0
    groups.sort(
        key=lambda g: (
            g["value_mean"] is None,
            sign * g["value_mean"] if g["value_mean"] is not None else 0.0,
            g["trial"],
        )
    )
    winner = (
        groups[0]["trial"]
        if len(directions) == 1 and groups and groups[0]["value_mean"] is not None
        else None
    )
    return {"phase": phase, "groups": groups, "winner": winner}


def _best_row(conn: Connection, tenant: str, name: str) -> Any:
    """``_BEST_STMT``'s row (study columns plus its best search trial's). Raises NotFound."""
    row = conn.execute(_BEST_STMT, {"tenant": tenant, "name": name}).one_or_none()
    if row is None:
        raise NotFound(f"no study named '{name}'; {hint('list_studies')}")
    return row._mapping


def _final_of(conn: Connection, m: Any) -> dict[str, Any] | None:
    """``final_summary`` of the study of ``_best_row`` ``m``, or None for a search-phase study
    without re-trains (which then stays at one statement)."""
    phase = m["study_phase"] or StudyPhase.SEARCH
    if not m["has_final"] and phase == StudyPhase.SEARCH:
        return None
    rows = conn.execute(
        select(_TRIALS.c.final_of, _TRIALS.c.value, _TRIALS.c.test_metrics)
        .where(
            _TRIALS.c.study_id == m["study_pk"],
            _TRIALS.c.state == State.COMPLETE,
            _TRIALS.c.final_of.is_not(None),
        )
        .order_by(_TRIALS.c.final_of, _TRIALS.c.number)
    ).all()
    return final_summary(phase, m["directions"], [(r[0], r[1], r[2]) for r in rows])


def _best_trial(conn: Connection, m: Any, final: dict[str, Any] | None, name: str) -> TrialView:
    """THE best trial of a single-objective study (``_best_row`` ``m``): the final phase's
    winner when its re-trains chose one (and the search trial still exists), else the best
    COMPLETE search trial by the index. Raises Conflict when no search trial completed."""
    if m["id"] is None:
        raise Conflict(_none_best(conn, m, name))
    best_t = trial_view(SimpleNamespace(**m, curve=None), space=m["search_space"])
    if final is not None and final["winner"] is not None and final["winner"] != best_t.number:
        won = conn.execute(
            select(*_TRIAL_COLS).where(
                _TRIALS.c.study_id == m["study_pk"], _TRIALS.c.number == final["winner"]
            )
        ).one_or_none()
        if won is not None:  # else the search trial is gone: keep the index's best
            best_t = trial_view(
                SimpleNamespace(**won._mapping, curve=None), space=m["search_space"]
            )
    return best_t


def _none_best(conn: Connection, m: Any, name: str) -> str:
    """Why a study has no best trial: none completed, or none that met its constraints."""
    infeasible = conn.scalar(
        select(func.count())
        .select_from(_TRIALS)
        .where(
            _TRIALS.c.study_id == m["study_pk"],
            _TRIALS.c.state == State.COMPLETE,
            _TRIALS.c.feasible.is_(False),
        )
    )
    if infeasible:
        return (
            f"study '{name}' has no completed trial that meets its constraints yet "
            f"({infeasible} completed trial(s) violate them)"
        )
    return f"study '{name}' has no completed trial yet"


def best_trial(db: Database, *, tenant: str, name: str) -> TrialView:
    """The trial ``best`` shows as ``best`` (the one whose model GET /best/model serves).

    Raises NotFound for an unknown study; Conflict for a study with several objectives (no
    single best) and until a search trial has completed."""

    def read(conn: Connection) -> TrialView:
        m = _best_row(conn, tenant, name)
        if len(m["directions"]) > 1:
            raise Conflict(
                f"study '{name}' has several objectives, so no single best model: "
                + hint("trial_model", study=name)
            )
        return _best_trial(conn, m, _final_of(conn, m), name)

    return db.read(read)


def best(db: Database, *, tenant: str, name: str) -> BestView:
    """The best trial (one objective) or the Pareto front (several), read by index, with the
    study's baselines, the verdict of the best trial against them, and the final phase.

    Final-phase re-trains (``final_of`` set) are never the best trial nor on the front. When
    re-trains completed, ``final`` groups them (see ``final_summary``), and with a winner
    ``best`` is the search trial whose hyperparameters won on mean value over the seeds (its
    own model is the one to download; see ``best_trial``). ``final`` is None in the search
    phase without re-trains; in the final phase before any re-train completed it has no groups
    yet. ``verdict`` (single objective only) judges ``best`` (see
    ``service.store.baselines.verdict``).

    Raises NotFound for an unknown study, Conflict until a search trial has completed.
    """

    def read(conn: Connection) -> BestView:
        m = _best_row(conn, tenant, name)
        directions, metrics = m["directions"], [o["metric"] for o in m["objectives"]]
        baselines, final = m["study_baselines"], _final_of(conn, m)
        if len(directions) == 1:
            best_t = _best_trial(conn, m, final, name)
            return BestView(
                study=name,
                directions=directions,
                metrics=metrics,
                best=best_t,
                baselines=baselines,
                final=final,
                verdict=verdict(baselines, best_t, m["study_task"]),
            )
        front = conn.execute(
            select(*_TRIAL_COLS)
            .where(
                _TRIALS.c.study_id == m["study_pk"],
                _TRIALS.c.state == State.COMPLETE,
                _TRIALS.c.on_front.is_(True),
                _TRIALS.c.final_of.is_(None),
            )
            .order_by(_TRIALS.c.number)
        ).all()
        if not front:
            raise Conflict(_none_best(conn, m, name))
        return BestView(
            study=name,
            directions=directions,
            metrics=metrics,
            pareto_front=[
                trial_view(SimpleNamespace(**f._mapping, curve=None), space=m["search_space"])
                for f in front
            ],
            baselines=baselines,
            final=final,
        )

    return db.read(read)


def seqtune_study(
    db: Database, storage: optuna.storages.BaseStorage, view: StudyView
) -> optuna.Study:
    """The study as seqtune shows it, for Optuna's plots and importances: its trials that have
    a seqtune record (asked by a seqtune claim, or queued through seqtune, whoever ran them),
    the trials ``/trials`` lists and ``/best`` chooses from, under their own numbers. Trials
    that an outside Optuna client asked on the same study (plain ``study.optimize``) are left
    out here as there: they are outside seqtune's budget and have no curve, model or test
    metrics. Optuna itself (``load_study``, the dashboard, the sampler) sees every trial.

    Reads every trial: for people, not hot paths."""
    ours = frozenset(
        db.run(
            lambda s: s.scalars(
                select(Trial.optuna_trial_id)
                .join(Study, Study.id == Trial.study_id)
                .where(Study.tenant == view.tenant, Study.name == view.name)
            ).all()
        )
    )
    return optuna.load_study(
        study_name=view.optuna_study_name, storage=_OnlyTheseTrials(storage, ours)
    )


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise RuntimeError("a read-only view of seqtune's trials: write through the storage")


class _OnlyTheseTrials(optuna.storages.BaseStorage):
    """A read-only view of an Optuna storage whose studies hold only the trials ``keep``
    names (Optuna trial ids), with their numbers. Optuna's plots and importance evaluators
    read trials through ``get_all_trials`` (a study's ``trials``, ``get_trials`` and the
    storage's own best-trial and count helpers all do), so they see exactly these. A
    BaseStorage is Optuna's public extension point; writes are refused."""

    def __init__(self, base: optuna.storages.BaseStorage, keep: frozenset[int]) -> None:
        self._base, self._keep = base, keep

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return [
            t
            for t in self._base.get_all_trials(study_id, deepcopy=deepcopy, states=states)
            if t._trial_id in self._keep
        ]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._base.get_trial(trial_id)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._base.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._base.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._base.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._base.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._base.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[Any]:  # FrozenStudy, which Optuna keeps private
        return self._base.get_all_studies()

    create_new_study = _refuse
    delete_study = _refuse
    set_study_user_attr = _refuse
    set_study_system_attr = _refuse
    create_new_trial = _refuse
    set_trial_param = _refuse
    set_trial_state_values = _refuse
    set_trial_intermediate_value = _refuse
    set_trial_user_attr = _refuse
    set_trial_system_attr = _refuse


MIN_TRIALS_FOR_IMPORTANCE = 4


def importance(
    db: Database,
    storage: optuna.storages.BaseStorage,
    *,
    tenant: str,
    name: str,
    objective: int = 0,
) -> ImportanceView:
    """Parameter importances (Optuna's default evaluator, PED-ANOVA in Optuna 5).

    Raises Conflict until ``MIN_TRIALS_FOR_IMPORTANCE`` trials completed, NotFound for an
    objective index the study does not have. Reads the study's trials: meant for people, not
    for hot paths.
    """
    view = get_study(db, tenant=tenant, name=name)
    if not 0 <= objective < len(view.directions):
        raise NotFound(
            f"study '{name}' has no objective {objective}: its objectives are "
            f"0 to {len(view.directions) - 1}"
        )
    if view.trials.complete < MIN_TRIALS_FOR_IMPORTANCE:
        raise Conflict(
            f"importances need {MIN_TRIALS_FOR_IMPORTANCE} completed trials; "
            f"'{name}' has {view.trials.complete}"
        )
    if not view.spec.get("search_space"):
        raise Conflict("the study searches no hyperparameter")
    study = seqtune_study(db, storage, view)
    target = None if len(view.directions) == 1 else (lambda t: t.values[objective])
    try:
        imp = optuna.importance.get_param_importances(study, target=target)
    except (ValueError, RuntimeError) as exc:
        raise Conflict(f"importances cannot be computed yet: {exc}") from None
    metric = view.spec["objectives"][objective]["metric"]
    return ImportanceView(
        study=name,
        metric=metric,
        evaluator="PedAnovaImportanceEvaluator",
        n_trials=view.trials.complete,
        importances=dict(imp),
    )
