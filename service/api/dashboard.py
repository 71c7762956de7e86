"""The browser side: optuna-dashboard at ``/dashboard/`` and seqtune's own page at ``/ui/``.

Both sit behind the API's keys. A browser cannot send a bearer header, so the sign-in form
at ``/login`` posts the key (in the body: a key in a URL would stay in browser history and
server logs) and gets an HttpOnly, SameSite=Strict cookie; the cookie then stands for the key
on GET requests only (the dashboard is read-only here, and /v1 writes still need the header,
so a cookie can never change anything). ``GET /login`` shows the form and never accepts a key
in its query (400 with the form).

optuna-dashboard is a WSGI app that owns the paths ``/dashboard``, ``/api``, ``/static`` and
``/csv``; each tenant gets its own instance over a view of the storage that lists that
tenant's studies only, and study ids of other tenants answer 404.
"""

from __future__ import annotations

import html
import re
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from optuna.storages import BaseStorage
from optuna.study._frozen import FrozenStudy

from seqtune.errors import ErrorCode, Unauthorized
from service.api.deps import COOKIE, DEFAULT_TENANT, MAX_KEY_LEN, AppState, request_key
from service.api.errors import error_response
from service.metrics import ROUTE_LABEL
from service.store import keys

DASHBOARD_PREFIXES = ("/dashboard", "/api/", "/static/", "/csv/")
_STUDY_ID = re.compile(r"^/(?:api/studies|csv)/(\d+)")

router = APIRouter(tags=["browser"], include_in_schema=False)


class TenantStorage(BaseStorage):
    """A view of an Optuna storage that shows one tenant's studies (``<tenant>/…``) only."""

    def __init__(self, inner: BaseStorage, tenant: str) -> None:
        self._inner, self._prefix = inner, f"{tenant}/"

    def get_all_studies(self) -> list[FrozenStudy]:
        return [s for s in self._inner.get_all_studies() if s.study_name.startswith(self._prefix)]

    def owns(self, study_id: int) -> bool:
        try:
            return self._inner.get_study_name_from_id(study_id).startswith(self._prefix)
        except KeyError:
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _delegate(name: str) -> Any:
    def method(self: TenantStorage, *args: Any, **kw: Any) -> Any:
        return getattr(self._inner, name)(*args, **kw)

    method.__name__ = name
    return method


for _name in dir(BaseStorage):
    if (
        not _name.startswith("_")
        and _name != "get_all_studies"
        and callable(getattr(BaseStorage, _name))
    ):
        setattr(TenantStorage, _name, _delegate(_name))
TenantStorage.__abstractmethods__ = frozenset()


def _tenant_of_key(st: AppState, key: str | None) -> str | None:
    """The key's tenant, or None when it is missing, unknown or revoked."""
    if not key or len(key) > MAX_KEY_LEN:
        return None
    ttl = st.settings.auth_cache_s
    cached = keys.cached_tenant(key, ttl)
    if cached is not None:
        return cached
    try:
        return keys.authenticate(st.db, key=key, cache_ttl_s=ttl)
    except Unauthorized:
        return None


