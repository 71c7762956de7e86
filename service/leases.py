"""Claims, leases and recovery: how trials move from a study's budget to a worker and back.

The lifecycle (Postgres; SQLite gets the same guarantees from its single writer):

1. ``claim``: one worker takes either a RUNNING trial that lost its owner (resume) or a new
   budget slot: an UPDATE of the study row that increments ``n_claimed`` only while
   ``n_claimed < n_trials``, so exactly ``n_trials`` trials ever start, whatever the number of
   workers. While that row is locked the worker calls Optuna's ``ask()`` (which pops enqueued
   trials first), so asks on one study are serialised: no two workers get the same grid point,
   and TPE's constant liar sees every running trial.
2. The claim holds a lease: ``lease_owner`` plus a ``fence`` number. Every epoch's report and
   every heartbeat that follows progress renews it (``lease_renewed_at``).
3. ``report`` and ``finish`` lock the trial row, check owner and fence, and only then write to
   Optuna, inside the same transaction: a fenced-off attempt is refused and changes nothing.
4. ``reap`` (any worker, and the service) finds leases with no progress for the study's lease
   timeout, bumps the fence and frees the trial for another worker (same hyperparameters; the
   resume checkpoint if any), or fails it once ``max_retries`` is spent.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy import (
    Connection,
    String,
    Table,
    bindparam,
    cast,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from service.db import Database
from service.errors import Conflict
from service.models import Checkpoint, Study, Trial, Worker, utcnow
from service.optuna_bridge import distributions, make_pruner, make_sampler
from service.spec import StudySpec
from service.trials import count_move, update_front

log = logging.getLogger(__name__)
_T: Table = Trial.__table__  # type: ignore[assignment]  # Core table for the epoch hot path


class Fenced(Conflict):
    """This attempt no longer holds the trial's lease: its writes are refused."""


@dataclass(frozen=True)
class Claim:
    """A trial held by one attempt. Pass it back to report, finish, release."""

    owner: str
    fence: int
    trial_row_id: int
    number: int
    optuna_trial_id: int
    attempt: int
    params: dict[str, Any]
    study_id: int
    study_name: str
    tenant: str
    optuna_study_name: str
    spec: dict[str, Any] = field(repr=False)
    final_of: int | None = None  # a final-phase re-train of this search trial (never pruned)

    @property
    def resumed(self) -> bool:
        return self.attempt > 1


_STUDIES: dict[tuple[int, str], optuna.Study] = {}


def optuna_study(storage: optuna.storages.BaseStorage, optuna_name: str, spec: StudySpec,
                 seed_offset: int = 0) -> optuna.Study:
    """The Optuna study with the spec's sampler and pruner, cached per process (loading costs
    queries; a study's name, directions and spec never change). The sampler is made afresh,
    seeded per budget slot: samplers sharing one seed in many processes would propose the
    same points, and a fresh one per slot keeps a seeded study reproducible."""
    key = (id(storage), optuna_name)
    study = _STUDIES.get(key)
    if study is None:
        study = optuna.load_study(study_name=optuna_name, storage=storage,
                                  pruner=make_pruner(spec.pruner))
        # Optuna's storage reads every trial of the study into this process the first time
        # (seconds at 10^4 trials); do it now, not later inside ask() under the study lock.
        study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if len(_STUDIES) > 256:
            _STUDIES.clear()
        _STUDIES[key] = study
    sampler_spec = spec.sampler
    if sampler_spec.seed is not None:
        spec = spec.model_copy(update={"sampler": sampler_spec.model_copy(
            update={"seed": (sampler_spec.seed + seed_offset) % 2**32})})
    study.sampler = make_sampler(spec)
    return study


