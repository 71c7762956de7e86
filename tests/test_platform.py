"""Health, readiness, Optuna interoperability, lost connections, and the SQLite default."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.store import migrate
from service.store.db import Database
from tests.conftest import ADMIN_URL, run_trial, study_body


def test_healthz_and_readyz(client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["migration"] == migrate.head_revision()
    engine = create_engine(settings.url)
    migrate.downgrade(engine, "base")
    r = client.get("/readyz")
    assert r.status_code == 503 and "seqtune db upgrade" in r.json()["reason"]
    migrate.upgrade(engine)
    engine.dispose()
    assert client.get("/readyz").status_code == 200


def test_api_study_is_an_ordinary_optuna_study(
    client: TestClient, auth: dict, db: Database, settings
) -> None:  # type: ignore[no-untyped-def]
    client.post("/v1/studies", json=study_body("interop"), headers=auth)
    for v in (3.0, 1.0, 2.0):
        run_trial(db, client.app.state.seqtune.storage, client, auth, "interop", v)  # type: ignore[attr-defined]
    study = optuna.load_study(study_name="acme/interop", storage=settings.url)
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert study.best_value == 1.0 and len(done) == 3
    # Besides them, the suggestions buffered for the next claims: RUNNING in Optuna.
    buffered = client.get("/v1/studies/interop", headers=auth).json()["trials"]["buffered"]
    assert buffered >= 1 and len(study.trials) == 3 + buffered
    assert study.metric_names == ["val_rmse"]
    assert study.user_attrs["seqtune_spec"]["name"] == "interop"
    df = study.trials_dataframe()
    assert (df["state"] == "COMPLETE").sum() == 3 and "params_lr" in df.columns
    # Optuna's own command line reads the same database.
    optuna_cli = Path(sys.executable).parent / "optuna"
    out = subprocess.run(
        [str(optuna_cli), "studies", "--storage", settings.url, "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "acme/interop" in out.stdout


def test_lost_connections_are_recovered(client: TestClient, auth: dict, settings) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/v1/studies", json=study_body("pp"), headers=auth).status_code == 201
    dbname = settings.url.rsplit("/", 1)[1]
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:  # what a Postgres restart or an idle cut does to our pool
        killed = c.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": dbname},
        ).scalar()
    admin.dispose()
    assert killed >= 1
    r = client.get("/v1/studies/pp", headers=auth)
    assert r.status_code == 200 and r.json()["name"] == "pp"


def test_unreachable_database_is_503_not_500(settings) -> None:  # type: ignore[no-untyped-def]
    from seqtune.errors import Unavailable

    settings.database_url = "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere"
    settings.db_retries = 1
    db = Database(settings)
    try:
        db.run(lambda s: s.execute(text("SELECT 1")))
    except Unavailable as exc:
        assert "unreachable" in exc.message
    else:
        raise AssertionError("expected Unavailable")


def test_sqlite_default_serves_the_example(tmp_path: Path) -> None:
    """With no database URL the service runs on an SQLite file in the data folder."""
    import yaml

    from service.api.app import create_app
    from service.settings import Settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    s = Settings(
        _env_file=None,
        data_dir=tmp_path,
        auth_enabled=False,
        **({} if "SEQTUNE_DATABASE_URL" not in env else {}),
    )
    assert s.database_url is None and s.is_sqlite
    example = yaml.safe_load(Path("examples/sunspots.yaml").read_text())
    with TestClient(create_app(s)) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/studies", json=example)
        assert r.status_code == 201, r.text
        assert c.get("/v1/studies/sunspots-lstm").json()["trials"]["budget"] == 40
    assert (tmp_path / "seqtune.db").exists()
    study = optuna.load_study(study_name="default/sunspots-lstm", storage=s.url)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE


@pytest.mark.timeout(150)
def test_sqlite_default_runs_a_study_to_the_end(tmp_path: Path) -> None:
    """The embedded default end to end: a real slot on SQLite claims, trains, stores models,
    computes baselines and runs the final phase. Every Optuna write must come before seqtune's
    in a transaction (SQLite has one writer): the other order blocked 30 s per try."""
    import signal

    from service.api.app import create_app
    from service.settings import Settings
    from worker.slot import Slot, SlotConfig

    s = Settings(_env_file=None, data_dir=tmp_path, auth_enabled=False)
    assert s.is_sqlite
    body = {
        "name": "lite",
        "dataset": {"kind": "builtin", "name": "sunspots"},
        "search_space": {"hidden_size": {"type": "int", "low": 4, "high": 16}},
        "fixed": {"max_epochs": 2, "seq_len": 6},
        "budget": {"n_trials": 2},
        "final": {"top_k": 1, "seeds": 2},
    }
    with TestClient(create_app(s)) as c:
        assert c.post("/v1/studies", json=body).status_code == 201
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.monotonic()
    try:
        done = Slot(SlotConfig(burst=True, threads=1), s).run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    assert done == 4 and time.monotonic() - t0 < 100
    with TestClient(create_app(s)) as c:
        view = c.get("/v1/studies/lite").json()
        assert view["status"] == "completed" and view["trials"]["complete"] == 4
        best = c.get("/v1/studies/lite/best").json()
        assert best["baselines"]["status"] == "done" and best["final"]["winner"] is not None
        assert c.get("/v1/studies/lite/best/model").status_code == 200
