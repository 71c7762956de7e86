"""/v1/datasets: CSV uploads validated on arrival; deletion guarded by running studies."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import study_body

GOOD = b"date,load,temp\n2024-01-01,1.5,3\n2024-01-02,,4\n2024-01-03,2.5,5\n"


def upload(client: TestClient, auth: dict, content: bytes, name: str = "d.csv"):  # type: ignore[no-untyped-def]
    return client.post("/v1/datasets", files={"file": (name, content, "text/csv")}, headers=auth)


def test_upload_parses_and_describes(client: TestClient, auth: dict) -> None:
    r = upload(client, auth, GOOD, "load.csv")
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["name"] == "load.csv" and d["n_rows"] == 3 and len(d["sha256"]) == 64
    assert d["columns"] == [
        {"name": "date", "type": "text", "missing": 0},
        {"name": "load", "type": "numeric", "missing": 1},
        {"name": "temp", "type": "numeric", "missing": 0},
    ]
    assert client.get(f"/v1/datasets/{d['id']}", headers=auth).json()["id"] == d["id"]
    assert [x["id"] for x in client.get("/v1/datasets", headers=auth).json()["items"]] == [d["id"]]


@pytest.mark.parametrize(
    "content, words",
    [
        (b"a,b\n1,2\n3\n", "line 3: 1 fields, but the header has 2"),
        (b"a,b\n1,2\n3,oops\n", "line 3: column 'b' is numeric but has 'oops'"),
        (b"", "empty"),
        (b"a,b\n", "line 2: the file has a header but no data rows"),
        (b"a,a\n1,2\n", "line 1: duplicate column name"),
        (b"a,\n1,2\n", "line 1: a column has an empty name"),
        (b"\xff\xfe\x00a", "not UTF-8"),
        (b"x,y\nfoo,bar\n", "no numeric column"),
        (b"a,b\n1,2\ninf,3\n", "line 3: column 'a' is numeric but has 'inf'"),
    ],
)
def test_bad_csv_is_422_with_line_and_reason(
    client: TestClient, auth: dict, content: bytes, words: str
) -> None:
    r = upload(client, auth, content)
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]["message"]
    assert client.get("/v1/datasets", headers=auth).json()["items"] == []


def test_upload_over_cap_is_413(settings, auth: dict) -> None:  # type: ignore[no-untyped-def]
    from service.api.app import create_app

    settings.max_upload_bytes = 2048
    with TestClient(create_app(settings)) as c:
        r = upload(c, auth, b"a\n" + b"1\n" * 5000)
        assert r.status_code == 413 and "cap" in r.json()["error"]["message"]


def test_study_on_uploaded_dataset_checks_columns(client: TestClient, auth: dict) -> None:
    ds = upload(client, auth, GOOD).json()
    ref = {"kind": "uploaded", "id": ds["id"]}
    r = client.post(
        "/v1/studies", json=study_body("u", dataset=ref, target=["loadd"]), headers=auth
    )
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "target[0]"
    r = client.post(
        "/v1/studies",
        json=study_body("u", dataset={"kind": "uploaded", "id": "abc123"}),
        headers=auth,
    )
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "dataset.id"
    r = client.post(
        "/v1/studies",
        json=study_body("u", dataset=ref, target=["load"], features=["load", "temp"]),
        headers=auth,
    )
    assert r.status_code == 201, r.text


def test_delete_is_409_while_a_running_study_uses_it(client: TestClient, auth: dict) -> None:
    ds = upload(client, auth, GOOD).json()
    client.post(
        "/v1/studies",
        json=study_body("u", dataset={"kind": "uploaded", "id": ds["id"]}, target=["load"]),
        headers=auth,
    )
    r = client.delete(f"/v1/datasets/{ds['id']}", headers=auth)
    assert r.status_code == 409 and "'u'" in r.json()["error"]["message"]
    # force does not override a running study: its trials read the data
    assert client.delete(f"/v1/datasets/{ds['id']}?force=true", headers=auth).status_code == 409
    client.patch("/v1/studies/u", json={"status": "stopped"}, headers=auth)
    # a finished study still uses it: 409 naming it, unless force
    r = client.delete(f"/v1/datasets/{ds['id']}", headers=auth)
    assert r.status_code == 409 and "'u' (stopped)" in r.json()["error"]["message"]
    assert client.delete(f"/v1/datasets/{ds['id']}?force=true", headers=auth).status_code == 204
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth).status_code == 404
    assert client.get("/v1/studies/u", headers=auth).status_code == 200
