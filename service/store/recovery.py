"""Recovery: reaping dead attempts, and seqtune trials that outside Optuna clients take.

``reap`` (any worker, and the service) finds leases with no progress for the study's lease
timeout, bumps the fence and frees the trial for another worker (same hyperparameters; the
resume checkpoint if any), or fails it once ``max_retries`` is spent. It also fails orphans
(Optuna trials a claim asked and died before recording), settles outside clients' trials, and
times out or completes studies.

Other Optuna clients may work on the same study (``study.optimize``, ``enqueue_trial``). The
reaper touches only trials seqtune asked: ``claim`` marks each Optuna trial it asks with the
system attribute ``ASKED_BY`` before sampling it, and only a marked RUNNING trial without a
seqtune record is a claim that died (an orphan). A seqtune-enqueued trial that an outside
client popped is followed instead: RUNNING under the owner ``OUTSIDE`` while that client runs
it, then recorded with Optuna's state and values (reason ``outside_client``), counted in the
budget once, never run again by seqtune.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from seqtune.search import CONSTRAINTS_ATTR
from seqtune.spec import StudySpec
from seqtune.states import (
    ACTIVE_STATUSES,
    StudyPhase,
    StudyStatus,
    TrialState,
    study_transition,
    trial_transition,
)
from service.store import buffer
from service.store.budget import close_trial, end_of_budget
from service.store.db import Database
from service.store.optuna import ASKED_BY, optuna_study
from service.store.tables import Study, Trial, Worker, utcnow
from service.store.trials import count_move

log = logging.getLogger(__name__)

# Lease owner, worker and reason of a seqtune trial that an outside Optuna client runs.
OUTSIDE = "optuna-client"
OUTSIDE_REASON = "outside_client"
# How long an unmarked RUNNING Optuna trial popped from seqtune's queue must have run before it
# is taken for an outside client's. On Postgres the study row lock already keeps a claim that
# is between its pop and its mark out of sight; the grace covers SQLite (no row locks).
OUTSIDE_GRACE_S = 10.0


@dataclass(frozen=True)
class ReapReport:
    """What one ``reap`` did."""

    freed: int = 0  # stale attempts fenced off; their trials wait for a worker
    failed: int = 0  # trials failed after max_retries lost leases
    reconciled: int = 0  # trials Optuna had finished but seqtune had not recorded
    orphans: int = 0  # Optuna trials left RUNNING by a crash inside claim
    outside: int = 0  # queued seqtune trials an outside Optuna client took or finished
    timed_out: int = 0  # studies past their deadline
    completed: int = 0
    cancelled: int = 0  # suggestions asked ahead that their study no longer has room for


@dataclass
class _Tally:
    """``ReapReport``'s counts while a reap runs (its transactions add to them)."""

    freed: int = 0
    failed: int = 0
    reconciled: int = 0
    orphans: int = 0
    outside: int = 0
    timed_out: int = 0
    completed: int = 0
    cancelled: int = 0


def _violations(frozen: optuna.trial.FrozenTrial) -> list[float] | None:
    """The constraint violations a worker stored on the Optuna trial before its tell, if any
    (``budget.close_trial``): a reconciled trial keeps its feasibility."""
    got = frozen.user_attrs.get(CONSTRAINTS_ATTR)
    return [float(v) for v in got] if isinstance(got, list) else None


def reap(
    db: Database, storage: optuna.storages.BaseStorage, *, now: datetime | None = None
) -> ReapReport:
    """Recover from dead workers: free or fail the trials of stale leases, fail orphans,
    settle outside clients' trials, time out and complete studies; each in a transaction of
    its own. Returns what it did. Safe to run from every worker and the service at once."""
    now = now or utcnow()
    out = _Tally()
    # An outside client's run of a queued trial has no lease to expire: it ends in Optuna.
    stale = db.run(
        lambda s: [
            (t.id, str(t.lease_owner), t.fence)
            for t, study in s.execute(
                select(Trial, Study)
                .join(Study, Study.id == Trial.study_id)
                .where(
                    Trial.state == TrialState.RUNNING,
                    Trial.lease_owner.is_not(None),
                    Trial.lease_owner != OUTSIDE,
                )
            )
            if t.lease_renewed_at is not None
            and t.lease_renewed_at < now - timedelta(seconds=study.lease_timeout_s)
        ]
    )
    for trial_id, owner, fence in stale:

        def one(s: Session, i: int = trial_id, o: str = owner, f: int = fence) -> None:
            _reap_one(s, storage, i, o, f, out)

        db.run(one)
    db.run(lambda s: _reap_orphans(s, storage, now, out))
    # Studies where an outside client may hold a seqtune trial: queued ones, or ones it runs.
    outside_runs = (
        select(Trial.id)
        .where(
            Trial.study_id == Study.id,
            Trial.state == TrialState.RUNNING,
            Trial.lease_owner == OUTSIDE,
        )
        .exists()
    )
    ids = db.run(
        lambda s: list(
            s.scalars(
                select(Study.id).where((Study.n_waiting > 0) | outside_runs).order_by(Study.id)
            )
        )
    )
    for study_id in ids:

        def outside(s: Session, i: int = study_id) -> None:
            out.outside += settle_outside(s, storage, study_id=i, now=now)

        db.run(outside)
    db.run(lambda s: _reap_studies(s, now, out))
    _cancel_buffers(db, storage, out)
    return ReapReport(**asdict(out))


