"""Test fixtures on a real Postgres (127.0.0.1:5432 by default).

Isolation: one template database is migrated once per run (seqtune's tables and Optuna's);
every test gets a fresh clone of it (CREATE DATABASE ... TEMPLATE), dropped afterwards.
Under CI=true an unreachable Postgres fails the run instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from seqtune.spec import StudySpec
from service.settings import Settings
from service.store import keys, leases, migrate
from service.store.db import Database
from service.store.optuna import optuna_study
from tests.pgbouncer import PgBouncer
from tests.pgbouncer import Unavailable as PgBouncerUnavailable

ADMIN_URL = os.environ.get(
    "SEQTUNE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


def _admin():  # type: ignore[no-untyped-def]
    return create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", pool_size=1, pool_pre_ping=True)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[PgBouncer]:
    """PgBouncer (Debian's package) in transaction pooling mode on a free 127.0.0.1 port, in
    front of the test Postgres, for the whole run, with 3 server connections per database
    entry (fewer than the fleet tests' slots); stopped (by its PID) at the end. Under CI=true
    a failure to start fails the run; elsewhere it skips the tests that need it.

    Any database name is served (a ``*`` entry), so each test's clone works through it;
    its server connections to a clone are ended by the clone's DROP ... WITH (FORCE)."""
    try:
        with PgBouncer.running(ADMIN_URL, pool_size=3) as bouncer:
            yield bouncer
    except PgBouncerUnavailable as exc:
        _unavailable(str(exc))


def _unavailable(why: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{why} (under CI=true)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    try:
        admin = _admin()
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        if _in_ci():
            pytest.fail(f"Postgres is unreachable at {ADMIN_URL} under CI=true: {exc}")
        pytest.skip(f"Postgres unreachable at {ADMIN_URL}: {exc}")
    name = f"seqtune_tpl_{os.getpid()}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    eng = create_engine(url)
    migrate.upgrade(eng)
    eng.dispose()
    storage = optuna.storages.RDBStorage(url)  # creates Optuna's tables in the template
    storage.engine.dispose()
    admin.dispose()
    yield name
    admin = _admin()  # a fresh engine: a test may have restarted Postgres meanwhile
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh database cloned from the migrated template."""
    admin = _admin()
    name = f"seqtune_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    admin.dispose()
    yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    admin = _admin()  # fresh: the test may have restarted Postgres
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def settings(pg_url: str, tmp_path: Any) -> Settings:
    return Settings(
        database_url=pg_url, data_dir=tmp_path, auth_enabled=True, db_retry_backoff_s=0.05
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    d = Database(settings)
    yield d
    d.dispose()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    from service.api.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def key(db: Database) -> str:
    return keys.create_key(db, tenant="acme")


@pytest.fixture
def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def study_body(name: str = "s1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "dataset": {"kind": "builtin", "name": "sunspots"},
        "objectives": [{"metric": "val_rmse"}],
        "search_space": {
            "hidden_size": {"type": "int", "low": 8, "high": 64},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        },
        "budget": {"n_trials": 20},
    }
    body.update(over)
    return body


def run_trial(
    db: Database,
    storage: optuna.storages.BaseStorage,
    client: TestClient,
    headers: dict[str, str],
    name: str,
    values: list[float] | float | Callable[[dict[str, Any]], list[float] | float],
    state: str = "COMPLETE",
    epochs: int = 3,
    owner: str = "test-worker",
) -> int:
    """Drive one trial the way a worker does: claim → epoch reports → finish."""
    c = leases.claim(db, storage, owner=owner, studies=[name])
    assert c is not None, f"nothing to claim in {name}"
    spec = StudySpec.model_validate(c.spec)
    ostudy = optuna_study(storage, c.optuna_study_name, spec)
    trial = optuna.trial.Trial(ostudy, c.optuna_trial_id)
    vals = values(c.params) if callable(values) else values
    vals = vals if isinstance(vals, list) else [vals]
    single = len(vals) == 1
    for e in range(epochs):
        leases.report(
            db,
            claim=c,
            trial=trial if single else None,
            epoch=e,
            record={"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": vals[0] + e},
            value=vals[0] + (epochs - e) if single else None,
        )
    if state == "COMPLETE":
        leases.finish(
            db,
            ostudy=ostudy,
            claim=c,
            state="COMPLETE",
            values=vals,
            reason="max_epochs",
            test_metrics={"test_rmse": vals[0] * 1.1},
        )
    else:
        leases.finish(
            db,
            ostudy=ostudy,
            claim=c,
            state=state,
            reason="pruned" if state == "PRUNED" else "error",
        )
    return c.number


def _study_id(db: Database, tenant: str, name: str) -> int:
    from sqlalchemy import select

    from service.store.tables import Study

    return db.run(
        lambda s: s.scalar(select(Study.id).where(Study.tenant == tenant, Study.name == name))
    )


def seqtune_cmd() -> list[str]:
    import shutil
    import sys

    exe = shutil.which("seqtune")
    return [exe] if exe else [sys.executable, "-m", "seqtune.cli"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: Any, log_path: Any = None, tries: int = 300) -> None:
    """Poll ``base``/readyz until it answers 200; fail early if ``proc`` exits."""
    import time

    import httpx

    for _ in range(tries):
        try:
            if httpx.get(base + "/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text() if log_path else "the service exited")
        time.sleep(0.1)
    raise AssertionError("the service did not become ready")


@contextlib.contextmanager
def serve_process(
    settings: Settings, tmp_path: Path, *args: str, log_level: str = "WARNING", **env_over: str
) -> Iterator[tuple[str, Any, Path]]:
    """`seqtune serve` in its own process on the test database, ready when entered:
    ``(base URL, process, log path)``; stopped (SIGTERM, then SIGKILL) on exit."""
    import subprocess

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    env.update(
        SEQTUNE_DATABASE_URL=settings.url,
        SEQTUNE_DATA_DIR=str(tmp_path),
        SEQTUNE_LOG_LEVEL=log_level,
        **env_over,
    )
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*seqtune_cmd(), "serve", "--port", str(port), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log_path=log_path)
        yield base, proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def live(settings: Settings, key: str, tmp_path: Any) -> Iterator[tuple[str, str]]:
    """`seqtune serve` in its own process on the test database, auth on: (base URL, key)."""
    with serve_process(settings, Path(tmp_path)) as (base, _, _):
        yield base, key
