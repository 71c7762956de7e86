"""/v1/studies on real Postgres: create, list, read, steer, delete, and malformed requests."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import study_body


def test_create_returns_201_with_location_and_counts(client: TestClient, auth: dict) -> None:
    r = client.post("/v1/studies", json=study_body("alpha"), headers=auth)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/studies/alpha"
    body = r.json()
    assert body["status"] == "running" and body["optuna_study_name"] == "acme/alpha"
    assert body["trials"] == {
        "waiting": 0,
        "running": 0,
        "complete": 0,
        "pruned": 0,
        "failed": 0,
        "finished": 0,
        "budget": 20,
        "remaining": 20,
        "buffered": 0,
    }
    assert body["directions"] == ["minimize"]


def test_duplicate_name_is_409(client: TestClient, auth: dict) -> None:
    assert client.post("/v1/studies", json=study_body("dup"), headers=auth).status_code == 201
    r = client.post("/v1/studies", json=study_body("dup"), headers=auth)
    assert r.status_code == 409
    assert "exists" in r.json()["error"]["message"]


def test_invalid_definition_is_422_naming_fields_and_stores_nothing(
    client: TestClient, auth: dict
) -> None:
    bad = study_body("bad", search_space={"hidden_size": {"type": "int", "low": 9, "high": 2}})
    r = client.post("/v1/studies", json=bad, headers=auth)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid"
    assert err["details"][0]["field"] == "search_space.hidden_size"
    assert "low (9) must be <= high (2)" in err["details"][0]["reason"]
    assert client.get("/v1/studies", headers=auth).json()["items"] == []


def test_list_filters_by_status_and_paginates(client: TestClient, auth: dict) -> None:
    for i in range(5):
        client.post("/v1/studies", json=study_body(f"s{i}"), headers=auth)
    client.patch("/v1/studies/s1", json={"status": "paused"}, headers=auth)
    page = client.get("/v1/studies?limit=2", headers=auth).json()
    assert [s["name"] for s in page["items"]] == ["s4", "s3"] and page["next_offset"] == 2
    last = client.get("/v1/studies?limit=2&offset=4", headers=auth).json()
    assert [s["name"] for s in last["items"]] == ["s0"] and last["next_offset"] is None
    paused = client.get("/v1/studies?status=paused", headers=auth).json()["items"]
    assert [s["name"] for s in paused] == ["s1"]
    r = client.get("/v1/studies?status=sleeping", headers=auth)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "query.status"
    assert "'paused'" in r.json()["error"]["message"]


def test_get_unknown_study_is_404(client: TestClient, auth: dict) -> None:
    r = client.get("/v1/studies/nope", headers=auth)
    assert r.status_code == 404 and "no study named 'nope'" in r.json()["error"]["message"]


def test_pause_resume_stop_and_budget(client: TestClient, auth: dict) -> None:
    client.post("/v1/studies", json=study_body("p"), headers=auth)
    assert (
        client.patch("/v1/studies/p", json={"status": "paused"}, headers=auth).json()["status"]
        == "paused"
    )
    assert (
        client.patch("/v1/studies/p", json={"status": "running"}, headers=auth).json()["status"]
        == "running"
    )
    raised = client.patch("/v1/studies/p", json={"n_trials": 50}, headers=auth).json()
    assert raised["trials"]["budget"] == 50 and raised["trials"]["remaining"] == 50
    stopped = client.patch("/v1/studies/p", json={"status": "stopped"}, headers=auth).json()
    assert stopped["status"] == "stopped" and stopped["finished_at"] is not None
    r = client.patch("/v1/studies/p", json={"status": "running"}, headers=auth)
    assert r.status_code == 409 and "stopped" in r.json()["error"]["message"]
    r = client.patch("/v1/studies/p", json={}, headers=auth)
    assert r.status_code == 422 and "nothing to change" in r.json()["error"]["message"]
    r = client.patch("/v1/studies/p", json={"status": "completed"}, headers=auth)
    assert r.status_code == 422


def test_budget_cannot_drop_below_started_trials(client: TestClient, auth: dict) -> None:
    client.post("/v1/studies", json=study_body("b"), headers=auth)
    for _ in range(3):
        assert (
            client.post(
                "/v1/studies/b/trials", json={"params": {"hidden_size": 16}}, headers=auth
            ).status_code
            == 201
        )
    r = client.patch("/v1/studies/b", json={"n_trials": 2}, headers=auth)
    assert r.status_code == 409 and "n_trials must be >= 3" in r.json()["error"]["message"]
    assert (
        client.patch("/v1/studies/b", json={"n_trials": 3}, headers=auth).json()["trials"][
            "remaining"
        ]
        == 0
    )


def test_delete_removes_study_and_optuna_study(client: TestClient, auth: dict, settings) -> None:  # type: ignore[no-untyped-def]
    import optuna

    client.post("/v1/studies", json=study_body("gone"), headers=auth)
    assert client.delete("/v1/studies/gone", headers=auth).status_code == 204
    assert client.get("/v1/studies/gone", headers=auth).status_code == 404
    names = [s.study_name for s in optuna.get_all_study_summaries(settings.url)]
    assert "acme/gone" not in names
    assert client.delete("/v1/studies/gone", headers=auth).status_code == 404
    # The name is free again.
    assert client.post("/v1/studies", json=study_body("gone"), headers=auth).status_code == 201


@pytest.mark.parametrize(
    "kwargs",
    [
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        {"content": b"", "headers": {"content-type": "application/json"}},
        {"content": b"[1, 2]", "headers": {"content-type": "application/json"}},
        {"content": b"null", "headers": {"content-type": "application/json"}},
        {"content": b"name=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        {"json": {"name": "x", "dataset": "sunspots"}},
        {
            "json": {
                "name": "x",
                "dataset": {"kind": "builtin", "name": "sunspots"},
                "budget": {"n_trials": 10**400},
            }
        },
        {
            "content": b'{"name": "x", "dataset": {"kind": "builtin", "name": "sunspots"}, '
            b'"budget": {"timeout_s": NaN}}',
            "headers": {"content-type": "application/json"},
        },
        {
            "content": b'{"name": "x", "dataset": {"kind": "builtin", "name": "sunspots"}, '
            b'"budget": {"timeout_s": 1e999}}',
            "headers": {"content-type": "application/json"},
        },
        {"json": study_body("n" * 5000)},
        {"json": study_body("名前")},
        {
            "json": study_body(
                "x", search_space={"lr": {"type": "float", "low": -1e308, "high": 1e308}}
            )
        },
        {"json": study_body("x", search_space={"lr": ["float", 1, 2]})},
        {"json": study_body("x", fixed={"hidden_size": {"nested": True}})},
        {
            "json": study_body(
                "x",
                search_space={f"p{i}": {"type": "int", "low": 1, "high": 2} for i in range(100)},
            )
        },
    ],
)
def test_malformed_requests_get_4xx_never_500(client: TestClient, auth: dict, kwargs: dict) -> None:
    headers = {**auth, **kwargs.pop("headers", {})}
    r = client.post("/v1/studies", headers=headers, **kwargs)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] in ("invalid", "too_large")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/studies/" + "x" * 300,
        "/v1/studies/%E5%90%8D%E5%89%8D",
        "/v1/studies/a/trials/99999999999999999999",
        "/v1/studies/a/trials/-1",
        "/v1/studies/a/trials?limit=100000000000000000000",
        "/v1/studies/a/trials?sort=evil",
        "/v1/studies/a/importance?objective=9",
        "/v1/datasets/" + "z" * 100,
    ],
)
def test_odd_paths_get_4xx(client: TestClient, auth: dict, path: str) -> None:
    r = client.get(path, headers=auth)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]


def test_oversized_body_is_413(client: TestClient, auth: dict) -> None:
    r = client.post(
        "/v1/studies",
        content=b"x" * (2 * 1024 * 1024),
        headers={**auth, "content-type": "application/json"},
    )
    assert r.status_code == 413 and "cap" in r.json()["error"]["message"]


def test_unknown_route_and_method(client: TestClient, auth: dict) -> None:
    assert client.get("/v2/nothing", headers=auth).status_code == 404
    r = client.put("/v1/studies", headers=auth)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openapi_document_is_complete(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for p, methods in {
        "/v1/studies": {"get", "post"},
        "/v1/studies/{name}": {"get", "patch", "delete"},
        "/v1/studies/{name}/trials": {"get", "post"},
        "/v1/studies/{name}/trials/{number}": {"get"},
        "/v1/studies/{name}/best": {"get"},
        "/v1/studies/{name}/importance": {"get"},
        "/v1/datasets": {"get", "post"},
        "/v1/datasets/{dataset_id}": {"get", "delete"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }.items():
        assert methods <= set(paths[p]), p
    post = paths["/v1/studies"]["post"]
    assert "sunspots" in post["requestBody"]["content"]["application/json"]["examples"]
    assert "StudySpec" in doc["components"]["schemas"]
