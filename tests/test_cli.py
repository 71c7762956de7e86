"""The command line as a user runs it: `seqtune serve` in its own process, `seqtune db upgrade`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import create_engine

from service.store import migrate
from tests.conftest import free_port, seqtune_cmd, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def test_up_runs_the_example_to_completion_on_the_embedded_default(tmp_path: Path) -> None:
    """The README's run command: `seqtune up` with no database configured serves the API and
    runs a local worker on an SQLite file; the example study (a smaller budget) completes."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    env["SEQTUNE_LOG_LEVEL"] = "WARNING"
    proc = subprocess.Popen(
        [*seqtune_cmd(), "up", "--gpus", "none", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        example = yaml.safe_load((ROOT / "examples" / "sunspots.yaml").read_text())
        example["budget"]["n_trials"] = 3
        example["fixed"]["max_epochs"] = 4
        r = httpx.post(base + "/v1/studies", json=example)
        assert r.status_code == 201, r.text
        for _ in range(600):
            study = httpx.get(base + "/v1/studies/sunspots-lstm").json()
            if study["status"] == "completed":
                break
            time.sleep(0.2)
        assert study["status"] == "completed", study
        assert study["trials"]["finished"] == 3 and study["trials"]["running"] == 0
        best = httpx.get(base + "/v1/studies/sunspots-lstm/best")
        complete = study["trials"]["complete"]
        assert (best.status_code == 200) == (complete > 0)
        workers = httpx.get(base + "/v1/workers").json()
        assert workers and workers[0]["device"] == "cpu"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children, "up started no worker process"
        proc.send_signal(signal.SIGTERM)  # `up` alone, as a supervisor or `kill` would
        out, _ = proc.communicate(timeout=150)
        assert proc.returncode == 0, out
        for pid in map(int, children):  # the worker went with it, not left orphaned
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert (tmp_path / "seqtune-data" / "seqtune.db").exists()
    assert "authentication is OFF" in out


def test_db_upgrade_migrates_an_empty_database(pg_url: str) -> None:
    engine = create_engine(pg_url)
    migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None
    out = subprocess.run(
        [*seqtune_cmd(), "--database-url", pg_url, "db", "upgrade"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert migrate.head_revision() in out.stdout
    engine.dispose()


# Run as a base install would: the server's and the worker's stack cannot be imported.
_WITHOUT_EXTRAS = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "sqlalchemy", "fastapi", "uvicorn", "optuna",
                                  "numpy", "pandas", "pydantic_settings"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from seqtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _without_extras(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )


def test_help_lists_every_verb_without_the_extras() -> None:
    from seqtune.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    verbs = set(sub.choices)
    assert {"studies", "best", "serve", "up", "worker", "db", "keys", "predict"} <= verbs
    r = _without_extras("--help")
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("positional arguments:")[1].split("options:")[0]
    assert verbs <= {line.split()[0] for line in listed.splitlines() if line.strip()}


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["serve", "--port", "1"], "server"),
        (["db", "upgrade"], "server"),
        (["keys", "create", "--tenant", "x"], "server"),
        (["worker", "--gpus", "none"], "worker"),
        (["predict", "m.pt", "--csv", "x.csv"], "worker"),
    ],
)
def test_a_verb_without_its_extra_says_which_to_install(args: list[str], extra: str) -> None:
    r = _without_extras(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        f"seqtune {args[0]} needs the {extra} extra: pip install 'seqtune[{extra}]'"
    )
    assert not r.stdout


def test_child_processes_get_their_settings_from_settings() -> None:
    from service.settings import Settings

    s = Settings(database_url="postgres://u@h/db", auth_enabled=False, log_format="json")
    env = s.child_env({"SEQTUNE_TENSORBOARD_DIR": "/tb", "SEQTUNE_URL": "http://x", "PATH": "/b"})
    assert env["SEQTUNE_DATABASE_URL"] == "postgresql+psycopg2://u@h/db"
    assert env["SEQTUNE_AUTH_ENABLED"] == "false" and env["SEQTUNE_LOG_FORMAT"] == "json"
    assert "SEQTUNE_TENSORBOARD_DIR" not in env  # None here: the child's default, not /tb
    assert env["SEQTUNE_URL"] == "http://x" and env["PATH"] == "/b"  # not settings: kept
    code = "from service.settings import Settings; print(Settings().model_dump_json())"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    assert r.stdout.strip() == s.model_dump_json()
