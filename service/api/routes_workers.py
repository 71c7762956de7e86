"""/v1/workers: the worker fleet, live and lost."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from seqtune.views import WorkerView
from service.api.deps import AppState, state, tenant
from service.api.errors import responses
from service.store import workers

router = APIRouter(prefix="/v1/workers", tags=["workers"], responses=responses(401, 422, 503))


@router.get("", response_model=list[WorkerView])
async def list_workers(
    include_stopped: bool = False, st: AppState = Depends(state), who: str = Depends(tenant)
) -> list[WorkerView]:
    """Worker slots seen in the last day: live, lost (no heartbeat for 30 s) or stopped, with
    the trial each runs when it belongs to one of your studies."""
    return await run_in_threadpool(
        workers.list_workers,
        st.db,
        tenant=who,
        lost_after_s=st.settings.lost_after_s,
        include_stopped=include_stopped,
    )
