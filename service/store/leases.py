"""Claims and leases: how trials move from a study's budget to a worker and back.

The lifecycle (Postgres; SQLite gets the same guarantees from its single writer):

1. ``claim``: one worker takes either a RUNNING trial that lost its owner (resume) or a new
   budget slot: an UPDATE of the study row that increments ``n_claimed`` only while
   ``n_claimed < n_trials``, so exactly ``n_trials`` trials ever start, whatever the number of
   workers. The slot's trial is a suggestion asked ahead, popped in one statement
   (``service.store.buffer``), or, when the buffer is empty (or off, or queued trials wait),
   one the claim samples itself under the study's ask lock: on Postgres sketched and written
   in the claim's transaction (``service.store.optuna.sketch``), with a batch for the buffer;
   where Optuna holds an enqueued trial, and on SQLite, ``ask()``-ed (which pops it). Asks on
   one study are serialised either way: no two workers get the same grid point, and TPE's
   constant liar sees every running or buffered trial. Each trial seqtune asks is marked with
   ``ASKED_BY`` (``service.store.optuna``).
2. The claim holds a lease: ``lease_owner`` plus a ``fence`` number. Every epoch's report and
   every heartbeat that follows progress renews it (``lease_renewed_at``).
3. Every write of an attempt (``report``, ``save_checkpoint``, ``finish`` with the trial's
   model, ``release``) locks the trial row, checks owner and fence, and only then writes, to
   Optuna too, inside the same transaction: a fenced-off attempt is refused and changes nothing.
   An epoch's report is all of that in one statement on Postgres (``_REPORT_FUSED``).
   ``finish`` stores the model in the transaction that records the value, so a trial's model
   and its value always come from the same attempt; how the trial's end moves its study is
   ``service.store.budget``.
4. Leases with no progress are reaped, and trials that outside Optuna clients take are settled,
   by ``service.store.recovery``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState as OptunaState
from sqlalchemy import (
    Connection,
    String,
    Table,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from seqtune.errors import Fenced, Unavailable
from seqtune.spec import StudySpec
from seqtune.states import StudyPhase, StudyStatus, TrialState, trial_transition
from service.store import budget, buffer
from service.store.budget import close_trial, enqueue_retrain, finite
from service.store.db import Database
from service.store.known import known_trials
from service.store.optuna import ask_marked, optuna_study, sketch
from service.store.recovery import poppable, settle_outside
from service.store.tables import Checkpoint, Study, Trial, utcnow
from service.store.trials import count_move

if TYPE_CHECKING:
    from service.store.stocker import Stocker

log = logging.getLogger(__name__)
_T: Table = Trial.__table__  # type: ignore[assignment]  # Core table for the epoch hot path


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


def _claim_view(t: Trial, study: Study) -> Claim:
    assert t.lease_owner is not None
    return Claim(
        owner=t.lease_owner,
        fence=t.fence,
        trial_row_id=t.id,
        number=t.number,
        optuna_trial_id=t.optuna_trial_id,
        attempt=t.attempts,
        params=t.params,
        study_id=study.id,
        study_name=study.name,
        tenant=study.tenant,
        optuna_study_name=study.optuna_study_name,
        spec=study.spec,
        final_of=t.final_of,
    )


def claim(
    db: Database,
    storage: optuna.storages.BaseStorage,
    *,
    owner: str,
    studies: list[str] | None = None,
    stocker: Stocker | None = None,
) -> Claim | None:
    """Take one trial to run, or None when no running study has work for this worker.

    Trials waiting to be resumed come first; then a new budget slot from the running study
    with the highest priority, least recently served, under its ``max_concurrent_trials``.
    ``stocker``: the worker's ``service.store.stocker.Stocker``, poked after each pop of a
    suggestion, so that the study's buffer is refilled before it runs dry.
    """
    if not db.settings.is_sqlite:
        try:
            popped = _claim_popped(db, owner, studies)
        except Unavailable:  # not retried: it may have committed (the reaper frees that
            popped = None  # trial when its lease lapses); the full claim retries safely
        if popped is not None:
            c, left = popped
            if stocker is not None:
                stocker.poke(c, left)
            return c
    hint = db.run(
        lambda s: s.execute(
            _pick(studies).with_only_columns(
                Study.optuna_study_name, Study.spec, Study.id, Study.n_waiting
            )
        ).first()
    )
    if hint is not None:  # load (and warm) the likely study's Optuna object before locking
        ostudy = optuna_study(storage, hint[0], StudySpec.model_validate(hint[1]))
        if buffer.enabled(db):  # and this process's copy of its trials (``known_trials``)
            try:
                db.autocommit(lambda conn: known_trials(conn, ostudy._study_id))
            except Unavailable:  # only a warm-up: the claim reads them again, retried
                log.warning("reading study %s's trials ahead failed", hint[0], exc_info=True)
        if hint[3] > 0:
            # Queued trials that an outside Optuna client took are settled first, in a
            # transaction of their own: the claim's transaction must not write before its ask
            # (SQLite's single writer), and settling counts them as started.
            db.run(lambda s: settle_outside(s, storage, study_id=hint[2], now=utcnow()))

    patient = False

    def txn(s: Session) -> Claim | None:
        return (
            _claim_resume(s, owner, studies)
            or _claim_buffered(s, owner, studies)
            or _claim_new(s, storage, owner, studies, patient=patient)
        )

    for _ in range(3):
        try:
            got = db.run(txn)
            if got is not None and stocker is not None and not got.resumed:
                stocker.poke(got, None)
            return got
        except buffer.Raced:  # rolled back: the study changed under the pop; look again
            continue
        except buffer.Again:  # rolled back: others popped what the asker stored; this
            patient = True  # claim now queues for the lock itself, and asks
            continue
    return None


def _pick(names: list[str] | None) -> Any:
    """The study the next new slot comes from: running, budget left, under its concurrency
    cap; highest priority, then least recently served."""
    pick = (
        select(Study.id)
        .where(
            Study.status == StudyStatus.RUNNING,
            Study.n_claimed < Study.n_trials,
            (Study.max_concurrent.is_(None)) | (Study.n_running < Study.max_concurrent),
        )
        .order_by(Study.priority.desc(), Study.last_served_at.asc().nulls_first(), Study.id)
        .limit(1)
    )
    return pick.where(Study.name.in_(names)) if names else pick


def _claim_popped(db: Database, owner: str, names: list[str] | None) -> tuple[Claim, int] | None:
    """The claim's fast path (Postgres): a suggestion of the study the next slot comes from,
    popped in one statement that commits by itself (``_CLAIM_POP``), so the study's row is
    locked for that statement's execution only. None, having changed nothing, when a trial
    waits to be resumed, the study has queued trials or no suggestion to pop, or another claim
    holds its last one: the full claim (``claim``) decides then. With the claim, how many
    suggestions the study has left."""
    params = {
        "names": list(names) if names else None,
        "owner": owner,
        "now": utcnow(),
        "running": str(StudyStatus.RUNNING),
        "trunning": str(TrialState.RUNNING),
    }

    def pop(conn: Connection) -> Any:
        return conn.execute(text(_CLAIM_POP), params).mappings().first()

    row = db.autocommit(pop)
    if row is None:
        return None
    c = _first_attempt(
        owner,
        row,
        study_id=row["study_id"],
        study_name=row["name"],
        tenant=row["tenant"],
        optuna_study_name=row["optuna_study_name"],
        spec=row["spec"],
    )
    return c, int(row["n_buffered"])


# The fast path's statement: the study is the one ``_pick`` picks; nothing is popped while a
# trial of the worker's studies waits to be resumed (``_claim_resume`` goes first). The
# suggestion is locked first, then the study's counters move (under the same guards as
# ``buffer.pop``), and only then is the suggestion deleted and the trial inserted: where the
# counters could not move (a pause, a cut, a queued trial or the concurrency cap, read after
# waiting for the row), the statement changes nothing, and it commits by itself.
_CLAIM_POP = """
WITH pick AS (
    SELECT id FROM seqtune_studies
    WHERE status = :running AND n_claimed < n_trials
      AND (max_concurrent IS NULL OR n_running < max_concurrent)
      AND (CAST(:names AS text[]) IS NULL OR name = ANY(CAST(:names AS text[])))
    ORDER BY priority DESC, last_served_at ASC NULLS FIRST, id
    LIMIT 1
), orphan AS (
    SELECT 1 FROM seqtune_trials t JOIN seqtune_studies st ON st.id = t.study_id
    WHERE t.state = :trunning AND t.lease_owner IS NULL AND st.status = :running
      AND (CAST(:names AS text[]) IS NULL OR st.name = ANY(CAST(:names AS text[])))
    LIMIT 1
), sug AS (
    SELECT id, study_id FROM seqtune_suggestions
    WHERE study_id = (SELECT id FROM pick) AND NOT EXISTS (SELECT 1 FROM orphan)
    ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
), slot AS (
    UPDATE seqtune_studies
    SET n_claimed = n_claimed + 1, n_running = n_running + 1, n_buffered = n_buffered - 1,
        last_served_at = :now
    WHERE id = (SELECT study_id FROM sug) AND status = :running AND n_waiting = 0
      AND n_claimed < n_trials
      AND (max_concurrent IS NULL OR n_running < max_concurrent)
    RETURNING id, name, tenant, optuna_study_name, spec, n_buffered
), gone AS (
    DELETE FROM seqtune_suggestions
    WHERE id = (SELECT id FROM sug) AND EXISTS (SELECT 1 FROM slot)
    RETURNING study_id, optuna_trial_id, number, params
), ins AS (
    INSERT INTO seqtune_trials (
        study_id, number, optuna_trial_id, state, params, on_front, curve, epochs, info,
        attempts, lease_owner, worker, fence, lease_renewed_at, created_at, started_at
    )
    SELECT study_id, number, optuna_trial_id, :trunning, params, false,
           '[]'::jsonb, 0, '{}'::jsonb, 1, :owner, :owner, 1, :now, :now, :now
    FROM gone
    RETURNING id, study_id, number, optuna_trial_id, params
)
SELECT ins.id, ins.study_id, ins.number, ins.optuna_trial_id, ins.params,
       slot.name, slot.tenant, slot.optuna_study_name, slot.spec, slot.n_buffered
