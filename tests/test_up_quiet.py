"""`seqtune up` starts quietly and says what it runs: the URL, the database (password masked),
the workers (count, device, threads) and whether auth is on; nothing from Alembic at INFO.
`--threads` reaches the worker, and every option of `up` and `serve` has a help text."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine

from seqtune.cli import build_parser
from service import cli
from service.settings import Settings
from service.store import migrate
from tests.conftest import free_port, seqtune_cmd, wait_ready


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_up_logs_what_it_runs_and_no_alembic(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    env.update(SEQTUNE_DATA_DIR=str(tmp_path / "data"), SEQTUNE_LOG_LEVEL="INFO")
    proc = subprocess.Popen(
        [*seqtune_cmd(), "up", "--gpus", "none", "--threads", "1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    children: list[int] = []
    try:
        wait_ready(base, proc)
        deadline = time.monotonic() + 120  # the worker's slot registered: its lines are out
        while not httpx.get(base + "/v1/workers").json():
            assert proc.poll() is None and time.monotonic() < deadline, "no worker registered"
            time.sleep(0.2)
        children = _children(proc.pid)
        assert len(children) == 1, "up started no worker, or more than one"
        worker = Path(f"/proc/{children[0]}/cmdline").read_bytes().split(b"\0")
        assert b"--threads" in worker and worker[worker.index(b"--threads") + 1] == b"1"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, out
    for pid in children:  # the worker went with it
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    lines = out.splitlines()
    assert not [line for line in lines if "alembic" in line.lower()], out
    for noise in ("Started server process", "Waiting for application startup", "Uvicorn running"):
        assert noise not in out
    said = [line.split(" seqtune.up ", 1)[1] for line in lines if " seqtune.up " in line]
    assert said == [
        f"serving http://127.0.0.1:{port} (API /v1, docs /docs, pages /ui/ and /dashboard/)",
        f"database: SQLite {tmp_path / 'data' / 'seqtune.db'}",
        "workers: 1 slot on the CPU, 1 torch thread each",
        "auth: off; every caller is tenant 'default' (--auth turns keys on)",
    ], out
    # One line for the schema, not one per revision; the service's line and the worker's.
    head = migrate.head_revision()
    assert sum("alembic" in x or "Running upgrade" in x for x in lines) == 0
    assert f"seqtune's database schema upgraded from none to {head}" in out
    assert "seqtune service ready" in out and "slot 0 on cpu" in out
    before_ready = lines[: next(i for i, x in enumerate(lines) if "service ready" in x)]
    assert len(before_ready) <= 7, out


def test_up_masks_the_password_and_says_when_auth_is_on(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(
        database_url="postgresql://seqtune:s3cret@db.example:5433/tuning", auth_enabled=True
    )
    args = argparse.Namespace(gpus="0,1", slots_per_gpu=2, threads=None)
    with caplog.at_level(logging.INFO, logger="seqtune.up"):
        cli._log_up(settings, args, "0.0.0.0", 9000)
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("serving http://0.0.0.0:9000 ")
    assert said[1] == "database: postgresql+psycopg2://seqtune:***@db.example:5433/tuning"
    assert said[2] == "workers: 4 slot(s) on GPU 0, 1 (2 per GPU)"
    assert said[3].startswith("auth: on; callers need an API key")
    assert "s3cret" not in caplog.text


def test_workers_summary() -> None:
    cores = os.cpu_count() or 1
    assert cli.workers_summary("none", 2, 3) == "2 slots on the CPU, 3 torch threads each"
    n = max(1, cores // 2)
    assert cli.workers_summary("none", 2, None) == (
        f"2 slots on the CPU, {n} torch thread{'s' if n > 1 else ''} each"
    )
    assert cli.workers_summary("all", 1, 4) == (
        "1 slot per visible GPU (without one: 1 slot on the CPU, 4 torch threads each)"
    )


def test_the_schema_line_is_logged_only_when_the_schema_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with caplog.at_level(logging.INFO):
            migrate.upgrade(engine)
            first = [r.getMessage() for r in caplog.records if r.name == "seqtune.db"]
            caplog.clear()
            migrate.upgrade(engine)
            again = [r.getMessage() for r in caplog.records if r.name == "seqtune.db"]
    finally:
        engine.dispose()
    assert first == [f"seqtune's database schema upgraded from none to {migrate.head_revision()}"]
    assert again == []


@pytest.mark.parametrize("verb", ["up", "serve"])
def test_every_option_has_a_help_text(verb: str) -> None:
    parser = build_parser(load={verb})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = [a for a in sub.choices[verb]._actions if a.option_strings and a.dest != "help"]
    assert {o for a in options for o in a.option_strings} >= {"--host", "--port", "--workers"}
    assert [a.option_strings for a in options if not a.help] == []
    if verb == "up":
        text = sub.choices[verb].format_help()
        assert "--threads N" in text and "$SEQTUNE_PORT or 8000" in text