def _claim_view(t: Trial, study: Study) -> Claim:
    assert t.lease_owner is not None
    return Claim(owner=t.lease_owner, fence=t.fence, trial_row_id=t.id, number=t.number,
                 optuna_trial_id=t.optuna_trial_id, attempt=t.attempts, params=t.params,
                 study_id=study.id, study_name=study.name, tenant=study.tenant,
                 optuna_study_name=study.optuna_study_name, spec=study.spec,
                 final_of=t.final_of)


def claim(db: Database, storage: optuna.storages.BaseStorage, *, owner: str,
          studies: list[str] | None = None) -> Claim | None:
    """Take one trial to run, or None when no running study has work for this worker.

    Trials waiting to be resumed come first; then a new budget slot from the running study
    with the highest priority, least recently served, under its ``max_concurrent_trials``.
    """
    hint = db.run(lambda s: s.execute(_pick(studies).with_only_columns(
        Study.optuna_study_name, Study.spec)).first())
    if hint is not None:  # load (and warm) the likely study's Optuna object before locking
        optuna_study(storage, hint[0], StudySpec.model_validate(hint[1]))

    def txn(s: Session) -> Claim | None:
        return _claim_resume(s, owner, studies) or _claim_new(s, storage, owner, studies)

    return db.run(txn)


def _pick(names: list[str] | None) -> Any:
    """The study the next new slot comes from: running, budget left, under its concurrency
    cap; highest priority, then least recently served."""
    pick = (select(Study.id)
            .where(Study.status == "running", Study.n_claimed < Study.n_trials,
                   (Study.max_concurrent.is_(None)) | (Study.n_running < Study.max_concurrent))
            .order_by(Study.priority.desc(), Study.last_served_at.asc().nulls_first(),
                      Study.id)
            .limit(1))
    return pick.where(Study.name.in_(names)) if names else pick


def _claim_resume(s: Session, owner: str, names: list[str] | None) -> Claim | None:
    q = (select(Trial, Study).join(Study, Study.id == Trial.study_id)
         .where(Trial.state == "RUNNING", Trial.lease_owner.is_(None),
                Study.status == "running")
         .order_by(Study.priority.desc(), Trial.id).limit(1)
         .with_for_update(skip_locked=True, of=Trial))
    if names:
        q = q.where(Study.name.in_(names))
    row = s.execute(q).first()
    if row is None:
        return None
    t, study = row
    # Compare-and-set on the owner: safe even where FOR UPDATE is a no-op (SQLite).
    res = s.execute(update(Trial).where(Trial.id == t.id, Trial.lease_owner.is_(None),
                                        Trial.fence == t.fence)
                    .values(lease_owner=owner, worker=owner, fence=Trial.fence + 1,
                            attempts=Trial.attempts + 1, lease_renewed_at=utcnow()))
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    s.refresh(t)
    # The new attempt resumes after its checkpoint's epoch (or from scratch): the curve keeps
    # exactly the epochs it will not replay.
    ck = s.scalar(select(Checkpoint.epoch).where(Checkpoint.trial_id == t.id,
                                                 Checkpoint.kind == "resume"))
    t.curve = [r for r in t.curve if ck is not None and r.get("epoch", -1) <= ck]
    t.epochs = len(t.curve)
    return _claim_view(t, study)


