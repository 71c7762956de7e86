"""Uploaded models: seqtune checkpoints a study may start its trials from
(``init_from: {model: ID}``), tenant-scoped like datasets.

A file is read on arrival without running it (``service.store.lineage.read_checkpoint``): junk
and anything that is not a seqtune checkpoint is refused, and what the file says of itself
(its model's shape, task, features, lineage) is kept as ``meta`` beside the bytes.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from seqtune.errors import Conflict, Invalid, NotFound, TooLarge
from seqtune.states import ACTIVE_STATUSES
from seqtune.views import ModelView, Page
from service.store.db import Database, page
from service.store.lineage import read_checkpoint
from service.store.tables import Model, Study


def _view(m: Model) -> ModelView:
    return ModelView(
        id=m.id,
        name=m.name,
        sha256=m.sha256,
        size_bytes=m.size_bytes,
        meta=m.meta,
        created_at=m.created_at,
    )


def upload_model(db: Database, *, tenant: str, name: str, stream: BinaryIO, cap: int) -> ModelView:
    """Check and store the model file read from ``stream`` (binary, seekable), at most
    ``cap`` bytes. Raises ``TooLarge`` over the cap (before reading when the stream's size is
    known), ``Invalid`` for an empty file or one that is not a seqtune checkpoint."""
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    if size > cap:
        raise TooLarge(f"the file is over the {cap} byte cap (SEQTUNE_MAX_UPLOAD_BYTES)")
    if size == 0:
        raise Invalid("the uploaded file is empty")
    stream.seek(0)
    data = stream.read(cap + 1)
    if len(data) > cap:  # a stream that misreported its size
        raise TooLarge(f"the file is over the {cap} byte cap (SEQTUNE_MAX_UPLOAD_BYTES)")
    return create_model(db, tenant=tenant, name=name, content=data)


def create_model(db: Database, *, tenant: str, name: str, content: bytes) -> ModelView:
    """Check and store a model file's bytes. Raises Invalid when it is not a seqtune model."""
    meta = read_checkpoint(content)

    def txn(s: Session) -> ModelView:
        row = Model(
            id=uuid.uuid4().hex,
            tenant=tenant,
            name=name[:128],
            sha256=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
            meta=meta,
            content=content,
        )
        s.add(row)
        s.flush()
        return _view(row)

    return db.run(txn)


def list_models(db: Database, *, tenant: str, limit: int, offset: int) -> Page[ModelView]:
    """One page of the tenant's models, newest first."""

    def txn(s: Session) -> Page[ModelView]:
        rows = s.scalars(
            select(Model)
            .where(Model.tenant == tenant)
            .order_by(Model.created_at.desc(), Model.id)
            .limit(limit + 1)
            .offset(offset)
        ).all()
        return page(rows, limit, offset, _view)

    return db.run(txn)


def _get(s: Session, tenant: str, model_id: str) -> Model:
    row = s.get(Model, model_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"no model '{model_id}'; list yours with GET /v1/models")
    return row


def get_model(db: Database, *, tenant: str, model_id: str) -> ModelView:
    """One model (without its bytes). Raises NotFound, also for another tenant's model."""
    return db.run(lambda s: _view(_get(s, tenant, model_id)))


def _users(s: Session, tenant: str, model_id: str) -> list[str]:
    """The tenant's running or paused studies that start from the model."""
    starts_from = Study.spec["init_from"]["model"].as_string()
    return list(
        s.scalars(
            select(Study.name).where(
                Study.tenant == tenant,
                Study.status.in_(ACTIVE_STATUSES),
                starts_from == model_id,
            )
        ).all()
    )


def delete_model(db: Database, *, tenant: str, model_id: str) -> None:
    """Delete a model. Raises NotFound, and Conflict while a running or paused study starts
    its trials from it (they would fail); finished studies keep their spec."""

    def txn(s: Session) -> None:
        row = _get(s, tenant, model_id)
        users = _users(s, tenant, model_id)
        if users:
            raise Conflict(
                f"model is used by active studies {sorted(users)}; stop or delete them first"
            )
        s.delete(row)

    db.run(txn)
