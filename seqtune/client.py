"""The Python client: typed methods mirroring the REST API. The ``seqtune`` CLI uses it.

    from seqtune.client import Client
    c = Client("http://127.0.0.1:8000", key="...")     # or SEQTUNE_URL / SEQTUNE_API_KEY
    c.submit("examples/sunspots.yaml")
    c.wait("sunspots-lstm")
    print(c.best("sunspots-lstm").best.params)
    c.download_model("sunspots-lstm", "best.pt")

Every error the service answers becomes an :class:`ApiError` carrying its status, code (a
:class:`seqtune.errors.ErrorCode`), message and field details; a service that cannot be reached
becomes :class:`ServiceUnreachable`, and one that does not answer within the timeout
(``timeout_s``, default ``SEQTUNE_TIMEOUT`` or 60 s) :class:`ServiceTimeout`.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from pydantic import BaseModel

from seqtune import __version__
from seqtune.errors import ErrorCode, import_extra
from seqtune.spec import load_yaml
from seqtune.states import FINISHED_STATUSES, StudyStatus
from seqtune.views import BestView, DatasetView, ModelView, Page, StudyView, TrialView, WorkerView

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
# The User-Agent of requests the ``seqtune`` CLI makes: the service words its hints as
# commands to type for it (`seqtune studies`) and as REST calls for anyone else
# (service/hints.py recognises the prefix).
CLI_AGENT = f"seqtune-cli/{__version__}"
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """The service answered with an error: ``status`` (HTTP; 0 for bad input found on this
    side), ``code``, ``message``, ``details``.

    ``code`` is always an ErrorCode (equal to its string, ``e.code == "invalid"``). For a code
    this client does not know (a newer server's) or the unclassified ``error`` (a proxy's
    error page), it is the code the HTTP status stands for (``ErrorCode.for_status``);
    ``raw_code`` keeps the code as the answer spelled it."""

    def __init__(
        self,
        status: int,
        code: ErrorCode | str,
        message: str,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        known = ErrorCode.of(str(code))
        self.code: ErrorCode = (
            known if known not in (None, ErrorCode.ERROR) else ErrorCode.for_status(status)
        )
        self.raw_code = str(code)
        self.status, self.message = status, message
        self.details = details or []

    def __str__(self) -> str:
        extra = "; ".join(f"{d.get('field')}: {d.get('reason')}" for d in self.details)
        return f"{self.message} ({extra})" if extra else self.message


class ServiceUnreachable(Exception):
    """No answer from the service (not running, wrong URL, network)."""


class ServiceTimeout(Exception):
    """The service was reached but did not answer within the client's timeout; the request may
    still be running there (a contour plot of a large study can take minutes). Deliberately not
    a ServiceUnreachable: the service is up, and the fix is a longer timeout, not starting it."""


def timeout_from_env(value: float | None = None) -> float:
    """The timeout in seconds: ``value``, else ``SEQTUNE_TIMEOUT``, else 60. Raises ValueError
    naming the source for anything but a positive finite number."""
    source = "timeout"
    if value is None:
        raw = os.environ.get("SEQTUNE_TIMEOUT", "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        source = "SEQTUNE_TIMEOUT"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"SEQTUNE_TIMEOUT must be a number of seconds, not {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{source} must be a positive number of seconds, not {value!r}")
    return value


class Client:
    """A seqtune service at ``url``, called with API key ``key`` (None when auth is off)."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout_s: float | None = None,
        http: httpx.Client | None = None,
        user_agent: str | None = None,
    ) -> None:
        """``timeout_s``: how long to wait for each answer (default ``SEQTUNE_TIMEOUT``, else
        60; ValueError when not a positive number). ``http``: an httpx.Client to send through
        instead (FastAPI's TestClient, a proxy), with its own timeouts. ``user_agent``: the
        User-Agent to send (default httpx's); the CLI sends ``CLI_AGENT``."""
        self.url = (url or os.environ.get("SEQTUNE_URL") or DEFAULT_URL).rstrip("/")
        self.timeout_s = timeout_from_env(timeout_s)
        key = key if key is not None else os.environ.get("SEQTUNE_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if user_agent:
            headers["User-Agent"] = user_agent
        if http is not None:
            http.headers.update(headers)
            self._http = http
        else:
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            # Connected, then no answer in time: the service is up but slow (or busy).
            raise ServiceTimeout(
                f"the seqtune service at {self.url} did not answer {method} {path} within "
                f"{self.timeout_s:g} s; it may still be working on it: retry with a longer "
                "--timeout (or SEQTUNE_TIMEOUT)"
            ) from None
        except httpx.TransportError as exc:  # refused, DNS, connect timeout: not reached
            raise ServiceUnreachable(
                f"cannot reach the seqtune service at {self.url} ({exc}); "
                "start it with `seqtune up` or set SEQTUNE_URL"
            ) from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise ApiError(
                    r.status_code,
                    err.get("code", ErrorCode.ERROR),
                    err["message"],
                    err.get("details"),
                )
            except (ValueError, KeyError, TypeError):
                raise ApiError(
                    r.status_code, ErrorCode.ERROR, f"HTTP {r.status_code}: {r.text[:200]}"
                ) from None
        return r

    def _model(self, cls: type[M], method: str, path: str, **kw: Any) -> M:
        return cls.model_validate(self._call(method, path, **kw).json())

    @staticmethod
    def _q(name: str) -> str:
        return httpx.URL(f"/{name}").raw_path.decode()[1:]  # percent-encode a path segment

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> bool:
        return bool(self._call("GET", "/healthz").json().get("status") == "ok")

    # -- studies --------------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any] | str | Path) -> StudyView:
        """Submit a study: a dict, or the path of a YAML/JSON study file."""
        if isinstance(spec, str | Path):
            try:
                spec = load_yaml(Path(spec).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
                raise ApiError(
                    0, ErrorCode.INVALID, f"cannot read study file {spec}: {exc}"
                ) from None
        return self._model(StudyView, "POST", "/v1/studies", json=spec)

    def studies(
        self, *, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> Page[StudyView]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._model(Page[StudyView], "GET", "/v1/studies", params=params)

    def study(self, name: str) -> StudyView:
        return self._model(StudyView, "GET", f"/v1/studies/{self._q(name)}")

    def update(
        self,
        name: str,
        *,
        status: str | None = None,
        n_trials: int | None = None,
        priority: int | None = None,
    ) -> StudyView:
        body = {
            k: v
            for k, v in (("status", status), ("n_trials", n_trials), ("priority", priority))
            if v is not None
        }
        return self._model(StudyView, "PATCH", f"/v1/studies/{self._q(name)}", json=body)

    def pause(self, name: str) -> StudyView:
        return self.update(name, status=StudyStatus.PAUSED)

    def resume(self, name: str) -> StudyView:
        return self.update(name, status=StudyStatus.RUNNING)

    def stop(self, name: str) -> StudyView:
        return self.update(name, status=StudyStatus.STOPPED)

    def delete(self, name: str, *, force: bool = False) -> None:
        self._call("DELETE", f"/v1/studies/{self._q(name)}", params={"force": force})

    def wait(
        self,
        name: str,
        *,
        poll_s: float = 2.0,
        timeout_s: float | None = None,
        on_update: Callable[[StudyView], None] | None = None,
    ) -> StudyView:
        """Poll until the study is completed, stopped or timed out (FINISHED_STATUSES: it
        starts no more trials on its own); returns its last view."""
        t0 = time.monotonic()
        while True:
            view = self.study(name)
            if on_update is not None:
                on_update(view)
            if view.status in FINISHED_STATUSES:
                return view
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"study {name} still {view.status} after {timeout_s} s")
            time.sleep(poll_s)

    # -- trials ---------------------------------------------------------------------------------
    def trials(
        self,
        name: str,
        *,
        state: str | None = None,
        sort: str = "number",
        limit: int = 100,
        offset: int = 0,
    ) -> Page[TrialView]:
        params: dict[str, Any] = {"sort": sort, "limit": limit, "offset": offset}
        if state:
            params["state"] = state
        return self._model(
            Page[TrialView], "GET", f"/v1/studies/{self._q(name)}/trials", params=params
        )

    def iter_trials(self, name: str, **kw: Any) -> Iterator[TrialView]:
        """Every trial, page by page."""
        offset: int | None = 0
        while offset is not None:
            page = self.trials(name, offset=offset, **kw)
            yield from page.items
            offset = page.next_offset

    def trial(self, name: str, number: int) -> TrialView:
        return self._model(TrialView, "GET", f"/v1/studies/{self._q(name)}/trials/{number}")

    def enqueue(self, name: str, params: dict[str, Any]) -> TrialView:
        return self._model(
            TrialView, "POST", f"/v1/studies/{self._q(name)}/trials", json={"params": params}
        )

    def best(self, name: str) -> BestView:
        return self._model(BestView, "GET", f"/v1/studies/{self._q(name)}/best")

    def importance(self, name: str, *, objective: int = 0) -> dict[str, Any]:
        r = self._call(
            "GET", f"/v1/studies/{self._q(name)}/importance", params={"objective": objective}
        )
        return dict(r.json())

    def plot(
        self,
        name: str,
        kind: str,
        *,
        fmt: str = "png",
        objective: int = 0,
        params: Sequence[str] | None = None,
    ) -> bytes:
        """A plot of the study as PNG bytes (``fmt='html'`` for an interactive page).
        ``params``: the hyperparameters a contour or parallel plot draws (default: the most
        important ones)."""
        query: dict[str, Any] = {"format": fmt, "objective": objective}
        if params:
            query["params"] = ",".join(params)
        return self._call("GET", f"/v1/studies/{self._q(name)}/plots/{kind}", params=query).content

    # -- models ---------------------------------------------------------------------------------
    def download_model(self, name: str, dest: str | Path, *, trial: int | None = None) -> Path:
        """Save a trained model (the best trial's unless ``trial``) to ``dest``; returns it."""
        path = (
            f"/v1/studies/{self._q(name)}/best/model"
            if trial is None
            else f"/v1/studies/{self._q(name)}/trials/{trial}/model"
        )
        dest = Path(dest)
        dest.write_bytes(self._call("GET", path).content)
        return dest

    def best_model(self, name: str) -> tuple[int, bytes]:
        """The best trial's trained model: ``(trial number, torch checkpoint bytes)``."""
        r = self._call("GET", f"/v1/studies/{self._q(name)}/best/model")
        return int(r.headers["X-Seqtune-Trial"]), r.content

    def predict(self, name: str, data: Any, *, trial: int | None = None) -> Any:
        """Download a study's model and predict on ``data`` (a DataFrame or a CSV path).

        Forecast: an array (windows, horizon, targets) in original units; classify: labels.
        Runs the model here, with torch: MissingExtra (an ImportError) without the worker
        extra."""
        local = import_extra("worker.cli", extra="worker", what="Client.predict")
        with tempfile.TemporaryDirectory() as tmp:
            path = self.download_model(name, Path(tmp) / "model.pt", trial=trial)
            predictor = local.load_predictor(str(path))
        return predictor.predict(local.read_frame(data))

    # -- datasets -------------------------------------------------------------------------------
    def upload_dataset(self, path: str | Path, *, name: str | None = None) -> DatasetView:
        path = Path(path)
        with path.open("rb") as fh:
            return self._model(
                DatasetView,
                "POST",
                "/v1/datasets",
                files={"file": (path.name, fh, "text/csv")},
                data={"name": name} if name else None,
            )

    def datasets(self, *, limit: int = 50, offset: int = 0) -> Page[DatasetView]:
        return self._model(
            Page[DatasetView], "GET", "/v1/datasets", params={"limit": limit, "offset": offset}
        )

    def dataset(self, dataset_id: str) -> DatasetView:
        """An uploaded dataset, by its id or its name."""
        return self._model(DatasetView, "GET", f"/v1/datasets/{self._q(dataset_id)}")

    def delete_dataset(self, dataset_id: str, *, force: bool = False) -> None:
        """Delete an uploaded dataset, by its id or its name. ApiError (409) while a study
        uses it, naming the studies; ``force`` deletes it all the same when none of them is
        running or paused (they keep their spec and lose the link)."""
        params = {"force": "true"} if force else None
        self._call("DELETE", f"/v1/datasets/{self._q(dataset_id)}", params=params)

    # -- uploaded models (init_from: {model: ID}) ------------------------------------------------
    def upload_model(self, path: str | Path, *, name: str | None = None) -> ModelView:
        """Upload a model file (a ``.pt`` that ``download_model`` saved) that studies may start
        from with ``init_from: {model: ID}``; its view's ``id`` is that ID."""
        path = Path(path)
        with path.open("rb") as fh:
            return self._model(
                ModelView,
                "POST",
                "/v1/models",
                files={"file": (path.name, fh, "application/octet-stream")},
                data={"name": name} if name else None,
            )

    def models(self, *, limit: int = 50, offset: int = 0) -> Page[ModelView]:
        return self._model(
            Page[ModelView], "GET", "/v1/models", params={"limit": limit, "offset": offset}
        )

    def model(self, model_id: str) -> ModelView:
        return self._model(ModelView, "GET", f"/v1/models/{self._q(model_id)}")

    def delete_model(self, model_id: str) -> None:
        self._call("DELETE", f"/v1/models/{self._q(model_id)}")

    # -- fleet ----------------------------------------------------------------------------------
    def workers(self, *, include_stopped: bool = False) -> list[WorkerView]:
        r = self._call("GET", "/v1/workers", params={"include_stopped": include_stopped})
        return [WorkerView.model_validate(w) for w in r.json()]
