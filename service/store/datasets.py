"""Uploaded datasets: CSV parsed and validated on upload (``service.csvparse``), stored with
their content hash. On Postgres the stored copy is streamed too (``COPY ... FROM STDIN``), never
held in memory.
"""

from __future__ import annotations

import hashlib
import io
import struct
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

from sqlalchemy import literal_column, select, table, update
from sqlalchemy.orm import Session

from seqtune.errors import AlreadyExists, Conflict, Invalid, NotFound, TooLarge
from seqtune.states import ACTIVE_STATUSES
from seqtune.views import DatasetView, Page
from service.csvparse import CHUNK_BYTES, parse_csv
from service.hints import hint
from service.store.db import Database, page
from service.store.tables import Dataset, Study


def _view(d: Dataset) -> DatasetView:
    return DatasetView(
        id=d.id,
        name=d.name,
        sha256=d.sha256,
        size_bytes=d.size_bytes,
        n_rows=d.n_rows,
        columns=d.columns,
        created_at=d.created_at,
    )


def create_dataset(db: Database, *, tenant: str, name: str, content: bytes) -> DatasetView:
    """Validate and store a CSV. Raises Invalid (with the line) for a bad file."""
    return upload_dataset(
        db, tenant=tenant, name=name, stream=io.BytesIO(content), cap=max(len(content), 1)
    )


def upload_dataset(
    db: Database, *, tenant: str, name: str, stream: BinaryIO, cap: int
) -> DatasetView:
    """Validate and store the CSV read from ``stream`` (binary, seekable: an upload's spooled
    file), at most ``cap`` bytes.

    Two passes over the stream, one chunk in memory at a time: the first checks the size,
    parses, validates and hashes; the second stores it (on Postgres with psycopg2 by a binary
    ``COPY``, so even a file at the cap costs a few MB of memory). Raises ``TooLarge`` over the
    cap (before parsing when the stream's size is known), ``Invalid`` for an empty or bad file,
    ``AlreadyExists`` when the tenant has a dataset of that name (names are unique per tenant:
    a study may name its data by it).
    """
    if "/" in name or not name.strip():
        raise Invalid(
            "a dataset's name is how studies and URLs name it",
            details=[{"field": "name", "reason": "must be non-empty and hold no '/'"}],
        )
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    if size > cap:
        raise TooLarge(f"the file is over the {cap} byte cap (SEQTUNE_MAX_UPLOAD_BYTES)")
    if size == 0:
        raise Invalid("the uploaded file is empty")
    stream.seek(0)
    digest = hashlib.sha256()
    read = 0

    def chunks() -> Iterator[bytes]:
        nonlocal read
        while chunk := stream.read(CHUNK_BYTES):
            read += len(chunk)
            if read > cap:  # a stream that does not know its size
                raise TooLarge(f"the file is over the {cap} byte cap (SEQTUNE_MAX_UPLOAD_BYTES)")
            digest.update(chunk)
            yield chunk

    columns, n_rows = parse_csv(chunks())
    size = read  # what was parsed and hashed is what is stored
    name = name[:128]
    row_values = {
        "tenant": tenant,
        "name": name,
        "sha256": digest.hexdigest(),
        "size_bytes": size,
        "n_rows": n_rows,
        "columns": columns,
    }

    def txn(s: Session) -> DatasetView:
        # Checked here for a clear message; the unique index on (tenant, name) decides a race
        # between two uploads of one name (the loser's flush raises AlreadyExists below).
        _refuse_taken(s, tenant, name)
        row = Dataset(id=uuid.uuid4().hex, **row_values)
        row.content = _stored_content(s, stream, size)
        s.add(row)
        s.flush()
        return _view(row)

    try:
        return db.run(txn)
    except AlreadyExists:
        raise _name_taken(name) from None


def _name_taken(name: str) -> AlreadyExists:
    return AlreadyExists(
        f"you already have a dataset named '{name}'; " + hint("dataset_name_taken", dataset=name),
        details=[{"field": "name", "reason": "taken"}],
    )


def _refuse_taken(s: Session, tenant: str, name: str) -> None:
    if s.scalar(select(Dataset.id).where(Dataset.tenant == tenant, Dataset.name == name)):
        raise _name_taken(name)


_UPLOAD_TABLE = "seqtune_upload_content"


def _stored_content(s: Session, stream: BinaryIO, size: int) -> Any:
    """What to put in ``Dataset.content`` for the ``size`` bytes of ``stream``: on Postgres
    through psycopg2, a subquery on a temporary table the bytes were streamed into by a binary
    COPY; elsewhere (SQLite, other drivers) the bytes themselves.

    Why not the bytes everywhere: psycopg2 sends a bytea parameter as a hex literal inside the
    query text, so a 49 MB file became about 400 MB of escaped copies in the service and took
    seconds for the server to parse. Binary COPY sends the raw bytes in chunks. Where the server
    offers lz4, the value is also compressed with it for this transaction (pglz took about 2 s
    of a 49 MB insert; readers decompress either transparently).
    """
    stream.seek(0)
    conn = s.connection()
    if conn.dialect.name != "postgresql":
        return stream.read(size)
    raw = conn.connection.dbapi_connection
    if raw is None:
        return stream.read(size)
    cur = raw.cursor()
    if not hasattr(cur, "copy_expert"):  # not psycopg2 (postgresql+psycopg, say)
        cur.close()
        return stream.read(size)
    try:
        cur.execute(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        )
        found = cur.fetchone()
        if found and found[0]:
            cur.execute("SET LOCAL default_toast_compression = lz4")
        # Temporary and dropped at commit (or rollback): private to this transaction's session.
        cur.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {_UPLOAD_TABLE} (b bytea) ON COMMIT DROP"
        )
        cur.execute(f"TRUNCATE {_UPLOAD_TABLE}")
        cur.copy_expert(
            f"COPY {_UPLOAD_TABLE} (b) FROM STDIN WITH (FORMAT binary)",
            _BinaryCopy(stream, size),
            size=CHUNK_BYTES,
        )
    finally:
        cur.close()
    return select(literal_column("b")).select_from(table(_UPLOAD_TABLE)).scalar_subquery()


