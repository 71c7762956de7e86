"""Prometheus metrics at ``/metrics``, all named ``seqtune_*``.

Fleet-wide numbers (trials, studies, workers, reaps, durations) are read from the database at
scrape time, so every service replica reports the same values whatever worker did the work.
API latency and the connection pool are this process's own. Labels never carry study or
tenant names: the endpoint is unauthenticated, like most scrape targets, and reveals no names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.store.db import Database
from service.store.tables import Study, Trial, Worker
from service.store.workers import LOST_AFTER_S

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_STATES = {"waiting": Study.n_waiting, "running": Study.n_running,
           "complete": Study.n_complete, "pruned": Study.n_pruned, "failed": Study.n_failed}


class FleetCollector(Collector):
    """Reads the fleet's state from the database on each scrape (four small queries)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        yield from self.db.run(self._collect)

    def _collect(self, s: Any) -> list[Metric]:
        out: list[Metric] = []
        sums = s.execute(select(*(func.coalesce(func.sum(c), 0) for c in _STATES.values()),
                                func.coalesce(func.sum(Study.n_reaped), 0))).one()
        g = GaugeMetricFamily("seqtune_trials", "Trials by state, all studies", labels=["state"])
        for state, n in zip(_STATES, sums, strict=False):
            g.add_metric([state], float(n))
        out.append(g)
        complete, pruned = float(sums[2]), float(sums[3])
        out.append(GaugeMetricFamily(
            "seqtune_trials_pruned_ratio", "Pruned / (complete + pruned) over all trials",
            value=pruned / (complete + pruned) if complete + pruned else 0.0))
        c = CounterMetricFamily("seqtune_lease_reaps", "Leases taken from dead attempts "
                                "(counted in the database, fleet-wide)")
        c.add_metric([], float(sums[5]))
        out.append(c)

        by_status = dict(s.execute(select(Study.status, func.count()).group_by(Study.status))
                         .all())
        g = GaugeMetricFamily("seqtune_studies", "Studies by status", labels=["status"])
        for status in ("running", "paused", "completed", "stopped", "timed_out", "failed"):
            g.add_metric([status], float(by_status.get(status, 0)))
        out.append(g)

        # Queue depth: trials running studies may still start (budget left + enqueued waiting).
        depth = s.scalar(select(func.coalesce(func.sum(
            Study.n_trials - Study.n_claimed), 0)).where(Study.status == "running"))
        out.append(GaugeMetricFamily("seqtune_queue_depth",
                                     "Trials of running studies not started yet",
                                     value=float(max(int(depth or 0), 0))))

        now = datetime.now(UTC)
        rows = s.execute(select(Worker.heartbeat_at).where(
            Worker.stopped_at.is_(None), Worker.heartbeat_at > now - timedelta(days=1))).all()
        ages = [(now - (hb if hb.tzinfo else hb.replace(tzinfo=UTC))).total_seconds()
                for (hb,) in rows]
        live = sum(1 for a in ages if a < LOST_AFTER_S)
        lost = len(ages) - live
        g = GaugeMetricFamily("seqtune_workers", "Worker slots by status", labels=["status"])
        g.add_metric(["live"], float(live))
        g.add_metric(["lost"], float(lost))
        out.append(g)

        out.append(self._durations(s))
        return out

    def _durations(self, s: Any) -> Metric:
        """Histogram of finished trials' wall time, from their start and end stamps."""
        dur: Any
        if self.db.engine.dialect.name == "postgresql":
            dur = func.extract("epoch", Trial.finished_at - Trial.started_at)
        else:
            dur = (func.julianday(Trial.finished_at) - func.julianday(Trial.started_at)) * 86400
        done = (Trial.finished_at.is_not(None), Trial.started_at.is_not(None))
        cols: list[Any] = [func.count(), func.coalesce(func.sum(dur), 0)]
        cols += [func.count().filter(dur <= b) for b in DURATION_BUCKETS]
        row = s.execute(select(*cols).where(*done)).one()
        buckets = [(str(float(b)), float(n)) for b, n in zip(DURATION_BUCKETS, row[2:],
                                                            strict=True)]
        buckets.append(("+Inf", float(row[0])))
        h = HistogramMetricFamily("seqtune_trial_duration_seconds",
                                  "Wall time of finished trials (start to end, all attempts)")
        h.add_metric([], buckets, sum_value=float(row[1]))
        return h


class PoolCollector(Collector):
    """This process's database connection pool."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        pool: Any = self.db.engine.pool
        for name, fn, doc in (("size", "size", "Configured pool size"),
                              ("checked_out", "checkedout", "Connections in use"),
                              ("overflow", "overflow", "Connections over the pool size"),
                              ("idle", "checkedin", "Idle connections in the pool")):
            f = getattr(pool, fn, None)
            if f is not None:
                yield GaugeMetricFamily(f"seqtune_db_pool_{name}", doc, value=float(f()))


class Metrics:
    """One registry per app: the request-latency histogram plus the two collectors."""

    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("seqtune_api_request_duration_seconds",
                                 "API request latency by route", ["method", "route", "status"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(FleetCollector(db))
        self.registry.register(PoolCollector(db))


# Label values come from closed sets, whatever callers send: the endpoint is unauthenticated,
# and every new label value is a new series that Prometheus keeps (and this process holds).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
UNMATCHED = "unmatched"
# Set by inner middleware that answers paths outside the routers (the mounted dashboard).
ROUTE_LABEL = "seqtune.route_label"


def route_label(scope: dict) -> str:
    """The route template of a request (``/v1/studies/{name}``), never the raw path: the
    router's match, else a label an inner middleware set, else the template the path would
    match (a request refused before routing, by the key check or the body cap), else
    ``unmatched``."""
    route = scope.get("route")
    if isinstance(getattr(route, "path", None), str):
        return str(route.path)  # type: ignore[union-attr]
    label = scope.get(ROUTE_LABEL)
    if isinstance(label, str):
        return label
    from starlette.routing import Match

    for candidate in _leaf_routes(getattr(getattr(scope.get("app"), "router", None),
                                          "routes", ())):
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return str(candidate.path)
    return UNMATCHED


def _leaf_routes(routes: Any, depth: int = 0) -> Iterator[Any]:
    """The routes with a path template, looking inside included routers (FastAPI keeps an
    included router as one route that holds the original router)."""
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None and depth < 8:
            yield from _leaf_routes(inner, depth + 1)
        elif isinstance(getattr(route, "path", None), str) and hasattr(route, "matches"):
            yield route


class LatencyMiddleware:
    """Times every HTTP request into ``seqtune_api_request_duration_seconds``. Labels: the
    method (one of METHODS, else ``other``), the route template (``route_label``) and the
    status the app answered; so the number of series is bounded by the app's routes."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics: Metrics | None = getattr(scope["app"].state, "metrics", None) \
                if "app" in scope else None
            if metrics is not None:
                method = scope["method"] if scope["method"] in METHODS else OTHER_METHOD
                metrics.latency.labels(method, route_label(scope), str(status[0])).observe(
                    time.perf_counter() - t0)
