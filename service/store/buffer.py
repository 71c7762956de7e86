"""Suggestions asked ahead of claims: a small per-study buffer, so that most claims are one pop.

Without it every claim samples a trial under the study's ask lock: asks on one study are
serialised (grid points stay unique, TPE's constant liar sees every running trial), so with
many workers and short trials the claim, not the GPU, sets the pace. With it (Postgres only;
SQLite's single writer keeps the ask-per-claim path):

- A claim that finds the buffer empty takes the study's *ask lock* (a transaction-scoped
  advisory lock, safe behind PgBouncer in transaction mode), samples its own trial and a
  batch for the buffer (``sketch_many``: up to the study's ``target``, plus one for each
  claim waiting behind it, ``waiters``), and stores them all in its one transaction
  (``leases._claim_new``): the batch's Optuna rows, its suggestions and the study's counter
  in one statement however many (``store``), the counter moved first under the budget's
  guard. So one process at a time refills, in batches, and the study's row is held from
  that statement to the commit.
- Claims that arrive while someone asks do not queue to ask in turn: they wait for the asker
  beside each other (``wait_for_asker``, the lock held shared) and then pop what it stored,
  in parallel; one that finds nothing left looks again (``Again``).
- So that claims seldom find it empty, workers stock it ahead (``service.store.stocker``): a
  claim whose pop leaves half the target or less pokes its worker's stocker thread, which
  refills the buffer to the target under the same ask lock (taken only if free), in four
  statements, while claims go on popping; the worker that stocked keeps it topped up for a
  while after. A batch reads the study's trials in one statement, cached per process
  (``service.store.known``).
- A claim turns the oldest suggestion into a running, leased seqtune trial in one statement
  that commits by itself (``leases._CLAIM_POP``; inside a claim's transaction, ``pop``):
  ``FOR UPDATE SKIP LOCKED`` on the suggestion and a guarded UPDATE of the study's counters.
- Suggestions are *sketched* (``service.store.optuna.sketch``): Optuna's sampler runs as in
  ``ask()`` and the trial is written, RUNNING in Optuna, in the transaction that gives it its
  budget slot; a batch's sketches see each other as running trials. So TPE's constant liar
  treats buffered trials as running ones, no sampler proposes them again, and a claim that
  loses its slots or dies leaves nothing in Optuna.

Invariants: each suggestion holds a budget slot (``n_claimed + n_waiting + n_buffered <=
n_trials``), so exactly ``n_trials`` trials ever start; a pause, a stop or a lower budget cancels
the suggestions that no longer have a slot (``cancel``; the reaper cancels any that remain in a
study that is not running), and a cancelled suggestion is failed in Optuna with the system
attribute ``seqtune_cancelled``; a deleted study takes its suggestions along (cascade).

The trade-off: a suggestion is made before the results of the trials running at the time, as if
the study had up to ``buffer`` more workers. The target is about ``HORIZON_S`` of recent claims,
at least one, at most the study's ``sampler.buffer`` (default 64; 0 turns the buffer off); a
claim stocks more only for claims already waiting, which take them at once, so that the claims
after them still find the target. The grid sampler
gets no buffer: a cancelled grid point would count as visited in Optuna, and its asks cost
nothing to hide. Nor do studies with queued trials (they are popped by ask first) or in their
final phase.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState
from sqlalchemy import column, delete, extract, func, literal, select, table, text
from sqlalchemy.orm import Session

from seqtune.spec import StudySpec
from seqtune.states import StudyPhase, StudyStatus
from service.store.db import Database
from service.store.optuna import (
    WRITE_TRIALS_SQL,
    Sketch,
    asking_study,
    lock_optuna_study,
    sketch,
    sketch_rows,
)
from service.store.tables import Study, Suggestion, Trial, UtcDateTime

log = logging.getLogger(__name__)

# The advisory lock key space of the ask lock: pg_advisory_xact_lock(ASK_LOCK, study id).
ASK_LOCK = 0x5E97_0002
# The buffer holds about this many seconds of the study's recent claims (enough for a
# stocker's refill, about a second on a loaded 2-core machine, and for a wave of claims from
# workers that finish together)...
HORIZON_S = 4.0
# ...measured over this window (short enough to follow a fleet that speeds up, after a
# start-up in which every worker loads a large study, say)...
RATE_WINDOW_S = 10.0
# ...or expected from the running trials and how long the last few finished ones ran
# (``sized``), trials shorter than this counted as this long.
RECENT_FINISHED = 16
MIN_TRIAL_S = 1.0
# The most suggestions one stocking samples (a claim's, for the claims waiting behind it, or
# a worker's stocking ahead)...
MAX_STOCK = 64
# ...within about this many seconds (the ask lock and the transaction stay open meanwhile; the
# idle-in-transaction timeout must not end it).
STOCK_S = 2.0
# Optuna system attribute on a suggestion that was cancelled before any claim took it.
CANCELLED = "seqtune_cancelled"


def enabled(db: Database) -> bool:
    """Whether this database buffers suggestions (Postgres; not SQLite)."""
    return not db.settings.is_sqlite


def ask_lock(s: Session, study_id: int, *, wait: bool) -> bool:
    """Take the study's ask lock for the rest of this transaction (Postgres; always on
    SQLite, whose single writer serialises asks): waiting for it (a claim of a study with no
    buffer), or only if it is free (a claim that would restock, or the reaper's settling).
    Returns whether it was taken.

    A claim that waits holds one of seqtune's connections meanwhile, and the holder's ask()
    needs one of Optuna's besides its own: behind PgBouncer, Optuna's storage gets a pool of
    its own (``Settings.optuna_database_url``), so waiters can never take the connection the
    holder needs. (Waiting by polling instead, each try a transaction, cost more than the asks
    it waited for: measured at 32 workers, claim p50 8.5 s against 2.2 s blocking.)"""
    if s.get_bind().dialect.name != "postgresql":
        return True
    params = {"ns": ASK_LOCK, "id": study_id}
    if wait:
        s.execute(text("SELECT pg_advisory_xact_lock(:ns, :id)"), params)
        return True
    return bool(s.scalar(text("SELECT pg_try_advisory_xact_lock(:ns, :id)"), params))


def enabled_for(s: Session) -> bool:
    """Whether the session's database buffers suggestions (``enabled``)."""
    return s.get_bind().dialect.name == "postgresql"


def wait_for_asker(s: Session, study_id: int) -> None:
    """Wait until whoever holds the study's ask lock has committed, holding the lock shared
    for the rest of this transaction: waiters do not exclude each other (they pop in
    parallel). A claim that then finds nothing to pop queues for the lock itself
    (``ask_lock(wait=True)``); Postgres queues later shared requests behind it, so it gets
    the lock once the poppers ahead of it commit (Postgres; they pop in one statement)."""
    s.execute(
        text("SELECT pg_advisory_xact_lock_shared(:ns, :id)"), {"ns": ASK_LOCK, "id": study_id}
    )


def waiters(s: Session, study_id: int) -> int:
    """How many transactions wait for the study's ask lock right now (claims, in
    ``wait_for_asker``): the asker stocks at least that many suggestions."""
    return int(s.scalar(select(waiting_column(study_id))) or 0)


class Again(Exception):
    """A claim waited for the study's asker and found nothing to pop: roll back, look again."""


def wants_buffer(study: Study, spec: StudySpec) -> bool:
    """Whether the study (as read) buffers suggestions at all."""
    return (
        spec.sampler.buffer > 0
        and spec.sampler.name != "grid"
        and study.status == StudyStatus.RUNNING
        and study.phase == StudyPhase.SEARCH
        and study.n_waiting == 0
    )


def target(s: Session, study: Study, spec: StudySpec, now: datetime | None = None) -> int:
    """How many suggestions the study should hold: about ``HORIZON_S`` of its claims, at
    the rate of those of the last ``RATE_WINDOW_S`` (up to ``now``; by default the database's
    clock; claims are stamped by their workers' clocks), over the window or, in a study whose
    first claim is younger, over the time since it (a study that began claiming 2 s ago at 10
    a second claims 10 a second, not 20 / 10; a burst in an older one is averaged over the
    window), at least 1, at most ``sampler.buffer``; 0 when it buffers none."""
    if not wants_buffer(study, spec):
        return 0
    recent, first, clock, mean_s = s.execute(select(*rate_columns(study.id, now))).one()
    return sized(spec, recent, first, clock, mean_s, study.n_running)


def rate_columns(study_id: int, now: datetime | None = None) -> list[Any]:
    """What ``target`` sizes the buffer from, as four scalar columns (to select beside
    others): the study's claims started in the window before ``now`` (by default the
    database's clock), when its first claim started, ``now``, and how long its last
    ``RECENT_FINISHED`` finished trials ran, on average, in seconds."""
    window = timedelta(seconds=RATE_WINDOW_S)
    clock: Any = func.now() if now is None else literal(now, UtcDateTime())
    since: Any = func.now() - window if now is None else literal(now - window, UtcDateTime())
    mine = Trial.study_id == study_id
    last = (
        select(Trial.started_at, Trial.finished_at)
        .where(mine, Trial.finished_at.is_not(None), Trial.started_at.is_not(None))
        .order_by(Trial.id.desc())
        .limit(RECENT_FINISHED)
        .subquery()
    )
    return [
        select(func.count()).where(mine, Trial.started_at >= since).scalar_subquery(),
        select(func.min(Trial.started_at)).where(mine).scalar_subquery(),
        clock,
        select(
            func.avg(extract("epoch", last.c.finished_at - last.c.started_at))
        ).scalar_subquery(),
    ]


def sized(
    spec: StudySpec,
    recent: int,
    first: datetime | None,
    now: datetime,
    mean_s: float | None = None,
    running: int = 0,
) -> int:
    """``target`` from what ``rate_columns`` read and the study's running trials (for a
    study that buffers). The claim rate is the larger of the one observed (``recent`` over
    the window, or over the time since the first claim in a younger study) and the one
    expected: each running trial claims again when it ends, ``running / mean_s`` a second
    (Little's law; trials under ``MIN_TRIAL_S`` counted as that long). The expected rate is
    what a fleet that starts, or restarts, at once is about to claim at, before the window
    has seen it; for long trials it is small, and the buffer stays at one."""
    observed = 0.0
    if recent and first is not None:
        observed = recent / min(RATE_WINDOW_S, max(1.0, (now - first).total_seconds()))
    expected = running / max(float(mean_s), MIN_TRIAL_S) if running and mean_s is not None else 0
    rate = max(observed, expected)
    if rate <= 0:
        return 1
    return max(1, min(spec.sampler.buffer, math.ceil(rate * HORIZON_S)))


def waiting_column(study_id: int) -> Any:
    """``waiters`` as a scalar column (to select beside others)."""
    locks = table(
        "pg_locks",
        column("locktype"),
        column("granted"),
        column("classid"),
        column("objid"),
        column("objsubid"),
    )
    return (
        select(func.count())
        .select_from(locks)
        .where(
            locks.c.locktype == "advisory",
            ~locks.c.granted,
            locks.c.classid == ASK_LOCK,
            locks.c.objid == study_id,
            locks.c.objsubid == 2,
        )
        .scalar_subquery()
    )


def sketch_many(
    storage: optuna.storages.BaseStorage,
    study: Study,
    spec: StudySpec,
    owner: str,
    *,
    k: int,
    seed_from: int | None = None,
    siblings: list[Sketch] | None = None,
    within_s: float | None = None,
    known: list[FrozenTrial] | None = None,
) -> list[Sketch]:
    """Up to ``k`` suggestions sampled (``optuna.sketch``), nothing written: each sees the
    ones before it as RUNNING, as it would had they been asked. Sampling takes no lock in
    seqtune's tables (only the caller's ask lock), so finishes and pops of the study go on
    meanwhile. ``siblings``: trials sketched before these in the same transaction.
    ``within_s``: stop once sampling has taken this long (a slow sampler on a large study).
    ``known``: the study's trials, as the caller read them (``sketch``)."""
    before = list(siblings or [])
    done: list[Sketch] = []
    until = None if within_s is None else time.monotonic() + within_s
    base = seed_from if seed_from is not None else study.n_claimed + study.n_buffered + 1
    while len(done) < k and (until is None or time.monotonic() < until):
        ostudy = asking_study(storage, study.optuna_study_name, spec, seed_offset=base + len(done))
        sk = sketch(storage, ostudy, spec, owner, siblings=before + done, known=known)
        if sk is None:
            break
        done.append(sk)
    return done


def room(study: Study, k: int, *, claiming: int = 0) -> int:
    """How many of ``k`` suggestions the study (read under its ask lock) has slots for,
    besides ``claiming`` slots a claim is taking in the same transaction."""
    free = study.n_trials - study.n_claimed - study.n_waiting - study.n_buffered - claiming
    return max(0, min(k, free))


def store(s: Session, study: Study, sketches: list[Sketch], *, claiming: int = 0) -> int:
    """Store as many of ``sketches`` as the study (read under its ask lock) has slots for,
    besides ``claiming`` slots a claim takes in the same transaction, each holding one:
    Optuna's trials, the suggestions and the study's counter in one statement (``_STOCK``,
    after the Optuna study's row is locked, ``lock_optuna_study``), which writes nothing
    unless the study still has the slots; it is the study's row, locked last, that finishes
    and pops wait for, until the caller commits. Returns how many. Raises ``Raced`` when the
    study lost the slots meanwhile (paused, cut back or queued to: the caller's transaction
    must roll back)."""
    g = room(study, len(sketches), claiming=claiming)
    if g == 0:
        return 0
    lock_optuna_study(s, study.optuna_study_id)
    kept = s.execute(
        _STOCK,
        {
            "sid": study.optuna_study_id,
            "trials": sketch_rows(sketches[:g]),
            "study": study.id,
            "g": g,
            "claiming": claiming,
            "running": str(StudyStatus.RUNNING),
        },
    ).scalar()
    if kept != 1:
        raise Raced(f"study {study.id} lost its room while suggestions were stored")
    return g


# Optuna's rows for a batch (``WRITE_TRIALS_SQL``), its suggestions, and the study's counter,
# moved under the budget's guard first: where it cannot move, nothing is written.
_STOCK = text(
    WRITE_TRIALS_SQL.format(
        gate_cte="""slot AS (
    UPDATE seqtune_studies SET n_buffered = n_buffered + :g
    WHERE id = :study AND status = :running
      AND n_claimed + n_waiting + n_buffered + :g + :claiming <= n_trials
    RETURNING id
),""",
        gate=", slot",
        more=""", sug AS (
    INSERT INTO seqtune_suggestions (study_id, optuna_trial_id, number, params, created_at)
    SELECT :study, j.trial_id, j.number, j.ext, now() FROM j
)""",
    )
    + "SELECT count(*) FROM slot"
)


def pop(s: Session, *, study_id: int, owner: str, now: datetime) -> dict[str, Any] | None:
    """Take the study's oldest suggestion as a new RUNNING trial leased to ``owner``, in one
    statement: the suggestion row is skipped if another claim (or a cancel) holds it, and the
    study's counters move only while the study runs, has no queued trial (those go first, and
    a suggestion never takes their slot), has budget and is under its concurrency cap. (Not
    "while every suggestion has a slot": a pop keeps that sum, so where a race left more
    suggestions than slots, every pop would fail until the reaper cancelled the excess.)

    Returns the new trial's ``id``, ``number``, ``optuna_trial_id`` and ``params``; None when
    there was nothing to pop. Raises ``Raced`` when a suggestion was taken but the study no
    longer had room for it (the caller's transaction must roll back)."""
    row = (
        s.execute(
            text(_POP),
            {"sid": study_id, "owner": owner, "now": now, "running": str(StudyStatus.RUNNING)},
        )
        .mappings()
        .first()
    )
    if row is None:
        return None
    if row["id"] is None:
        raise Raced(f"study {study_id} lost its room while a claim took a suggestion")
    return dict(row)


class Raced(Exception):
    """A pop took a suggestion the study had no room for (its concurrency cap was reached,
    it was paused, or a trial was queued meanwhile): roll the claim's transaction back."""


_POP = """
WITH sug AS (
    DELETE FROM seqtune_suggestions
    WHERE id = (
        SELECT id FROM seqtune_suggestions WHERE study_id = :sid
        ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
    )
    RETURNING study_id, optuna_trial_id, number, params
), slot AS (
    UPDATE seqtune_studies
    SET n_claimed = n_claimed + 1, n_running = n_running + 1, n_buffered = n_buffered - 1,
        last_served_at = :now
    WHERE id = :sid AND status = :running AND n_waiting = 0
      AND n_claimed < n_trials
      AND (max_concurrent IS NULL OR n_running < max_concurrent)
      AND EXISTS (SELECT 1 FROM sug)
    RETURNING id
), ins AS (
    INSERT INTO seqtune_trials (
        study_id, number, optuna_trial_id, state, params, on_front, curve, epochs, info,
        attempts, lease_owner, worker, fence, lease_renewed_at, created_at, started_at
    )
    SELECT sug.study_id, sug.number, sug.optuna_trial_id, 'RUNNING', sug.params, false,
           '[]'::jsonb, 0, '{}'::jsonb, 1, :owner, :owner, 1, :now, :now, :now
    FROM sug JOIN slot ON slot.id = sug.study_id
    RETURNING id, number, optuna_trial_id, params
)
SELECT ins.id, sug.number, sug.optuna_trial_id, sug.params
FROM sug LEFT JOIN ins ON ins.optuna_trial_id = sug.optuna_trial_id
"""


def cancel(s: Session, study: Study, *, keep: int = 0) -> list[int]:
    """Delete the study's newest suggestions, all but its ``keep`` oldest (the study row is
    locked by the caller), and return their Optuna trial ids: the caller fails them in Optuna
    (``fail_cancelled``) once its transaction has committed.

    A suggestion a claim is popping right now is skipped, not waited for (the pop waits for
    the study row this caller holds: waiting here would deadlock). That pop then fails its
    guard and rolls back, or took a slot that was still there; what is left over is cancelled
    by the next reap (``service.store.recovery``)."""
    if study.n_buffered <= keep and keep > 0:
        return []
    # The newest first, and counted, not offset: rows a pop holds (skipped) would not count
    # towards an OFFSET, and too few would go. keep=0 takes every row, whatever the counter.
    q = (
        select(Suggestion.id)
        .where(Suggestion.study_id == study.id)
        .order_by(Suggestion.id.desc())
        .with_for_update(skip_locked=True)
    )
    if keep > 0:
        q = q.limit(max(0, study.n_buffered - keep))
    ids = list(s.scalars(q))
    if not ids:
        return []
    gone = list(
        s.scalars(
            delete(Suggestion).where(Suggestion.id.in_(ids)).returning(Suggestion.optuna_trial_id)
        )
    )
    study.n_buffered = max(0, study.n_buffered - len(gone))
    return gone


def keep_for(study: Study) -> int:
    """How many suggestions a study may keep: all while it runs, within its budget; none
    once it is paused, stopped, completed or timed out."""
    if study.status != StudyStatus.RUNNING or study.phase != StudyPhase.SEARCH:
        return 0
    return max(0, study.n_trials - study.n_claimed - study.n_waiting)


def fail_cancelled(storage: optuna.storages.BaseStorage, optuna_ids: Iterable[int]) -> int:
    """Fail cancelled suggestions in Optuna, marked ``CANCELLED`` (a trial that finished
    meanwhile is left alone). Returns how many it failed."""
    n = 0
    for tid in optuna_ids:
        try:
            storage.set_trial_system_attr(tid, CANCELLED, True)
            storage.set_trial_state_values(tid, OptunaState.FAIL)
            n += 1
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
            continue
        except Exception:  # noqa: BLE001 - the reaper's orphan sweep fails it later
            log.warning("could not fail cancelled suggestion %s in Optuna", tid, exc_info=True)
    return n


def buffered_ids(s: Session, study_id: int) -> set[int]:
    """The Optuna trial ids of the study's suggestions (RUNNING in Optuna, not orphans)."""
    return set(s.scalars(select(Suggestion.optuna_trial_id).where(Suggestion.study_id == study_id)))
