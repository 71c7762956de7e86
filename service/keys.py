"""API keys: created per tenant, stored as SHA-256 hashes, revocable."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import Database
from service.errors import Invalid, NotFound, Unauthorized
from service.models import ApiKey, utcnow

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
        res = s.execute(update(ApiKey)
                        .where(ApiKey.key_hash == _hash(key), ApiKey.revoked_at.is_(None))
                        .values(revoked_at=utcnow()))
        return int(res.rowcount)  # type: ignore[attr-defined]

    if db.run(txn) == 0:
        raise NotFound("no live key matches; it may be revoked already")


def authenticate(db: Database, *, key: str) -> str:
    """The tenant a live key belongs to. Raises Unauthorized otherwise."""

    def txn(s: Session) -> str | None:
        return s.scalar(select(ApiKey.tenant)
                        .where(ApiKey.key_hash == _hash(key), ApiKey.revoked_at.is_(None)))

    tenant = db.run(txn)
    if tenant is None:
        raise Unauthorized("the API key is unknown or revoked; create one with "
                           "`seqtune keys create --tenant NAME`")
    return tenant
