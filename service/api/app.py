"""The FastAPI application: ``create_app(settings)`` wires state, routes and error mapping."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from service import leases, migrate
from service.api import dashboard, routes_datasets, routes_studies, routes_workers
from service.api import errors as api_errors
from service.api.deps import AppState, state
from service.db import Database
from service.metrics import LatencyMiddleware, Metrics
from service.optuna_bridge import make_storage
from service.settings import Settings, get_settings

log = logging.getLogger("seqtune.service")


class BodyLimit:
    """Refuse bodies over the cap from their Content-Length, before reading them (413)."""

    def __init__(self, app: Any, *, json_cap: int, upload_cap: int) -> None:
        self.app, self.json_cap, self.upload_cap = app, json_cap, upload_cap

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None:
                cap = self.upload_cap + 64 * 1024 if scope["path"].startswith("/v1/datasets") \
                    else self.json_cap
                try:
                    too_big = int(length) > cap
                except ValueError:
                    too_big = False
                if too_big:
                    resp = JSONResponse(api_errors.error_body(
                        "too_large", f"the request body is over the {cap} byte cap"),
                        status_code=413)
                    await resp(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class Reaper:
    """Recovers trials of dead workers from the service too, so that recovery happens even
    when every worker is gone (``SEQTUNE_REAP_INTERVAL_S``; 0 turns it off)."""

    def __init__(self, db: Database, storage: Any, interval_s: float) -> None:
        self.db, self.storage, self.interval = db, storage, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seqtune-reaper", daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                report = leases.reap(self.db, self.storage)
                if report.freed or report.failed or report.orphans or report.timed_out:
                    log.info("reaper: %s", report)
            except Exception:  # noqa: BLE001 - the loop must survive a bad round; logged
                log.exception("reaper round failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings)
        if settings.migrate_on_start:
            migrate.upgrade(db.engine)
        storage = make_storage(settings)
        app.state.seqtune = AppState(settings=settings, db=db, storage=storage)
        app.state.metrics = Metrics(db)
        reaper = Reaper(db, storage, settings.reap_interval_s)
        reaper.start()
        if not settings.auth_enabled:
            log.warning("authentication is OFF (SEQTUNE_AUTH_ENABLED=false): every caller "
                        "acts as tenant 'default'. Do not expose this service.")
        where = "SQLite " + settings.url if settings.is_sqlite else "Postgres"
        log.info("seqtune service ready on %s", where)
        try:
            yield
        finally:
            reaper.stop()
            db.dispose()

    app = FastAPI(
        title="seqtune",
        version="0.1.0",
        summary="Hyperparameter search for LSTM sequence models",
        description=(
            "Submit studies (dataset, search space, sampler, pruner, budget); GPU workers "
            "train the trials; query trials, the best hyperparameters and importances. Every "
            "/v1 call needs `Authorization: Bearer <key>` unless auth is off. Errors share one "
            "body: `{\"error\": {\"code\", \"message\", \"details\": [{\"field\", \"reason\"}]}}`."
        ),
        lifespan=lifespan,
    )
    api_errors.install(app)
    app.include_router(routes_studies.router)
    app.include_router(routes_datasets.router)
    app.include_router(routes_workers.router)
    app.include_router(dashboard.router)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics (``seqtune_*``): fleet-wide numbers from the database, API
        latency and the connection pool of this process. No study or tenant names."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(app.state.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(st: AppState = Depends(state)) -> JSONResponse:
        """The database answers and seqtune's migrations are current."""
        try:
            with st.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            current = migrate.current_revision(st.db.engine)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "unavailable", "reason": f"database: {exc}"[:300]},
                                status_code=503)
        head = migrate.head_revision()
        if current != head:
            return JSONResponse({"status": "unavailable", "reason": f"migrations at {current},"
                                 f" head is {head}; run `seqtune db upgrade`"}, status_code=503)
        return JSONResponse({"status": "ready", "migration": current})

    app.add_middleware(BodyLimit, json_cap=settings.max_body_bytes,
                       upload_cap=settings.max_upload_bytes)
    app.add_middleware(dashboard.DashboardGate)
    app.add_middleware(LatencyMiddleware)  # outermost: times everything, errors included
    return app
