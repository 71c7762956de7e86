"""Suggestions asked ahead of claims: a small per-study buffer, so that a claim is one pop.

Without it every claim runs Optuna's ``ask()`` under the study's lock: asks on one study are
serialised and grow with the study (TPE reads every trial), so with many workers and short
trials the claim, not the GPU, sets the pace. With it (Postgres only; SQLite's single writer
keeps the ask-per-claim path):

- ``refill`` (a worker's background thread after each claim, see ``Refiller``) tops the buffer
  up to ``target``: one ``Suggestion`` row per transaction, asked of Optuna under the study's
  *ask lock*, a transaction-scoped advisory lock (safe behind PgBouncer in transaction mode),
  so one process at a time. The
  asked trials are RUNNING in Optuna, so TPE's constant liar treats them as running trials and
  no sampler proposes them again.
- ``pop`` (``service.store.leases.claim``) turns the oldest suggestion into a running,
  leased seqtune trial in one statement: ``FOR UPDATE SKIP LOCKED`` on the suggestion and a
  guarded UPDATE of the study's counters, so while the buffer lasts, a claim waits for no
  ``ask()`` (only for the study row, which each pop holds for its one statement).
- Every ask for a study, buffered or not, happens under its ask lock, so asks never
  interleave (grid points stay unique). A claim that finds the buffer empty waits for the
  lock, then pops what a refill stored meanwhile or asks itself; a refill only tries it
  (``ask_lock``).

Invariants: each suggestion holds a budget slot (``n_claimed + n_waiting + n_buffered <=
n_trials``), so exactly ``n_trials`` trials ever start; a pause, a stop or a lower budget cancels
the suggestions that no longer have a slot (``cancel``; the reaper cancels any that remain in a
study that is not running), and a cancelled suggestion is failed in Optuna with the system
attribute ``seqtune_cancelled``; a deleted study takes its suggestions along (cascade).

The trade-off: a suggestion is made before the results of the trials running at the time, as if
the study had up to ``buffer`` more workers. The target is about ``HORIZON_S`` of recent claims,
at least one, at most the study's ``sampler.buffer`` (default 8; 0 turns the buffer off). The
grid sampler gets no buffer: a cancelled grid point would count as visited in Optuna, and its
asks cost nothing to hide. Nor do studies with queued trials (they are popped by ask first) or
in their final phase.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from seqtune.spec import StudySpec
from seqtune.states import StudyPhase, StudyStatus
from service.store.db import Database
from service.store.optuna import ask_marked, asking_study
from service.store.tables import Study, Suggestion, Trial

log = logging.getLogger(__name__)

# The advisory lock key space of the ask lock: pg_advisory_xact_lock(ASK_LOCK, study id).
ASK_LOCK = 0x5E97_0002
# The buffer holds about this many seconds of the study's recent claims...
HORIZON_S = 2.0
# ...measured over this window.
RATE_WINDOW_S = 30.0
# Optuna system attribute on a suggestion that was cancelled before any claim took it.
CANCELLED = "seqtune_cancelled"


def enabled(db: Database) -> bool:
    """Whether this database buffers suggestions (Postgres; not SQLite)."""
    return not db.settings.is_sqlite


def ask_lock(s: Session, study_id: int, *, wait: bool) -> bool:
    """Take the study's ask lock for the rest of this transaction (Postgres; always on
    SQLite, whose single writer serialises asks): waiting for it (a claim), or only if it is
    free (a refill). Returns whether it was taken.

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


class Busy(Exception):
    """Another process holds the study's ask lock (a refill leaves the asking to it)."""


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
    """How many suggestions the study should hold: about ``HORIZON_S`` of its claims over the
    last ``RATE_WINDOW_S`` (up to ``now``; by default the database's clock, which stamped
    them), at least 1, at most ``sampler.buffer``; 0 when it buffers none."""
    if not wants_buffer(study, spec):
        return 0
    window = timedelta(seconds=RATE_WINDOW_S)
    since = (now - window) if now is not None else func.now() - window
    recent = s.scalar(
        select(func.count())
        .select_from(Trial)
        .where(Trial.study_id == study.id, Trial.started_at >= since)
    )
    rate = (recent or 0) / RATE_WINDOW_S
    return max(1, min(spec.sampler.buffer, math.ceil(rate * HORIZON_S)))


class _Abandoned(Exception):
    """The study changed under a refill: roll its transaction back, cancel what it asked."""


