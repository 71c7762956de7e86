"""Prometheus metrics at ``/metrics``, all named ``seqtune_*``.

Fleet-wide numbers (trials, studies, workers, reaps, durations) are read from the database at
scrape time, so every service replica reports the same values whatever worker did the work.
API latency and the connection pool are this process's own. Labels never carry study or
tenant names: the endpoint is unauthenticated, like most scrape targets, and reveals no names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.store import health
from service.store.db import Database

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class FleetCollector(Collector):
    """Reads the fleet's state from the database on each scrape (``health.fleet_stats``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        yield from fleet_metrics(
            health.fleet_stats(
                self.db, buckets=DURATION_BUCKETS, lost_after_s=self.db.settings.lost_after_s
            )
        )


def fleet_metrics(stats: health.FleetStats) -> list[Metric]:
    """The Prometheus families of ``stats``."""
    out: list[Metric] = []
    g = GaugeMetricFamily("seqtune_trials", "Trials by state, all studies", labels=["state"])
    for state, n in stats.trials.items():
        g.add_metric([state], float(n))
    out.append(g)
    complete, pruned = float(stats.trials["complete"]), float(stats.trials["pruned"])
    out.append(
        GaugeMetricFamily(
            "seqtune_trials_pruned_ratio",
            "Pruned / (complete + pruned) over all trials",
            value=pruned / (complete + pruned) if complete + pruned else 0.0,
        )
    )
    c = CounterMetricFamily(
        "seqtune_lease_reaps",
        "Leases taken from dead attempts (counted in the database, fleet-wide)",
    )
    c.add_metric([], float(stats.reaps))
    out.append(c)
    g = GaugeMetricFamily("seqtune_studies", "Studies by status", labels=["status"])
    for status, n in stats.studies.items():
        g.add_metric([status], float(n))
    out.append(g)
    out.append(
        GaugeMetricFamily(
            "seqtune_queue_depth",
            "Trials of running studies not started yet",
            value=float(stats.queue_depth),
        )
    )
    g = GaugeMetricFamily("seqtune_workers", "Worker slots by status", labels=["status"])
    g.add_metric(["live"], float(stats.workers_live))
    g.add_metric(["lost"], float(stats.workers_lost))
    out.append(g)
    buckets = [
        (str(float(b)), float(n)) for b, n in zip(DURATION_BUCKETS, stats.durations_le, strict=True)
    ]
    buckets.append(("+Inf", float(stats.durations_count)))
    h = HistogramMetricFamily(
        "seqtune_trial_duration_seconds",
        "Wall time of finished trials (start to end, all attempts)",
    )
    h.add_metric([], buckets, sum_value=stats.durations_sum_s)
    out.append(h)
    return out


class PoolCollector(Collector):
    """This process's database connection pool."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        pool: Any = self.db.engine.pool
        for name, fn, doc in (
            ("size", "size", "Configured pool size"),
            ("checked_out", "checkedout", "Connections in use"),
            ("overflow", "overflow", "Connections over the pool size"),
            ("idle", "checkedin", "Idle connections in the pool"),
        ):
            f = getattr(pool, fn, None)
            if f is not None:
                yield GaugeMetricFamily(f"seqtune_db_pool_{name}", doc, value=float(f()))


class Metrics:
    """One registry per app: the request-latency histogram plus the two collectors."""

    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "seqtune_api_request_duration_seconds",
            "API request latency by route",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
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

    for candidate in _leaf_routes(getattr(getattr(scope.get("app"), "router", None), "routes", ())):
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
            metrics: Metrics | None = (
                getattr(scope["app"].state, "metrics", None) if "app" in scope else None
            )
            if metrics is not None:
                method = scope["method"] if scope["method"] in METHODS else OTHER_METHOD
                metrics.latency.labels(method, route_label(scope), str(status[0])).observe(
                    time.perf_counter() - t0
                )
