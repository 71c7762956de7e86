"""What the end-to-end benchmarks share: a fresh database, a real service and real workers.

Each benchmark runs `seqtune serve` and `seqtune worker` as separate processes, the way users
run them, and talks to the service through the Python client.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seqtune.client import Client  # noqa: E402

EXE = [sys.executable, "-m", "seqtune.cli"]


def fresh_database(url: str) -> None:
    """Drop and create a Postgres database (SQLite files are left to the caller)."""
    if not url.startswith("postgresql"):
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    u = make_url(url.replace("postgresql://", "postgresql+psycopg2://"))
    admin = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{u.database}"'))
    admin.dispose()


def service_env(database_url: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    env.update(
        SEQTUNE_DATABASE_URL=database_url,
        SEQTUNE_LOG_LEVEL="WARNING",
        SEQTUNE_DATA_DIR=str(data_dir),
    )
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A `seqtune` subcommand in its own session, its output in ``log``."""
    return subprocess.Popen(
        [*EXE, *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(*procs: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """SIGTERM (a worker hands its trials back), then SIGKILL what outlives ``timeout``."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


@contextlib.contextmanager
def service(env: dict[str, str], port: int, log: Path) -> Iterator[Client]:
    """A running `seqtune serve --no-auth` and a client for it."""
    proc = start(["serve", "--no-auth", "--port", str(port)], env, log)
    c = Client(f"http://127.0.0.1:{port}", key="")
    try:
        for _ in range(600):
            try:
                c.health()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None:
                    raise SystemExit(f"seqtune serve exited; see {log}") from None
                time.sleep(0.2)
        yield c
    finally:
        stop(proc)
