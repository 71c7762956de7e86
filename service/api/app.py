"""The FastAPI application: ``create_app(settings)`` wires state, routes and error mapping."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response

from seqtune.errors import ErrorCode, Unauthorized, Unavailable
from seqtune.views import Readiness
from service.api import dashboard, routes_datasets, routes_models, routes_studies, routes_workers
from service.api import errors as api_errors
from service.api.deps import TENANT_SCOPE_KEY, AppState, request_key, resolve_tenant, state
from service.logs import redact_access_log
from service.metrics import LatencyMiddleware, Metrics
from service.settings import Settings, get_settings
from service.store import health, migrate, recovery
from service.store.db import Database
from service.store.optuna import make_storage

log = logging.getLogger("seqtune.service")


class _OverCap(Exception):
    """Raised from ``receive`` once a body passes its cap; BodyLimit answers 413 for it."""


def _header(scope: dict, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k == name), None)


class BodyLimit:
    """Caps request bodies before anything else reads them: ``json_cap`` bytes, or
    ``upload_cap`` plus multipart framing under /v1/datasets and /v1/models (uploads). Over
    the cap: 413, code 'too_large'.

    A Content-Length over the cap is refused at once, unread. A body without one (chunked) is
    counted as the app pulls it from ``receive``: the message that crosses the cap raises
    inside the app, and whatever the app answers to that is replaced by the 413. Nothing is
    buffered here and the server reads no further ahead than the app asked (uvicorn pauses
    the socket at 64 KiB), so memory stays flat whatever a client streams."""

    def __init__(self, app: Any, *, json_cap: int, upload_cap: int) -> None:
        self.app, self.json_cap, self.upload_cap = app, json_cap, upload_cap

    def cap_for(self, path: str) -> int:
        uploads = path.startswith(("/v1/datasets", "/v1/models"))
        return self.upload_cap + 64 * 1024 if uploads else self.json_cap

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.cap_for(scope["path"])
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > cap:
            await self._refuse(cap, scope, receive, send)
            return
        seen, over, started = 0, False, False

        async def counted_receive() -> dict:
            nonlocal seen, over
            if over:
                raise _OverCap  # an app that swallowed the first one gets no more body
            message: dict = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    over = True
                    raise _OverCap
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a body cut short (400, 422, 500): 413 instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            # _OverCap itself, or whatever the app or a framework layer wrapped it in.
            if not over:
                raise
        if over and not started:
            await self._refuse(cap, scope, receive, send)

    @staticmethod
    async def _refuse(cap: int, scope: dict, receive: Any, send: Any) -> None:
        what = (
            "SEQTUNE_MAX_UPLOAD_BYTES"
            if scope["path"].startswith("/v1/datasets")
            else "SEQTUNE_MAX_BODY_BYTES"
        )
        await api_errors.error_response(
            ErrorCode.TOO_LARGE, f"the request body is over the {cap} byte cap ({what})"
        )(scope, receive, send)


class KeyFirst:
    """With auth on, authenticates every /v1 request before anything reads its body: no key,
    or an unknown or revoked one, gets its 401 at once, so an anonymous client can make the
    service neither parse nor hold a body. The tenant found is left in the scope for
    ``deps.tenant``, which therefore does not look the key up twice."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        st: AppState | None = (
            getattr(scope["app"].state, "seqtune", None)
            if scope["type"] == "http" and "app" in scope
            else None
        )
        if (
            st is None
            or not st.settings.auth_enabled
            or not (path == "/v1" or path.startswith("/v1/"))
        ):
            await self.app(scope, receive, send)
            return
        try:
            scope[TENANT_SCOPE_KEY] = await resolve_tenant(
                st, request_key(scope["method"], scope["headers"])
            )
        except (Unauthorized, Unavailable) as exc:
            # Outside the routers, so the app's exception handlers do not run: the same
            # answer as theirs.
            await api_errors.domain_response(exc)(scope, receive, send)
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
                report = recovery.reap(self.db, self.storage)
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
            migrate.upgrade(db.engine, settings=settings)
        storage = make_storage(settings)
        app.state.seqtune = AppState(settings=settings, db=db, storage=storage)
        app.state.metrics = Metrics(db)
        reaper = Reaper(db, storage, settings.reap_interval_s)
        reaper.start()
        if not settings.auth_enabled:
            log.warning(
                "authentication is OFF (SEQTUNE_AUTH_ENABLED=false): every caller "
                "acts as tenant 'default'. Do not expose this service."
            )
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
            'body: `{"error": {"code", "message", "details": [{"field", "reason"}]}}`.'
        ),
        lifespan=lifespan,
    )
    api_errors.install(app)
    app.include_router(routes_studies.router)
    app.include_router(routes_datasets.router)
    app.include_router(routes_models.router)
    app.include_router(routes_workers.router)
    app.include_router(dashboard.router)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    def metrics() -> Response:
        """Prometheus metrics (``seqtune_*``): fleet-wide numbers from the database, API
        latency and the connection pool of this process. No study or tenant names."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=Readiness,
        responses={
            503: {
                "model": Readiness,
                "description": "the database is unreachable or behind on migrations",
            }
        },
    )
    def readyz(st: AppState = Depends(state)) -> JSONResponse:
        """The database answers and seqtune's migrations are current."""
        ready = health.readiness(st.db)
        return JSONResponse(
            ready.model_dump(exclude_none=True), status_code=200 if ready.status == "ready" else 503
        )

    # Each add_middleware wraps the ones before it, so requests meet them bottom up: latency
    # (times everything), then the body cap, then the key check, then the dashboard's paths.
    app.add_middleware(dashboard.DashboardGate)
    app.add_middleware(KeyFirst)
    app.add_middleware(
        BodyLimit, json_cap=settings.max_body_bytes, upload_cap=settings.max_upload_bytes
    )
    app.add_middleware(LatencyMiddleware)  # outermost: times everything, errors included
    redact_access_log()  # keys in query strings or paths never reach uvicorn's access log
    return app