def _claim_new(s: Session, storage: optuna.storages.BaseStorage, owner: str,
               names: list[str] | None) -> Claim | None:
    pick = _pick(names)
    # Wait for the study's row rather than skip it: its lock is held for one ask(). With
    # SKIP LOCKED, workers arriving during another's ask found nothing and idled a whole poll
    # interval (measured: 7 of 56 trials timed at 8 workers). Studies still share the fleet:
    # the least recently served one is picked first.
    study = s.scalar(select(Study).where(Study.id == pick.scalar_subquery())
                     .with_for_update())
    if study is None:
        return None
    # The row we hold is the current one: re-check it before asking, or claimers queued behind
    # the last slot would each leave an extra trial in Optuna.
    if study.status != "running" or study.n_claimed >= study.n_trials or (
            study.max_concurrent is not None and study.n_running >= study.max_concurrent):
        return None
    spec = StudySpec.model_validate(study.spec)
    # Optuna's write comes before ours: on SQLite (one writer for the whole file) Optuna's own
    # connection could not write while this transaction held the write lock. On Postgres the
    # study row is locked from the SELECT above, so asks on one study still never interleave.
    ostudy = optuna_study(storage, study.optuna_study_name, spec,
                          seed_offset=study.n_claimed + 1)
    final_of = _enqueue_retrain(s, ostudy, study, spec) if study.phase == "final" else None
    trial = ostudy.ask(distributions(spec))
    # Exactly n_trials claims, whatever the concurrency: the UPDATE re-checks the budget.
    slot = s.execute(update(Study)
                     .where(Study.id == study.id, Study.status == "running",
                            Study.n_claimed < Study.n_trials)
                     .values(n_claimed=Study.n_claimed + 1, n_running=Study.n_running + 1,
                             last_served_at=utcnow())
                     .returning(Study.n_claimed)).scalar()
    if slot is None:  # lost a race (possible where FOR UPDATE is a no-op): give it back
        ostudy.tell(trial, state=TrialState.FAIL)
        return None
    now = utcnow()
    t = s.scalar(select(Trial).where(Trial.study_id == study.id,
                                     Trial.optuna_trial_id == trial._trial_id))
    if t is not None:  # an enqueued trial that ask() popped
        count_move(s, study.id, "WAITING", None)
        t.state, t.params = "RUNNING", trial.params
        t.lease_owner, t.worker, t.fence, t.attempts = owner, owner, t.fence + 1, 1
        t.started_at, t.lease_renewed_at = now, now
    else:
        t = Trial(study_id=study.id, number=trial.number, optuna_trial_id=trial._trial_id,
                  state="RUNNING", params=trial.params, curve=[], epochs=0, info={},
                  attempts=1, on_front=False, lease_owner=owner, worker=owner, fence=1,
                  started_at=now, lease_renewed_at=now, final_of=final_of)
        s.add(t)
    s.flush()
    return _claim_view(t, study)


def top_trials(s: Session, study: Study, k: int) -> list[Trial]:
    """The study's k best COMPLETE search trials (final re-trains excluded), best first."""
    desc = study.directions[0] == "maximize"
    return list(s.scalars(
        select(Trial).where(Trial.study_id == study.id, Trial.state == "COMPLETE",
                            Trial.final_of.is_(None), Trial.value.is_not(None))
        .order_by(Trial.value.desc() if desc else Trial.value.asc(), Trial.number).limit(k)))


