"""/metrics parses as Prometheus text and its numbers follow the fleet; logs carry study and
trial ids, as text or JSON lines."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from service.logs import log_context, setup_logging
from service.settings import Settings
from service.store import leases, recovery, workers
from service.store.db import Database
from service.store.tables import Trial
from tests.conftest import run_trial, study_body


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_follow_trials_workers_and_reaps(
    client: TestClient, auth: dict[str, str], db: Database
) -> None:
    storage = client.app.state.seqtune.storage  # type: ignore[attr-defined]
    m = scrape(client)
    assert m[("seqtune_trials", (("state", "complete"),))] == 0
    assert m[("seqtune_queue_depth", ())] == 0

    client.post("/v1/studies", json=study_body("a", budget={"n_trials": 10}), headers=auth)
    run_trial(db, storage, client, auth, "a", 1.0)
    run_trial(db, storage, client, auth, "a", 2.0)
    run_trial(db, storage, client, auth, "a", 3.0, state="PRUNED")
    c = leases.claim(db, storage, owner="dead", studies=["a"])  # a worker that will die
    assert c is not None
    workers.register(db, worker_id="h-1-s0", host="h", slot=0, device="cpu", pid=1, versions={})

    m = scrape(client)
    assert m[("seqtune_trials", (("state", "complete"),))] == 2
    assert m[("seqtune_trials", (("state", "pruned"),))] == 1
    assert m[("seqtune_trials", (("state", "running"),))] == 1
    assert m[("seqtune_trials_pruned_ratio", ())] == pytest.approx(1 / 3)
    assert m[("seqtune_queue_depth", ())] == 10 - 4
    assert m[("seqtune_studies", (("status", "running"),))] == 1
    assert m[("seqtune_workers", (("status", "live"),))] == 1
    assert m[("seqtune_trial_duration_seconds_count", ())] == 3
    assert m[("seqtune_trial_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert m[("seqtune_lease_reaps_total", ())] == 0
    assert m[("seqtune_db_pool_size", ())] == 5
    assert ("seqtune_db_pool_checked_out", ()) in m
    # API latency by route template, never by raw path
    key = (
        "seqtune_api_request_duration_seconds_count",
        (("method", "POST"), ("route", "/v1/studies"), ("status", "201")),
    )
    assert m[key] == 1

    # the dying worker's lease expires; the reaper takes it and the counter moves
    db.run(
        lambda s: s.execute(
            update(Trial)
            .where(Trial.lease_owner == "dead")
            .values(lease_renewed_at=datetime.now(UTC) - timedelta(hours=1))
        )
    )
    assert recovery.reap(db, storage).freed == 1
    assert scrape(client)[("seqtune_lease_reaps_total", ())] == 1


def test_metrics_name_no_study_or_tenant(client: TestClient, auth: dict[str, str]) -> None:
    client.post("/v1/studies", json=study_body("secret-project"), headers=auth)
    client.get("/v1/studies/secret-project", headers=auth)
    text = client.get("/metrics").text
    assert "secret-project" not in text and "acme" not in text
    assert "/v1/studies/{name}" in text


@pytest.fixture
def restore_logging() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_carry_study_and_trial(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, restore_logging: Any
) -> None:
    monkeypatch.setenv("SEQTUNE_LOG_FORMAT", "json")
    setup_logging(Settings())
    log = logging.getLogger("seqtune.test")
    with log_context(study="sun", trial=7, worker="h-1-s0"):
        log.info("epoch %d done", 3)
    log.warning("outside")
    lines = [json.loads(x) for x in capsys.readouterr().err.strip().splitlines()]
    assert lines[0]["msg"] == "epoch 3 done" and lines[0]["study"] == "sun"
    assert lines[0]["trial"] == 7 and lines[0]["worker"] == "h-1-s0"
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "seqtune.test"
    assert "study" not in lines[1] and lines[1]["msg"] == "outside"


def test_text_logs_tag_study_and_trial(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, restore_logging: Any
) -> None:
    monkeypatch.setenv("SEQTUNE_LOG_FORMAT", "text")
    setup_logging(Settings())
    with log_context(study="sun", trial=2):
        logging.getLogger("seqtune.test").info("hello")
    assert capsys.readouterr().err.strip().endswith("hello [study=sun trial=2]")
