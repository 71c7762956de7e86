"""Export a study to MLflow: one run per finished trial, under one experiment.

    seqtune export mlflow sunspots-lstm --tracking-uri sqlite:///mlflow.db
    mlflow ui --backend-store-uri sqlite:///mlflow.db

Each run holds the trial's hyperparameters (params); its final metrics (``objective/<metric>``
for the value(s) Optuna optimised, ``best_epoch/<metric>`` for the validation metrics of the
epoch it kept, the test metrics under their own names); its learning curve as metric history
(``train_loss``, ``val_loss``, ``val_rmse`` ... with ``step`` = epoch); and tags: the study,
the trial's number, state, reason, attempts and worker. The best trial's run also holds the
best model (``model/<study>-trial<N>.pt``, a torch checkpoint for ``seqtune predict``) and the
tag ``seqtune.best = true``.

Read through seqtune's REST client, so it exports from any service it can reach. Written
through MLflow's own client (the ``mlflow`` extra: mlflow-skinny, and SQLAlchemy for an
``sqlite:`` store), imported only when an export runs.

Exporting again adds what is new and rewrites nothing: a run is found by its tags
(``seqtune.study``, ``seqtune.trial``), and a trial whose run is there already is skipped (a
finished trial never changes). Trials still waiting or running are left for a later export.
The best model moves to the run of the study's best trial when that changes.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from seqtune.client import ApiError, Client
from seqtune.errors import ErrorCode, Invalid, import_extra
from seqtune.states import TrialState
from seqtune.views import StudyView, TrialView

WHAT = "seqtune export mlflow"
# A trial's state as the status of its MLflow run: a pruned trial was stopped early.
RUN_STATUS: dict[str, str] = {
    TrialState.COMPLETE: "FINISHED",
    TrialState.PRUNED: "KILLED",
    TrialState.FAIL: "FAILED",
}
# Tags (seqtune.*) that find a trial's run again.
STUDY_TAG, TRIAL_TAG, BEST_TAG = "seqtune.study", "seqtune.trial", "seqtune.best"
# What tells one study from another of the same name (re-created after a delete, another
# tenant's, another service's): runs are found again by this, not by the name alone.
UID_TAG = "seqtune.study_uid"


def study_uid(view: StudyView) -> str:
    """The study's identity across re-creations: tenant, name, Optuna id and creation time."""
    return f"{view.tenant}/{view.name}#{view.optuna_study_id}@{view.created_at.isoformat()}"


_CURVE_KEYS_SKIPPED = ("epoch", "fold", "fold_epoch")  # the step, and where it sits
_MAX_TAG = 5000  # MLflow 2.x's limit on a tag's value (8000 in 3.x)
_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")


@dataclass
class ExportReport:
    """What an export did: the store (its password masked), the experiment (name, id), the
    trial numbers whose runs it created, those whose runs were there already, those left out
    (not finished), and the run holding the best model (None with ``no_model`` saying why)."""

    study: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    created: list[int] = field(default_factory=list)
    existing: list[int] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)
    best_trial: int | None = None
    model_run_id: str | None = None
    no_model: str | None = None

    def summary(self) -> str:
        """One paragraph for people."""
        lines = [
            f"exported '{self.study}' to MLflow experiment '{self.experiment}' "
            f"(id {self.experiment_id}) at {self.tracking_uri}: {len(self.created)} run(s) "
            f"created, {len(self.existing)} already there"
        ]
        if self.unfinished:
            lines.append(
                f"{len(self.unfinished)} trial(s) not finished yet, left out (export again later)"
            )
        if self.model_run_id:
            lines.append(
                f"the best model (trial {self.best_trial}) is an artifact of run "
                f"{self.model_run_id}"
            )
        elif self.no_model:
            lines.append(f"no model exported: {self.no_model}")
        return "\n".join(lines)


def mlflow_module() -> ModuleType:
    """``mlflow``; MissingExtra naming the ``mlflow`` extra without it."""
    return import_extra("mlflow", extra="mlflow", what=WHAT)


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the database for an ``sqlite:``
    store (``<its folder>/mlruns``, which is MLflow's own default when it is run from that
    folder), else None (the store or server decides). MLflow's default for an SQLite store
    is ``./mlruns`` under whatever folder the export happens to run in."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = tracking_uri[len(prefix) :].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return str(Path(db).expanduser().resolve().parent / "mlruns")