def _enqueue_retrain(s: Session, ostudy: optuna.Study, study: Study, spec: StudySpec) -> int:
    """Final phase: queue the next (configuration, seed) re-train in Optuna so that the
    ask() that follows pops it. Re-trains go in order: each of the top-k configurations
    ``seeds`` times; each gets its own trial number, and the trial number seeds training."""
    assert spec.final is not None
    done = s.scalar(select(func.count()).select_from(Trial).where(
        Trial.study_id == study.id, Trial.final_of.is_not(None))) or 0
    source = top_trials(s, study, spec.final.top_k)[done // spec.final.seeds]
    ostudy.enqueue_trial(source.params, user_attrs={"seqtune_final_of": source.number},
                         skip_if_exists=False)
    return source.number


def end_of_budget(s: Session, study: Study) -> bool:
    """The budget is spent and nothing runs: start the final phase (the spec asks for one and
    the search completed a trial: the budget grows by top_k x seeds re-trains), else
    complete the study. Returns True when the study completed."""
    final = (study.spec or {}).get("final")
    if final and study.phase == "search" and len(study.directions) == 1:
        n_top = len(top_trials(s, study, final["top_k"]))
        if n_top:
            study.phase = "final"
            study.n_trials += n_top * final["seeds"]
            log.info("study %s: search done; re-training its top %d with %d seeds",
                     study.name, n_top, final["seeds"])
            return False
    study.status, study.finished_at = "completed", utcnow()
    return True


def _locked(s: Session, c: Claim) -> Trial:
    t = s.scalar(select(Trial).where(Trial.id == c.trial_row_id).with_for_update())
    if t is None or t.lease_owner != c.owner or t.fence != c.fence or t.state != "RUNNING":
        raise Fenced(f"trial {c.number} of '{c.study_name}' is no longer held by this attempt")
    return t


def renew(db: Database, c: Claim) -> None:
    """Extend the lease (the worker's heartbeat calls this while training progresses)."""

    def txn(s: Session) -> None:
        res = s.execute(update(Trial)
                        .where(Trial.id == c.trial_row_id, Trial.lease_owner == c.owner,
                               Trial.fence == c.fence, Trial.state == "RUNNING")
                        .values(lease_renewed_at=utcnow()))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise Fenced(f"trial {c.number} of '{c.study_name}' was taken from this attempt")

    db.run(txn)


def report(db: Database, c: Claim, trial: optuna.Trial | None, *, epoch: int,
           record: dict[str, Any], value: float | None) -> None:
    """Append an epoch to the learning curve, renew the lease and report ``value`` to Optuna
    (single-objective studies). Raises Fenced.

    The row is locked and the fence checked before Optuna's write and held until the append
    commits, so a reaper fencing this attempt off waits for it, and a fenced attempt never
    reaches Optuna (strictly on Postgres; SQLite has no row locks)."""
    stamped = json.dumps({k: _finite(v) for k, v in {**record, "attempt": c.attempt}.items()})

    def txn(conn: Connection) -> None:
        text_rec = bindparam("rec", stamped, type_=String)
        curve: Any
        if conn.dialect.name == "postgresql":
            curve = _T.c.curve.op("||")(cast(text_rec, JSONB))
        else:
            curve = func.json_insert(_T.c.curve, "$[#]", func.json(text_rec))
        held = (_T.c.id == c.trial_row_id, _T.c.lease_owner == c.owner,
                _T.c.fence == c.fence, _T.c.state == "RUNNING")
        # Lock (Postgres) and check first, then Optuna, then our write: Optuna writes on its
        # own connection, which SQLite's single writer would refuse while we held the lock.
        if conn.execute(select(_T.c.id).where(*held).with_for_update()).first() is None:
            raise Fenced(f"trial {c.number} of '{c.study_name}' is no longer held by this "
                         "attempt")
        if trial is not None and value is not None:
            trial.report(value, epoch)
        conn.execute(update(_T).where(*held).values(curve=curve, epochs=_T.c.epochs + 1,
                                                    lease_renewed_at=utcnow()))

    db.write(txn)


def _finite(v: Any) -> Any:
    """JSON has no NaN or infinity (Postgres' jsonb refuses them): they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def finish(db: Database, ostudy: optuna.Study, c: Claim, *, state: str,
           values: list[float] | None = None, reason: str | None = None,
           test_metrics: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
           error: str | None = None) -> None:
    """Tell Optuna the trial's end and record it, if this attempt still holds the lease.
    Completes the study when its budget is spent and nothing runs. Raises Fenced."""

    def txn(s: Session) -> None:
        t = _locked(s, c)
        _close(s, ostudy, t, state=state, values=values, reason=reason,
               test_metrics=test_metrics, info=info, error=error)

    db.run(txn)


def _close(s: Session, ostudy: optuna.Study | None, t: Trial, *, state: str,
           values: list[float] | None, reason: str | None,
           test_metrics: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
           error: str | None = None, tell: bool = True) -> None:
    # Optuna first, under the trial's lock only: the study row is what claimers queue on while
    # they ask(), so it is taken last and held just for the counters and the completion check.
    if tell and ostudy is not None:
        ostudy.tell(t.number, values=values if state == "COMPLETE" else None,
                    state=TrialState[state], skip_if_finished=True)
    old_state = t.state
    t.state, t.reason, t.error = state, reason, error
    t.values = list(values) if values is not None else None
    t.value = values[0] if values else None
    t.test_metrics = _finite(test_metrics)
    t.info = _finite(info or t.info or {})
    t.lease_owner, t.fence = None, t.fence + 1
    t.finished_at = utcnow()
    s.execute(update(Worker).where(Worker.trial_id == t.id).values(trial_id=None))
    s.flush()
    study = s.scalar(select(Study).where(Study.id == t.study_id).with_for_update())
    assert study is not None
    count_move(s, study.id, old_state, state)
    if state == "COMPLETE" and values and len(study.directions) > 1:
        update_front(s, study, t)
    s.flush()
    s.refresh(study)
    if study.status == "running" and study.n_claimed >= study.n_trials and study.n_running == 0:
        end_of_budget(s, study)


def release(db: Database, c: Claim) -> None:
    """Give the trial back without finishing it (SIGTERM): it stays RUNNING with no owner, and
    the next worker resumes it from its checkpoint. Raises Fenced."""

    def txn(s: Session) -> None:
        t = _locked(s, c)
        t.lease_owner, t.fence, t.lease_renewed_at = None, t.fence + 1, utcnow()

    db.run(txn)


def save_checkpoint(db: Database, c: Claim, *, kind: str, epoch: int, data: bytes) -> None:
    """Store the trial's 'resume' snapshot or 'best' model (fenced: a stale attempt's
    snapshot never overwrites the live one)."""

    def txn(s: Session) -> None:
        if kind == "resume":
            _locked(s, c)
        s.execute(delete(Checkpoint).where(Checkpoint.trial_id == c.trial_row_id,
                                           Checkpoint.kind == kind))
        s.add(Checkpoint(trial_id=c.trial_row_id, kind=kind, epoch=epoch,
                         size_bytes=len(data), data=data))

    db.run(txn)


def load_checkpoint(db: Database, *, trial_row_id: int, kind: str) -> tuple[int, bytes] | None:
    """``(epoch, bytes)`` of a trial's checkpoint, or None."""

    def txn(s: Session) -> tuple[int, bytes] | None:
        row = s.execute(select(Checkpoint.epoch, Checkpoint.data)
                        .where(Checkpoint.trial_id == trial_row_id,
                               Checkpoint.kind == kind)).first()
        return (row[0], row[1]) if row else None

    return db.run(txn)