def _cancel_buffers(db: Database, storage: optuna.storages.BaseStorage, out: _Tally) -> None:
    """Cancel the suggestions of studies that are no longer running or have lost the budget
    for them (a path that changed the study without cancelling them, or a queued trial that
    took their slot), each study in a transaction of its own, and fail them in Optuna."""
    over = (
        (Study.status != StudyStatus.RUNNING)
        | (Study.phase != StudyPhase.SEARCH)
        | (Study.n_claimed + Study.n_waiting + Study.n_buffered > Study.n_trials)
    )
    ids = db.run(
        lambda s: list(
            s.scalars(select(Study.id).where(Study.n_buffered > 0, over).order_by(Study.id))
        )
    )
    for study_id in ids:

        def one(s: Session, i: int = study_id) -> list[int]:
            study = s.scalar(select(Study).where(Study.id == i).with_for_update(skip_locked=True))
            if study is None or study.n_buffered <= buffer.keep_for(study):
                return []
            return buffer.cancel(s, study, keep=buffer.keep_for(study))

        out.cancelled += buffer.fail_cancelled(storage, db.run(one))


def _optuna_utc(ts: datetime) -> datetime:
    """An Optuna trial's timestamp (Optuna's storage, not ours: ``UtcDateTime`` does not
    cover it), naive on every backend, taken as UTC."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=utcnow().tzinfo)


def _reap_one(
    s: Session,
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    owner: str,
    fence: int,
    out: _Tally,
) -> None:
    t = s.scalar(
        select(Trial)
        .where(Trial.id == trial_id, Trial.lease_owner == owner, Trial.fence == fence)
        .with_for_update(skip_locked=True)
    )
    if t is None:
        return  # renewed, finished or reaped by someone else meanwhile
    study = s.get(Study, t.study_id)
    assert study is not None
    frozen = storage.get_trial(t.optuna_trial_id)
    if frozen.state.is_finished():  # its tell went through, our record did not
        close_trial(
            s,
            None,
            t,
            action="reconcile",
            state=frozen.state.name,
            values=frozen.values,
            reason=t.reason or "recovered",
            tell=False,
            constraints=_violations(frozen),
        )
        out.reconciled += 1
        return
    study.n_reaped += 1
    if t.attempts > study.max_retries:
        spec = StudySpec.model_validate(study.spec)
        close_trial(
            s,
            optuna_study(storage, study.optuna_study_name, spec),
            t,
            action="reap",
            state=TrialState.FAIL,
            values=None,
            reason="lost",
            error=f"lease lost {t.attempts} time(s); max_retries={study.max_retries}",
        )
        out.failed += 1
        return
    # Fence the dead attempt off; the trial waits, RUNNING and unowned, for a worker.
    t.lease_owner, t.fence = None, t.fence + 1
    s.execute(update(Worker).where(Worker.trial_id == t.id).values(trial_id=None))
    out.freed += 1


def _reap_orphans(
    s: Session, storage: optuna.storages.BaseStorage, now: datetime, out: _Tally
) -> None:
    """Fail the RUNNING Optuna trials that seqtune asked (``ASKED_BY``) and has no running
    record of, once older than the lease timeout: a claim died between its ask and its
    commit (its claim would have committed within the timeout). Each is marked
    ``seqtune_orphan``; a queued trial it had popped is queued again. A RUNNING trial seqtune
    did not ask belongs to an outside Optuna client, alive or not, and is left alone (a
    queued seqtune trial among them: ``settle_outside``). All of Optuna's writes come before
    ours (SQLite's single writer)."""
    requeued: list[tuple[Trial, int]] = []
    # Studies that ended in the last day too: a suggestion cancelled with its study's end
    # whose failing in Optuna did not happen (a crash between commit and tell) is found here.
    recent = now - timedelta(days=1)
    for study in s.scalars(
        select(Study).where(Study.status.in_(ACTIVE_STATUSES) | (Study.updated_at > recent))
    ):
        running = storage.get_all_trials(
            study.optuna_study_id, deepcopy=False, states=(OptunaState.RUNNING,)
        )
        if not running:
            continue
        grace = timedelta(seconds=study.lease_timeout_s)
        # Suggestions first: a claim that pops one between the two reads then shows up as a
        # running trial (the other way round, it would be in neither and failed here).
        buffered = buffer.buffered_ids(s, study.id)
        known = buffered | set(
            s.scalars(
                select(Trial.optuna_trial_id).where(
                    Trial.study_id == study.id, Trial.state == TrialState.RUNNING
                )
            )
        )
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
            waiting = s.scalar(
                select(Trial).where(
                    Trial.study_id == study.id,
                    Trial.optuna_trial_id == ft._trial_id,
                    Trial.state == TrialState.WAITING,
                )
            )
            if waiting is not None:
                requeued.append((waiting, _queue_again(storage, study, waiting.params)))
    for t, new_id in requeued:
        _point_at(storage, t, new_id)


def settle_outside(
    s: Session, storage: optuna.storages.BaseStorage, *, study_id: int, now: datetime
) -> int:
    """Settle one study's seqtune trials that an outside Optuna client took (see
    ``_settle_waiting``) and record those it ran that ended in Optuna. Returns how many trials
    it moved. Takes the study's ask lock, and then its row, only if they are free (a study
    whose claim is asking right now, and so may be between its pop and its mark, waits for
    the next round)."""
    if not buffer.ask_lock(s, study_id, wait=False):
        return 0
    study = s.scalar(select(Study).where(Study.id == study_id).with_for_update(skip_locked=True))
    if study is None:
        return 0
    moved = _settle_waiting(s, storage, study, now) if study.n_waiting > 0 else 0
    for t in s.scalars(
        select(Trial)
        .where(
            Trial.study_id == study.id,
            Trial.state == TrialState.RUNNING,
            Trial.lease_owner == OUTSIDE,
        )
        .with_for_update()
    ):
        frozen = storage.get_trial(t.optuna_trial_id)
        if frozen.state.is_finished():
            _record_outside(s, t, frozen)
            moved += 1
    return moved


def poppable(s: Session, storage: optuna.storages.BaseStorage, study: Study) -> int:
    """How many of the study's queued seqtune trials are still in Optuna's queue (what the
    next ask() can pop). Reads only."""
    queued = {
        ft._trial_id
        for ft in storage.get_all_trials(
            study.optuna_study_id, deepcopy=False, states=(OptunaState.WAITING,)
        )
    }
    ids = s.scalars(
        select(Trial.optuna_trial_id).where(
            Trial.study_id == study.id, Trial.state == TrialState.WAITING
        )
    )
    return sum(1 for i in ids if i in queued)


def _settle_waiting(
    s: Session, storage: optuna.storages.BaseStorage, study: Study, now: datetime
) -> int:
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
    rows = s.scalars(
        select(Trial)
        .where(Trial.study_id == study.id, Trial.state == TrialState.WAITING)
        .order_by(Trial.id)
        .with_for_update()
    ).all()
    # One read for the usual case (every queued trial still queued); the others one by one.
    queued = {
        ft._trial_id
        for ft in storage.get_all_trials(
            study.optuna_study_id, deepcopy=False, states=(OptunaState.WAITING,)
        )
    }
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
            if (
                not asked
                and started is not None
                and _optuna_utc(started) <= now - timedelta(seconds=OUTSIDE_GRACE_S)
            ):
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
        s.execute(update(Study).where(Study.id == study.id).values(n_claimed=Study.n_claimed + 1))
        t.state = trial_transition("adopt", t.state, TrialState.RUNNING, number=t.number)
        t.params = dict(ft.params) or t.params
        t.lease_owner, t.worker, t.fence, t.attempts = OUTSIDE, OUTSIDE, t.fence + 1, 1
        t.started_at, t.lease_renewed_at = ft.datetime_start, now
        log.info("study %s: trial %d is run by an outside Optuna client", study.name, t.number)
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
        s.execute(update(Study).where(Study.id == t.study_id).values(n_claimed=Study.n_claimed + 1))
        t.attempts, t.started_at = 1, frozen.datetime_start
    t.params, t.worker = dict(frozen.params) or t.params, OUTSIDE
    close_trial(
        s,
        None,
        t,
        action="record",
        state=frozen.state.name,
        values=frozen.values,
        reason=OUTSIDE_REASON,
        tell=False,
    )
    if frozen.datetime_complete is not None:
        t.finished_at = frozen.datetime_complete
    log.info(
        "trial %d (study id %d) ended %s in an outside Optuna client",
        t.number,
        t.study_id,
        frozen.state.name,
    )


def _queue_again(storage: optuna.storages.BaseStorage, study: Study, params: dict[str, Any]) -> int:
    """A new WAITING Optuna trial with a seqtune-enqueued trial's parameters (the one it
    pointed at was popped by a claim that died or gave it back). Returns its id."""
    template = optuna.trial.create_trial(
        state=OptunaState.WAITING, system_attrs={"fixed_params": params}
    )
    return storage.create_new_trial(study.optuna_study_id, template_trial=template)


def _point_at(storage: optuna.storages.BaseStorage, t: Trial, optuna_trial_id: int) -> None:
    """Point a queued seqtune trial at a new Optuna trial: it takes that trial's number."""
    t.optuna_trial_id = optuna_trial_id
    t.number = storage.get_trial_number_from_id(optuna_trial_id)


def _reap_studies(s: Session, now: datetime, out: _Tally) -> None:
    for study in s.scalars(
        select(Study).where(Study.status == StudyStatus.RUNNING).with_for_update(skip_locked=True)
    ):
        if study.deadline is not None and study.deadline < now:
            study.status = study_transition("time_out", study.status, name=study.name)
            study.finished_at = utcnow()
            out.timed_out += 1
        elif study.n_claimed >= study.n_trials and study.n_running == 0 and end_of_budget(s, study):
            out.completed += 1