FROM ins JOIN slot ON slot.id = ins.study_id
"""


def _claim_resume(s: Session, owner: str, names: list[str] | None) -> Claim | None:
    q = (
        select(Trial, Study)
        .join(Study, Study.id == Trial.study_id)
        .where(
            Trial.state == TrialState.RUNNING,
            Trial.lease_owner.is_(None),
            Study.status == StudyStatus.RUNNING,
        )
        .order_by(Study.priority.desc(), Trial.id)
        .limit(1)
        .with_for_update(skip_locked=True, of=Trial)
    )
    if names:
        q = q.where(Study.name.in_(names))
    row = s.execute(q).first()
    if row is None:
        return None
    t, study = row
    # Compare-and-set on the owner: safe even where FOR UPDATE is a no-op (SQLite).
    res = s.execute(
        update(Trial)
        .where(Trial.id == t.id, Trial.lease_owner.is_(None), Trial.fence == t.fence)
        .values(
            lease_owner=owner,
            worker=owner,
            fence=Trial.fence + 1,
            attempts=Trial.attempts + 1,
            lease_renewed_at=utcnow(),
        )
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    s.refresh(t)
    # The new attempt resumes after its checkpoint's epoch (or from scratch): the curve keeps
    # exactly the epochs it will not replay.
    ck = s.scalar(
        select(Checkpoint.epoch).where(Checkpoint.trial_id == t.id, Checkpoint.kind == "resume")
    )
    t.curve = [r for r in t.curve if ck is not None and r.get("epoch", -1) <= ck]
    t.epochs = len(t.curve)
    return _claim_view(t, study)


def _claim_buffered(s: Session, owner: str, names: list[str] | None) -> Claim | None:
    """A suggestion asked ahead (``service.store.buffer``) of the study the next slot comes
    from, popped without waiting on anyone's ask; None when it has none to pop."""
    study = s.scalar(select(Study).where(Study.id == _pick(names).scalar_subquery()))
    if study is None or study.n_buffered <= 0 or study.n_waiting > 0:
        return None  # queued trials go first: ask() pops them (``_claim_new``)
    return _popped(s, study, owner)


