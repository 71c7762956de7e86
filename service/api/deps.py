"""Request dependencies: the app's shared state and the caller's tenant."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import keys
from service.db import Database
from service.errors import Unauthorized
from service.settings import Settings

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


async def tenant(request: Request,
                 creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
    """The tenant of the bearer key. With auth off, everyone is the 'default' tenant."""
    st: AppState = request.app.state.seqtune
    if not st.settings.auth_enabled:
        return DEFAULT_TENANT
    if creds is None and request.method in ("GET", "HEAD"):
        # A browser page signed in at /login: its cookie stands for the key, for reads only.
        cookie = request.cookies.get("seqtune_key")
        if cookie:
            creds = HTTPAuthorizationCredentials(scheme="Bearer", credentials=cookie)
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthorized("send 'Authorization: Bearer <key>'; create a key with "
                           "`seqtune keys create --tenant NAME`")
    if len(creds.credentials) > 256:
        raise Unauthorized("the API key is unknown or revoked")
    ttl = st.settings.auth_cache_s
    cached = keys.cached_tenant(creds.credentials, ttl)
    if cached is not None:
        return cached
    return await run_in_threadpool(keys.authenticate, st.db, key=creds.credentials,
                                   cache_ttl_s=ttl)
