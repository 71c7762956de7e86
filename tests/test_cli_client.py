"""The user-facing CLI end to end, as separate processes: `seqtune serve` on Postgres with
auth on, a real `seqtune worker` training real LSTMs, and every client command run the way a
user types it. Also the exit codes and one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import statsmodels.api as sm
import yaml

from tests.conftest import seqtune_cmd

STUDY = {
    "name": "cli-sun",
    "task": "forecast",
    "dataset": {"kind": "builtin", "name": "sunspots"},
    "objectives": [{"metric": "val_rmse"}],
    "search_space": {
        "hidden_size": {"type": "int", "low": 8, "high": 24},
        "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    },
    "fixed": {"max_epochs": 3, "seq_len": 8, "batch_size": 32},
    "sampler": {"name": "random", "seed": 1},
    "budget": {"n_trials": 3},
}


def _env(base: str, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
    env["SEQTUNE_URL"] = base
    if key:
        env["SEQTUNE_API_KEY"] = key
    return env


def st(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*seqtune_cmd(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_cli_from_submit_to_prediction(
    live: tuple[str, str], tmp_path: Path, settings: Any
) -> None:
    base, key = live
    env = _env(base, key)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    wenv = {
        **env,
        "SEQTUNE_DATABASE_URL": settings.url,
        "SEQTUNE_DATA_DIR": str(tmp_path),
        "SEQTUNE_LOG_LEVEL": "WARNING",
        "SEQTUNE_TENSORBOARD_DIR": str(tmp_path / "tb"),
    }
    worker = subprocess.Popen(
        [
            *seqtune_cmd(),
            "worker",
            "--gpus",
            "none",
            "--studies",
            "cli-sun",
            "--max-idle",
            "60",
            "--threads",
            "1",
        ],
        env=wenv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        r = st(env, "submit", str(study_file), "--watch", "--interval", "0.3")
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "submitted study 'cli-sun'" in r.stderr
    assert len(lines) >= 1 and "completed" in lines[-1] and "3/3" in lines[-1], r.stdout
    assert "best val_rmse=" in lines[-1]

    # TensorBoard event files: one run per trial, the validation metric at every epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((tmp_path / "tb" / "cli-sun").iterdir())
    assert [r.name for r in runs] == ["trial-00000-a1", "trial-00001-a1", "trial-00002-a1"]
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_rmse")] == [0, 1, 2]

    # best: a table for people, the same trial as JSON for scripts
    r = st(env, "best", "cli-sun")
    assert r.returncode == 0 and "hidden_size" in r.stdout and "test_rmse" in r.stdout
    best = json.loads(st(env, "best", "cli-sun", "--json").stdout)
    trials = json.loads(st(env, "trials", "cli-sun", "--json").stdout)["items"]
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
    assert best["best"]["value"] == min(t["value"] for t in trials)
    # The worker computed the study's classical baselines once; best shows them beside the
    # trial, with a verdict on validation, in the table and as JSON.
    base = best["baselines"]
    assert base["status"] == "done" and base["best"] in base["models"]
    assert {"persistence", "ar", "arima", "ets", "mean"} <= set(base["models"])
    assert base["n_test_targets"] == best["best"]["test_metrics"]["test_n_targets"]
    assert best["verdict"]["baseline"] == base["best"] and best["verdict"]["message"]
    assert "persistence" in r.stdout and best["verdict"]["message"] in r.stdout
    status = json.loads(st(env, "status", "cli-sun", "--json").stdout)  # the study view
    assert status["status"] == "completed" and status["trials"]["complete"] == 3
    r = st(env, "studies")
    assert r.returncode == 0 and "cli-sun" in r.stdout and "completed" in r.stdout
    r = st(env, "trials", "cli-sun")
    assert (
        r.stdout.splitlines()[0].split()[:2] == ["#", "STATE"] and len(r.stdout.splitlines()) == 4
    )

    # the model: download, then predict from a CSV, from the file and straight from the study
    r = st(env, "model", "cli-sun", "-o", str(tmp_path / "best.pt"))
    assert r.returncode == 0 and (tmp_path / "best.pt").stat().st_size > 1000
    frame = sm.datasets.sunspots.load_pandas().data.tail(30)
    frame.to_csv(tmp_path / "recent.csv", index=False)
    r = st(
        env, "predict", str(tmp_path / "best.pt"), "--csv", str(tmp_path / "recent.csv"), "--json"
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 30 - 8 + 1  # one forecast per full window of seq_len=8
    preds = np.array([row["SUNACTIVITY_t+1"] for row in rows])
    assert np.isfinite(preds).all() and 0 < preds.mean() < 300  # original units
    r2 = st(env, "predict", "--study", "cli-sun", "--csv", str(tmp_path / "recent.csv"), "--json")
    assert json.loads(r2.stdout) == rows
    r = st(env, "predict", str(tmp_path / "best.pt"), "--csv", str(study_file))
    assert r.returncode == 2 and "lacks the model's input column" in r.stderr

    # a plot, decoded as an image
    r = st(env, "plot", "cli-sun", "history", "-o", str(tmp_path / "h.png"))
    assert r.returncode == 0, r.stderr
    img = matplotlib.image.imread(io.BytesIO((tmp_path / "h.png").read_bytes()), format="png")
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_cli_steering_datasets_and_exit_codes(live: tuple[str, str], tmp_path: Path) -> None:
    base, key = live
    env = _env(base, key)
    spec = dict(STUDY, name="steer", budget={"n_trials": 50})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    r = st(env, "submit", str(tmp_path / "s.yaml"))
    assert r.returncode == 0 and r.stdout.strip() == "steer"
    assert st(env, "submit", str(tmp_path / "s.yaml")).returncode == 5  # exists: conflict
    r = st(env, "pause", "steer")
    assert r.returncode == 0 and r.stdout.strip() == "steer: paused"
    assert "paused" in st(env, "status", "steer").stdout
    assert st(env, "resume", "steer").stdout.strip() == "steer: running"
    assert st(env, "stop", "steer").stdout.strip() == "steer: stopped"
    r = st(env, "resume", "steer")
    assert r.returncode == 5 and len(r.stderr.strip().splitlines()) == 1

    # datasets
    csv = tmp_path / "series.csv"
    csv.write_text("t,y\n" + "".join(f"{i},{np.sin(i / 5):.4f}\n" for i in range(200)))
    r = st(env, "datasets", "upload", str(csv), "--name", "waves")
    assert r.returncode == 0, r.stderr
    ds_id = r.stdout.strip()
    r = st(env, "datasets", "list")
    assert ds_id in r.stdout and "waves" in r.stdout
    listed = json.loads(st(env, "datasets", "list", "--json").stdout)["items"]
    assert [d["id"] for d in listed] == [ds_id]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3\n")
    assert st(env, "datasets", "upload", str(tmp_path / "bad.csv")).returncode == 2

    # exit codes and one-line errors
    bad = dict(
        STUDY, name="bad", search_space={"hidden_size": {"type": "int", "low": 9, "high": 3}}
    )
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    r = st(env, "submit", str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and "search_space.hidden_size" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = st(env, "submit", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read study file" in r.stderr
    r = st(env, "status", "nope")
    assert r.returncode == 3 and "no study named 'nope'" in r.stderr
    r = st(env, "best", "steer")
    assert r.returncode == 5 and "no completed trial" in r.stderr
    r = st(env, "model", "steer", "--trial", "99")
    assert r.returncode == 3
    r = st(_env(base, "not-a-key"), "studies")
    assert r.returncode == 4 and "unknown or revoked" in r.stderr
    r = st(_env(base, None), "studies")
    assert r.returncode == 4 and "Bearer" in r.stderr
    r = st(_env("http://127.0.0.1:9", key), "studies")
    assert r.returncode == 6 and "cannot reach" in r.stderr and "seqtune up" in r.stderr
    r = st(env, "plot", "steer", "importance")
    assert r.returncode == 5 and "completed trial" in r.stderr
