"""API keys: created per tenant, stored as SHA-256 hashes, revocable."""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from seqtune.errors import Invalid, NotFound, Unauthorized
from service.store.db import Database
from service.store.tables import ApiKey, utcnow

TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
KEY_PREFIX = "st_"


def _hash(key: str) -> str:
    # Keys carry 256 random bits, so a plain hash is enough (no slow KDF needed).
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(db: Database, *, tenant: str) -> str:
    """Make a key for ``tenant`` and return it; only its hash is stored."""
    if not TENANT_PATTERN.match(tenant):
        raise Invalid("tenant names are 1-64 lowercase letters, digits, '_' or '-'")
    key = KEY_PREFIX + secrets.token_urlsafe(32)

    def txn(s: Session) -> None:
        s.add(ApiKey(tenant=tenant, key_hash=_hash(key), prefix=key[:10]))

    db.run(txn)
    return key


def revoke_key(db: Database, *, key: str) -> None:
    """Revoke ``key``. Raises NotFound when no such live key exists."""

    def txn(s: Session) -> int:
        res = s.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == _hash(key), ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        return int(res.rowcount)  # type: ignore[attr-defined]

    _cache.clear()
    if db.run(txn) == 0:
        raise NotFound("no live key matches; it may be revoked already")


class _AuthCache:
    """Recently verified key hashes → tenant, so a busy client costs one lookup per TTL.

    A revocation in this process takes effect at once; one made elsewhere (the CLI, another
    replica) within ``ttl`` seconds. Unknown keys are never cached.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, float]] = {}

    def get(self, key_hash: str, ttl: float) -> str | None:
        hit = self._entries.get(key_hash)
        if hit is None or time.monotonic() - hit[1] > ttl:
            return None
        return hit[0]

    def put(self, key_hash: str, tenant: str) -> None:
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[key_hash] = (tenant, time.monotonic())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _AuthCache()


def cached_tenant(key: str, ttl_s: float) -> str | None:
    """The tenant of a key verified within ``ttl_s`` seconds, without touching the database."""
    return _cache.get(_hash(key), ttl_s) if ttl_s > 0 else None


def authenticate(db: Database, *, key: str, cache_ttl_s: float = 0.0) -> str:
    """The tenant a live key belongs to. Raises Unauthorized otherwise.

    With ``cache_ttl_s`` > 0 a key verified less than that long ago is not looked up again.
    """
    key_hash = _hash(key)
    if cache_ttl_s > 0:
        cached = _cache.get(key_hash, cache_ttl_s)
        if cached is not None:
            return cached

    def txn(s: Session) -> str | None:
        return s.scalar(
            select(ApiKey.tenant).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        )

    tenant = db.run(txn)
    if tenant is not None and cache_ttl_s > 0:
        _cache.put(key_hash, tenant)
    if tenant is None:
        raise Unauthorized(
            "the API key is unknown or revoked; create one with `seqtune keys create --tenant NAME`"
        )
    return tenant
