"""Bearer keys, hashed at rest; tenants see only their own studies and datasets."""

from __future__ import annotations

import subprocess
import sys

from fastapi.testclient import TestClient
from sqlalchemy import select

from service.store import keys
from service.store.db import Database
from service.store.tables import ApiKey
from tests.conftest import study_body


def test_every_v1_call_needs_a_key(client: TestClient) -> None:
    for method, path in [
        ("get", "/v1/studies"),
        ("post", "/v1/studies"),
        ("get", "/v1/studies/x/best"),
        ("get", "/v1/datasets"),
    ]:
        r = getattr(client, method)(path)
        assert r.status_code == 401, path
        assert "Authorization: Bearer" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"
    r = client.get("/v1/studies", headers={"Authorization": "Bearer st_wrong"})
    assert r.status_code == 401 and "unknown or revoked" in r.json()["error"]["message"]
    r = client.get("/v1/studies", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 401
    assert client.get("/healthz").status_code == 200  # health needs no key


def test_keys_are_stored_hashed(db: Database, key: str) -> None:
    rows = db.run(lambda s: s.scalars(select(ApiKey)).all())
    assert len(rows) == 1 and rows[0].key_hash != key and key not in rows[0].key_hash
    assert rows[0].prefix == key[:10]


def test_tenants_are_isolated(client: TestClient, auth: dict, db: Database) -> None:
    other = {"Authorization": f"Bearer {keys.create_key(db, tenant='globex')}"}
    assert client.post("/v1/studies", json=study_body("secret"), headers=auth).status_code == 201
    ds = client.post("/v1/datasets", files={"file": ("a.csv", b"x\n1\n2\n")}, headers=auth).json()
    for path in [
        "/v1/studies/secret",
        "/v1/studies/secret/trials",
        "/v1/studies/secret/best",
        f"/v1/datasets/{ds['id']}",
    ]:
        assert client.get(path, headers=other).status_code == 404, path
    assert (
        client.patch("/v1/studies/secret", json={"status": "stopped"}, headers=other).status_code
        == 404
    )
    assert client.delete("/v1/studies/secret", headers=other).status_code == 404
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=other).status_code == 404
    assert client.get("/v1/studies", headers=other).json()["items"] == []
    # The same study name is free for another tenant, in its own Optuna namespace.
    r = client.post("/v1/studies", json=study_body("secret"), headers=other)
    assert r.status_code == 201 and r.json()["optuna_study_name"] == "globex/secret"
    assert client.get("/v1/studies/secret", headers=auth).json()["tenant"] == "acme"


def test_revoked_key_is_refused(client: TestClient, auth: dict, db: Database, key: str) -> None:
    assert client.get("/v1/studies", headers=auth).status_code == 200
    keys.revoke_key(db, key=key)
    assert client.get("/v1/studies", headers=auth).status_code == 401


def test_auth_off_serves_the_default_tenant(settings) -> None:  # type: ignore[no-untyped-def]
    from service.api.app import create_app

    settings.auth_enabled = False
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/studies", json=study_body("open"))
        assert r.status_code == 201 and r.json()["tenant"] == "default"


def test_cli_creates_and_revokes_keys(pg_url: str) -> None:
    env_url = ["--database-url", pg_url]
    out = subprocess.run(
        [sys.executable, "-m", "seqtune.cli", *env_url, "keys", "create", "--tenant", "initech"],
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("st_") and len(key) > 40
    db = Database(
        __import__("service.settings", fromlist=["Settings"]).Settings(database_url=pg_url)
    )
    assert keys.authenticate(db, key=key) == "initech"
    subprocess.run(
        [sys.executable, "-m", "seqtune.cli", *env_url, "keys", "revoke", key],
        check=True,
        capture_output=True,
    )
    bad = subprocess.run(
        [sys.executable, "-m", "seqtune.cli", *env_url, "keys", "revoke", key],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no live key" in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "seqtune.cli", *env_url, "keys", "create", "--tenant", "Bad Name"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "tenant names" in bad.stderr
    db.dispose()