def _popped(s: Session, study: Study, owner: str) -> Claim | None:
    now = utcnow()
    row = buffer.pop(s, study_id=study.id, owner=owner, now=now)
    if row is None:
        return None
    return _first_attempt(
        owner,
        row,
        study_id=study.id,
        study_name=study.name,
        tenant=study.tenant,
        optuna_study_name=study.optuna_study_name,
        spec=study.spec,
    )


def _first_attempt(
    owner: str,
    row: Any,
    *,
    study_id: int,
    study_name: str,
    tenant: str,
    optuna_study_name: str,
    spec: dict[str, Any],
) -> Claim:
    """The claim of a popped suggestion (``row``: the new trial's id, number, Optuna id and
    parameters): its first attempt, fence 1."""
    return Claim(
        owner=owner,
        fence=1,
        trial_row_id=row["id"],
        number=row["number"],
        optuna_trial_id=row["optuna_trial_id"],
        attempt=1,
        params=row["params"],
        study_id=study_id,
        study_name=study_name,
        tenant=tenant,
        optuna_study_name=optuna_study_name,
        spec=spec,
    )


def _claim_new(
    s: Session,
    storage: optuna.storages.BaseStorage,
    owner: str,
    names: list[str] | None,
    *,
    patient: bool = False,
) -> Claim | None:
    study_id = s.scalar(_pick(names))
    if study_id is None:
        return None
    # Every ask for a study happens under its ask lock (``service.store.buffer``). A claim
    # of a study that buffers takes it only if free: else another claim is asking, and
    # stocks the buffer for the claims waiting behind it, so this one waits beside them and
    # pops (``_after_ask``). Without a buffer (grid, ``buffer: 0``, SQLite) claims wait for
    # it in turn. (Skipping a busy study instead, workers arriving during another's ask found
    # nothing and idled a whole poll interval: measured, 7 of 56 trials timed at 8 workers.)
    # Studies still share the fleet: the least recently served one is picked first.
    # The study's row is locked last, by the guarded UPDATE below, for one statement:
    # finishes and pops of the study update it (measured with the row held for the ask: tell
    # 100-120 ms at 8 workers). The UPDATE keeps the budget exact.
    seen = s.get(Study, study_id)
    held = False
    if (
        not patient  # a claim that found nothing after waiting queues for the lock itself
        and seen is not None
        and buffer.enabled_for(s)
        and buffer.wants_buffer(seen, StudySpec.model_validate(seen.spec))
    ):
        held = buffer.ask_lock(s, study_id, wait=False)
        if not held:
            # Waiting in turn for the lock, even to pop, claims queued at 32 workers and the
            # queue never drained (claim p50 1.4-1.7 s against 0.65 s side by side).
            return _after_ask(s, study_id, owner)
    if not held:
        buffer.ask_lock(s, study_id, wait=True)
    study = s.scalar(
        select(Study).where(Study.id == study_id).execution_options(populate_existing=True)
    )
    if study is None:
        return None
    # Read after the lock, so current for everything asks change: re-check it before asking,
    # or claimers queued behind the last slot would each leave an extra trial in Optuna.
    if not _has_room(study):
        return None
    if study.n_buffered > 0 and study.n_waiting == 0:
        popped = _popped(s, study, owner)  # an asker stored them while we waited
        if popped is not None:
            return popped
    free = study.n_trials - study.n_claimed - study.n_waiting - study.n_buffered
    if free <= 0 and (study.n_waiting == 0 or poppable(s, storage, study) == 0):
        # Every slot left is reserved by a queued trial that cannot be popped now (an outside
        # Optuna client took it moments ago, or a claim that died did), or by a suggestion
        # another claim is popping: a fresh ask would spend its slot a second time. Step back
        # in the serving order meanwhile, so that the other studies are served; the reaper
        # settles the queued trial.
        study.last_served_at = utcnow()
        return None
    spec = StudySpec.model_validate(study.spec)
    # SQLite: Optuna's write (an ask) comes before ours, as Optuna's own connection could not
    # write while this transaction held the file's write lock.
    slot_no = study.n_claimed + study.n_buffered + 1
    ostudy = optuna_study(storage, study.optuna_study_name, spec, seed_offset=slot_no)
    final_of = enqueue_retrain(s, ostudy, study, spec) if study.phase == StudyPhase.FINAL else None
    # Postgres: the new trial is sketched (``service.store.optuna.sketch``) and written in
    # this transaction, with a batch for the buffer; a WAITING trial is asked (popped).
    sk, extra = None, []
    if final_of is None and buffer.enabled_for(s):
        sk = sketch(
            storage, ostudy, spec, owner, known=known_trials(s.connection(), ostudy._study_id)
        )
        if sk is not None and buffer.wants_buffer(study, spec):
            # The buffer is empty (or this claim would have popped): stock it, with one
            # suggestion for each claim waiting behind this one besides its target, so that
            # the claims after those still find some to pop.
            want = buffer.target(s, study, spec) - study.n_buffered + buffer.waiters(s, study.id)
            extra = buffer.sketch_many(
                storage,
                study,
                spec,
                owner,
                k=buffer.room(study, min(buffer.MAX_STOCK, want), claiming=1),
                seed_from=slot_no + 1,
                siblings=[sk],
                within_s=buffer.STOCK_S,
            )
    asked = ask_marked(storage, ostudy, spec, owner) if sk is None else None
    now = utcnow()
    trial = asked
    if sk is not None:
        # Optuna's rows first, the study's row last (finishes and pops wait for it): the
        # slots were counted under the ask lock, so only a pause, a cut or a queued trial
        # meanwhile can take them, and then the claim rolls back and looks again (Raced).
        trial = sk.write(s)
        buffer.store(s, study, extra, claiming=1)
    assert trial is not None
    t = (
        None
        if sk is not None
        else s.scalar(
            select(Trial).where(Trial.study_id == study.id, Trial.optuna_trial_id == trial.trial_id)
        )
    )
    # Exactly n_trials claims, whatever the concurrency: the UPDATE re-checks the budget. A
    # new trial takes a slot no queued trial or suggestion holds; a queued trial that ask()
    # popped takes its own. Pops do not take the ask lock: the cap is checked again too.
    guard = (
        Study.n_claimed + Study.n_waiting + Study.n_buffered < Study.n_trials
        if t is None
        else Study.n_claimed < Study.n_trials
    )
    slot = s.execute(
        update(Study)
        .where(
            Study.id == study.id,
            Study.status == StudyStatus.RUNNING,
            guard,
            Study.max_concurrent.is_(None) | (Study.n_running < Study.max_concurrent),
        )
        .values(n_claimed=Study.n_claimed + 1, n_running=Study.n_running + 1, last_served_at=now)
        .returning(Study.n_claimed)
    ).scalar()
    if slot is None:  # lost a race (paused, cut or at its cap meanwhile; or SQLite)
        if sk is not None:
            raise buffer.Raced(f"study {study.id} lost its room while a claim asked")
        ostudy.tell(trial.number, state=OptunaState.FAIL)  # give the asked one back
        return None
    if t is not None:  # an enqueued trial that ask() popped
        count_move(s, study.id, TrialState.WAITING, None)
        t.state = trial_transition("claim", t.state, TrialState.RUNNING, number=t.number)
        t.params = trial.params
        t.lease_owner, t.worker, t.fence, t.attempts = owner, owner, t.fence + 1, 1
        t.started_at, t.lease_renewed_at = now, now
    else:
        t = Trial(
            study_id=study.id,
            number=trial.number,
            optuna_trial_id=trial.trial_id,
            state=TrialState.RUNNING,
            params=trial.params,
            curve=[],
            epochs=0,
            info={},
            attempts=1,
            on_front=False,
            lease_owner=owner,
            worker=owner,
            fence=1,
            started_at=now,
            lease_renewed_at=now,
            final_of=final_of,
        )
        s.add(t)
    s.flush()
    return _claim_view(t, study)


