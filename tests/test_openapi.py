"""The OpenAPI document tells the truth: each route lists the error statuses it answers with the
one error body, the closed sets are enumerations, and what the document says about malformed
bodies, strict types and 405s is what the service does. (bench/schemathesis.py checks the
whole document against a running service.)"""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient

from seqtune import catalog
from seqtune.hparams import HPARAMS
from seqtune.states import StudyStatus, TrialState, WorkerStatus
from seqtune.views import PLOT_KINDS, TrialSort, TrialStateFilter
from service.api.app import create_app
from service.settings import Settings
from tests.conftest import study_body

ERROR_REF = "#/components/schemas/ErrorBody"
BODY_ROUTES = {
    ("post", "/v1/studies"),
    ("patch", "/v1/studies/{name}"),
    ("post", "/v1/studies/{name}/trials"),
    ("post", "/v1/datasets"),
    ("post", "/v1/models"),
}
CONFLICT_ROUTES = {
    ("post", "/v1/studies"),
    ("post", "/v1/datasets"),  # a name already taken
    ("patch", "/v1/studies/{name}"),
    ("delete", "/v1/studies/{name}"),
    ("post", "/v1/studies/{name}/trials"),
    ("get", "/v1/studies/{name}/best"),
    ("get", "/v1/studies/{name}/importance"),
    ("get", "/v1/studies/{name}/plots/{kind}"),
    ("get", "/v1/studies/{name}/best/model"),
    ("get", "/v1/studies/{name}/trials/{number}/model"),
    ("delete", "/v1/datasets/{dataset_id}"),
    ("delete", "/v1/models/{model_id}"),
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    # The document needs no database: the app is built, never started.
    app = create_app(Settings(database_url="postgresql://nobody@127.0.0.1:1/none"))
    return app.openapi()


def _ops(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (m, p, op)
        for p, ops in doc["paths"].items()
        for m, op in ops.items()
        if p.startswith("/v1/")
    ]


def _param(op: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p["schema"] for p in op["parameters"] if p["name"] == name)


def test_every_route_lists_its_error_statuses_with_the_error_body(doc: dict) -> None:
    ops = _ops(doc)
    assert len(ops) == 22
    for method, path, op in ops:
        expected = {"401", "422", "503"}
        expected |= {"404"} if "{" in path else set()
        expected |= {"413"} if (method, path) in BODY_ROUTES else set()
        expected |= {"409"} if (method, path) in CONFLICT_ROUTES else set()
        errors = {s for s in op["responses"] if s >= "400"}
        assert errors == expected, (method, path)
        for status in errors:
            resp = op["responses"][status]
            assert resp["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}
            assert resp["description"]
        assert ("requestBody" in op) == ((method, path) in BODY_ROUTES)
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # FastAPI's own 422 body
    assert "WWW-Authenticate" in doc["paths"]["/v1/studies"]["get"]["responses"]["401"]["headers"]
    assert "Retry-After" in doc["paths"]["/v1/studies"]["get"]["responses"]["503"]["headers"]
    ready = doc["paths"]["/readyz"]["get"]["responses"]
    assert set(ready) == {"200", "503"}


def test_the_error_body_is_declared_once(doc: dict) -> None:
    schemas = doc["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error"]
    assert set(schemas["ErrorInfo"]["required"]) == {"code", "message"}
    assert set(schemas["ErrorDetail"]["required"]) == {"field", "reason"}


def test_enumerations_are_declared(doc: dict) -> None:
    schemas = doc["components"]["schemas"]
    # The views' Literals are built from seqtune.states' enums and seqtune.views' tuples: only
    # the document is checked.
    assert schemas["StudyView"]["properties"]["status"]["enum"] == list(StudyStatus)
    assert schemas["TrialView"]["properties"]["state"]["enum"] == list(TrialState)
    assert schemas["WorkerView"]["properties"]["status"]["enum"] == list(WorkerStatus)
    paths = doc["paths"]
    assert _param(paths["/v1/studies"]["get"], "status")["enum"] == list(StudyStatus)
    listing = paths["/v1/studies/{name}/trials"]["get"]
    assert set(_param(listing, "state")["enum"]) == set(get_args(TrialStateFilter))
    assert _param(listing, "sort")["enum"] == list(get_args(TrialSort))
    plot = paths["/v1/studies/{name}/plots/{kind}"]["get"]
    assert _param(plot, "kind")["enum"] == list(PLOT_KINDS)
    assert _param(plot, "format")["enum"] == ["png", "html"]
    for path in ("/v1/studies/{name}/plots/{kind}", "/v1/studies/{name}/importance"):
        objective = _param(paths[path]["get"], "objective")
        assert (objective["minimum"], objective["maximum"]) == (0, 3)  # 1 to 4 objectives
    # Names the service checks (check_spec) are listed too.
    assert schemas["BuiltinData"]["properties"]["name"]["enum"] == sorted(catalog.BUILTIN)
    assert schemas["Objective"]["properties"]["metric"]["enum"] == sorted(catalog.METRICS)
    space = schemas["StudySpec"]["properties"]["search_space"]["propertyNames"]["enum"]
    assert space == sorted(HPARAMS)
    patch = schemas["StudyPatch"]
    assert patch["minProperties"] == 1 and patch["additionalProperties"] is False
    assert patch["properties"]["status"]["enum"] == ["running", "paused", "stopped"]
    # Only standard JSON Schema bounds: no pydantic 'ge'/'le' left in a union.
    text = json.dumps(doc)
    assert '"ge":' not in text and '"le":' not in text


def _invalid(r: Any) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == "invalid" and err["details"], err
    return err


def test_malformed_bodies_answer_422_invalid(client: TestClient, auth: dict) -> None:
    json_h = {**auth, "content-type": "application/json"}
    err = _invalid(client.post("/v1/studies", content=b'{"name": ', headers=json_h))
    assert err["details"] == [
        {"field": "(body)", "reason": "the body is not valid JSON (character 9)"}
    ]
    # Not UTF-8: FastAPI says 400; the API answers like any other malformed JSON.
    err = _invalid(client.post("/v1/studies", content=b'{"name": "\xff\xfe"}', headers=json_h))
    assert err["details"] == [{"field": "(body)", "reason": "the body is not valid JSON"}]
    client.post("/v1/studies", json=study_body("m"), headers=auth)
    _invalid(client.patch("/v1/studies/m", content=b"[1,", headers=json_h))
    _invalid(client.post("/v1/studies/m/trials", content=b"\x00\x01", headers=json_h))
    broken = {**auth, "content-type": "multipart/form-data; boundary=zzz"}
    err = _invalid(client.post("/v1/datasets", content=b"--zzz\r\nnot a part", headers=broken))
    assert err["details"][0]["field"] in ("(body)", "file")


def test_bodies_take_the_types_the_schema_names(client: TestClient, auth: dict) -> None:
    client.post("/v1/studies", json=study_body("t"), headers=auth)
    for bad in (
        {"priority": True},
        {"priority": "5"},
        {"priority": 1.5},
        {"status": None},
        {},
        {"n_trials": None, "priority": 3},
    ):
        _invalid(client.patch("/v1/studies/t", json=bad, headers=auth))
    ok = client.patch("/v1/studies/t", json={"priority": 5.0}, headers=auth)  # JSON's 5.0 is 5
    assert ok.status_code == 200 and ok.json()["priority"] == 5
    err = _invalid(
        client.post("/v1/studies", json=study_body("u", budget={"n_trials": "3"}), headers=auth)
    )
    assert err["details"][0]["field"] == "budget.n_trials"


def test_documented_statuses_are_the_ones_answered(client: TestClient, auth: dict) -> None:
    r = client.get("/v1/studies")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"code", "message", "details"}
    client.post("/v1/studies", json=study_body("e"), headers=auth)
    for path in ("/v1/studies/e/best", "/v1/studies/e/best/model"):
        r = client.get(path, headers=auth)
        assert r.status_code == 409 and "no completed trial" in r.json()["error"]["message"]
    r = client.get("/v1/studies/e/importance?objective=1", headers=auth)
    assert r.status_code == 404 and "no objective 1" in r.json()["error"]["message"]
    r = client.get("/v1/studies/e/plots/history?objective=2", headers=auth)
    assert r.status_code == 404 and "no objective 2" in r.json()["error"]["message"]
    r = client.get("/v1/studies/e/plots/nope", headers=auth)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "path.kind"
    r = client.get("/v1/studies/e/trials?state=complete&sort=-value", headers=auth)
    assert r.status_code == 200
    # 405 names every method the path answers, not the first route's only.
    r = client.request("OPTIONS", "/v1/studies/e", headers=auth)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"
    assert r.json()["error"]["code"] == "method_not_allowed"
