"""The browser side: optuna-dashboard at /dashboard/ and seqtune's page at /ui/, behind the
same keys as the API, one tenant's studies each. The last tests load both pages in headless
Chromium against a running service and read what the page shows."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from service.store import keys
from service.store.db import Database
from tests.conftest import run_trial, study_body


def _storage(client: TestClient) -> Any:
    return client.app.state.seqtune.storage  # type: ignore[attr-defined]


def test_dashboard_needs_a_key_and_shows_only_the_tenants_studies(
    client: TestClient, auth: dict[str, str], db: Database
) -> None:
    other = {"Authorization": f"Bearer {keys.create_key(db, tenant='rival')}"}
    mine = client.post("/v1/studies", json=study_body("mine"), headers=auth).json()
    theirs = client.post("/v1/studies", json=study_body("theirs"), headers=other).json()

    r = client.get("/dashboard/")
    assert r.status_code == 401 and "API key" in r.text and 'action="/login"' in r.text
    assert client.get("/api/studies").status_code == 401

    r = client.get("/api/studies", headers=auth)
    assert r.status_code == 200
    assert [s["study_name"] for s in r.json()["study_summaries"]] == ["acme/mine"]
    assert client.get(f"/api/studies/{mine['optuna_study_id']}", headers=auth).status_code == 200
    for path in (
        f"/api/studies/{theirs['optuna_study_id']}",
        f"/api/studies/{theirs['optuna_study_id']}/param_importances",
        f"/csv/{theirs['optuna_study_id']}",
    ):
        assert client.get(path, headers=auth).status_code == 404, path
    r = client.get("/dashboard/", headers=auth)
    assert r.status_code == 200 and "Optuna Dashboard" in r.text


def test_dashboard_is_read_only(client: TestClient, auth: dict[str, str]) -> None:
    sid = client.post("/v1/studies", json=study_body("ro"), headers=auth).json()["optuna_study_id"]
    for method, path in (
        ("DELETE", f"/api/studies/{sid}"),
        ("POST", "/api/studies"),
        ("PUT", f"/api/studies/{sid}/note"),
    ):
        r = client.request(method, path, headers=auth)
        assert r.status_code == 405 and "read-only" in r.json()["error"]["message"]
    assert client.get("/v1/studies/ro", headers=auth).status_code == 200


def test_login_cookie_reads_but_never_writes(client: TestClient, key: str) -> None:
    r = client.post("/login", data={"key": "wrong", "next": "/ui/"}, follow_redirects=False)
    assert r.status_code == 401 and "unknown or revoked" in r.text
    r = client.post(
        "/login", data={"key": key, "next": "https://evil.example/"}, follow_redirects=False
    )
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
    exe = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Chromium is needed for the browser tests (apt-get install chromium)")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    return exe


def dom_after_load(url: str, tmp: Any) -> str:
    """The page's DOM after its scripts ran, in headless Chromium with a fresh profile."""
    r = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-
    pipe``: commands in on fd 3, answers and events out on fd 4, JSON ended by NUL): enough to
    open a page, type into it like a person and read its DOM, with no extra packages."""

    def __init__(self, profile: Any) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._evt_r, evt_w = os.pipe()
        # Copies at 10 and up, so that dup2 onto 3 and 4 below never meets itself.
        hi_r, hi_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, evt_w))

        def wire() -> None:  # in the child, before exec: dup2 leaves 3 and 4 inheritable
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=wire,
        )  # noqa: PLW1509 - single-threaded enough for a test
        for fd in (cmd_r, evt_w, hi_r, hi_w):
            os.close(fd)
        self._buf, self._id = b"", 0

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict:
        """One command; its result, or RuntimeError with the protocol's error."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._cmd_w, data) :]
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._evt_r], [], [], left)[0]:
                    raise TimeoutError(f"no answer to {method}")
                more = os.read(self._evt_r, 1 << 20)
                if not more:
                    raise RuntimeError("Chromium closed the pipe")
                self._buf += more
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:  # else an event: not needed here
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]  # type: ignore[no-any-return]

    def open(self, url: str) -> str:
        """A new tab at ``url``; its session id."""
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        return self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]  # type: ignore[no-any-return]

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of ``expression`` in the page; None while the page is between documents."""
        try:
            out = self.send(
                "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
            )
        except RuntimeError:  # the execution context went away with a navigation
            return None
        return out.get("result", {}).get("value")

    def dom_when(self, session: str, ready: Callable[[str], bool], timeout: float = 60) -> str:
        """The page's DOM once ``ready(dom)`` holds (or the last one seen at ``timeout``)."""
        deadline, dom = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            dom = self.evaluate(session, "document.documentElement.outerHTML") or dom
            if dom and ready(dom):
                break
            time.sleep(0.25)
        return dom

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._evt_r)


def signed_in_dom(
    base: str, key: str, next_path: str, profile: Any, ready: Callable[[str], bool]
) -> str:
    """Sign in as a person does (open /login, type the key, press Sign in: the form posts
    it), then return the DOM of the page it leads to once ``ready(dom)`` holds."""
    browser = Chromium(profile)
    try:
        tab = browser.open(f"{base}/login?next={quote(next_path)}")
        browser.dom_when(tab, lambda dom: 'name="key"' in dom, timeout=30)
        browser.evaluate(
            tab,
            f"document.querySelector('input[name=key]').value = "
            f"{json.dumps(key)}; document.querySelector('form button').click()",
        )
        return browser.dom_when(tab, ready)
    finally:
        browser.close()


@pytest.fixture
def filled(live: tuple[str, str], db: Database, settings: Any) -> tuple[str, str]:
    """The live service with a study of three finished trials for tenant 'acme'."""
    base, key = live
    from service.store.optuna import make_storage

    h = {"Authorization": f"Bearer {key}"}
    assert (
        httpx.post(base + "/v1/studies", json=study_body("browser-study"), headers=h).status_code
        == 201
    )
    storage = make_storage(settings)
    for v in (4.5, 2.25, 3.0):
        run_trial(db, storage, None, h, "browser-study", v)  # type: ignore[arg-type]
    return base, key


def test_seqtune_page_in_a_browser(filled: tuple[str, str], tmp_path: Any) -> None:
    base, key = filled
    dom = signed_in_dom(base, key, "/ui/", tmp_path / "profile", lambda dom: "val_rmse=2.25" in dom)
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
    dom = signed_in_dom(
        base, key, "/dashboard/", tmp_path / "profile", lambda dom: "acme/browser-study" in dom
    )
    assert "acme/browser-study" in dom, dom[-3000:]
