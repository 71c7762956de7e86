"""The HTTP edge under hostile requests (issue 13, items 1, 6, 8 and 9).

1. Body caps hold for chunked bodies with no Content-Length, and a /v1 request without a valid
   key is refused before its body is read: a real ``seqtune serve`` keeps a flat RSS while a
   few hundred MB are streamed at it.
6. ``/metrics`` keeps a bounded number of series whatever methods and paths callers invent.
8. optuna-dashboard's files answer with or without an Accept-Encoding header.
9. ``/readyz`` does not reveal where the database is; API keys stay out of access logs and
   URLs (the sign-in form posts the key).
"""

from __future__ import annotations

import random
import select
import socket
import string
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings
from service.store.db import Database
from tests.conftest import free_port, serve_process

MB = 1024 * 1024


# ---------------------------------------------------------------- a real `seqtune serve`


@dataclass
class Served:
    base: str
    key: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def served(settings: Settings, key: str, tmp_path: Path) -> Iterator[Served]:
    """`seqtune serve` in its own process (auth on, access log on, INFO), with its pid."""
    with serve_process(
        settings, tmp_path, "--access-log", log_level="INFO", SEQTUNE_REAP_INTERVAL_S="0"
    ) as (base, proc, log_path):
        yield Served(base, key, proc, log_path)


def _rss_bytes(pid: int) -> int:
    """The process's resident set size now (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples a process's RSS every few milliseconds in a thread; ``peak`` is the highest seen.
    Sampling rather than VmHWM because VmHWM holds the start-up peak, which would hide growth."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, _rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.peak = max(self.peak, _rss_bytes(self.pid))
            except (OSError, AssertionError):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes(self.pid))


@dataclass
class Answer:
    status: int
    seconds: float
    sent: int  # body bytes written before the answer came (or all of them)
    head: str  # the status line, the headers and what came of the body with them


def stream_chunked(
    base: str,
    path: str,
    total: int,
    headers: dict[str, str] | None = None,
    chunk: int = MB,
    prefix: bytes = b"",
    fill: bytes = b"7",
) -> Answer:
    """POST ``prefix`` and then ``total`` bytes of ``fill`` to ``path`` as a chunked body (no
    Content-Length), generated lazily from one reused chunk. Stops sending as soon as the
    server answers, as a careful client does, and returns the answer. A raw socket because an
    HTTP client would write the whole body before it looks for a response."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Transfer-Encoding: chunked"]
    lines += [
        f"{k}: {v}" for k, v in {"Content-Type": "application/json", **(headers or {})}.items()
    ]
    frame = f"{chunk:x}\r\n".encode() + (fill * chunk)[:chunk] + b"\r\n"
    t0 = time.monotonic()
    sent = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        if prefix:
            sock.sendall(f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n")
        sock.settimeout(2.0)
        try:
            while sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break  # the answer is here: stop sending
                sock.sendall(frame)
                sent += chunk
            else:
                sock.sendall(b"0\r\n\r\n")
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading; its answer should be waiting
        sock.settimeout(120)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    head = data.decode("latin-1")
    assert head.startswith("HTTP/1.1 "), f"no HTTP answer: {data[:200]!r}"
    return Answer(int(head.split()[1]), time.monotonic() - t0, sent, head)


# ---------------------------------------------------------------- item 1: body size first


def test_chunked_bodies_cannot_grow_the_server(served: Served) -> None:
    """Three hostile chunked uploads with no Content-Length: without a key (JSON and multipart
    routes) and with a key over the JSON cap. Each answers 401 or 413 within seconds, long
    before the body ends, and the server's RSS stays within 100 MB of where it started."""
    pid = served.proc.pid
    # Warm the paths once (imports, first DB connections) so their cost is not counted.
    assert httpx.post(served.base + "/v1/studies", json={}).status_code == 401
    before = _rss_bytes(pid)
    cases = [
        ("/v1/studies", {}, 401, 300 * MB),
        ("/v1/datasets", {"Content-Type": "multipart/form-data; boundary=xyz"}, 401, 300 * MB),
        ("/v1/studies", {"Authorization": f"Bearer {served.key}"}, 413, 300 * MB),
    ]
    with PeakRss(pid) as rss:
        answers = [stream_chunked(served.base, path, total, hdrs) for path, hdrs, _, total in cases]
    grown = rss.peak - before
    print(
        f"server RSS before {before / MB:.1f} MB, peak during {rss.peak / MB:.1f} MB "
        f"(+{grown / MB:.1f} MB); answers "
        + ", ".join(f"{a.status} after {a.sent / MB:.0f} MB in {a.seconds:.2f}s" for a in answers)
    )
    for (path, _, status, total), a in zip(cases, answers, strict=True):
        assert a.status == status, (path, a.head)
        assert a.seconds < 15, (path, a.seconds)
        assert a.sent < total // 4, (path, a.sent)  # refused early, not after the whole body
    assert grown < 100 * MB, f"server RSS grew by {grown / MB:.0f} MB"
    assert served.proc.poll() is None
    assert httpx.get(served.base + "/healthz").status_code == 200


def test_chunked_upload_over_the_upload_cap_is_cut_off(served: Served) -> None:
    """With a valid key, a well-formed chunked CSV upload is stopped at the upload cap, not
    read to its end, and the server's memory does not grow with it."""
    cap = Settings().max_upload_bytes
    part = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        b"Content-Type: text/csv\r\n\r\na,b\r\n"
    )
    before = _rss_bytes(served.proc.pid)
    with PeakRss(served.proc.pid) as rss:
        a = stream_chunked(
            served.base,
            "/v1/datasets",
            4 * cap,
            {
                "Authorization": f"Bearer {served.key}",
                "Content-Type": "multipart/form-data; boundary=xyz",
            },
            prefix=part,
            fill=b"1.5,2.5\r\n",
        )
    print(
        f"upload: {a.status} after {a.sent / MB:.0f} MB in {a.seconds:.2f}s; server RSS "
        f"before {before / MB:.1f} MB, peak {rss.peak / MB:.1f} MB"
    )
    assert a.status == 413, a.head
    assert a.sent < 2 * cap
    assert rss.peak - before < 100 * MB


