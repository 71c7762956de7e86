"""Request dependencies: the app's shared state, the caller's tenant, and the wording of the
hints its errors carry (``service.hints``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import optuna
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from seqtune.errors import Unauthorized
from service import hints
from service.settings import Settings
from service.store import keys
from service.store.db import Database

DEFAULT_TENANT = "default"
_bearer = HTTPBearer(auto_error=False, description="An API key from `seqtune keys create`")


@dataclass
class AppState:
    settings: Settings
    db: Database
    storage: optuna.storages.RDBStorage


# Both dependencies are async: FastAPI runs sync ones in the threadpool, one hop each.
async def state(request: Request) -> AppState:
    return request.app.state.seqtune  # type: ignore[no-any-return]


# Set by app.KeyFirst on requests it authenticated, so the dependency below does not repeat
# the check. Only server code writes scope keys; a client cannot set it.
TENANT_SCOPE_KEY = "seqtune.tenant"
COOKIE = "seqtune_key"
MAX_KEY_LEN = 256


def request_key(method: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The API key a request carries, or None: the bearer header, else (GET and HEAD only)
    the browser's sign-in cookie. Never the query string: keys in URLs end up in logs."""
    auth = cookie = None
    for name, value in headers:
        if name == b"authorization":
            auth = value.decode("latin-1")
        elif name == b"cookie":
            cookie = value.decode("latin-1")
    if auth is not None:
        scheme, _, credentials = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    # Another scheme (a proxy's Basic auth, say) is not ours: the cookie may still stand in.
    if cookie and method in ("GET", "HEAD"):
        # A browser page signed in at /login: its cookie stands for the key, for reads only.
        for part in cookie.split(";"):
            k, _, v = part.strip().partition("=")
            if k == COOKIE and v:
                return v
    return None


async def resolve_tenant(st: AppState, key: str | None) -> str:
    """The tenant of ``key``. Raises Unauthorized when it is missing, unknown or revoked.
    A key verified within ``auth_cache_s`` costs no database round trip."""
    if not key:
        raise Unauthorized(
            "send 'Authorization: Bearer <key>'; create a key with "
            "`seqtune keys create --tenant NAME`"
        )
    if len(key) > MAX_KEY_LEN:
        raise Unauthorized("the API key is unknown or revoked")
    ttl = st.settings.auth_cache_s
    cached = keys.cached_tenant(key, ttl)
    if cached is not None:
        return cached
    return await run_in_threadpool(keys.authenticate, st.db, key=key, cache_ttl_s=ttl)


async def caller(request: Request) -> hints.Caller:
    """Who made the request, for the wording of hints: the ``seqtune`` CLI (by its User-Agent)
    or any other client. Sets ``hints.CALLER`` for the rest of the request: an async
    dependency runs in the request's own context, and the route (in the threadpool) runs in a
    copy of it, so every hint the route's store calls raise is worded for this caller."""
    who = hints.caller_of(request.headers.get("user-agent"))
    hints.CALLER.set(who)
    return who


async def tenant(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Depends(_bearer),
    _caller: hints.Caller = Depends(caller),  # every route names its tenant: hints ride along
) -> str:
    """The tenant of the bearer key (or, for GET and HEAD, the sign-in cookie). With auth off,
    everyone is the 'default' tenant. ``creds`` is declared for the OpenAPI security scheme;
    the key itself is read by ``request_key``, the same parser app.KeyFirst uses."""
    st: AppState = request.app.state.seqtune
    if not st.settings.auth_enabled:
        return DEFAULT_TENANT
    known = request.scope.get(TENANT_SCOPE_KEY)
    if isinstance(known, str):
        return known
    return await resolve_tenant(st, request_key(request.method, request.scope["headers"]))
