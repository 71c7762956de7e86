"""Plain values the data layer returns and the API serialises. Never live ORM rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_offset: int | None = None


class TrialCounts(BaseModel):
    waiting: int
    running: int
    complete: int
    pruned: int
    failed: int
    finished: int
    budget: int
    remaining: int


class StudyView(BaseModel):
    name: str
    tenant: str
    status: str
    task: str
    optuna_study_name: str
    optuna_study_id: int | None = None  # the dashboard's /dashboard/studies/{id}
    directions: list[str]
    priority: int
    trials: TrialCounts
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    # Classical baselines (see service.baselines): None until a worker claims them, then
    # {"status": "computing" | "done" | "failed", ...}.
    baselines: dict[str, Any] | None = None
    phase: str = "search"  # 'search', or 'final' while/after the top configs are re-trained


class TrialView(BaseModel):
    number: int
    state: str
    params: dict[str, Any]
    value: float | None = None
    values: list[float] | None = None
    reason: str | None = None
    test_metrics: dict[str, Any] | None = None
    info: dict[str, Any] = {}
    curve: list[dict[str, Any]] | None = None  # only in the single-trial view
    epochs: int = 0
    worker: str | None = None
    attempts: int = 0
    error: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    final_of: int | None = None  # a final-phase re-train of this search trial's params


class BestView(BaseModel):
    study: str
    directions: list[str]
    metrics: list[str]
    best: TrialView | None = None  # single objective
    pareto_front: list[TrialView] | None = None  # several objectives
    baselines: dict[str, Any] | None = None  # the study's baselines record, as stored
    # The best trial against the best baseline on validation (service.baselines.verdict);
    # None without finished baselines, with several objectives, or without the metric.
    verdict: dict[str, Any] | None = None
    # The final phase's re-trains grouped by search trial (service.studies.final_summary);
    # None while the study is in its search phase and has no finished re-train.
    final: dict[str, Any] | None = None


class DatasetView(BaseModel):
    id: str
    name: str
    sha256: str
    size_bytes: int
    n_rows: int
    columns: list[dict[str, Any]]
    created_at: datetime
