"""`seqtune export mlflow`, as a user runs it: a real study trained by a real `seqtune worker`
behind `seqtune serve`, exported by the CLI into a local MLflow store (SQLite, no server), read
back with MLflow's own client; exported again without a duplicate; and without the extra, one
line naming it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from seqtune.cli import main
from tests.conftest import seqtune_cmd

mlflow = pytest.importorskip("mlflow")

STUDY = {
    "name": "to-mlflow",
    "task": "forecast",
    "dataset": {"kind": "builtin", "name": "sunspots"},
    "objectives": [{"metric": "val_rmse"}],
    "search_space": {
        "hidden_size": {"type": "int", "low": 8, "high": 24},
        "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    },
    "fixed": {"max_epochs": 3, "seq_len": 8, "batch_size": 32},
    "sampler": {"name": "random", "seed": 2},
    "pruner": {"name": "none"},
    "budget": {"n_trials": 3},
}


def _env(base: str, key: str, **over: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQTUNE_", "MLFLOW_"))}
    env.update(SEQTUNE_URL=base, SEQTUNE_API_KEY=key, MLFLOW_DISABLE_TELEMETRY="true", **over)
    return env


def st(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*seqtune_cmd(), *args], env=env, capture_output=True, text=True, timeout=300
    )


def _run_study(env: dict[str, str], settings: Any, tmp_path: Path) -> None:
    """Submit STUDY and train it to completion with a real worker."""
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    wenv = {
        **env,
        "SEQTUNE_DATABASE_URL": settings.url,
        "SEQTUNE_DATA_DIR": str(tmp_path),
        "SEQTUNE_LOG_LEVEL": "WARNING",
    }
    worker = subprocess.Popen(
        [*seqtune_cmd(), "worker", "--gpus", "none", "--studies", STUDY["name"]]
        + ["--max-idle", "60", "--threads", "1"],
        env=wenv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        r = st(env, "submit", str(study_file), "--watch", "--interval", "0.3")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert r.returncode == 0 and "3/3" in r.stdout, r.stdout + r.stderr


def test_export_to_a_local_mlflow_store(
    live: tuple[str, str], settings: Any, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    env = _env(*live)
    _run_study(env, settings, tmp_path)
    trials = json.loads(st(env, "trials", STUDY["name"], "--json").stdout)["items"]
    best = json.loads(st(env, "best", STUDY["name"], "--json").stdout)["best"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    r = st(env, "export", "mlflow", STUDY["name"], "--tracking-uri", uri)
    assert r.returncode == 0, r.stderr
    assert "exported 'to-mlflow' to MLflow experiment 'to-mlflow'" in r.stdout
    assert "3 run(s) created, 0 already there" in r.stdout
    assert f"the best model (trial {best['number']}) is an artifact of run" in r.stdout

    ml = MlflowClient(tracking_uri=uri)
    exp = ml.get_experiment_by_name("to-mlflow")
    assert exp is not None and exp.tags["seqtune.study"] == "to-mlflow"
    # Artifacts beside the database, not in the folder the command ran in.
    assert exp.artifact_location.endswith(str(tmp_path / "mlruns"))
    runs = {int(r.data.tags["seqtune.trial"]): r for r in ml.search_runs([exp.experiment_id])}
    assert sorted(runs) == [t["number"] for t in trials] == [0, 1, 2]
    for t in trials:
        run = runs[t["number"]]
        rid = run.info.run_id
        assert run.info.run_name == f"trial-{t['number']}"
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t["state"]]
        assert run.data.params == {k: str(v) for k, v in t["params"].items()}
        tags = run.data.tags
        assert tags["seqtune.study"] == "to-mlflow" and tags["seqtune.state"] == t["state"]
        assert tags["seqtune.reason"] == t["reason"] and tags["seqtune.attempts"] == "1"
        assert tags["seqtune.worker"] == t["worker"] and tags["seqtune.url"] == live[0]
        # final metrics: the value, the best epoch's val metrics, the test metrics
        m = run.data.metrics
        assert m["objective/val_rmse"] == pytest.approx(t["value"])
        assert m["best_epoch/val_rmse"] == pytest.approx(t["value"])
        assert m["test_rmse"] == pytest.approx(t["test_metrics"]["test_rmse"])
        # the learning curve: one point per epoch, step = epoch
        for key in ("train_loss", "val_loss", "val_rmse"):
            history = ml.get_metric_history(rid, key)
            assert [p.step for p in history] == list(range(t["epochs"])), key
            stamps = [p.timestamp for p in history]
            assert stamps == sorted(stamps) and stamps[0] >= run.info.start_time
        # the value is the curve's best epoch (minimised, restored best weights)
        curve = [p.value for p in ml.get_metric_history(rid, "val_rmse")]
        assert min(curve) == pytest.approx(t["value"])
        assert t["epochs"] == 3
    # The best model: an artifact of the best trial's run, a torch checkpoint.
    best_run = runs[best["number"]]
    assert best_run.data.tags.get("seqtune.best") == "true"
    assert sum(r.data.tags.get("seqtune.best") == "true" for r in runs.values()) == 1
    files = [f.path for f in ml.list_artifacts(best_run.info.run_id, "model")]
    assert files == [f"model/to-mlflow-trial{best['number']}.pt"]
    local = ml.download_artifacts(best_run.info.run_id, files[0], str(tmp_path / "dl"))
    checkpoint = torch.load(local, map_location="cpu", weights_only=False)
    assert checkpoint["hparams"]["hidden_size"] == best["params"]["hidden_size"]

    # Again: nothing new, nothing duplicated, the same run keeps the model.
    r = st(env, "export", "mlflow", STUDY["name"], "--tracking-uri", uri, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["created"] == [] and report["existing"] == [0, 1, 2]
    assert report["model_run_id"] == best_run.info.run_id
    assert len(ml.search_runs([exp.experiment_id])) == 3
    assert len(ml.list_artifacts(best_run.info.run_id, "model")) == 1
    assert len(ml.get_metric_history(best_run.info.run_id, "val_loss")) == 3

    # Another experiment by name; `seqtune plot --params` through the same service.
    r = st(env, "export", "mlflow", STUDY["name"], "--tracking-uri", uri, "--experiment", "x")
    assert r.returncode == 0 and "experiment 'x'" in r.stdout
    out = tmp_path / "c.png"
    r = st(env, "plot", STUDY["name"], "contour", "--params", "lr,hidden_size", "-o", str(out))
    assert r.returncode == 0, r.stderr
    title = Image.open(io.BytesIO(out.read_bytes())).info["Title"]
    assert title == "to-mlflow · val_rmse · contour of hidden_size × lr"

    # A store MLflow does not take: one line, exit 2.
    r = st(env, "export", "mlflow", STUDY["name"], "--tracking-uri", "bogus://x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("seqtune: MLflow at bogus://x refused the export: ")


def test_without_the_extra_the_verb_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    code = main(["export", "mlflow", "s", "--tracking-uri", "sqlite:///x.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["seqtune export mlflow needs the mlflow extra: pip install 'seqtune[mlflow]'"]


def test_metrics_of_a_two_objective_trial_and_a_resumed_curve() -> None:
    """Each objective under its metric's name; an epoch a resumed trial reported twice is one
    point (its last); nested test metrics flattened; booleans and non-numbers left out."""
    from types import SimpleNamespace

    from seqtune.export_mlflow import curve_metrics, final_metrics
    from seqtune.views import TrialView

    view: Any = SimpleNamespace(
        spec={"objectives": [{"metric": "val_rmse"}, {"metric": "param_count"}]}
    )
    trial = TrialView(
        number=4,
        state="COMPLETE",
        params={"lr": 0.01},
        values=[0.5, 1200.0],
        info={"val": {"val_rmse": 0.5, "val_mae": 0.4}, "best_epoch": 1},
        test_metrics={"test_rmse": 0.7, "per_target": {"y": {"rmse": 0.7}}, "ok": True, "n": "x"},
        curve=[
            {"epoch": 0, "train_loss": 3.0, "val_rmse": 0.9, "seconds": 1.5},
            {"epoch": 1, "train_loss": 9.9, "val_rmse": 9.9, "seconds": 1.0},  # lost attempt
            {"epoch": 1, "train_loss": 2.0, "val_rmse": 0.5, "seconds": 2.0, "fold": 0},
        ],
        epochs=2,
        created_at="2026-01-01T00:00:00Z",
    )
    assert final_metrics(view, trial) == {
        "objective/val_rmse": 0.5,
        "objective/param_count": 1200.0,
        "best_epoch/val_rmse": 0.5,
        "best_epoch/val_mae": 0.4,
        "test_rmse": 0.7,
        "per_target/y/rmse": 0.7,
    }
    curve = curve_metrics(trial, 1_000)
    assert curve["train_loss"] == [(0, 3.0, 2_500), (1, 2.0, 4_500)]
    assert curve["val_rmse"] == [(0, 0.9, 2_500), (1, 0.5, 4_500)]
    assert set(curve) == {"train_loss", "val_rmse", "seconds"}


def test_a_study_recreated_under_the_same_name_is_another_study(tmp_path: Path) -> None:
    """Runs are found again by the study's identity (tenant, name, Optuna id, creation time),
    not its name: a study deleted and submitted again under the same name gets runs of its
    own, never the old study's (which would be skipped as already exported)."""
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    from seqtune.export_mlflow import TRIAL_TAG, UID_TAG, _runs_of, study_uid
    from seqtune.views import StudyView, TrialCounts

    def view(created: datetime, oid: int) -> StudyView:
        counts = TrialCounts(
            waiting=0, running=0, complete=0, pruned=0, failed=0, finished=0, budget=1, remaining=1
        )
        return StudyView(
            name="foo", tenant="default", status="completed", task="forecast",
            optuna_study_name="default/foo", optuna_study_id=oid, directions=["minimize"],
            priority=0, trials=counts, spec={}, created_at=created, updated_at=created,
        )  # fmt: skip

    old = view(datetime(2026, 1, 1, tzinfo=UTC), 1)
    new = view(datetime(2026, 1, 2, tzinfo=UTC), 2)
    assert study_uid(old) != study_uid(new)
    ml = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = ml.create_experiment("foo", artifact_location=str(tmp_path / "art"))
    ml.create_run(exp, tags={UID_TAG: study_uid(old), TRIAL_TAG: "0", "seqtune.study": "foo"})
    assert set(_runs_of(ml, exp, study_uid(old))) == {0}
    assert _runs_of(ml, exp, study_uid(new)) == {}
