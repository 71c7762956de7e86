"""Uploaded datasets by name: names unique per tenant (409 for a taken one, a unique index
behind it, duplicates of older databases renamed by migration 0007), a study referencing one
by name (resolved at submit and pinned by id), the messages that point a wrong reference the
right way, and hints worded for the caller: the CLI's commands or the REST calls."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from seqtune.client import CLI_AGENT, ApiError, Client
from service.hints import HINTS, caller_of
from service.store import migrate
from service.store.db import Database
from service.store.tables import Study
from tests.conftest import study_body

CSV = b"date,load,temp\n" + b"".join(
    f"2024-01-{d:02d},{1 + d % 5}.5,{d % 7}\n".encode() for d in range(1, 29)
)
CLI = {"User-Agent": CLI_AGENT}


def _upload(client: TestClient, auth: dict[str, str], name: str | None, **headers: str):  # type: ignore[no-untyped-def]
    data = {"name": name} if name else None
    return client.post(
        "/v1/datasets",
        files={"file": ("load.csv", CSV, "text/csv")},
        data=data,
        headers={**auth, **headers},
    )


def _error(r) -> dict:  # type: ignore[no-untyped-def]
    return r.json()["error"]  # type: ignore[no-any-return]


def test_a_study_names_its_data_and_is_pinned_to_the_id(
    client: TestClient, auth: dict[str, str], db: Database
) -> None:
    ds = _upload(client, auth, "weather").json()
    body = study_body("w", dataset={"kind": "uploaded", "name": "weather"}, target=["load"])
    r = client.post("/v1/studies", json=body, headers=auth)
    assert r.status_code == 201, r.text
    # the stored spec keeps the name and records the id it resolved to
    assert r.json()["spec"]["dataset"] == {"kind": "uploaded", "id": ds["id"], "name": "weather"}
    linked = db.run(lambda s: s.query(Study.dataset_id).filter(Study.name == "w").scalar())
    assert linked == ds["id"]
    # by id still works, and an id with its own name is recorded with the name too
    r = client.post(
        "/v1/studies",
        json=study_body("w2", dataset={"kind": "uploaded", "id": ds["id"]}, target=["load"]),
        headers=auth,
    )
    assert r.status_code == 201 and r.json()["spec"]["dataset"]["name"] == "weather"
    # an id and a name of two different datasets: refused, naming the field
    _upload(client, auth, "other")
    r = client.post(
        "/v1/studies",
        json=study_body(
            "w3", dataset={"kind": "uploaded", "id": ds["id"], "name": "other"}, target=["load"]
        ),
        headers=auth,
    )
    assert r.status_code == 422 and _error(r)["details"][0]["field"] == "dataset.name"
    assert "is named 'weather', not 'other'" in _error(r)["details"][0]["reason"]


def test_names_are_unique_per_tenant(
    client: TestClient, auth: dict[str, str], db: Database
) -> None:
    first = _upload(client, auth, "weather")
    assert first.status_code == 201
    r = _upload(client, auth, "weather")
    assert r.status_code == 409 and _error(r)["code"] == "already_exists"
    assert "already have a dataset named 'weather'" in _error(r)["message"]
    assert "DELETE /v1/datasets/weather" in _error(r)["message"]
    r = _upload(client, auth, "weather", **CLI)
    assert "--name" in _error(r)["message"]
    assert "`seqtune datasets delete weather`" in _error(r)["message"]
    assert [d["name"] for d in client.get("/v1/datasets", headers=auth).json()["items"]] == [
        "weather"
    ]
    # the file's name stands in for a missing one, and is just as unique
    assert _upload(client, auth, None).json()["name"] == "load.csv"
    assert _upload(client, auth, None).status_code == 409
    # another tenant may use the same name
    from service.store import keys

    other = {"Authorization": f"Bearer {keys.create_key(db, tenant='globex')}"}
    assert _upload(client, other, "weather").status_code == 201
    # the database itself refuses a duplicate (what decides a race between two uploads)
    with pytest.raises(IntegrityError), db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO seqtune_datasets (id, tenant, name, sha256, size_bytes, n_rows,"
                " columns, content, created_at) SELECT 'f00d', tenant, name, sha256, "
                "size_bytes, n_rows, columns, content, created_at FROM seqtune_datasets "
                "WHERE id = :id"
            ),
            {"id": first.json()["id"]},
        )


def test_get_and_delete_by_name(client: TestClient, auth: dict[str, str]) -> None:
    ds = _upload(client, auth, "weather").json()
    assert client.get("/v1/datasets/weather", headers=auth).json()["id"] == ds["id"]
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth).json()["name"] == "weather"
    assert client.delete("/v1/datasets/weather", headers=auth).status_code == 204
    r = client.get("/v1/datasets/weather", headers=auth)
    assert r.status_code == 404 and "GET /v1/datasets" in _error(r)["message"]
    r = client.get("/v1/datasets/weather", headers={**auth, **CLI})
    assert "`seqtune datasets list`" in _error(r)["message"]
    # A name with '/' could never be reached in a URL: refused at upload.
    r = _upload(client, auth, "team/weather")
    assert r.status_code == 422 and "no '/'" in r.text


@pytest.mark.parametrize(
    "dataset, field, words",
    [
        (
            {"kind": "uploaded", "id": "weather"},
            "dataset.id",
            "to use a dataset by its name, write `name: weather` instead of `id:`",
        ),
        ({"kind": "uploaded"}, "dataset", "name the dataset: `name: NAME`"),
        ({"kind": "uploaded", "name": "nope"}, "dataset.name", "no such dataset"),
    ],
)
def test_a_wrong_reference_says_how_to_write_it(
    client: TestClient, auth: dict[str, str], dataset: dict, field: str, words: str
) -> None:
    r = client.post("/v1/studies", json=study_body("w", dataset=dataset), headers=auth)
    assert r.status_code == 422, r.text
    detail = _error(r)["details"][0]
    assert detail["field"] == field and words in detail["reason"], detail


def test_target_must_be_a_list(client: TestClient, auth: dict[str, str]) -> None:
    _upload(client, auth, "weather")
    ref = {"kind": "uploaded", "name": "weather"}
    r = client.post("/v1/studies", json=study_body("w", dataset=ref, target="load"), headers=auth)
    assert r.status_code == 422
    detail = _error(r)["details"][0]
    assert detail["field"] == "target"
    assert detail["reason"] == "target must be a list of column names: write `target: [load]`"


def test_an_unknown_dataset_hint_is_worded_for_the_caller(
    client: TestClient, auth: dict[str, str]
) -> None:
    body = study_body("w", dataset={"kind": "uploaded", "name": "weather"})
    rest = _error(client.post("/v1/studies", json=body, headers=auth))["details"][0]["reason"]
    cli = _error(client.post("/v1/studies", json=body, headers={**auth, **CLI}))["details"][0]
    assert "POST /v1/datasets" in rest and "seqtune" not in rest
    assert "`seqtune datasets upload FILE --name NAME`" in cli["reason"]
    assert "/v1/" not in cli["reason"]


def test_hints_name_the_cli_only_to_the_cli(client: TestClient, key: str) -> None:
    assert caller_of(CLI_AGENT) == "cli" and caller_of("python-httpx/0.28") == "rest"
    cli = Client("http://testserver", key=key, http=client, user_agent=CLI_AGENT)
    with pytest.raises(ApiError) as e:
        cli.study("nope")
    assert "list yours with `seqtune studies`" in e.value.message
    # the next request, without the CLI's User-Agent, gets the REST wording: nothing leaks
    client.headers.pop("User-Agent")
    rest = Client("http://testserver", key=key, http=client)
    with pytest.raises(ApiError) as e:
        rest.study("nope")
    assert "list yours with GET /v1/studies" in e.value.message
    rest.submit(study_body("dup"))
    for c, words in ((rest, "DELETE /v1/studies/dup"), (cli, "`seqtune delete dup`")):
        c._http.headers["User-Agent"] = CLI_AGENT if c is cli else "python-httpx"
        with pytest.raises(ApiError) as e:
            c.submit(study_body("dup"))
        assert words in e.value.message
    # every hint has both wordings, and no CLI wording points at a REST path but the budget's
    # (the CLI has no verb for it)
    for name, (cli_words, rest_words) in HINTS.items():
        assert cli_words and rest_words
        if name != "raise_budget":
            assert "/v1/" not in cli_words and "?force" not in cli_words, name


def test_migration_0007_renames_older_duplicates(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        migrate.downgrade(engine, "0006")
        insert = text(
            "INSERT INTO seqtune_datasets (id, tenant, name, sha256, size_bytes, n_rows, "
            "columns, content, created_at) VALUES (:id, :tenant, :name, 'x', 1, 1, '[]', "
            "'\\x00', now() + make_interval(secs => :t))"
        )
        rows = [  # (tenant, name): the oldest keeps the name; 'w-2' is taken already
            ("acme", "w"),
            ("acme", "w-2"),
            ("acme", "w"),
            ("acme", "w"),
            ("globex", "w"),
        ]
        ids = [uuid.uuid4().hex for _ in rows]
        with engine.begin() as conn:
            for t, (id_, (tenant, name)) in enumerate(zip(ids, rows, strict=True)):
                conn.execute(insert, {"id": id_, "tenant": tenant, "name": name, "t": t})
        migrate.upgrade(engine)
        with engine.connect() as conn:
            names = dict(conn.execute(text("SELECT id, name FROM seqtune_datasets")).all())
        assert [names[i] for i in ids] == ["w", "w-2", "w-3", "w-4", "w"]
    finally:
        engine.dispose()