def has_work(db: Database, *, studies: list[str] | None = None) -> bool:
    """Whether a running study (of ``studies``) still has trials to start or finish."""

    def txn(s: Session) -> bool:
        q = select(Study.id).where(Study.status == "running", (
            Study.n_claimed < Study.n_trials) | (Study.n_running > 0)).limit(1)
        if studies:
            q = q.where(Study.name.in_(studies))
        return s.scalar(q) is not None

    return db.run(txn)


@dataclass
class ReapReport:
    freed: int = 0  # stale attempts fenced off; their trials wait for a worker
    failed: int = 0  # trials failed after max_retries lost leases
    reconciled: int = 0  # trials Optuna had finished but seqtune had not recorded
    orphans: int = 0  # Optuna trials left RUNNING by a crash inside claim
    timed_out: int = 0  # studies past their deadline
    completed: int = 0


def reap(db: Database, storage: optuna.storages.BaseStorage,
         now: datetime | None = None) -> ReapReport:
    """Recover from dead workers. Safe to run from every worker and the service at once."""
    now = now or utcnow()
    out = ReapReport()
    stale = db.run(lambda s: [
        (t.id, str(t.lease_owner), t.fence) for t, study in s.execute(
            select(Trial, Study).join(Study, Study.id == Trial.study_id)
            .where(Trial.state == "RUNNING", Trial.lease_owner.is_not(None)))
        if t.lease_renewed_at is not None
        and _aware(t.lease_renewed_at) < now - timedelta(seconds=study.lease_timeout_s)])
    for trial_id, owner, fence in stale:

        def one(s: Session, i: int = trial_id, o: str = owner, f: int = fence) -> None:
            _reap_one(s, storage, i, o, f, out)

        db.run(one)
    db.run(lambda s: _reap_orphans(s, storage, now, out))
    db.run(lambda s: _reap_studies(s, now, out))
    return out


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=utcnow().tzinfo)


