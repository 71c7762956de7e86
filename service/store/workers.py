"""Worker slots: registration, heartbeats, and the fleet listing behind GET /v1/workers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from seqtune.states import WorkerStatus
from seqtune.views import WorkerView
from service.store.db import Database
from service.store.tables import Study, Trial, Worker, utcnow

# The timing (how often a slot beats, how long a silence means lost) is in Settings:
# heartbeat_s for the slots, lost_after_s for the listing below and /metrics.


def register(
    db: Database,
    *,
    worker_id: str,
    host: str,
    slot: int,
    device: str,
    pid: int,
    versions: dict[str, Any],
) -> None:
    db.run(
        lambda s: s.add(
            Worker(
                id=worker_id,
                host=host,
                slot=slot,
                device=device,
                pid=pid,
                versions=versions,
                trials_done=0,
            )
        )
    )


def heartbeat(db: Database, *, worker_id: str, trial_row_id: int | None) -> None:
    db.run(
        lambda s: s.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(heartbeat_at=utcnow(), trial_id=trial_row_id)
        )
    )


def trial_done(db: Database, *, worker_id: str) -> None:
    db.run(
        lambda s: s.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(trials_done=Worker.trials_done + 1, trial_id=None)
        )
    )


def stopped(db: Database, *, worker_id: str) -> None:
    db.run(
        lambda s: s.execute(
            update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow(), trial_id=None)
        )
    )


def list_workers(
    db: Database,
    *,
    tenant: str,
    lost_after_s: float,
    include_stopped: bool = False,
    limit: int = 200,
) -> list[WorkerView]:
    """Workers seen in the last day, live first: ``lost`` when silent for ``lost_after_s``
    (``Settings.lost_after_s``). A trial is named only for the caller's own studies (workers
    are shared by every tenant)."""

    def txn(s: Session) -> list[WorkerView]:
        now = utcnow()
        q = (
            select(Worker, Trial.number, Study.name, Study.tenant)
            .outerjoin(Trial, Trial.id == Worker.trial_id)
            .outerjoin(Study, Study.id == Trial.study_id)
            .where(Worker.heartbeat_at > now - timedelta(days=1))
            .order_by(Worker.heartbeat_at.desc())
            .limit(limit)
        )
        if not include_stopped:
            q = q.where(Worker.stopped_at.is_(None))
        out = []
        for w, number, study, owner in s.execute(q):
            if w.stopped_at:
                status = WorkerStatus.STOPPED
            elif w.heartbeat_at > now - timedelta(seconds=lost_after_s):
                status = WorkerStatus.LIVE
            else:
                status = WorkerStatus.LOST
            mine = owner == tenant
            out.append(
                WorkerView(
                    id=w.id,
                    host=w.host,
                    slot=w.slot,
                    device=w.device,
                    pid=w.pid,
                    status=status,
                    versions=w.versions,
                    started_at=w.started_at,
                    heartbeat_at=w.heartbeat_at,
                    trials_done=w.trials_done,
                    study=study if mine else None,
                    trial=number if mine else None,
                )
            )
        return out

    return db.run(txn)