def _after_ask(s: Session, study_id: int, owner: str) -> Claim | None:
    """Wait for the study's asker (``buffer.wait_for_asker``) and pop what it stored. Raises
    ``buffer.Again`` when there is nothing to pop by then (the claim looks again)."""
    buffer.wait_for_asker(s, study_id)
    study = s.scalar(
        select(Study).where(Study.id == study_id).execution_options(populate_existing=True)
    )
    if study is None or not _has_room(study):
        return None
    if study.n_buffered > 0 and study.n_waiting == 0:
        popped = _popped(s, study, owner)
        if popped is not None:
            return popped
    raise buffer.Again(f"study {study_id}'s buffer was empty after its ask")


def _has_room(study: Study) -> bool:
    """The study (read under its ask lock) may start a trial: running, budget left, under
    its cap."""
    return (
        study.status == StudyStatus.RUNNING
        and study.n_claimed < study.n_trials
        and (study.max_concurrent is None or study.n_running < study.max_concurrent)
    )


def _locked(s: Session, c: Claim) -> Trial:
    t = s.scalar(select(Trial).where(Trial.id == c.trial_row_id).with_for_update())
    if t is None or t.lease_owner != c.owner or t.fence != c.fence or t.state != TrialState.RUNNING:
        raise Fenced(f"trial {c.number} of '{c.study_name}' is no longer held by this attempt")
    return t