def test_body_caps_hold_without_content_length(client: TestClient, auth: dict[str, str]) -> None:
    """In process: a chunked (generator) body over the JSON cap is a 413 with the error body,
    one under the cap is handled normally."""
    cap = client.app.state.seqtune.settings.max_body_bytes  # type: ignore[attr-defined]

    def body(n: int) -> Iterator[bytes]:
        for _ in range(n // 4096 + 1):
            yield b" " * 4096

    r = client.post("/v1/studies", content=body(cap + 8192), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = client.post("/v1/studies", content=body(4096), headers=auth)
    assert r.status_code == 422  # read in full and found not to be JSON


def test_unauthenticated_request_is_refused_before_its_body_is_read(client: TestClient) -> None:
    """The key check comes before the body: a request with no or a wrong key gets 401, not
    the 413 or 422 its body would earn (the live test above shows the body is not read)."""

    def body() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 65536

    for headers in ({}, {"Authorization": "Bearer st_not-a-real-key"}):
        r = client.post("/v1/studies", content=body(), headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers.get("www-authenticate") == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
    r = client.put("/v1/studies/x", content=b"{}")  # an unknown method still needs a key
    assert r.status_code == 401


# ---------------------------------------------------------------- item 6: /metrics series


def _latency_series(client: TestClient) -> set[tuple[tuple[str, str], ...]]:
    text = client.get("/metrics").text
    out = set()
    for fam in text_string_to_metric_families(text):
        if fam.name == "seqtune_api_request_duration_seconds":
            for s in fam.samples:
                if s.name.endswith("_count"):
                    out.add(tuple(sorted(s.labels.items())))
    return out


def test_metrics_cardinality_is_bounded(client: TestClient) -> None:
    """200 rounds of invented methods and random paths, no key, add at most three series:
    methods outside HTTP's standard set count as "other", paths no route matched as
    "unmatched", the dashboard's paths as "dashboard"."""
    rnd = random.Random(13)
    for _ in range(3):  # the series an ordinary scrape creates, before counting
        client.get("/metrics")
        client.get("/nope")
    before = _latency_series(client)
    for i in range(200):
        method = "".join(rnd.choices(string.ascii_uppercase, k=8)) + str(i)
        path = "/" + "/".join(
            "".join(rnd.choices(string.ascii_lowercase + string.digits, k=6))
            for _ in range(rnd.randint(1, 4))
        )
        client.request(method, path)
        client.get(path)
        client.request(method, f"/dashboard{path}")
        client.request(method, "/v1/studies")  # a real route, no key
    after = _latency_series(client)
    added = after - before
    print(f"latency series before {len(before)}, after {len(after)}: {sorted(added)}")
    assert len(added) <= 3, sorted(added)
    methods = {dict(s)["method"] for s in after}
    routes = {dict(s)["route"] for s in after}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert routes <= {"/metrics", "unmatched", "dashboard", "/v1/studies"}, routes
    # A request refused before routing (no key) is still labelled by its route's template.
    for name in ("alpha", "beta", "gamma"):
        assert client.get(f"/v1/studies/{name}").status_code == 401
    labels = (("method", "GET"), ("route", "/v1/studies/{name}"), ("status", "401"))
    assert _latency_series(client) - after == {labels}


# ---------------------------------------------------------------- item 8: dashboard files


@pytest.mark.parametrize("path", ["/favicon.ico", "/static/bundle.js"])
def test_dashboard_files_with_and_without_accept_encoding(
    client: TestClient, auth: dict[str, str], path: str
) -> None:
    """optuna-dashboard reads Accept-Encoding unguarded; seqtune supplies 'identity' when a
    client sends none, so the file comes back plain instead of a 500. With gzip accepted the
    same file comes back (the favicon plain: optuna-dashboard mislabels its gzipped one)."""
    req = client.build_request("GET", path, headers=auth)
    del req.headers["accept-encoding"]
    r = client.send(req)
    assert r.status_code == 200, r.text[:300]
    assert "gzip" not in r.headers.get("content-encoding", "")
    plain = r.content
    assert plain
    kind = r.headers["content-type"]
    assert kind.startswith("image/" if path == "/favicon.ico" else "text/javascript"), kind
    r = client.get(path, headers={**auth, "Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-type"] == kind
    assert r.content == plain  # httpx decoded any gzip: the same file either way


# ---------------------------------------------------------------- item 9: no leaks


def test_readyz_does_not_reveal_the_database(client: TestClient, tmp_path: Path) -> None:
    """A database that cannot be reached is reported as such, without its host, port, user
    or the driver's message."""
    port = free_port()  # bound and released: nothing listens there
    bad = Settings(
        database_url=f"postgresql+psycopg2://leaky:hunter2@127.0.0.1:{port}/nowhere",
        data_dir=tmp_path,
        migrate_on_start=False,
    )
    st = client.app.state.seqtune  # type: ignore[attr-defined]
    good, st.db = st.db, Database(bad)
    try:
        r = client.get("/readyz")
    finally:
        st.db.dispose()
        st.db = good
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable" and "database" in body["reason"]
    for leak in (
        "127.0.0.1",
        str(port),
        "leaky",
        "hunter2",
        "nowhere",
        "psycopg",
        "postgresql",
        "onnection",
        "refused",
    ):
        assert leak not in r.text, (leak, r.text)
    assert client.get("/readyz").status_code == 200  # the real database again


def test_sign_in_posts_the_key_and_refuses_it_in_the_url(client: TestClient, key: str) -> None:
    """The sign-in form posts the key in its body; a key in the URL is never accepted (the
    answer is the form again, 400, and no cookie)."""
    r = client.get("/login", params={"next": "/dashboard/"})
    assert r.status_code == 200
    assert 'method="post"' in r.text and 'action="/login"' in r.text
    assert 'name="next" value="/dashboard/"' in r.text

    r = client.get("/login", params={"key": key, "next": "/ui/"}, follow_redirects=False)
    assert r.status_code == 400 and 'method="post"' in r.text
    assert "set-cookie" not in r.headers and key not in r.text

    r = client.post("/login", data={"key": "wrong", "next": "/ui/"}, follow_redirects=False)
    assert r.status_code == 401 and "unknown or revoked" in r.text
    r = client.post("/login", data={"key": key, "next": "/ui/"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    assert key not in r.headers["location"]
    assert client.get("/ui/").status_code == 200
    # the 401 pages point at the form, never at a URL with the key in it
    client.cookies.clear()
    for path in ("/api/studies", "/dashboard/"):
        assert "login?key" not in client.get(path).text


def test_keys_never_reach_the_access_log(served: Served) -> None:
    """Requests carrying the key in a bearer header, in query strings under several names, in
    a path and in the sign-in form: the service's log (access log on) has none of them, while
    the requests themselves are logged."""
    key = served.key
    wrong = "st_" + "Q" * 43  # an unknown key looks the same and is just as secret
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=served.base) as c:
        assert c.get("/v1/studies", headers=h).status_code == 200
        c.get("/v1/studies", params={"key": key})
        c.get("/login", params={"key": key, "next": "/ui/"})
        c.get("/ui/", params={"api_key": key, "token": wrong, "state": "COMPLETE"})
        c.get(f"/v1/studies/{wrong}", headers=h)
        c.get("/healthz", params={"q": key})
        c.post("/login", data={"key": key, "next": "/ui/"})
        c.get("/v1/studies", headers={"Authorization": f"Bearer {wrong}"})
    time.sleep(0.5)  # the access log is written after the response
    text = served.log_text()
    assert '"GET /v1/studies' in text and '"GET /healthz' in text, text[-2000:]
    assert "state=COMPLETE" in text  # harmless query parameters are kept
    for secret in (key, wrong, key[3:], wrong[3:]):
        assert secret not in text, f"a key reached the log:\n{text[-3000:]}"