def login_page(next_path: str, message: str = "", status: int = 401) -> HTMLResponse:
    """The sign-in form. It posts the key in the body to ``POST /login``."""
    note = f'<p class="err">{html.escape(message)}</p>' if message else ""
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>seqtune: sign in</title>
<style>body{{font:15px system-ui,sans-serif;max-width:30em;margin:4em auto}}
input{{width:100%;padding:.5em;margin:.5em 0}}.err{{color:#b00}}</style></head><body>
<h1>seqtune</h1>{note}<form action="/login" method="post">
<label>API key (from <code>seqtune keys create</code>)
<input name="key" type="password" autocomplete="current-password" autofocus required></label>
<input type="hidden" name="next" value="{html.escape(next_path)}">
<button>Sign in</button></form></body></html>"""
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _safe_next(path: str) -> str:
    """A local path to go to after signing in; anything else (an open redirect: ``//host``,
    ``/\\host``, a URL) becomes /ui/."""
    ok = path.startswith("/") and not path.startswith(("//", "/\\")) and len(path) <= 512
    return path if ok else "/ui/"


@router.get("/login")
async def login_form(request: Request) -> Response:
    """The sign-in form. A ``key`` in the query is refused (400, the form again, no cookie):
    URLs are kept in browser history and access logs, so a key must be posted."""
    target = _safe_next(request.query_params.get("next", "/ui/"))
    if "key" in request.query_params:
        return login_page(
            target,
            "Keys are not accepted in the address, where browser "
            "history and logs keep them. Paste the key here instead.",
            400,
        )
    return login_page(target, status=200)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the posted key (form fields ``key`` and ``next``) and keep it in a cookie for
    the browser pages; 303 to ``next``. A wrong key answers the form again (401)."""
    st: AppState = request.app.state.seqtune
    async with request.form(max_files=0, max_fields=8) as form:
        key, nxt = form.get("key"), form.get("next")
    target = _safe_next(nxt if isinstance(nxt, str) else "/ui/")
    if not isinstance(key, str) or not key.strip():
        return login_page(target, "Paste an API key.", 400)
    key = key.strip()
    if st.settings.auth_enabled and await run_in_threadpool(_tenant_of_key, st, key) is None:
        return login_page(target, "That key is unknown or revoked.")
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(
        COOKIE,
        key,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=7 * 24 * 3600,
    )
    return resp


@router.get("/logout")
async def logout() -> Response:
    resp = RedirectResponse("/ui/", status_code=303)
    resp.delete_cookie(COOKIE)
    return resp


@router.get("/")
async def root() -> Response:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
@router.get("/ui/")
async def ui(request: Request) -> Response:
    """seqtune's page: studies, progress, best hyperparameters, the worker fleet."""
    st: AppState = request.app.state.seqtune
    if st.settings.auth_enabled:
        key = request_key(request.method, request.scope["headers"])
        if await run_in_threadpool(_tenant_of_key, st, key) is None:
            return login_page("/ui/")
    page = resources.files("service.ui").joinpath("index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


class DashboardGate:
    """ASGI middleware: sends optuna-dashboard's paths to the tenant's dashboard instance
    after the same key check as the API, and everything else on to the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._apps: dict[str, Any] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (
            path.startswith(DASHBOARD_PREFIXES) or path == "/favicon.ico"
        ):
            await self.app(scope, receive, send)
            return
        scope[ROUTE_LABEL] = "dashboard"  # one metrics label for all of the dashboard's paths
        st: AppState | None = getattr(scope["app"].state, "seqtune", None)
        if st is None:  # not started yet
            await error_response(ErrorCode.UNAVAILABLE, "starting")(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await error_response(
                ErrorCode.READ_ONLY,
                "the dashboard is read-only in seqtune; steer studies with the CLI or /v1",
            )(scope, receive, send)
            return
        tenant = DEFAULT_TENANT
        if st.settings.auth_enabled:
            found = await run_in_threadpool(
                _tenant_of_key, st, request_key(scope["method"], scope["headers"])
            )
            if found is None:
                if path.startswith("/dashboard"):
                    resp: Response = login_page(quote(path, safe="/"))
                else:
                    resp = error_response(
                        ErrorCode.UNAUTHORIZED,
                        "sign in at /login or send 'Authorization: Bearer <key>'",
                    )
                await resp(scope, receive, send)
                return
            tenant = found
        app = self._dashboard(st, tenant)
        m = _STUDY_ID.match(path)
        if m and not await run_in_threadpool(app.storage.owns, int(m.group(1))):
            # optuna-dashboard's own not-found body, which its page reads, not the API's.
            await JSONResponse({"reason": "study not found"}, status_code=404)(scope, receive, send)
            return
        if path == "/favicon.ico" or not any(k == b"accept-encoding" for k, _ in scope["headers"]):
            # optuna-dashboard reads request.headers["Accept-Encoding"] unguarded for
            # /favicon.ico and /static/* (KeyError, 500): without the header a client may not
            # decode gzip, so it asks for the plain file. The favicon is always asked plain:
            # gzipped, optuna-dashboard sends it as application/gzip with no Content-Encoding,
            # which no browser shows.
            headers = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
            scope = {**scope, "headers": [*headers, (b"accept-encoding", b"identity")]}
        await app.asgi(scope, receive, send)

    def _dashboard(self, st: AppState, tenant: str) -> Any:
        if tenant not in self._apps:
            import optuna_dashboard
            from a2wsgi import WSGIMiddleware

            storage = TenantStorage(st.storage, tenant)  # type: ignore[abstract]
            wsgi = optuna_dashboard.wsgi(storage)
            self._apps[tenant] = _Dash(storage, WSGIMiddleware(wsgi))  # type: ignore[arg-type]
        return self._apps[tenant]


class _Dash:
    def __init__(self, storage: TenantStorage, asgi: Any) -> None:
        self.storage, self.asgi = storage, asgi