def renew(db: Database, *, claim: Claim) -> None:
    """Extend the lease (the worker's heartbeat calls this while training progresses)."""

    def txn(s: Session) -> None:
        res = s.execute(
            update(Trial)
            .where(
                Trial.id == claim.trial_row_id,
                Trial.lease_owner == claim.owner,
                Trial.fence == claim.fence,
                Trial.state == TrialState.RUNNING,
            )
            .values(lease_renewed_at=utcnow())
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise Fenced(
                f"trial {claim.number} of '{claim.study_name}' was taken from this attempt"
            )

    db.run(txn)


def report(
    db: Database,
    *,
    claim: Claim,
    trial: optuna.Trial | None,
    epoch: int,
    record: dict[str, Any],
    value: float | None,
) -> None:
    """Append an epoch to the learning curve, renew the lease and report ``value`` to Optuna
    (single-objective studies) as the intermediate value of step ``epoch``, replacing the
    value an earlier attempt reported for that step (see ``report_value``). Raises Fenced.

    On Postgres all of it is one statement (``_REPORT_FUSED``): a reaper fencing this attempt
    off waits for it or wins, and a fenced attempt never reaches Optuna. On SQLite the fence
    is checked before Optuna's write and re-checked by the append (no row locks there).
    Raises ``optuna.exceptions.UpdateFinishedTrialError`` when Optuna's trial has ended
    (nothing is written)."""
    stamped = json.dumps({k: finite(v) for k, v in {**record, "attempt": claim.attempt}.items()})

    fenced = Fenced(
        f"trial {claim.number} of '{claim.study_name}' is no longer held by this attempt"
    )
    if db.settings.is_sqlite:
        db.write(lambda conn: _report_sqlite(conn, claim, trial, epoch, stamped, value, fenced))
        return
    to_optuna = trial is not None and value is not None
    if to_optuna and epoch < 0:
        raise ValueError(f"step must be non-negative, got {epoch}")
    params = {
        "rec": stamped,
        "id": claim.trial_row_id,
        "owner": claim.owner,
        "fence": claim.fence,
        "running": str(TrialState.RUNNING),
        "now": utcnow(),
    }
    if to_optuna:
        stored, kind = _stored_value(float(value))  # type: ignore[arg-type]
        params |= {"otid": claim.optuna_trial_id, "step": int(epoch), "v": stored, "kind": kind}

    def txn(conn: Connection) -> None:
        row = conn.execute(text(_REPORT_FUSED if to_optuna else _REPORT), params).first()
        if row is None or not row[0]:
            raise fenced
        if to_optuna and not row[1]:  # held by us, but Optuna's trial ended (an outside
            # client told it): roll the append back too, as Optuna's own check would refuse
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"Optuna's trial {claim.optuna_trial_id} has already finished"
            )

    db.write(txn)
    if to_optuna:
        trial._cached_frozen_trial.intermediate_values[int(epoch)] = float(value)  # type: ignore[union-attr,arg-type]


