"""Issue 13, item 7: CSV uploads are bounded while parsing.

An upload is read a chunk at a time and refused at the first chunk that breaks a cap (4,096
columns, 1 MiB per line), so a hostile 50 MB header costs about one chunk of memory; a valid file
is parsed column-wise and stored by a streamed COPY, so a large valid one costs a few MB too.
Memory is measured on a real `seqtune serve` process (its peak RSS, VmHWM); speed is measured by
bench/uploads.py and reported in BENCHMARKS.md, never asserted here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from seqtune.errors import Invalid
from service import csvparse
from service.settings import Settings
from service.store import datasets
from service.store.db import Database
from tests.conftest import serve_process

MiB = 1024 * 1024


# -- the parser, in process ---------------------------------------------------------------------
class Counting:
    """Chunks of a file, counting how many the parser pulled."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.pulled = chunks, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


def hostile_header(n_chunks: int = 50) -> Iterator[bytes]:
    """A 50 MB header line of 25 million fields, as 1 MiB chunks (never all in memory)."""
    chunk = b"c," * (MiB // 2)
    for _ in range(n_chunks):
        yield chunk


def test_hostile_header_is_refused_at_its_first_chunk() -> None:
    import tracemalloc

    source = Counting(hostile_header())
    tracemalloc.start()
    try:
        with pytest.raises(Invalid) as err:
            csvparse.parse_csv(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.message == f"line 1: more than {csvparse.MAX_COLUMNS} columns"
    assert source.pulled == 1, "read past the chunk that broke the column cap"
    assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB to refuse a header"  # 912 MB before


def test_a_line_over_the_cap_is_refused_as_it_streams_in() -> None:
    def long_line() -> Iterator[bytes]:
        yield b"a,b\n1,2\n3,"
        for _ in range(50):
            yield b"4" * MiB  # one 50 MB line

    source = Counting(long_line())
    with pytest.raises(Invalid) as err:
        csvparse.parse_csv(source)
    assert err.value.message == (
        f"line 3: the line is longer than {csvparse.MAX_LINE_BYTES} bytes (the line-length cap)"
    )
    assert source.pulled <= 3

    # Quoted fields with line breaks make one record of many short lines: it is capped too
    # (one quoted field alone is capped by the csv module at 131,072 characters).
    def long_record() -> Iterator[bytes]:
        yield b'a,b\n1,"x'
        for _ in range(50):
            yield b'\ny","x' * (MiB // 6)

    source = Counting(long_record())
    with pytest.raises(Invalid) as err:
        csvparse.parse_csv(source)
    assert "line 2: a record (a quoted field with line breaks) is longer than" in err.value.message
    assert source.pulled <= 4


def test_utf8_error_names_the_byte_of_the_file_past_a_bom() -> None:
    content = b"\xef\xbb\xbfa,b\n1,\xff\n"  # the bad byte is at offset 9 of the file
    with pytest.raises(Invalid) as err:
        csvparse.parse_csv(iter([content[:8], content[8:]]))
    assert err.value.message == "the file is not UTF-8 text (byte 9); save it as UTF-8 CSV"


def reference_parse(content: bytes) -> tuple[list[dict[str, Any]], int]:
    """The rules of parse_csv, value by value over the whole file (the implementation before
    the streaming one): what every chunking must reproduce."""
    text = content.decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise Invalid("line 1: the file is empty; the first line must be a header") from None
    if not header or all(h == "" for h in header):
        raise Invalid("line 1: the header line is empty")
    if any(h == "" for h in header):
        raise Invalid("line 1: a column has an empty name")
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        raise Invalid(f"line 1: duplicate column name(s): {sorted(dupes)}")
    types: list[str | None] = [None] * len(header)
    missing = [0] * len(header)
    n_rows = 0
    try:
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and row[0].strip() == ""):
                continue
            if len(row) != len(header):
                raise Invalid(f"line {line}: {len(row)} fields, but the header has {len(header)}")
            for i, raw in enumerate(row):
                value = raw.strip()
                if value.lower() in ("", "nan", "na", "null"):
                    missing[i] += 1
                    continue
                try:
                    ok = math.isfinite(float(value))
                except ValueError:
                    ok = False
                if types[i] is None:
                    types[i] = "numeric" if ok else "text"
                elif types[i] == "numeric" and not ok:
                    raise Invalid(
                        f"line {line}: column '{header[i]}' is numeric but has '{value[:40]}'"
                    )
            n_rows += 1
    except csv.Error as exc:
        raise Invalid(f"line {reader.line_num}: malformed CSV: {exc}") from None
    if n_rows == 0:
        raise Invalid("line 2: the file has a header but no data rows")
    if "numeric" not in types:
        raise Invalid("no numeric column found; a dataset needs at least one")
    return (
        [
            {"name": h, "type": t or "numeric", "missing": m}
            for h, t, m in zip(header, types, missing, strict=True)
        ],
        n_rows,
    )


VALUES = [
    "1",
    "2.5",
    " 3 ",
    "-4e3",
    "+.5e-3",
    "1.",
    "7",
    "12",
    "",
    " ",
    "nan",
    "NaN",
    "NA",
    "nUlL",
    "inf",
    "-nan",
    "1e999",
    "1e-999",
    "9" * 400,
    "1_0",
    "１２",
    "\u00a05",
    "0x1",
    "abc",
    "x y",
    '"q,1"',
    '"a\nb"',
    '"1"',
    '"a ""b"""',
    "\t5",
]


def random_csv(rng: random.Random) -> bytes:
    width = rng.randint(1, 4)
    lines = [",".join(f"c{i}" for i in range(width))]
    numeric_only = rng.random() < 0.5  # long runs the fast path takes whole
    pool = VALUES[:8] if numeric_only else VALUES
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.03:
            lines.append("")
        elif r < 0.05:
            lines.append("  ")
        elif r < 0.07:
            lines.append(",".join(rng.choice(pool) for _ in range(width + rng.choice((-1, 1)))))
        else:
            lines.append(",".join(rng.choice(pool) for _ in range(width)))
    sep = rng.choice(["\n", "\n", "\r\n", "\r"])
    data = (sep.join(lines) + (sep if rng.random() < 0.8 else "")).encode()
    return b"\xef\xbb\xbf" + data if rng.random() < 0.1 else data


def outcome(fn: Any, content: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(content)
    except Invalid as exc:
        return "invalid", exc.message


def test_any_chunking_gives_the_value_by_value_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the chunk boundaries (inside a \\r\\n, a quoted field, a UTF-8 character) and
    batch sizes, the streaming parser gives the reference's columns, counts and messages."""
    rng = random.Random(13)
    for n in range(600):
        content = random_csv(rng)
        want = outcome(reference_parse, content)
        for size in (1, 3, 7, 64, None):
            monkeypatch.setattr(csvparse, "_BATCH_FIELDS", rng.choice((1, 5, 1 << 18)))
            chunks = (
                content
                if size is None
                else (content[i : i + size] for i in range(0, len(content), size))
            )
            got = outcome(csvparse.parse_csv, chunks)
            assert got == want, (n, size, content)


# -- the service ---------------------------------------------------------------------------------
def test_upload_round_trips_through_small_chunks(
    client: TestClient,
    auth: dict[str, str],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks of 5 bytes split the BOM, CRLFs and a quoted field with a line break; the stored
    file is the uploaded one, byte for byte, on Postgres (streamed by COPY) and SQLite."""
    monkeypatch.setattr(datasets, "CHUNK_BYTES", 5)
    content = (
        '\ufeffdate,"load, kW",note\r\n2024-01-01,1.5,"a\r\nb"\r\n2024-01-02,,x\r\n'
        "2024-01-03,2.5,\r\n"
    ).encode()
    r = client.post("/v1/datasets", files={"file": ("l.csv", content, "text/csv")}, headers=auth)
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["n_rows"] == 3 and d["size_bytes"] == len(content)
    assert d["columns"] == [
        {"name": "date", "type": "text", "missing": 0},
        {"name": "load, kW", "type": "numeric", "missing": 1},
        {"name": "note", "type": "text", "missing": 1},
    ]
    db = Database(settings)
    try:
        sha, stored = datasets.dataset_content(db, dataset_id=d["id"])
    finally:
        db.dispose()
    assert stored == content and sha == d["sha256"] == hashlib.sha256(content).hexdigest()
    # The embedded default (SQLite) stores the bytes themselves, read back the same.
    lite = Database(Settings(data_dir=tmp_path))
    try:
        from service.store import migrate

        migrate.upgrade(lite.engine)
        view = datasets.upload_dataset(
            lite, tenant="default", name="l.csv", stream=io.BytesIO(content), cap=1024
        )
        assert view.columns == d["columns"] and view.sha256 == d["sha256"]
        assert datasets.dataset_content(lite, dataset_id=view.id) == (sha, content)
    finally:
        lite.dispose()


@pytest.fixture
def served(settings: Settings, key: str, tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    """`seqtune serve` in its own process: (base URL, key, pid of the server process)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/PID/clear_refs to measure peak memory")
    with serve_process(settings, tmp_path) as (base, proc, _):
        yield base, key, proc.pid


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def upload_measured(
    base: str, key: str, pid: int, path: Path
) -> tuple[httpx.Response, float, float]:
    """POST ``path``; the answer, the seconds it took and the server's peak memory growth in
    MiB over its resident memory just before (VmHWM, reset first)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib(pid, "VmRSS")
    t0 = time.perf_counter()
    with path.open("rb") as fh:
        r = httpx.post(
            base + "/v1/datasets",
            files={"file": (path.name, fh, "text/csv")},
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
        )
    return r, time.perf_counter() - t0, (_kib(pid, "VmHWM") - before) / 1024


def test_served_hostile_header_is_refused_in_flat_memory(
    served: tuple[str, str, int], tmp_path: Path
) -> None:
    base, key, pid = served
    path = tmp_path / "header.csv"
    with path.open("wb") as fh:
        for chunk in hostile_header():
            fh.write(chunk)
    r, seconds, growth = upload_measured(base, key, pid, path)
    print(f"hostile 50 MB header: {r.status_code} in {seconds:.2f} s, +{growth:.0f} MiB")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] == f"line 1: more than {csvparse.MAX_COLUMNS} columns"
    assert growth < 64, f"the server grew {growth:.0f} MiB to refuse the header"  # 670 before


def valid_file(path: Path, target_bytes: int) -> tuple[int, int]:
    """A valid CSV of about ``target_bytes``: a timestamp, numeric columns (one with missing
    values) and a quoted text column in one row of 50. Returns (rows, missing loads)."""
    rows = missing = 0
    with path.open("w", newline="") as fh:
        fh.write("time,load,temp,wind,note\r\n")
        size = 0
        while size < target_bytes:
            lines = []
            for j in range(rows, rows + 5000):
                load = "" if j % 97 == 0 else f"{(j * 7919) % 100_000 / 13:.4f}"
                missing += j % 97 == 0
                note = '"calm, dry"' if j % 50 == 0 else "ok"
                lines.append(
                    f"2024-01-01T{j % 24:02d}:{j % 60:02d}:00,{load},{j * 0.5:.3f},"
                    f"{(j % 1000) / 7:.5f},{note}\r\n"
                )
            block = "".join(lines)
            fh.write(block)
            size += len(block)
            rows += 5000
    return rows, missing


def test_served_valid_upload_round_trips_in_bounded_memory(
    served: tuple[str, str, int], settings: Settings, tmp_path: Path
) -> None:
    base, key, pid = served
    path = tmp_path / "valid.csv"
    n_rows, n_missing = valid_file(path, 24_000_000)
    r, seconds, growth = upload_measured(base, key, pid, path)
    print(
        f"valid {path.stat().st_size / 1e6:.0f} MB: {r.status_code} in {seconds:.2f} s, "
        f"+{growth:.0f} MiB"
    )
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["n_rows"] == n_rows and d["size_bytes"] == path.stat().st_size
    assert d["columns"] == [
        {"name": "time", "type": "text", "missing": 0},
        {"name": "load", "type": "numeric", "missing": n_missing},
        {"name": "temp", "type": "numeric", "missing": 0},
        {"name": "wind", "type": "numeric", "missing": 0},
        {"name": "note", "type": "text", "missing": 0},
    ]
    content = path.read_bytes()
    db = Database(settings)
    try:
        sha, stored = datasets.dataset_content(db, dataset_id=d["id"])
    finally:
        db.dispose()
    assert sha == d["sha256"] == hashlib.sha256(content).hexdigest() and stored == content
    # Before: the decoded text, a UCS-4 copy of it and psycopg2's hex-escaped query, about
    # 9x the file (200+ MiB here); now a few chunks.
    assert growth < 80, f"the server grew {growth:.0f} MiB for a 24 MB upload"
