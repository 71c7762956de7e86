"""Uploaded datasets: CSV parsed and validated on upload, stored with their content hash."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import Database
from service.errors import Conflict, Invalid, NotFound
from service.models import Dataset, Study
from service.views import DatasetView, Page

MAX_COLUMNS = 4096
ACTIVE_STATUSES = ("running", "paused")


def _fail(line: int, reason: str) -> Invalid:
    return Invalid(f"line {line}: {reason}", details=[{"field": "file", "line": line,
                                                        "reason": reason}])


def parse_csv(content: bytes) -> tuple[list[dict[str, Any]], int]:
    """Validate a CSV upload and describe it.

    The first line is the header. A column is numeric when its first non-empty value parses as
    a number; every later value in it must then be a number or empty (a missing value). Other
    columns are text (timestamps, class labels). Returns ``(columns, n_rows)`` where columns are
    ``{name, type, missing}``. Raises ``Invalid`` naming the line and the reason.
    """
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Invalid(f"the file is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") \
            from None
    if "\x00" in text:
        raise Invalid("the file contains NUL bytes; it is not a text CSV")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise _fail(1, "the file is empty; the first line must be a header") from None
    except csv.Error as exc:
        raise _fail(1, f"malformed CSV: {exc}") from None
    header = [h.strip() for h in header]
    if not header or all(h == "" for h in header):
        raise _fail(1, "the header line is empty")
    if len(header) > MAX_COLUMNS:
        raise _fail(1, f"more than {MAX_COLUMNS} columns")
    for h in header:
        if h == "":
            raise _fail(1, "a column has an empty name")
        if len(h) > 128:
            raise _fail(1, f"column name '{h[:20]}...' is longer than 128 characters")
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        raise _fail(1, f"duplicate column name(s): {sorted(dupes)}")

    types: list[str | None] = [None] * len(header)
    missing = [0] * len(header)
    n_rows = 0
    try:
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and row[0].strip() == ""):
                continue  # blank line
            if len(row) != len(header):
                raise _fail(line, f"{len(row)} fields, but the header has {len(header)}")
            for i, raw in enumerate(row):
                value = raw.strip()
                if value == "" or value.lower() in ("nan", "na", "null"):
                    missing[i] += 1
                    continue
                try:
                    number = float(value)
                    ok = math.isfinite(number)
                except ValueError:
                    ok = False
                if types[i] is None:
                    types[i] = "numeric" if ok else "text"
                elif types[i] == "numeric" and not ok:
                    raise _fail(line, f"column '{header[i]}' is numeric but has '{value[:40]}'")
            n_rows += 1
    except csv.Error as exc:
        raise _fail(reader.line_num, f"malformed CSV: {exc}") from None
    if n_rows == 0:
        raise _fail(2, "the file has a header but no data rows")
    if "numeric" not in types:
        raise Invalid("no numeric column found; a dataset needs at least one")
    columns = [{"name": h, "type": t or "numeric", "missing": m}
               for h, t, m in zip(header, types, missing, strict=True)]
    return columns, n_rows


def _view(d: Dataset) -> DatasetView:
    return DatasetView(id=d.id, name=d.name, sha256=d.sha256, size_bytes=d.size_bytes,
                       n_rows=d.n_rows, columns=d.columns, created_at=d.created_at)


def create_dataset(db: Database, *, tenant: str, name: str, content: bytes) -> DatasetView:
    """Validate and store a CSV. Raises Invalid (with the line) for a bad file."""
    columns, n_rows = parse_csv(content)
    row = Dataset(id=uuid.uuid4().hex, tenant=tenant, name=name[:128],
                  sha256=hashlib.sha256(content).hexdigest(), size_bytes=len(content),
                  n_rows=n_rows, columns=columns, content=content)

    def txn(s: Session) -> DatasetView:
        s.add(row)
        s.flush()
        return _view(row)

    return db.run(txn)


def list_datasets(db: Database, *, tenant: str, limit: int, offset: int) -> Page[DatasetView]:
    def txn(s: Session) -> Page[DatasetView]:
        rows = s.scalars(select(Dataset).where(Dataset.tenant == tenant)
                         .order_by(Dataset.created_at.desc(), Dataset.id)
                         .limit(limit + 1).offset(offset)).all()
        more = len(rows) > limit
        return Page(items=[_view(r) for r in rows[:limit]],
                    next_offset=offset + limit if more else None)

    return db.run(txn)


def _get(s: Session, tenant: str, dataset_id: str) -> Dataset:
    row = s.get(Dataset, dataset_id)
    if row is None or row.tenant != tenant:
        raise NotFound(f"no dataset '{dataset_id}'; list yours with GET /v1/datasets")
    return row


def get_dataset(db: Database, *, tenant: str, dataset_id: str) -> DatasetView:
    return db.run(lambda s: _view(_get(s, tenant, dataset_id)))


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


def delete_dataset(db: Database, *, tenant: str, dataset_id: str) -> None:
    """Delete a dataset. Raises Conflict while a running or paused study uses it; finished
    studies keep their spec and lose the link."""

    def txn(s: Session) -> None:
        row = _get(s, tenant, dataset_id)
        users = s.scalars(select(Study.name).where(Study.dataset_id == row.id,
                                                   Study.status.in_(ACTIVE_STATUSES))).all()
        if users:
            raise Conflict(f"dataset is used by active studies {sorted(users)}; stop or "
                           "delete them first")
        s.execute(update(Study).where(Study.dataset_id == row.id).values(dataset_id=None))
        s.delete(row)

    db.run(txn)