def export_study(
    client: Client,
    name: str,
    *,
    tracking_uri: str,
    experiment: str | None = None,
    artifact_location: str | None = None,
) -> ExportReport:
    """Export study ``name``, read through ``client``, to the MLflow tracking store at
    ``tracking_uri``, under ``experiment`` (default: the study's name; created when missing,
    its artifacts at ``artifact_location`` or ``default_artifact_location``).

    Raises MissingExtra without mlflow, ApiError/ServiceUnreachable as the client does,
    Invalid when the experiment of that name was deleted, and MLflow's MlflowException when
    the store refuses."""
    mlflow_module()
    from mlflow import MlflowClient

    view = client.study(name)  # first: a study that is not there leaves no store behind
    url = masked(client.url)
    ml = MlflowClient(tracking_uri=tracking_uri)
    exp_name = experiment or view.name
    exp_id = _experiment(ml, exp_name, view, url, artifact_location, tracking_uri)
    report = ExportReport(view.name, masked(tracking_uri), exp_name, exp_id)
    best = _best_model(client, view, report)  # first: its trial is in the listing below
    runs = _runs_of(ml, exp_id, study_uid(view))
    for listed in client.iter_trials(view.name):
        if listed.state not in RUN_STATUS:
            report.unfinished.append(listed.number)
            continue
        run = runs.get(listed.number)
        if run is not None and run.info.status in RUN_STATUS.values():
            report.existing.append(listed.number)
            continue
        if run is not None:  # an earlier export stopped half way through this run
            ml.delete_run(run.info.run_id)
        trial = client.trial(view.name, listed.number)  # with its curve
        runs[trial.number] = _export_trial(ml, exp_id, view, trial, url)
        report.created.append(trial.number)
    if best is not None:
        _attach_best(ml, view, runs, report, *best)
    return report


def _experiment(
    ml: Any,
    name: str,
    view: StudyView,
    url: str,
    artifact_location: str | None,
    tracking_uri: str,
) -> str:
    """The id of experiment ``name``, created (tagged with the study) when missing."""
    found = ml.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise Invalid(
                f"the MLflow experiment '{name}' was deleted; restore it "
                f"(mlflow experiments restore --experiment-id {found.experiment_id}) or "
                "choose another with --experiment"
            )
        return str(found.experiment_id)
    return str(
        ml.create_experiment(
            name,
            artifact_location=artifact_location or default_artifact_location(tracking_uri),
            tags={STUDY_TAG: view.name, "seqtune.url": url, "seqtune.task": view.task},
        )
    )


