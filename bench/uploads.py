"""CSV upload benchmark: a hostile 50 MB header and a valid 49 MB file, against `seqtune serve`.

    python bench/uploads.py [--cases header,valid] [--repeat 1]

Runs a real `seqtune serve --no-auth` on a fresh Postgres database (SEQTUNE_BENCH_PG, default
the machine's 127.0.0.1:5432) and uploads each file through httpx as the CLI does. For each case
it reports the answer's status, the request's wall time and the service process's peak resident
memory during the request (Linux: VmHWM, reset before each case through /proc/PID/clear_refs),
also as the growth over the process's resident memory before the request. Prints a Markdown
table.

The cases (issue 13, item 7):

- ``header``: one header line of 25,000,000 two-byte fields (``c,c,...``, 50,000,000 bytes);
  the service should refuse it with a 422 naming the column cap.
- ``valid``: 49,000,000 bytes of a plausible time series: an ISO timestamp column and eight
  numeric columns, one of them with missing values.
- ``quoted``: the same rows with every timestamp in quotes (as some exporters write them), the
  parser's slow path: each row goes through ``csv.reader``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402

ADMIN = os.environ.get("SEQTUNE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
DB_NAME = "seqtune_bench_uploads"
HEADER_FIELDS = 25_000_000
VALID_BYTES = 49_000_000


def hostile_header(path: Path) -> None:
    """One 50 MB line of 25 million fields, no newline."""
    path.write_bytes(b"c," * (HEADER_FIELDS - 1) + b"c")


def valid_file(path: Path, quote: str = "") -> int:
    """A valid CSV of about VALID_BYTES (timestamps in ``quote``); returns its number of data
    rows."""
    with path.open("wb") as fh:
        fh.write(b"time,load,temp,wind,rain,p1,p2,p3,p4\n")
        size, i = 0, 0
        while size < VALID_BYTES - 200:
            lines = []
            for j in range(i, i + 10_000):
                missing = "" if j % 97 == 0 else f"{(j * 7919) % 100_000 / 13:.4f}"
                lines.append(
                    f"{quote}2024-01-01T{j % 24:02d}:{j % 60:02d}:00{quote},"
                    f"{j * 0.5:.3f},{missing},"
                    f"{(j % 1000) / 7:.5f},{j % 13},{j % 17}.25,{-j % 19}.5,"
                    f"{j % 23},{(j * 31) % 1009 / 3:.6f}\n"
                )
            chunk = "".join(lines).encode()
            if size + len(chunk) > VALID_BYTES:
                chunk = chunk[: chunk.rfind(b"\n", 0, VALID_BYTES - size) + 1]
                i += chunk.count(b"\n")
                fh.write(chunk)
                size += len(chunk)
                break
            fh.write(chunk)
            size += len(chunk)
            i += 10_000
    return i


def _status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (kB) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _server_pid(port: int) -> int:
    """The pid of the process listening on ``port`` (the uvicorn process)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].split(":")[1], 16) == port and cols[3] == "0A":  # LISTEN
                inode = cols[9]
    if inode is None:
        raise RuntimeError(f"nothing listens on {port}")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            for fd in (d / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(d.name)
        except OSError:
            continue
    raise RuntimeError(f"no process owns the socket on {port}")


def measure(base: str, pid: int, path: Path) -> dict[str, object]:
    """Upload ``path`` once; the answer and the server's time and peak memory for it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status(pid, "VmRSS")
    t0 = time.perf_counter()
    with path.open("rb") as fh:
        r = httpx.post(
            base + "/v1/datasets", files={"file": (path.name, fh, "text/csv")}, timeout=600
        )
    wall = time.perf_counter() - t0
    peak = _status(pid, "VmHWM")
    body = r.json()
    msg = (
        body.get("error", {}).get("message")
        if r.status_code >= 400
        else f"{body['n_rows']} rows, {len(body['columns'])} columns"
    )
    return {
        "status": r.status_code,
        "wall_s": wall,
        "peak": peak,
        "growth": peak - before,
        "message": str(msg)[:90],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="header,valid,quoted")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    url = make_url(ADMIN).set(database=DB_NAME).render_as_string(hide_password=False)
    harness.fresh_database(url)
    port = int(os.environ.get("SEQTUNE_BENCH_PORT", "8717"))
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for case in args.cases.split(","):
            files[case] = Path(tmp) / f"{case}.csv"
            if case == "header":
                hostile_header(files[case])
            else:
                valid_file(files[case], quote='"' if case == "quoted" else "")
        env = harness.service_env(url, Path(tmp))
        print(
            f"machine: {platform.node()} ({os.cpu_count()} cores), python "
            f"{platform.python_version()}, Postgres at {make_url(ADMIN).host}"
        )
        print("| case | bytes | status | wall s | server peak RSS MiB | growth MiB | answer |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for case, path in files.items():
            for _ in range(args.repeat):
                # A fresh service per upload: the allocator keeps freed memory, so a second
                # request in the same process would start from the first one's high-water mark.
                with harness.service(env, port, Path(tmp) / "serve.log"):
                    base = f"http://127.0.0.1:{port}"
                    pid = _server_pid(port)
                    m = measure(base, pid, path)
                print(
                    f"| {case} | {path.stat().st_size:,} | {m['status']} | "
                    f"{m['wall_s']:.2f} | {m['peak'] / 2**20:.0f} | "  # type: ignore[operator]
                    f"{m['growth'] / 2**20:.0f} | {m['message']} |",  # type: ignore[operator]
                    flush=True,
                )
        harness.fresh_database(url)  # leave no 49 MB rows behind


if __name__ == "__main__":
    main()
