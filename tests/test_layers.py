"""The layers hold: the import rules (import-linter's contracts in pyproject.toml), a client
import that loads none of the server's or the worker's stack, and the base install alone, in a
fresh venv, running the CLI's client verbs against a real `seqtune serve`."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from fastapi.testclient import TestClient

from service.store.db import Database
from tests.conftest import run_trial, study_body

ROOT = Path(__file__).resolve().parent.parent

# What the base install (httpx, pydantic, pyyaml) must never load.
HEAVY = ("torch", "sqlalchemy", "fastapi", "optuna", "numpy", "pandas")


def _clean_env(**over: str) -> dict[str, str]:
    """This process's environment without seqtune's settings or a PYTHONPATH that could let a
    subprocess see the working tree instead of what it installed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SEQTUNE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(over)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 60, **env: str) -> CompletedProcess[str]:
    """Run ``cmd`` in ``cwd`` with the clean environment plus ``env``; output captured."""
    return subprocess.run(
        cmd, cwd=cwd, env=_clean_env(**env), capture_output=True, text=True, timeout=timeout
    )


def _lint_imports() -> list[str]:
    """The lint-imports command of the Python that runs the tests (a venv's bin/ or the
    interpreter's scripts folder), else the one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "lint-imports"
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is missing: pip install -e '.[dev]'"
    return [found]


def test_import_rules_hold() -> None:
    """seqtune ↛ service, worker and their stack; service ↛ torch, worker; worker ↛ the
    service's HTTP layer. Function-level and indirect imports count."""
    r = _run([*_lint_imports(), "--no-cache", "--no-logo"], cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_importing_the_client_loads_none_of_the_heavy_stack() -> None:
    code = (
        "import seqtune, seqtune.client, seqtune.commands, seqtune.cli, seqtune.spec, "
        "seqtune.views; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] "
        f"in {set(HEAVY)!r}))"
    )
    r = _run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert ast.literal_eval(r.stdout.strip()) == []


def _copy_of_the_tree(dest: Path) -> Path:
    """What a fresh clone holds for pip: pyproject.toml, the readme and every package it
    ships. pip builds in the source folder (build/, *.egg-info), so it builds in a copy and
    leaves the working tree alone."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for top in sorted({p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}):
        shutil.copytree(
            ROOT / top, dest / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return dest


@pytest.fixture
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv (no system site packages) with only the base install; its bin/ folder."""
    tmp = tmp_path_factory.mktemp("base-venv")
    r = _run([sys.executable, "-m", "venv", str(tmp / "venv")], cwd=tmp, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    bindir = tmp / "venv" / "bin"
    src = _copy_of_the_tree(tmp / "src")
    pip = [str(bindir / "python"), "-m", "pip", "install", "-q"]
    r = _run([*pip, "-c", str(ROOT / "constraints-cpu.txt"), str(src)], cwd=tmp, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    yield bindir


def test_the_base_install_alone_runs_studies_and_best(
    base_venv: Path,
    live: tuple[str, str],
    client: TestClient,
    auth: dict[str, str],
    db: Database,
    tmp_path: Path,
) -> None:
    python = str(base_venv / "python")
    # Nothing of the server's or the worker's stack came with the base install.
    r = _run([python, "-c", "import torch"], cwd=tmp_path)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    found = f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"
    r = _run([python, "-c", found], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr

    # A study with two completed trials, on the database the live `seqtune serve` uses.
    assert client.post("/v1/studies", json=study_body("layers"), headers=auth).status_code == 201
    storage = client.app.state.seqtune.storage  # type: ignore[attr-defined]
    for value in (0.75, 0.25):
        run_trial(db, storage, client, auth, "layers", value)

    base, key = live
    seqtune = str(base_venv / "seqtune")
    r = _run([seqtune, "studies"], cwd=tmp_path, SEQTUNE_URL=base, SEQTUNE_API_KEY=key)
    assert r.returncode == 0, r.stderr
    assert any(line.split()[:1] == ["layers"] for line in r.stdout.splitlines()), r.stdout
    r = _run([seqtune, "best", "layers"], cwd=tmp_path, SEQTUNE_URL=base, SEQTUNE_API_KEY=key)
    assert r.returncode == 0, r.stderr
    assert "trial 1: val_rmse=0.25" in r.stdout, r.stdout
