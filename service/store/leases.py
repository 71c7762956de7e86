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
3. Every write of an attempt (``report``, ``save_checkpoint``, ``finish`` with the trial's
   model, ``release``) locks the trial row, checks owner and fence, and only then writes, to
   Optuna too, inside the same transaction: a fenced-off attempt is refused and changes nothing.
   ``finish`` stores the model in the transaction that records the value, so a trial's model
   and its value always come from the same attempt.
4. ``reap`` (any worker, and the service) finds leases with no progress for the study's lease
   timeout, bumps the fence and frees the trial for another worker (same hyperparameters; the
   resume checkpoint if any), or fails it once ``max_retries`` is spent.

Other Optuna clients may work on the same study (``study.optimize``, ``enqueue_trial``). The
reaper touches only trials seqtune asked: ``claim`` marks each Optuna trial it asks with the
system attribute ``ASKED_BY`` before sampling it, and only a marked RUNNING trial without a
seqtune record is a claim that died (an orphan). A seqtune-enqueued trial that an outside
client popped is followed instead: RUNNING under the owner ``OUTSIDE`` while that client runs
it, then recorded with Optuna's state and values (reason ``outside_client``), counted in the
budget once, never run again by seqtune.
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
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState
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

from seqtune.errors import Conflict
from seqtune.spec import StudySpec
from seqtune.states import (
    ACTIVE_STATUSES,
    StudyPhase,
    StudyStatus,
    TrialState,
    study_transition,
    trial_transition,
)
from service.store.db import Database
from service.store.optuna import distributions, make_pruner, make_sampler
from service.store.tables import Checkpoint, Study, Trial, Worker, utcnow
from service.store.trials import count_move, update_front

log = logging.getLogger(__name__)
_T: Table = Trial.__table__  # type: ignore[assignment]  # Core table for the epoch hot path

# Optuna system attribute on every trial seqtune's claim asks: the owner that asked it.
ASKED_BY = "seqtune_asked_by"
# Lease owner, worker and reason of a seqtune trial that an outside Optuna client runs.
OUTSIDE = "optuna-client"
OUTSIDE_REASON = "outside_client"
# How long an unmarked RUNNING Optuna trial popped from seqtune's queue must have run before it
# is taken for an outside client's. On Postgres the study row lock already keeps a claim that
# is between its pop and its mark out of sight; the grace covers SQLite (no row locks).
OUTSIDE_GRACE_S = 10.0


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
        study.get_trials(deepcopy=False, states=(OptunaState.WAITING,))
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
        Study.optuna_study_name, Study.spec, Study.id, Study.n_waiting)).first())
    if hint is not None:  # load (and warm) the likely study's Optuna object before locking
        optuna_study(storage, hint[0], StudySpec.model_validate(hint[1]))
        if hint[3] > 0:
            # Queued trials that an outside Optuna client took are settled first, in a
            # transaction of their own: the claim's transaction must not write before its ask
            # (SQLite's single writer), and settling counts them as started.
            db.run(lambda s: settle_outside(s, storage, hint[2], utcnow()))

    def txn(s: Session) -> Claim | None:
        return _claim_resume(s, owner, studies) or _claim_new(s, storage, owner, studies)

    return db.run(txn)


def _pick(names: list[str] | None) -> Any:
    """The study the next new slot comes from: running, budget left, under its concurrency
    cap; highest priority, then least recently served."""
    pick = (select(Study.id)
            .where(Study.status == StudyStatus.RUNNING, Study.n_claimed < Study.n_trials,
                   (Study.max_concurrent.is_(None)) | (Study.n_running < Study.max_concurrent))
            .order_by(Study.priority.desc(), Study.last_served_at.asc().nulls_first(),
                      Study.id)
            .limit(1))
    return pick.where(Study.name.in_(names)) if names else pick