def refill(
    db: Database,
    storage: optuna.storages.BaseStorage,
    *,
    study_id: int,
    owner: str,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Top the study's buffer up to its ``target``. Returns how many suggestions it stored.

    One suggestion per transaction: take the ask lock, re-read the study, ask, store, commit;
    so the lock is held (and the idle-in-transaction timeout spans) one ``ask()``. The lock is
    only tried: when a claim or another refill holds it, that process is asking for the study
    already, and this refill leaves it to them (the next claim starts another). When claims
    come faster than asks, claims queue on the lock and ask for themselves, as with no
    buffer. ``stop`` (a worker shutting down) ends it early."""
    if not enabled(db):
        return 0

    def wanted(s: Session, study: Study | None) -> int:
        if study is None:
            return 0
        spec = StudySpec.model_validate(study.spec)
        free = study.n_trials - study.n_claimed - study.n_waiting - study.n_buffered
        return min(target(s, study, spec, now) - study.n_buffered, free)

    stored = 0
    while stop is None or not stop.is_set():
        try:
            more = _store_one(db, storage, study_id, owner, wanted)
        except Busy:
            break
        if more < 0:
            break
        stored += 1
        if more == 0:
            break
    return stored


def _store_one(
    db: Database,
    storage: optuna.storages.BaseStorage,
    study_id: int,
    owner: str,
    wanted: Callable[[Session, Study | None], int],
) -> int:
    """Ask one suggestion and store it, in one transaction under the ask lock. Returns how
    many more the study wants after it; -1 when it wanted none (nothing stored). Raises
    ``Busy`` when the lock is taken. Whatever Optuna asked
    and did not end up stored (the study changed meanwhile, an error, or an attempt that
    ``Database.run`` retried after a lost connection) is failed in Optuna as cancelled."""
    asked: list[int] = []

    def txn(s: Session) -> tuple[int, int] | None:
        if not ask_lock(s, study_id, wait=False):
            raise Busy
        study = s.get(Study, study_id)  # read after the lock: no ask can change it now
        k = wanted(s, study)
        if study is None or k <= 0:
            return None
        spec = StudySpec.model_validate(study.spec)
        slot = study.n_claimed + study.n_buffered + 1
        ostudy = asking_study(storage, study.optuna_study_name, spec, seed_offset=slot)
        trial = ask_marked(storage, ostudy, spec, owner)
        asked.append(trial._trial_id)
        s.add(
            Suggestion(
                study_id=study_id,
                optuna_trial_id=trial._trial_id,
                number=trial.number,
                params=trial.params,
            )
        )
        s.flush()
        kept = s.execute(
            update(Study)
            .where(
                Study.id == study_id,
                Study.status == StudyStatus.RUNNING,
                Study.n_claimed + Study.n_waiting + Study.n_buffered < Study.n_trials,
            )
            .values(n_buffered=Study.n_buffered + 1)
        )
        if kept.rowcount != 1:  # type: ignore[attr-defined]
            raise _Abandoned  # paused, stopped, cut back or queued to while we asked
        return trial._trial_id, k - 1

    try:
        got = db.run(txn)
    except Busy:
        raise
    except _Abandoned:
        fail_cancelled(storage, asked)
        return -1
    except BaseException:
        fail_cancelled(storage, asked)
        raise
    stored = got[0] if got is not None else None
    fail_cancelled(storage, [a for a in asked if a != stored])  # a retried attempt's ask
    return -1 if got is None else got[1]


def pop(s: Session, *, study_id: int, owner: str, now: datetime) -> dict[str, Any] | None:
    """Take the study's oldest suggestion as a new RUNNING trial leased to ``owner``, in one
    statement: the suggestion row is skipped if another claim (or a cancel) holds it, and the
    study's counters move only while the study runs, has no queued trial (those go first, and
    a suggestion never takes their slot), has budget and is under its concurrency cap.

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
      AND n_claimed + n_waiting + n_buffered <= n_trials AND n_claimed < n_trials
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
    """Delete the study's suggestions beyond its ``keep`` oldest (the study row is locked by
    the caller) and return their Optuna trial ids: the caller fails them in Optuna
    (``fail_cancelled``) once its transaction has committed.

    A suggestion a claim is popping right now is skipped, not waited for (the pop waits for
    the study row this caller holds: waiting here would deadlock). That pop then fails its
    guard and rolls back, or took a slot that was still there; what is left over is cancelled
    by the next reap (``service.store.recovery``)."""
    if study.n_buffered <= keep and keep > 0:
        return []
    ids = list(
        s.scalars(
            select(Suggestion.id)
            .where(Suggestion.study_id == study.id)
            .order_by(Suggestion.id)
            .offset(keep)
            .with_for_update(skip_locked=True)
        )
    )
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


class Refiller:
    """Refills a study's buffer in a background thread of this process after a claim, one
    refill at a time, so the claim that triggers it does not wait for the asks."""

    def __init__(self, db: Database, storage: optuna.storages.BaseStorage, owner: str) -> None:
        self.db, self.storage, self.owner = db, storage, owner
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_claim(self, study_id: int) -> None:
        """Start a refill of ``study_id`` unless one is already running here."""
        if self._stop.is_set() or not enabled(self.db) or not self._busy.acquire(blocking=False):
            return
        self._thread = threading.Thread(
            target=self._run, args=(study_id,), name="seqtune-refill", daemon=True
        )
        self._thread.start()

    def _run(self, study_id: int) -> None:
        try:
            refill(self.db, self.storage, study_id=study_id, owner=self.owner, stop=self._stop)
        except Exception:  # noqa: BLE001 - a failed refill only means the next claim asks
            log.exception("refilling study %s's suggestions failed", study_id)
        finally:
            self._busy.release()

    def close(self, timeout: float = 10.0) -> None:
        """Stop refilling: a refill under way ends after the suggestion it is asking (stored,
        not orphaned), waited for at most ``timeout`` seconds."""
        self._stop.set()
        t = self._thread
        if t is not None and t.is_alive():
            t.join(timeout)