# Postgres: the fence check, the curve's append, the lease's renewal and Optuna's intermediate
# value, in one statement (one round trip, one transaction): a fenced-off attempt writes
# nothing anywhere, and Optuna's value of a step is replaced (an attempt resumed after a lost
# lease redoes the steps after its checkpoint; see ``report_value``). The write is the row
# Optuna's ``RDBStorage.set_trial_intermediate_value`` makes (``trial_intermediate_values``,
# unique on trial and step), only while Optuna's trial is RUNNING, as Optuna checks; Optuna's
# storage is seqtune's database by design (``Settings.optuna_database_url``). Optuna reads a
# running trial from the database every time (its cache keeps finished trials only), so
# pruners and plots see the value at once.
_REPORT = """
UPDATE seqtune_trials
SET curve = curve || CAST(:rec AS jsonb), epochs = epochs + 1, lease_renewed_at = :now
WHERE id = :id AND lease_owner = :owner AND fence = :fence AND state = :running
RETURNING 1
"""
_REPORT_FUSED = """
WITH held AS (
    UPDATE seqtune_trials
    SET curve = curve || CAST(:rec AS jsonb), epochs = epochs + 1, lease_renewed_at = :now
    WHERE id = :id AND lease_owner = :owner AND fence = :fence AND state = :running
    RETURNING id
), iv AS (
    INSERT INTO trial_intermediate_values
        (trial_id, step, intermediate_value, intermediate_value_type)
    SELECT trial_id, :step, :v, CAST(:kind AS trialintermediatevaluetype)
    FROM trials WHERE trial_id = :otid AND state = 'RUNNING' AND EXISTS (SELECT 1 FROM held)
    ON CONFLICT (trial_id, step) DO UPDATE
    SET intermediate_value = EXCLUDED.intermediate_value,
        intermediate_value_type = EXCLUDED.intermediate_value_type
    RETURNING trial_id
)
SELECT (SELECT count(*) FROM held), (SELECT count(*) FROM iv)
"""


