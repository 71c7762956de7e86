"""The service's own health: readiness (GET /readyz) and the fleet-wide numbers behind
/metrics. Read-only; every function returns a frozen value."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from seqtune.states import StudyStatus, TrialState
from seqtune.views import Readiness
from service.store import migrate
from service.store.db import Database
from service.store.tables import Study, Trial, Worker, utcnow

log = logging.getLogger("seqtune.service")

# The study row's counter of trials in each state, by the label /metrics gives it.
_COUNTERS = {
    TrialState.WAITING: Study.n_waiting,
    TrialState.RUNNING: Study.n_running,
    TrialState.COMPLETE: Study.n_complete,
    TrialState.PRUNED: Study.n_pruned,
    TrialState.FAIL: Study.n_failed,
}


def readiness(db: Database) -> Readiness:
    """'ready' with the migration when the database answers and seqtune's migrations are at
    head; else 'unavailable' with the reason. Never raises: any failure means not ready.

    Not retried (``Database.run`` would retry a lost connection for seconds): a probe wants
    the answer now."""
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = migrate.current_revision(db.engine)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        # The driver's message names the host, port, user and database: it goes to the log
        # for the operator, not to an unauthenticated probe.
        log.warning(
            "readyz: database unreachable: %s",
            str(getattr(exc, "orig", None) or exc).strip().replace("\n", " "),
        )
        return Readiness(
            status="unavailable", reason="database unreachable (the service log says why)"
        )
    head = migrate.head_revision()
    if current != head:
        return Readiness(
            status="unavailable",
            reason=f"migrations at {current}, head is {head}; run `seqtune db upgrade`",
        )
    return Readiness(status="ready", migration=current)


@dataclass(frozen=True)
class FleetStats:
    """What every replica reports alike: sums over all studies, trials and workers."""

    trials: dict[str, int]  # by state, lower case: waiting, running, complete, pruned, failed
    reaps: int  # leases taken from dead attempts
    studies: dict[str, int]  # by status, every StudyStatus present
    queue_depth: int  # trials running studies may still start
    workers_live: int
    workers_lost: int  # registered, not stopped, silent for lost_after_s (seen within a day)
    durations_count: int  # finished trials
    durations_sum_s: float
    durations_le: tuple[int, ...]  # finished trials within each of the ``buckets`` asked for


def _label(state: TrialState) -> str:
    # /metrics has always called FAIL 'failed' (the counter's name, n_failed).
    return "failed" if state == TrialState.FAIL else state.lower()


def fleet_stats(db: Database, *, buckets: tuple[float, ...], lost_after_s: float) -> FleetStats:
    """The fleet's numbers in one transaction (five small queries, no trial scan but the
    durations' aggregate). ``buckets`` are the duration histogram's upper bounds in seconds;
    a worker silent for ``lost_after_s`` (``Settings.lost_after_s``) counts as lost."""

    def txn(s: Session) -> FleetStats:
        sums = s.execute(
            select(
                *(func.coalesce(func.sum(c), 0) for c in _COUNTERS.values()),
                func.coalesce(func.sum(Study.n_reaped), 0),
            )
        ).one()
        by_status: dict[str, int] = {
            status: n
            for status, n in s.execute(select(Study.status, func.count()).group_by(Study.status))
        }
        # Queue depth: trials running studies may still start (budget left + enqueued).
        depth = s.scalar(
            select(func.coalesce(func.sum(Study.n_trials - Study.n_claimed), 0)).where(
                Study.status == StudyStatus.RUNNING
            )
        )
        now = utcnow()
        beats = s.scalars(
            select(Worker.heartbeat_at).where(
                Worker.stopped_at.is_(None), Worker.heartbeat_at > now - timedelta(days=1)
            )
        ).all()
        live = sum(1 for hb in beats if (now - hb).total_seconds() < lost_after_s)
        count, total, within = _durations(s, buckets)
        return FleetStats(
            trials={_label(st): int(n) for st, n in zip(_COUNTERS, sums, strict=False)},
            reaps=int(sums[len(_COUNTERS)]),
            studies={st.value: int(by_status.get(st, 0)) for st in StudyStatus},
            queue_depth=max(int(depth or 0), 0),
            workers_live=live,
            workers_lost=len(beats) - live,
            durations_count=count,
            durations_sum_s=total,
            durations_le=within,
        )

    return db.run(txn)


def _durations(s: Session, buckets: tuple[float, ...]) -> tuple[int, float, tuple[int, ...]]:
    """``(count, sum of seconds, count within each bound)`` of finished trials' wall time,
    start to end over all attempts."""
    dur: Any
    if s.get_bind().dialect.name == "postgresql":
        dur = func.extract("epoch", Trial.finished_at - Trial.started_at)
    else:
        dur = (func.julianday(Trial.finished_at) - func.julianday(Trial.started_at)) * 86400
    cols: list[Any] = [func.count(), func.coalesce(func.sum(dur), 0)]
    cols += [func.count().filter(dur <= b) for b in buckets]
    row = s.execute(
        select(*cols).where(Trial.finished_at.is_not(None), Trial.started_at.is_not(None))
    ).one()
    return int(row[0]), float(row[1]), tuple(int(n) for n in row[2:])
