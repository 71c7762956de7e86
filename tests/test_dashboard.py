"""The browser side: optuna-dashboard at /dashboard/ and seqtune's page at /ui/, behind the
same keys as the API, one tenant's studies each. The last tests load both pages in headless
Chromium against a running service and read what the page shows."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service import keys
from service.db import Database
from tests.conftest import run_trial, study_body


def _storage(client: TestClient) -> Any:
    return client.app.state.seqtune.storage  # type: ignore[attr-defined]


def test_dashboard_needs_a_key_and_shows_only_the_tenants_studies(
        client: TestClient, auth: dict[str, str], db: Database) -> None:
    other = {"Authorization": f"Bearer {keys.create_key(db, tenant='rival')}"}
    mine = client.post("/v1/studies", json=study_body("mine"), headers=auth).json()
    theirs = client.post("/v1/studies", json=study_body("theirs"), headers=other).json()

    r = client.get("/dashboard/")
    assert r.status_code == 401 and "API key" in r.text and 'action="/login"' in r.text
    assert client.get("/api/studies").status_code == 401

    r = client.get("/api/studies", headers=auth)
    assert r.status_code == 200
    assert [s["study_name"] for s in r.json()["study_summaries"]] == ["acme/mine"]
    assert client.get(f"/api/studies/{mine['optuna_study_id']}", headers=auth).status_code \
        == 200
    for path in (f"/api/studies/{theirs['optuna_study_id']}",
                 f"/api/studies/{theirs['optuna_study_id']}/param_importances",
                 f"/csv/{theirs['optuna_study_id']}"):
        assert client.get(path, headers=auth).status_code == 404, path
    r = client.get("/dashboard/", headers=auth)
    assert r.status_code == 200 and "Optuna Dashboard" in r.text


def test_dashboard_is_read_only(client: TestClient, auth: dict[str, str]) -> None:
    sid = client.post("/v1/studies", json=study_body("ro"), headers=auth).json()[
        "optuna_study_id"]
    for method, path in (("DELETE", f"/api/studies/{sid}"), ("POST", "/api/studies"),
                         ("PUT", f"/api/studies/{sid}/note")):
        r = client.request(method, path, headers=auth)
        assert r.status_code == 405 and "read-only" in r.json()["error"]["message"]
    assert client.get("/v1/studies/ro", headers=auth).status_code == 200


def test_login_cookie_reads_but_never_writes(client: TestClient, key: str) -> None:
    r = client.get("/login", params={"key": "wrong", "next": "/ui/"}, follow_redirects=False)
    assert r.status_code == 401 and "unknown or revoked" in r.text
    r = client.get("/login", params={"key": key, "next": "https://evil.example/"},
                   follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    # the client now holds the cookie: reads work, writes still need the bearer header
    assert client.get("/v1/studies").status_code == 200
    assert client.get("/ui/").status_code == 200
    r = client.post("/v1/studies", json=study_body("via-cookie"))
    assert r.status_code == 401
    client.cookies.clear()
    assert client.get("/ui/").status_code == 401


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Chromium is needed for the browser tests (apt-get install chromium)")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    return exe


def dom_after_load(url: str, tmp: Any) -> str:
    """The page's DOM after its scripts ran, in headless Chromium with a fresh profile."""
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", f"--user-data-dir={tmp}",
                        "--virtual-time-budget=15000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture
def filled(live: tuple[str, str], db: Database, settings: Any) -> tuple[str, str]:
    """The live service with a study of three finished trials for tenant 'acme'."""
    base, key = live
    from service.optuna_bridge import make_storage

    h = {"Authorization": f"Bearer {key}"}
    assert httpx.post(base + "/v1/studies", json=study_body("browser-study"),
                      headers=h).status_code == 201
    storage = make_storage(settings)
    for v in (4.5, 2.25, 3.0):
        run_trial(db, storage, None, h, "browser-study", v)  # type: ignore[arg-type]
    return base, key


def test_seqtune_page_in_a_browser(filled: tuple[str, str], tmp_path: Any) -> None:
    base, key = filled
    dom = dom_after_load(f"{base}/login?key={key}&next=/ui/", tmp_path / "profile")
    row = dom.split('<tr class="study" data-name="browser-study">', 1)
    assert len(row) == 2, dom[-3000:]
    cells = row[1].split("</tr>", 1)[0]
    assert "running" in cells and "3/20" in cells and "3 / 0 / 0 / 0" in cells
    assert "val_rmse=2.25" in cells and "hidden_size=" in cells
    assert 'href="/dashboard/studies/' in cells
    # signed out, the page is the sign-in form
    assert 'action="/login"' in dom_after_load(f"{base}/ui/", tmp_path / "fresh")


def test_optuna_dashboard_in_a_browser(filled: tuple[str, str], tmp_path: Any) -> None:
    base, key = filled
    dom = dom_after_load(f"{base}/login?key={key}&next=/dashboard/", tmp_path / "profile")
    assert "acme/browser-study" in dom, dom[-3000:]
