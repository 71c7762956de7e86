"""Stocking ahead: a worker's background thread that refills a study's suggestion buffer
before it runs dry, so that claims pop a suggestion and do not wait for the sampler.

Without it a study's buffer is refilled only by a claim that finds it empty: that claim
samples a batch under the study's ask lock while the claims arriving meanwhile wait for it
(``service.store.buffer``). With many workers and short trials most claims then waited, each
for a sampler that a loaded machine gave a small share of a core, and reading the study's new
trials from Optuna (the first sketch of a batch) took most of that.

A worker that pops a suggestion learns how many are left (``leases._CLAIM_POP`` returns it).
When that is half the study's target or less, it pokes its ``Stocker``, which refills the
buffer to the target in its own transaction (``restock``): under the same ask lock, taken only
if free (someone else is already stocking, or a claim that found the buffer empty is), with
the same batch rules as a claim's (``sketch_many``, ``store``). So one process at a time
refills, while claims go on popping what is left; a claim waits only when the buffer does run
dry. Samplers with no buffer (grid, ``buffer: 0``, queued trials, the final phase; SQLite)
are never stocked ahead: ``buffer.target`` is 0 for them.

The thread uses the worker's own engines (its pools bound its connections; it holds at most
one of seqtune's and one of Optuna's while it stocks), is a daemon, and never raises: a failed
restock is logged and left to the next poke or to a claim.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from seqtune.spec import StudySpec
from service.store import buffer
from service.store.db import Database
from service.store.known import known_trials
from service.store.optuna import warm_study
from service.store.tables import Study

if TYPE_CHECKING:
    from service.store.leases import Claim

log = logging.getLogger(__name__)

# A study's target, as last read by a worker, guides its pokes for this long.
TARGET_TTL_S = 5.0
# A worker that stocked a study keeps it stocked for this long after, looking at its buffer
# this often (``Stocker``).
LEAD_S = 5.0
POLL_S = 0.1
# After finding the ask lock taken, a worker leaves the study alone this long: whoever holds
# it is stocking, and pokes meanwhile would each cost a transaction for nothing.
BUSY_BACKOFF_S = 0.25


@dataclass(frozen=True)
class Restocked:
    """What one restock did: suggestions ``stored``, the study's ``target`` as read (0: the
    study takes none), and whether the ask lock was ``busy`` (someone else is stocking it:
    the study was read, nothing was stocked)."""

    stored: int = 0
    target: int | None = None
    busy: bool = False


def restock(
    db: Database, storage: optuna.storages.BaseStorage, study_id: int, owner: str
) -> Restocked:
    """Refill the study's buffer to its target in one transaction, if its ask lock is free
    and a quarter of the target or more is gone from the buffer (Postgres). Raises
    ``buffer.Raced`` when the study lost the slots while the batch was sampled (nothing is
    stored)."""

    def txn(s: Session) -> Restocked:
        # One statement: the ask lock (if free), the study, and what its target and the
        # claims waiting for the lock are read from (each round trip costs most on a loaded
        # machine, where stocking must keep ahead of the claims).
        row = s.execute(
            select(
                func.pg_try_advisory_xact_lock(buffer.ASK_LOCK, study_id),
                Study,
                *buffer.rate_columns(study_id),
                buffer.waiting_column(study_id),
            )
            .where(Study.id == study_id)
            .execution_options(populate_existing=True)
        ).first()
        if row is None:
            return Restocked(target=0)
        got, study, recent, first, now, mean_s, waiting = row
        spec = StudySpec.model_validate(study.spec)
        target = 0
        if buffer.wants_buffer(study, spec):
            target = buffer.sized(spec, recent, first, now, mean_s, study.n_running)
        if not got:  # the target still guides this worker's pokes
            return Restocked(target=target, busy=True)
        if target == 0 or study.n_claimed >= study.n_trials:
            return Restocked(target=target)
        if study.n_buffered * 4 > target * 3:  # stocked meanwhile (a claim, another worker)
            return Restocked(target=target)
        # Claims waiting for the lock (a claim that found the buffer empty waits for whoever
        # holds it) take one each at once: stock for them too, as a claim that stocks does.
        want = target - study.n_buffered + waiting
        k = buffer.room(study, min(buffer.MAX_STOCK, want))
        if k <= 0:
            return Restocked(target=target)
        known = known_trials(s.connection(), study.optuna_study_id)
        batch = buffer.sketch_many(
            storage, study, spec, owner, k=k, within_s=buffer.STOCK_S, known=known
        )
        return Restocked(stored=buffer.store(s, study, batch), target=target)

    return db.run(txn)


class Stocker:
    """One worker's stocking thread (``restock`` in the background). ``poke`` after a pop,
    with how many suggestions the study has left; ``close`` when the worker stops.

    A worker that has just stocked a study *leads* it for ``LEAD_S``: its thread looks at
    the study's count every ``POLL_S`` (one read of one row) and tops the buffer up as soon
    as a quarter of the target is gone, and each top-up renews the lead. So while claims go
    on, one worker keeps stocking, early (before the claims' pokes, at half), in batches of
    about a quarter of the target, without a transaction per poke. A leader that finds the
    lock taken, or nothing it can stock, steps down; a leader that dies leaves the study to
    the next claim that pops the buffer down to half."""

    def __init__(self, db: Database, storage: optuna.storages.BaseStorage, owner: str) -> None:
        self.db, self.storage, self.owner = db, storage, owner
        self._targets: dict[int, tuple[int, float]] = {}  # (target, when), as last read here
        self._pending: set[int] = set()
        self._busy_until: dict[int, float] = {}
        self._leading: dict[int, float] = {}  # study id -> until when (the thread's own)
        self._studies: dict[int, tuple[str, dict[str, Any]]] = {}  # Optuna name, spec
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restocked = 0  # suggestions this worker stocked ahead (for logs and tests)

    def poke(self, claim: Claim, left: int | None) -> None:
        """``claim`` popped a suggestion of its study and ``left`` remain (None: unknown).
        Wakes the thread when that is half the study's target or less, or the target is not
        known here yet."""
        study_id = claim.study_id
        self._studies.setdefault(study_id, (claim.optuna_study_name, claim.spec))
        now = time.monotonic()
        known = self._targets.get(study_id)
        if known is not None and now - known[1] < TARGET_TTL_S:
            target = known[0]
            if target == 0 or (left is not None and left * 2 > target):
                return
        if now < self._busy_until.get(study_id, 0.0):
            return
        with self._lock:
            self._pending.add(study_id)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="seqtune-stocker", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, letting a restock under way finish (within ``timeout``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(POLL_S if self._leading else None)
            self._wake.clear()
            with self._lock:
                todo, self._pending = self._pending, set()
            now = time.monotonic()
            for study_id, until in list(self._leading.items()):
                if until < now:
                    del self._leading[study_id]
                elif study_id not in todo and self._low(study_id):
                    todo.add(study_id)
            for study_id in sorted(todo):
                if self._stop.is_set():
                    return
                self._one(study_id)

    def _low(self, study_id: int) -> bool:
        """Whether a quarter of the study's target is gone from its buffer (one row read)."""
        target, _ = self._targets.get(study_id, (0, 0.0))
        try:
            left = self.db.autocommit(
                lambda conn: conn.execute(
                    select(Study.n_buffered).where(Study.id == study_id)
                ).scalar()
            )
        except Exception:  # noqa: BLE001 - the lead ends; a claim's poke starts another
            log.warning("reading study %s's buffer failed", study_id, exc_info=True)
            self._leading.pop(study_id, None)
            return False
        if left is None:  # the study is gone
            self._leading.pop(study_id, None)
            return False
        return bool(left * 4 <= target * 3)

    def _one(self, study_id: int) -> None:
        try:
            name, spec = self._studies[study_id]
            # Optuna's study object and this process's copy of the study's trials load (every
            # trial, the first time: seconds at 10^4 trials on a loaded machine) before the
            # lock; under it, only what changed since is read.
            optuna_id = warm_study(self.storage, name, StudySpec.model_validate(spec))
            self.db.autocommit(lambda conn: known_trials(conn, optuna_id))
            done = restock(self.db, self.storage, study_id, self.owner)
        except buffer.Raced:  # paused, cut back or queued to meanwhile: nothing was stored
            self._targets.pop(study_id, None)
            self._leading.pop(study_id, None)
            return
        except Exception:  # noqa: BLE001 - best effort: a claim that finds it empty stocks it
            log.warning("stocking study %s ahead failed", study_id, exc_info=True)
            self._busy_until[study_id] = time.monotonic() + 1.0
            self._leading.pop(study_id, None)
            return
        now = time.monotonic()
        if done.target is not None:
            self._targets[study_id] = (done.target, now)
        if done.busy:  # someone else is stocking it: let them lead
            self._busy_until[study_id] = now + BUSY_BACKOFF_S
            self._leading.pop(study_id, None)
        elif done.stored > 0:
            self._leading[study_id] = now + LEAD_S
        else:  # nothing to stock (or nothing it could: budget, queued trials): no lead
            self._leading.pop(study_id, None)
        self.restocked += done.stored