def _stored_value(value: float) -> tuple[float | None, str]:
    """Optuna's stored form of an intermediate value: (value, type); non-finite ones are
    NULL with their type (``TrialIntermediateValueModel.intermediate_value_to_stored_repr``)."""
    if math.isnan(value):
        return None, "NAN"
    if math.isinf(value):
        return None, "INF_POS" if value > 0 else "INF_NEG"
    return value, "FINITE"


def _report_sqlite(
    conn: Connection,
    claim: Claim,
    trial: optuna.Trial | None,
    epoch: int,
    stamped: str,
    value: float | None,
    fenced: Fenced,
) -> None:
    """SQLite: check first, then Optuna, then our write: Optuna writes on its own connection,
    which SQLite's single writer would refuse while we held the lock."""
    held = (
        _T.c.id == claim.trial_row_id,
        _T.c.lease_owner == claim.owner,
        _T.c.fence == claim.fence,
        _T.c.state == TrialState.RUNNING,
    )
    if conn.execute(select(_T.c.id).where(*held)).first() is None:
        raise fenced
    if trial is not None and value is not None:
        report_value(trial, epoch, value)
    curve = func.json_insert(_T.c.curve, "$[#]", func.json(bindparam("rec", stamped, type_=String)))
    conn.execute(
        update(_T)
        .where(*held)
        .values(curve=curve, epochs=_T.c.epochs + 1, lease_renewed_at=utcnow())
    )


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


def finish(
    db: Database,
    *,
    ostudy: optuna.Study,
    claim: Claim,
    state: str,
    values: list[float] | None = None,
    reason: str | None = None,
    test_metrics: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    error: str | None = None,
    model: bytes | None = None,
    model_epoch: int | None = None,
    constraints: list[float] | None = None,
) -> None:
    """Tell Optuna the trial's end and record it, if this attempt still holds the lease.
    ``constraints``: the violations of the study's constraints (``budget.close_trial``).
    ``model`` (a torch checkpoint of the restored best weights, trained at ``model_epoch``)
    becomes the trial's 'best' checkpoint in the same transaction, under the same fence check:
    a trial's model and its value always come from the one attempt that finished it, and a
    refused finish stores nothing. Completes the study when its budget is spent and nothing
    runs. Raises Fenced."""

    cancelled: list[int] = []
    # The study's counters last, right before the commit (``close_trial(last=True)``), where
    # nothing else needs the study's row locked: Postgres, one objective (no Pareto front to
    # keep), no automatic stopping.
    last = (
        not db.settings.is_sqlite
        and len(claim.spec.get("objectives") or []) == 1
        and not (claim.spec.get("budget") or {}).get("stop_when")
    )

    def txn(s: Session) -> None:
        cancelled.clear()
        t = _locked(s, claim)
        if last and model is not None:
            _put_checkpoint(s, t.id, kind="best", epoch=model_epoch or 0, data=model)
        # Optuna's tell (inside close_trial) writes first, on its own connection: SQLite's
        # single writer would block it behind this transaction had the checkpoint been written
        # before.
        gone = close_trial(
            s,
            ostudy,
            t,
            action="finish",
            state=state,
            values=values,
            reason=reason,
            test_metrics=test_metrics,
            info=info,
            error=error,
            constraints=constraints,
            last=last,
        )
        cancelled.extend(gone)
        if model is not None and not last:
            _put_checkpoint(s, t.id, kind="best", epoch=model_epoch or 0, data=model)

    db.run(txn)
    if cancelled:  # an automatic stop gave the buffer's suggestions up
        buffer.fail_cancelled(ostudy._storage, cancelled)