def _runs_of(ml: Any, exp_id: str, uid: str) -> dict[int, Any]:
    """The experiment's live runs of the study whose ``study_uid`` is ``uid``, by trial
    number (a study of the same name exported before is another study)."""
    out: dict[int, Any] = {}
    token: str | None = None
    while True:
        page = ml.search_runs(
            [exp_id],
            filter_string=f"tags.`{UID_TAG}` = '{uid}'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            number = run.data.tags.get(TRIAL_TAG, "")
            if number.isdigit():
                out[int(number)] = run
        token = page.token
        if not token:
            return out


def masked(url: str) -> str:
    """``url`` with the password in it, if any, shown as ``***``: what a tag or a message may
    show (``http://me:pw@host`` -> ``http://me:***@host``)."""
    return _PASSWORD.sub(r"\1***@", url)


def _ms(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp() * 1000)


def _numbers(d: dict[str, Any] | None, prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numbers in ``d`` (nested dicts flattened, keys joined with '/'); no booleans."""
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _numbers(v, key + "/")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            yield key, float(v)


def final_metrics(view: StudyView, trial: TrialView) -> dict[str, float]:
    """A trial's final metrics as the run logs them: ``objective/<metric>`` for each value
    Optuna was told, ``best_epoch/<metric>`` for the validation metrics of the epoch the trial
    kept, and its test metrics under their own names."""
    metrics = [str(o["metric"]) for o in view.spec.get("objectives") or []]
    values = trial.values if trial.values else ([] if trial.value is None else [trial.value])
    out = {f"objective/{m}": float(v) for m, v in zip(metrics, values, strict=False)}
    out.update((f"best_epoch/{k}", v) for k, v in _numbers(trial.info.get("val")))
    out.update(_numbers(trial.test_metrics))
    return out


def _epochs(trial: TrialView) -> dict[int, dict[str, Any]]:
    """The curve's records by epoch, in order (a resumed trial's repeated epoch: its last)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in trial.curve or []:
        if isinstance(record.get("epoch"), int):
            by_epoch[record["epoch"]] = record
    return dict(sorted(by_epoch.items()))


def curve_metrics(trial: TrialView, start_ms: int) -> dict[str, list[tuple[int, float, int]]]:
    """The learning curve as metric histories: for each metric an epoch reports, its
    ``(epoch, value, timestamp)`` triples, one per epoch. A timestamp is ``start_ms`` plus the
    seconds of the epochs so far (each record's ``seconds``), for MLflow's time axis."""
    out: dict[str, list[tuple[int, float, int]]] = {}
    elapsed = 0.0
    for epoch, record in _epochs(trial).items():
        seconds = record.get("seconds")
        if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0:
            elapsed += seconds
        stamp = start_ms + round(elapsed * 1000)
        for key, value in _numbers(record):
            if key not in _CURVE_KEYS_SKIPPED and math.isfinite(value):
                out.setdefault(key, []).append((epoch, value, stamp))
    return out


def trial_tags(view: StudyView, trial: TrialView, url: str) -> dict[str, str]:
    """The run's tags: the study and the trial's number (how an export finds it again), its
    state, reason, attempts and worker, and where it came from."""
    tags = {
        STUDY_TAG: view.name,
        UID_TAG: study_uid(view),
        TRIAL_TAG: str(trial.number),
        "seqtune.state": trial.state,
        "seqtune.reason": trial.reason or "",
        "seqtune.attempts": str(trial.attempts),
        "seqtune.worker": trial.worker or "",
        "seqtune.epochs": str(trial.epochs),
        "seqtune.url": url,
    }
    best_epoch = trial.info.get("best_epoch")
    if best_epoch is not None:
        tags["seqtune.best_epoch"] = str(best_epoch)
    if trial.info.get("device"):
        tags["seqtune.device"] = str(trial.info["device"])
    if trial.final_of is not None:
        tags["seqtune.final_of"] = str(trial.final_of)
    if trial.error:
        tags["seqtune.error"] = trial.error[:_MAX_TAG]
    return {k: v for k, v in tags.items() if v != ""}


def _export_trial(ml: Any, exp_id: str, view: StudyView, trial: TrialView, url: str) -> Any:
    """Create the run of finished ``trial``, log everything, end it with the trial's state."""
    from mlflow.entities import Metric, Param

    start = _ms(trial.started_at or trial.created_at) or 0
    run = ml.create_run(
        exp_id,
        start_time=start,
        tags=trial_tags(view, trial, url),
        run_name=f"trial-{trial.number}",
    )
    rid = run.info.run_id
    params = [Param(k, str(v)) for k, v in sorted(trial.params.items())]
    end = _ms(trial.finished_at) or start
    metrics = [Metric(k, v, end, 0) for k, v in sorted(final_metrics(view, trial).items())]
    for key, points in sorted(curve_metrics(trial, start).items()):
        metrics += [Metric(key, value, stamp, epoch) for epoch, value, stamp in points]
    for i in range(0, len(params), 100):  # MLflow takes 100 params and 1000 metrics a call
        ml.log_batch(rid, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        ml.log_batch(rid, metrics=metrics[i : i + 1000])
    ml.set_terminated(rid, status=RUN_STATUS[trial.state], end_time=end)
    return ml.get_run(rid)


def _best_model(client: Client, view: StudyView, report: ExportReport) -> tuple[int, bytes] | None:
    """The best trial's number and model, or None (why in ``report.no_model``): several
    objectives have no single best, and a study may have no model yet."""
    if len(view.directions) > 1:
        report.no_model = "the study has several objectives, so no single best model"
        return None
    try:
        return client.best_model(view.name)
    except ApiError as exc:
        if exc.code in (ErrorCode.CONFLICT, ErrorCode.NOT_FOUND):
            report.no_model = exc.message
            return None
        raise


def _attach_best(
    ml: Any,
    view: StudyView,
    runs: dict[int, Any],
    report: ExportReport,
    number: int,
    data: bytes,
) -> None:
    """Log the best model as an artifact of trial ``number``'s run (unless it is there
    already) and move the ``seqtune.best`` tag to that run."""
    run = runs.get(number)
    if run is None:  # finished after the listing began: it is exported next time
        report.no_model = f"trial {number}, the best, has no run yet; export again"
        return
    rid = run.info.run_id
    filename = f"{view.name}-trial{number}.pt"
    if not any(f.path.endswith(filename) for f in ml.list_artifacts(rid, "model")):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            ml.log_artifact(rid, str(path), artifact_path="model")
    for other_number, other in runs.items():
        if other_number != number and other.data.tags.get(BEST_TAG) == "true":
            ml.delete_tag(other.info.run_id, BEST_TAG)
    ml.set_tag(rid, BEST_TAG, "true")
    report.best_trial, report.model_run_id = number, rid