class _BinaryCopy(io.RawIOBase):
    """Postgres' binary COPY format for one row of one bytea field, read from ``stream``'s
    next ``size`` bytes: what psycopg2's ``copy_expert`` reads from, a chunk at a time."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        super().__init__()
        self._stream, self._left = stream, size
        # signature, flags, header extension length; then the tuple: 1 field of `size` bytes
        self._head: bytes | None = (
            b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0) + struct.pack("!hi", 1, size)
        )
        self._tail: bytes | None = struct.pack("!h", -1)  # end of data

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if self._head is not None:
            out, self._head = self._head, None
            return out
        if self._left > 0:
            want = self._left if n is None or n < 0 else min(n, self._left)
            out = self._stream.read(want)
            if not out:
                raise OSError("the upload ended before its measured size")
            self._left -= len(out)
            return out
        if self._tail is not None:
            out, self._tail = self._tail, None
            return out
        return b""


def list_datasets(db: Database, *, tenant: str, limit: int, offset: int) -> Page[DatasetView]:
    def txn(s: Session) -> Page[DatasetView]:
        rows = s.scalars(
            select(Dataset)
            .where(Dataset.tenant == tenant)
            .order_by(Dataset.created_at.desc(), Dataset.id)
            .limit(limit + 1)
            .offset(offset)
        ).all()
        return page(rows, limit, offset, _view)

    return db.run(txn)


def _get(
    s: Session, tenant: str, *, dataset_id: str | None = None, name: str | None = None
) -> Dataset:
    """The tenant's dataset of id ``dataset_id``, or else of name ``name``. NotFound."""
    row = s.get(Dataset, dataset_id) if dataset_id else None
    if row is not None and row.tenant != tenant:
        row = None
    if row is None and name is not None:
        row = s.scalar(select(Dataset).where(Dataset.tenant == tenant, Dataset.name == name))
    if row is None:
        shown = dataset_id if dataset_id is not None else name
        raise NotFound(f"no dataset '{shown}'; {hint('list_datasets')}")
    return row


def get_dataset(
    db: Database, *, tenant: str, dataset_id: str | None = None, name: str | None = None
) -> DatasetView:
    """The tenant's dataset of id ``dataset_id``, or of name ``name`` (give one); with both,
    the id is tried first, then the name (what a path segment "ID or NAME" means). Raises
    NotFound."""
    return db.run(lambda s: _view(_get(s, tenant, dataset_id=dataset_id, name=name)))


def dataset_columns(db: Database, *, tenant: str, dataset_id: str) -> list[str]:
    """The numeric and text column names of an uploaded dataset (for spec checks)."""
    return [c["name"] for c in get_dataset(db, tenant=tenant, dataset_id=dataset_id).columns]


def dataset_content(db: Database, *, dataset_id: str) -> tuple[str, bytes]:
    """``(sha256, content)`` of a dataset, for workers (they cache by the hash)."""

    def txn(s: Session) -> tuple[str, bytes]:
        row = s.get(Dataset, dataset_id)
        if row is None:
            raise NotFound(f"no dataset '{dataset_id}'")
        return row.sha256, row.content

    return db.run(txn)


def delete_dataset(db: Database, *, tenant: str, dataset_id: str, force: bool = False) -> None:
    """Delete the tenant's dataset of id (else name) ``dataset_id``.

    Raises NotFound; Conflict, naming them, while studies use it: a running or paused one
    always (its trials read the data), a finished one unless ``force``. With ``force``, the
    finished studies keep their spec (the dataset's id and name) and lose the link."""

    def txn(s: Session) -> None:
        row = _get(s, tenant, dataset_id=dataset_id, name=dataset_id)
        users = s.execute(
            select(Study.name, Study.status).where(Study.dataset_id == row.id).order_by(Study.name)
        ).all()
        active = [f"'{n}' ({st})" for n, st in users if st in ACTIVE_STATUSES]
        if active:
            raise Conflict(
                f"dataset '{row.name}' is used by {', '.join(active)}; " + hint("stop_studies")
            )
        if users and not force:
            names = ", ".join(f"'{n}' ({st})" for n, st in users)
            raise Conflict(f"dataset '{row.name}' is used by {names}; " + hint("dataset_in_use"))
        s.execute(update(Study).where(Study.dataset_id == row.id).values(dataset_id=None))
        s.delete(row)

    db.run(txn)