def stop_early(
    db: Database, storage: optuna.storages.BaseStorage, *, study_id: int, reason: str
) -> bool:
    """Stop a running study's search before its budget is spent (``budget.stop_early``), for
    a criterion judged outside the store (the regret bound). Returns whether it stopped it
    (False: it was no longer running or searching, or had already stopped early)."""
    cancelled: list[int] = []

    def txn(s: Session) -> bool:
        cancelled.clear()
        study = s.scalar(select(Study).where(Study.id == study_id).with_for_update())
        if (
            study is None
            or study.status != StudyStatus.RUNNING
            or study.stop_reason
            or study.phase != StudyPhase.SEARCH
        ):
            return False
        cancelled.extend(budget.stop_early(s, study, reason))
        return True

    stopped = db.run(txn)
    if cancelled:
        buffer.fail_cancelled(storage, cancelled)
    return stopped


def release(db: Database, *, claim: Claim) -> None:
    """Give the trial back without finishing it (SIGTERM): it stays RUNNING with no owner, and
    the next worker resumes it from its checkpoint. Raises Fenced."""

    def txn(s: Session) -> None:
        t = _locked(s, claim)
        t.lease_owner, t.fence, t.lease_renewed_at = None, t.fence + 1, utcnow()

    db.run(txn)


def save_checkpoint(db: Database, *, claim: Claim, kind: str, epoch: int, data: bytes) -> None:
    """Store the trial's 'resume' snapshot or 'best' model, if this attempt still holds the
    lease: the trial row is locked and owner and fence checked first, as ``report`` and
    ``finish`` do, so a stale attempt never overwrites the live attempt's snapshot nor the
    model of a trial another attempt finished (a finished trial is held by no attempt).
    Workers store the model with ``finish(model=...)``. Raises Fenced."""

    def txn(s: Session) -> None:
        _locked(s, claim)  # held until commit: a reaper fencing this attempt off waits for it
        _put_checkpoint(s, claim.trial_row_id, kind=kind, epoch=epoch, data=data)

    db.run(txn)


def _put_checkpoint(s: Session, trial_row_id: int, *, kind: str, epoch: int, data: bytes) -> None:
    """Replace the trial's checkpoint of ``kind`` (the caller holds the trial's row lock)."""
    s.execute(
        delete(Checkpoint).where(Checkpoint.trial_id == trial_row_id, Checkpoint.kind == kind)
    )
    s.add(
        Checkpoint(trial_id=trial_row_id, kind=kind, epoch=epoch, size_bytes=len(data), data=data)
    )


def load_checkpoint(db: Database, *, trial_row_id: int, kind: str) -> tuple[int, bytes] | None:
    """``(epoch, bytes)`` of a trial's checkpoint, or None."""

    def txn(s: Session) -> tuple[int, bytes] | None:
        row = s.execute(
            select(Checkpoint.epoch, Checkpoint.data).where(
                Checkpoint.trial_id == trial_row_id, Checkpoint.kind == kind
            )
        ).first()
        return (row[0], row[1]) if row else None

    return db.run(txn)


def has_work(db: Database, *, studies: list[str] | None = None) -> bool:
    """Whether a running study (of ``studies``) still has trials to start or finish."""

    def txn(s: Session) -> bool:
        q = (
            select(Study.id)
            .where(
                Study.status == StudyStatus.RUNNING,
                (Study.n_claimed < Study.n_trials) | (Study.n_running > 0),
            )
            .limit(1)
        )
        if studies:
            q = q.where(Study.name.in_(studies))
        return s.scalar(q) is not None

    return db.run(txn)