def _claim_resume(s: Session, owner: str, names: list[str] | None) -> Claim | None:
    q = (select(Trial, Study).join(Study, Study.id == Trial.study_id)
         .where(Trial.state == TrialState.RUNNING, Trial.lease_owner.is_(None),
                Study.status == StudyStatus.RUNNING)
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
    if not _has_room(study):
        return None
    if study.n_waiting > 0 and study.n_claimed + study.n_waiting >= study.n_trials and \
            _poppable(s, storage, study) == 0:
        # Every slot left is reserved by a queued trial that cannot be popped now (an outside
        # Optuna client took it moments ago, or a claim that died did): a fresh ask would
        # spend its slot a second time. Step back in the serving order meanwhile, so that the
        # other studies are served; the reaper settles the queued trial.
        study.last_served_at = utcnow()
        return None
    spec = StudySpec.model_validate(study.spec)
    # Optuna's write comes before ours: on SQLite (one writer for the whole file) Optuna's own
    # connection could not write while this transaction held the write lock. On Postgres the
    # study row is locked from the SELECT above, so asks on one study still never interleave.
    ostudy = optuna_study(storage, study.optuna_study_name, spec,
                          seed_offset=study.n_claimed + 1)
    final_of = _enqueue_retrain(s, ostudy, study, spec) if study.phase == StudyPhase.FINAL \
        else None
    trial = _ask(storage, ostudy, distributions(spec), owner)
    # Exactly n_trials claims, whatever the concurrency: the UPDATE re-checks the budget.
    slot = s.execute(update(Study)
                     .where(Study.id == study.id, Study.status == StudyStatus.RUNNING,
                            Study.n_claimed < Study.n_trials)
                     .values(n_claimed=Study.n_claimed + 1, n_running=Study.n_running + 1,
                             last_served_at=utcnow())
                     .returning(Study.n_claimed)).scalar()
    if slot is None:  # lost a race (possible where FOR UPDATE is a no-op): give it back
        ostudy.tell(trial, state=OptunaState.FAIL)
        return None
    now = utcnow()
    t = s.scalar(select(Trial).where(Trial.study_id == study.id,
                                     Trial.optuna_trial_id == trial._trial_id))
    if t is not None:  # an enqueued trial that ask() popped
        count_move(s, study.id, TrialState.WAITING, None)
        t.state = trial_transition("claim", t.state, TrialState.RUNNING, number=t.number)
        t.params = trial.params
        t.lease_owner, t.worker, t.fence, t.attempts = owner, owner, t.fence + 1, 1
        t.started_at, t.lease_renewed_at = now, now
    else:
        t = Trial(study_id=study.id, number=trial.number, optuna_trial_id=trial._trial_id,
                  state=TrialState.RUNNING, params=trial.params, curve=[], epochs=0, info={},
                  attempts=1, on_front=False, lease_owner=owner, worker=owner, fence=1,
                  started_at=now, lease_renewed_at=now, final_of=final_of)
        s.add(t)
    s.flush()
    return _claim_view(t, study)


def _has_room(study: Study) -> bool:
    """The study (row locked) may start a trial: running, budget left, under its cap."""
    return study.status == StudyStatus.RUNNING and study.n_claimed < study.n_trials and (
        study.max_concurrent is None or study.n_running < study.max_concurrent)


def _ask(storage: optuna.storages.BaseStorage, ostudy: optuna.Study,
         dists: dict[str, BaseDistribution], owner: str) -> optuna.Trial:
    """``ostudy.ask(dists)``, with the trial marked as seqtune's (``ASKED_BY``) right after
    Optuna creates or pops it and before the sampler runs, so that the window in which a dying
    claim leaves an unmarked trial is one write wide. The parameters are then suggested
    exactly as ask() suggests fixed distributions (enqueued values honoured)."""
    trial = ostudy.ask()
    storage.set_trial_system_attr(trial._trial_id, ASKED_BY, owner)
    for name, dist in dists.items():
        if isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            assert isinstance(dist, CategoricalDistribution)
            trial.suggest_categorical(name, dist.choices)
    return trial


def top_trials(s: Session, study: Study, k: int) -> list[Trial]:
    """The study's k best COMPLETE search trials (final re-trains excluded), best first."""
    desc = study.directions[0] == "maximize"
    return list(s.scalars(
        select(Trial).where(Trial.study_id == study.id, Trial.state == TrialState.COMPLETE,
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
    if final and study.phase == StudyPhase.SEARCH and len(study.directions) == 1:
        n_top = len(top_trials(s, study, final["top_k"]))
        if n_top:
            study.phase = StudyPhase.FINAL
            study.n_trials += n_top * final["seeds"]
            log.info("study %s: search done; re-training its top %d with %d seeds",
                     study.name, n_top, final["seeds"])
            return False
    study.status = study_transition("complete", study.status, name=study.name)
    study.finished_at = utcnow()
    return True


def _locked(s: Session, c: Claim) -> Trial:
    t = s.scalar(select(Trial).where(Trial.id == c.trial_row_id).with_for_update())
    if t is None or t.lease_owner != c.owner or t.fence != c.fence or t.state != TrialState.RUNNING:
        raise Fenced(f"trial {c.number} of '{c.study_name}' is no longer held by this attempt")
    return t


def renew(db: Database, c: Claim) -> None:
    """Extend the lease (the worker's heartbeat calls this while training progresses)."""

    def txn(s: Session) -> None:
        res = s.execute(update(Trial)
                        .where(Trial.id == c.trial_row_id, Trial.lease_owner == c.owner,
                               Trial.fence == c.fence, Trial.state == TrialState.RUNNING)
                        .values(lease_renewed_at=utcnow()))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise Fenced(f"trial {c.number} of '{c.study_name}' was taken from this attempt")

    db.run(txn)


def report(db: Database, c: Claim, trial: optuna.Trial | None, *, epoch: int,
           record: dict[str, Any], value: float | None) -> None:
    """Append an epoch to the learning curve, renew the lease and report ``value`` to Optuna
    (single-objective studies) as the intermediate value of step ``epoch``, replacing the
    value an earlier attempt reported for that step (see ``report_value``). Raises Fenced.

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
                _T.c.fence == c.fence, _T.c.state == TrialState.RUNNING)
        # Lock (Postgres) and check first, then Optuna, then our write: Optuna writes on its
        # own connection, which SQLite's single writer would refuse while we held the lock.
        if conn.execute(select(_T.c.id).where(*held).with_for_update()).first() is None:
            raise Fenced(f"trial {c.number} of '{c.study_name}' is no longer held by this "
                         "attempt")
        if trial is not None and value is not None:
            report_value(trial, epoch, value)
        conn.execute(update(_T).where(*held).values(curve=curve, epochs=_T.c.epochs + 1,
                                                    lease_renewed_at=utcnow()))

    db.write(txn)


def report_value(trial: optuna.Trial, step: int, value: float) -> None:
    """Set the intermediate value of ``step`` in Optuna, overwriting any earlier one.

    An attempt resumed after a lost lease (kill -9, a frozen worker) redoes the epochs after
    its checkpoint, and seqtune's curve keeps the new attempt's records for them. Optuna's
    ``Trial.report()`` keeps the first value of a step (it warns "already reported" and drops
    the new one), so pruners, plots and the dashboard would go on seeing the lost attempt's
    curve. ``BaseStorage.set_trial_intermediate_value`` is documented to overwrite the value
    of an existing step (RDBStorage updates the row) and is what ``report()`` itself calls.
    The Trial's own copy of its values, which ``should_prune()`` reads, is kept in step the
    way ``report()`` keeps it."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    trial.storage.set_trial_intermediate_value(trial._trial_id, int(step), float(value))
    trial._cached_frozen_trial.intermediate_values[int(step)] = float(value)


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
           error: str | None = None, model: bytes | None = None,
           model_epoch: int | None = None) -> None:
    """Tell Optuna the trial's end and record it, if this attempt still holds the lease.
    ``model`` (a torch checkpoint of the restored best weights, trained at ``model_epoch``)
    becomes the trial's 'best' checkpoint in the same transaction, under the same fence check:
    a trial's model and its value always come from the one attempt that finished it, and a
    refused finish stores nothing. Completes the study when its budget is spent and nothing
    runs. Raises Fenced."""

    def txn(s: Session) -> None:
        t = _locked(s, c)
        # Optuna's tell (inside _close) writes first, on its own connection: SQLite's single
        # writer would block it behind this transaction had the checkpoint been written before.
        _close(s, ostudy, t, action="finish", state=state, values=values, reason=reason,
               test_metrics=test_metrics, info=info, error=error)
        if model is not None:
            _put_checkpoint(s, t.id, kind="best", epoch=model_epoch or 0, data=model)

    db.run(txn)


def _close(s: Session, ostudy: optuna.Study | None, t: Trial, *, action: str, state: str,
           values: list[float] | None, reason: str | None,
           test_metrics: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
           error: str | None = None, tell: bool = True) -> None:
    # Optuna first, under the trial's lock only: the study row is what claimers queue on while
    # they ask(), so it is taken last and held just for the counters and the completion check.
    if tell and ostudy is not None:
        ostudy.tell(t.number, values=values if state == TrialState.COMPLETE else None,
                    state=OptunaState[state], skip_if_finished=True)
    old_state = t.state
    t.state = trial_transition(action, old_state, state, number=t.number)
    t.reason, t.error = reason, error
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
    if state == TrialState.COMPLETE and values and len(study.directions) > 1:
        update_front(s, study, t)
    s.flush()
    s.refresh(study)
    if study.status == StudyStatus.RUNNING and study.n_claimed >= study.n_trials \
            and study.n_running == 0:
        end_of_budget(s, study)


def release(db: Database, c: Claim) -> None:
    """Give the trial back without finishing it (SIGTERM): it stays RUNNING with no owner, and
    the next worker resumes it from its checkpoint. Raises Fenced."""

    def txn(s: Session) -> None:
        t = _locked(s, c)
        t.lease_owner, t.fence, t.lease_renewed_at = None, t.fence + 1, utcnow()

    db.run(txn)


def save_checkpoint(db: Database, c: Claim, *, kind: str, epoch: int, data: bytes) -> None:
    """Store the trial's 'resume' snapshot or 'best' model, if this attempt still holds the
    lease: the trial row is locked and owner and fence checked first, as ``report`` and
    ``finish`` do, so a stale attempt never overwrites the live attempt's snapshot nor the
    model of a trial another attempt finished (a finished trial is held by no attempt).
    Workers store the model with ``finish(model=...)``. Raises Fenced."""

    def txn(s: Session) -> None:
        _locked(s, c)  # held until commit: a reaper fencing this attempt off waits for it
        _put_checkpoint(s, c.trial_row_id, kind=kind, epoch=epoch, data=data)

    db.run(txn)


def _put_checkpoint(s: Session, trial_row_id: int, *, kind: str, epoch: int,
                    data: bytes) -> None:
    """Replace the trial's checkpoint of ``kind`` (the caller holds the trial's row lock)."""
    s.execute(delete(Checkpoint).where(Checkpoint.trial_id == trial_row_id,
                                       Checkpoint.kind == kind))
    s.add(Checkpoint(trial_id=trial_row_id, kind=kind, epoch=epoch, size_bytes=len(data),
                     data=data))


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
        q = select(Study.id).where(Study.status == StudyStatus.RUNNING, (
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
    outside: int = 0  # queued seqtune trials an outside Optuna client took or finished
    timed_out: int = 0  # studies past their deadline
    completed: int = 0


def reap(db: Database, storage: optuna.storages.BaseStorage,
         now: datetime | None = None) -> ReapReport:
    """Recover from dead workers. Safe to run from every worker and the service at once."""
    now = now or utcnow()
    out = ReapReport()
    # An outside client's run of a queued trial has no lease to expire: it ends in Optuna.
    stale = db.run(lambda s: [
        (t.id, str(t.lease_owner), t.fence) for t, study in s.execute(
            select(Trial, Study).join(Study, Study.id == Trial.study_id)
            .where(Trial.state == TrialState.RUNNING, Trial.lease_owner.is_not(None),
                   Trial.lease_owner != OUTSIDE))
        if t.lease_renewed_at is not None
        and t.lease_renewed_at < now - timedelta(seconds=study.lease_timeout_s)])
    for trial_id, owner, fence in stale:

        def one(s: Session, i: int = trial_id, o: str = owner, f: int = fence) -> None:
            _reap_one(s, storage, i, o, f, out)

        db.run(one)
    db.run(lambda s: _reap_orphans(s, storage, now, out))
    # Studies where an outside client may hold a seqtune trial: queued ones, or ones it runs.
    outside_runs = select(Trial.id).where(Trial.study_id == Study.id,
                                          Trial.state == TrialState.RUNNING,
                                          Trial.lease_owner == OUTSIDE).exists()
    ids = db.run(lambda s: list(s.scalars(select(Study.id).where(
        (Study.n_waiting > 0) | outside_runs).order_by(Study.id))))
    for study_id in ids:

        def outside(s: Session, i: int = study_id) -> None:
            out.outside += settle_outside(s, storage, i, now)

        db.run(outside)
    db.run(lambda s: _reap_studies(s, now, out))
    return out


def _optuna_utc(ts: datetime) -> datetime:
    """An Optuna trial's timestamp (Optuna's storage, not ours: ``UtcDateTime`` does not
    cover it), naive on every backend, taken as UTC."""
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
        _close(s, None, t, action="reconcile", state=frozen.state.name,
               values=frozen.values, reason=t.reason or "recovered", tell=False)
        out.reconciled += 1
        return
    study.n_reaped += 1
    if t.attempts > study.max_retries:
        spec = StudySpec.model_validate(study.spec)
        _close(s, optuna_study(storage, study.optuna_study_name, spec), t, action="reap",
               state=TrialState.FAIL,
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
    """Fail the RUNNING Optuna trials that seqtune asked (``ASKED_BY``) and has no running
    record of, once older than the lease timeout: a claim died between its ask and its
    commit (its claim would have committed within the timeout). Each is marked
    ``seqtune_orphan``; a queued trial it had popped is queued again. A RUNNING trial seqtune
    did not ask belongs to an outside Optuna client, alive or not, and is left alone (a
    queued seqtune trial among them: ``settle_outside``). All of Optuna's writes come before
    ours (SQLite's single writer)."""
    requeued: list[tuple[Trial, int]] = []
    for study in s.scalars(select(Study).where(Study.status.in_(ACTIVE_STATUSES))):
        running = storage.get_all_trials(study.optuna_study_id, deepcopy=False,
                                         states=(OptunaState.RUNNING,))
        if not running:
            continue
        grace = timedelta(seconds=study.lease_timeout_s)
        known = set(s.scalars(select(Trial.optuna_trial_id).where(
            Trial.study_id == study.id, Trial.state == TrialState.RUNNING)))
        for ft in running:
            started = ft.datetime_start
            if ft._trial_id in known or started is None or ASKED_BY not in ft.system_attrs:
                continue
            if _optuna_utc(started) > now - grace:
                continue
            storage.set_trial_system_attr(ft._trial_id, "seqtune_orphan", True)
            try:
                storage.set_trial_state_values(ft._trial_id, OptunaState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # finished meanwhile
            out.orphans += 1
            # An enqueued trial popped by the dead ask: queue its params again.
            waiting = s.scalar(select(Trial).where(Trial.study_id == study.id,
                                                   Trial.optuna_trial_id == ft._trial_id,
                                                   Trial.state == TrialState.WAITING))
            if waiting is not None:
                requeued.append((waiting, _queue_again(storage, study, waiting.params)))
    for t, new_id in requeued:
        _point_at(storage, t, new_id)


def settle_outside(s: Session, storage: optuna.storages.BaseStorage, study_id: int,
                   now: datetime) -> int:
    """Settle one study's seqtune trials that an outside Optuna client took (see
    ``_settle_waiting``) and record those it ran that ended in Optuna. Returns how many trials
    it moved. Locks the study row (SKIP LOCKED: a study whose claim is asking right now, and
    so may be between its pop and its mark, waits for the next round)."""
    study = s.scalar(select(Study).where(Study.id == study_id)
                     .with_for_update(skip_locked=True))
    if study is None:
        return 0
    moved = _settle_waiting(s, storage, study, now) if study.n_waiting > 0 else 0
    for t in s.scalars(select(Trial).where(Trial.study_id == study.id,
                                           Trial.state == TrialState.RUNNING,
                                           Trial.lease_owner == OUTSIDE).with_for_update()):
        frozen = storage.get_trial(t.optuna_trial_id)
        if frozen.state.is_finished():
            _record_outside(s, t, frozen)
            moved += 1
    return moved


def _poppable(s: Session, storage: optuna.storages.BaseStorage, study: Study) -> int:
    """How many of the study's queued seqtune trials are still in Optuna's queue (what the
    next ask() can pop). Reads only."""
    queued = {ft._trial_id for ft in storage.get_all_trials(
        study.optuna_study_id, deepcopy=False, states=(OptunaState.WAITING,))}
    ids = s.scalars(select(Trial.optuna_trial_id).where(Trial.study_id == study.id,
                                                        Trial.state == TrialState.WAITING))
    return sum(1 for i in ids if i in queued)


def _settle_waiting(s: Session, storage: optuna.storages.BaseStorage, study: Study,
                    now: datetime) -> int:
    """Settle the study's queued (WAITING) seqtune trials whose Optuna trial left Optuna's
    queue without a seqtune claim taking it. The caller holds the study's row lock.

    - popped and RUNNING, not asked by seqtune, for ``OUTSIDE_GRACE_S``: an outside client
      runs it. It becomes RUNNING under the owner ``OUTSIDE`` and counts as started (one
      budget slot, the one its enqueue reserved); no lease expires it.
    - finished, not asked by seqtune: an outside client ran it to the end: recorded with
      Optuna's state and values, counted as started, never run again.
    - finished after seqtune asked it: a claim gave it back unrun (it lost its slot): queued
      again. (RUNNING after seqtune asked it: an orphan, see ``_reap_orphans``.)

    Optuna's writes come before ours (SQLite's single writer). Returns how many trials it
    moved out of WAITING."""
    rows = s.scalars(select(Trial)
                     .where(Trial.study_id == study.id, Trial.state == TrialState.WAITING)
                     .order_by(Trial.id).with_for_update()).all()
    # One read for the usual case (every queued trial still queued); the others one by one.
    queued = {ft._trial_id for ft in storage.get_all_trials(
        study.optuna_study_id, deepcopy=False, states=(OptunaState.WAITING,))}
    adopt: list[tuple[Trial, FrozenTrial]] = []
    ended: list[tuple[Trial, FrozenTrial]] = []
    requeued: list[tuple[Trial, int]] = []
    for t in rows:
        if t.optuna_trial_id in queued:
            continue
        try:
            ft = storage.get_trial(t.optuna_trial_id)
        except KeyError:  # gone from Optuna (deleted by hand): queue the params again
            requeued.append((t, _queue_again(storage, study, t.params)))
            continue
        asked = ASKED_BY in ft.system_attrs
        if ft.state == OptunaState.RUNNING:
            started = ft.datetime_start
            if not asked and started is not None and \
                    _optuna_utc(started) <= now - timedelta(seconds=OUTSIDE_GRACE_S):
                adopt.append((t, ft))
        elif ft.state.is_finished():
            if asked:
                requeued.append((t, _queue_again(storage, study, t.params)))
            else:
                ended.append((t, ft))
    # Optuna's writes are done: ours follow.
    for t, new_id in requeued:
        _point_at(storage, t, new_id)
    for t, ft in adopt:
        count_move(s, study.id, TrialState.WAITING, TrialState.RUNNING)
        s.execute(update(Study).where(Study.id == study.id)
                  .values(n_claimed=Study.n_claimed + 1))
        t.state = trial_transition("adopt", t.state, TrialState.RUNNING, number=t.number)
        t.params = dict(ft.params) or t.params
        t.lease_owner, t.worker, t.fence, t.attempts = OUTSIDE, OUTSIDE, t.fence + 1, 1
        t.started_at, t.lease_renewed_at = ft.datetime_start, now
        log.info("study %s: trial %d is run by an outside Optuna client", study.name,
                 t.number)
    for t, ft in ended:
        _record_outside(s, t, ft)
    s.flush()
    return len(adopt) + len(ended)


def _record_outside(s: Session, t: Trial, frozen: FrozenTrial) -> None:
    """Record the end of a seqtune trial that an outside Optuna client ran: Optuna's state,
    values and parameters, reason ``OUTSIDE_REASON``. A trial still WAITING here (popped and
    finished between two looks) counts as started now. Optuna is not told anything: it is
    where the result came from. The caller holds the trial's row lock."""
    if t.state == TrialState.WAITING:
        s.execute(update(Study).where(Study.id == t.study_id)
                  .values(n_claimed=Study.n_claimed + 1))
        t.attempts, t.started_at = 1, frozen.datetime_start
    t.params, t.worker = dict(frozen.params) or t.params, OUTSIDE
    _close(s, None, t, action="record", state=frozen.state.name, values=frozen.values,
           reason=OUTSIDE_REASON, tell=False)
    if frozen.datetime_complete is not None:
        t.finished_at = frozen.datetime_complete
    log.info("trial %d (study id %d) ended %s in an outside Optuna client", t.number,
             t.study_id, frozen.state.name)


def _queue_again(storage: optuna.storages.BaseStorage, study: Study,
                 params: dict[str, Any]) -> int:
    """A new WAITING Optuna trial with a seqtune-enqueued trial's parameters (the one it
    pointed at was popped by a claim that died or gave it back). Returns its id."""
    template = optuna.trial.create_trial(state=OptunaState.WAITING,
                                         system_attrs={"fixed_params": params})
    return storage.create_new_trial(study.optuna_study_id, template_trial=template)


def _point_at(storage: optuna.storages.BaseStorage, t: Trial, optuna_trial_id: int) -> None:
    """Point a queued seqtune trial at a new Optuna trial: it takes that trial's number."""
    t.optuna_trial_id = optuna_trial_id
    t.number = storage.get_trial_number_from_id(optuna_trial_id)


def _reap_studies(s: Session, now: datetime, out: ReapReport) -> None:
    for study in s.scalars(select(Study).where(Study.status == StudyStatus.RUNNING)
                           .with_for_update(skip_locked=True)):
        if study.deadline is not None and study.deadline < now:
            study.status = study_transition("time_out", study.status, name=study.name)
            study.finished_at = utcnow()
            out.timed_out += 1
        elif study.n_claimed >= study.n_trials and study.n_running == 0 and \
                end_of_budget(s, study):
            out.completed += 1


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]
