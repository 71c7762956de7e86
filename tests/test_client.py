"""The Python client against the real app (through FastAPI's TestClient): every method
round-trips to typed views, and service errors arrive as ApiError with their details."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib.image
import optuna
import pytest
import yaml
from fastapi.testclient import TestClient

from seqtune.client import ApiError, Client, ServiceUnreachable
from seqtune.spec import StudySpec
from seqtune.states import WorkerStatus
from seqtune.views import StudyView
from service.store import leases, workers
from service.store.db import Database
from service.store.optuna import optuna_study
from tests.conftest import run_trial, study_body


@pytest.fixture
def api(client: TestClient, key: str) -> Client:
    return Client("http://testserver", key=key, http=client)


@pytest.fixture
def storage(client: TestClient) -> optuna.storages.BaseStorage:
    return client.app.state.seqtune.storage  # type: ignore[attr-defined]


def test_studies_round_trip(
    api: Client,
    db: Database,
    storage: Any,
    client: TestClient,
    auth: dict[str, str],
    tmp_path: Path,
) -> None:
    view = api.submit(study_body("c1", budget={"n_trials": 6}))
    assert isinstance(view, StudyView) and view.name == "c1" and view.trials.budget == 6
    assert view.optuna_study_id is not None
    # a YAML file works as well as a dict
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(study_body("c2")))
    assert api.submit(tmp_path / "c2.yaml").name == "c2"
    assert [s.name for s in api.studies().items] == ["c2", "c1"]
    assert api.pause("c1").status == "paused"
    assert [s.name for s in api.studies(status="paused").items] == ["c1"]
    assert api.resume("c1").status == "running"
    assert api.update("c1", n_trials=8, priority=3).trials.budget == 8

    queued = api.enqueue("c1", {"hidden_size": 16, "lr": 0.01, "optimizer": "adam"})
    assert queued.state == "WAITING" and queued.params["hidden_size"] == 16
    for v in (3.0, 1.0, 2.0, 4.0):
        run_trial(db, storage, client, auth, "c1", v)
    assert api.trial("c1", 0).params["hidden_size"] == 16  # the enqueued one ran first
    assert api.trial("c1", 0).curve  # the single-trial view has the learning curve
    assert [t.number for t in api.iter_trials("c1", sort="value")][:2] == [1, 2]
    page = api.trials("c1", state="COMPLETE", limit=2)
    assert len(page.items) == 2 and page.next_offset == 2
    best = api.best("c1")
    assert best.best is not None and best.best.value == 1.0 and best.metrics == ["val_rmse"]
    assert set(api.importance("c1")["importances"]) == {"hidden_size", "lr", "optimizer"}

    png = api.plot("c1", "history")
    assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[2] in (3, 4)
    html = api.plot("c1", "parallel", fmt="html")
    assert html.lower().startswith(b"<!doctype html>") and b"plotly" in html

    api.stop("c1")
    api.delete("c1")
    with pytest.raises(ApiError) as e:
        api.study("c1")
    assert e.value.status == 404 and "no study named 'c1'" in str(e.value)


def test_errors_carry_status_code_and_details(api: Client) -> None:
    with pytest.raises(ApiError) as e:
        api.submit(study_body("bad", budget={"n_trials": 0}))
    assert e.value.status == 422 and e.value.code == "invalid"
    assert any(d["field"] == "budget.n_trials" for d in e.value.details)
    api.submit(study_body("dup"))
    with pytest.raises(ApiError) as e:
        api.submit(study_body("dup"))
    assert e.value.status == 409
    with pytest.raises(ApiError) as e:
        api.plot("dup", "sideways")
    assert e.value.status == 422 and "history" in e.value.message
    with pytest.raises(ApiError) as e:
        api.plot("dup", "contour")
    assert e.value.status == 409 and "completed trial" in e.value.message
    with pytest.raises(ServiceUnreachable):
        Client("http://127.0.0.1:9", key="k").studies()


def test_wrong_key_is_an_api_error(client: TestClient) -> None:
    with pytest.raises(ApiError) as e:
        Client("http://testserver", key="nope", http=client).studies()
    assert e.value.status == 401


def test_datasets_round_trip(api: Client, tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text("t,y\n" + "".join(f"{i},{i % 7}\n" for i in range(50)))
    d = api.upload_dataset(f, name="sevens")
    assert d.name == "sevens" and d.n_rows == 50 and [c["name"] for c in d.columns] == ["t", "y"]
    assert api.dataset(d.id).sha256 == d.sha256
    assert [x.id for x in api.datasets().items] == [d.id]
    api.delete_dataset(d.id)
    assert api.datasets().items == []


def test_models_download_and_workers(
    api: Client,
    db: Database,
    storage: Any,
    client: TestClient,
    auth: dict[str, str],
    tmp_path: Path,
) -> None:
    api.submit(study_body("m"))
    run_trial(db, storage, client, auth, "m", 2.0)
    with pytest.raises(ApiError) as e:
        api.download_model("m", tmp_path / "x.pt")
    assert e.value.status == 409 and "no saved model" in e.value.message
    # a worker saves the best model of the trial it finishes; here, bytes stand for it
    c = leases.claim(db, storage, owner="w1", studies=["m"])
    assert c is not None
    leases.save_checkpoint(db, claim=c, kind="best", epoch=2, data=b"model-bytes")
    ostudy = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
    leases.finish(db, ostudy=ostudy, claim=c, state="COMPLETE", values=[1.0], reason="max_epochs")
    assert api.download_model("m", tmp_path / "b.pt").read_bytes() == b"model-bytes"
    assert api.download_model("m", tmp_path / "t.pt", trial=c.number).read_bytes() == b"model-bytes"
    r = client.get("/v1/studies/m/best/model", headers=auth)
    assert r.headers["x-seqtune-trial"] == str(c.number)
    assert f'filename="m-trial{c.number}.pt"' in r.headers["content-disposition"]

    workers.register(
        db, worker_id="host-1-s0", host="host", slot=0, device="cpu", pid=1, versions={}
    )
    assert [(w.id, w.status) for w in api.workers()] == [("host-1-s0", WorkerStatus.LIVE)]
    workers.stopped(db, worker_id="host-1-s0")  # listed again only when asked for
    assert api.workers() == []
    assert [w.status for w in api.workers(include_stopped=True)] == [WorkerStatus.STOPPED]


def test_best_model_of_several_objectives_is_a_conflict(api: Client) -> None:
    api.submit(
        study_body(
            "mo",
            objectives=[{"metric": "val_rmse"}, {"metric": "param_count"}],
            pruner={"name": "none"},
        )
    )
    with pytest.raises(ApiError) as e:
        api.download_model("mo", "unused.pt")
    assert e.value.status == 409 and "trials/{number}/model" in e.value.message


def test_error_codes_map_once_to_status_and_exit_code() -> None:
    """One table: a code's HTTP status is the one the API answers, its exit code the CLI's;
    a code this client does not know (a newer server) or a proxy's page falls back on the
    HTTP status."""
    from seqtune.commands import exit_code_of
    from seqtune.errors import ErrorCode, Exit, NotFound

    assert NotFound.code is ErrorCode.NOT_FOUND and ErrorCode.NOT_FOUND.status == 404
    assert exit_code_of(ApiError(404, "not_found", "x")) == Exit.NOT_FOUND == 3
    assert exit_code_of(ApiError(409, "already_exists", "x")) == 5
    assert exit_code_of(ApiError(413, "too_large", "x")) == 2
    assert exit_code_of(ApiError(0, "invalid", "x")) == 2
    newer = ApiError(429, "rate_limited", "slow down")
    assert newer.code is ErrorCode.ERROR and newer.raw_code == "rate_limited"
    assert exit_code_of(newer) == 2
    for status, code, exit_ in (
        (404, ErrorCode.NOT_FOUND, 3),
        (401, ErrorCode.UNAUTHORIZED, 4),
        (403, ErrorCode.UNAUTHORIZED, 4),
        (409, ErrorCode.CONFLICT, 5),
        (502, ErrorCode.UNAVAILABLE, 6),
        (500, ErrorCode.INTERNAL, 6),
    ):
        e = ApiError(status, "error", f"HTTP {status}: <html>")
        assert e.code is code and exit_code_of(e) == exit_, status


def test_api_answers_carry_the_status_of_their_code(client: TestClient) -> None:
    from seqtune.errors import ErrorCode

    for path, method in (("/v1/studies", "GET"), ("/v1/nope", "GET"), ("/v1/studies", "PUT")):
        r = client.request(method, path)
        assert r.status_code == ErrorCode(r.json()["error"]["code"]).status, r.text