def _reap_one(s: Session, storage: optuna.storages.BaseStorage, trial_id: int, owner: str,
              fence: int, out: ReapReport) -> None:
    t = s.scalar(select(Trial).where(Trial.id == trial_id, Trial.lease_owner == owner,
                                     Trial.fence == fence).with_for_update(skip_locked=True))
    if t is None:
        return  # renewed, finished or reaped by someone else meanwhile
    study = s.get(Study, t.study_id)
    assert study is not None
    frozen = storage.get_trial(t.optuna_trial_id)
    if frozen.state.is_finished():  # its tell went through, our record did not
        _close(s, None, t, state=frozen.state.name, values=frozen.values,
               reason=t.reason or "recovered", tell=False)
        out.reconciled += 1
        return
    study.n_reaped += 1
    if t.attempts > study.max_retries:
        spec = StudySpec.model_validate(study.spec)
        _close(s, optuna_study(storage, study.optuna_study_name, spec), t, state="FAIL",
               values=None, reason="lost",
               error=f"lease lost {t.attempts} time(s); max_retries={study.max_retries}")
        out.failed += 1
        return
    # Fence the dead attempt off; the trial waits, RUNNING and unowned, for a worker.
    t.lease_owner, t.fence = None, t.fence + 1
    s.execute(update(Worker).where(Worker.trial_id == t.id).values(trial_id=None))
    out.freed += 1


def _reap_orphans(s: Session, storage: optuna.storages.BaseStorage, now: datetime,
                  out: ReapReport) -> None:
    """Optuna trials a worker asked for but died before recording (a crash inside claim)."""
    for study in s.scalars(select(Study).where(Study.status.in_(("running", "paused")))):
        grace = timedelta(seconds=study.lease_timeout_s)
        running = storage.get_all_trials(study.optuna_study_id, deepcopy=False,
                                         states=(TrialState.RUNNING,))
        if not running:
            continue
        known = set(s.scalars(select(Trial.optuna_trial_id).where(
            Trial.study_id == study.id, Trial.state == "RUNNING")))
        for ft in running:
            started = ft.datetime_start
            if ft._trial_id in known or started is None:
                continue
            if _aware(started) > now - grace:
                continue
            storage.set_trial_system_attr(ft._trial_id, "seqtune_orphan", True)
            storage.set_trial_state_values(ft._trial_id, TrialState.FAIL)
            out.orphans += 1
            # An enqueued trial popped by the dead ask: queue its params again.
            waiting = s.scalar(select(Trial).where(Trial.study_id == study.id,
                                                   Trial.optuna_trial_id == ft._trial_id))
            if waiting is not None and waiting.state == "WAITING":
                template = optuna.trial.create_trial(
                    state=TrialState.WAITING, system_attrs={"fixed_params": waiting.params})
                new_id = storage.create_new_trial(study.optuna_study_id, template_trial=template)
                waiting.optuna_trial_id = new_id
                waiting.number = storage.get_trial_number_from_id(new_id)


def _reap_studies(s: Session, now: datetime, out: ReapReport) -> None:
    for study in s.scalars(select(Study).where(Study.status == "running")
                           .with_for_update(skip_locked=True)):
        if study.deadline is not None and _aware(study.deadline) < now:
            study.status, study.finished_at = "timed_out", utcnow()
            out.timed_out += 1
        elif study.n_claimed >= study.n_trials and study.n_running == 0 and \
                end_of_budget(s, study):
            out.completed += 1


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]
