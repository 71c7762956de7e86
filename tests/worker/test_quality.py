"""The verdict a study gives, from real training and real baselines: where persistence is the
best possible forecast (a random walk), a tuned LSTM must be told it does not beat it."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import optuna
import pandas as pd

from seqtune.spec import parse_spec
from seqtune.views import TrialView
from service.store import baselines as service_baselines
from worker.objective import study_baselines
from worker.runner import run_optuna


def test_a_random_walk_gets_the_does_not_beat_the_baseline_verdict() -> None:
    walk = np.cumsum(np.random.default_rng(3).standard_normal(1500)) + 100.0
    frame = pd.DataFrame({"y": walk})
    spec = parse_spec(
        {
            "name": "rw",
            "dataset": {"kind": "uploaded", "id": "ab"},
            "search_space": {},
            "fixed": {"hidden_size": 16, "seq_len": 16, "max_epochs": 6},
        }
    )
    base = study_baselines(spec, frame)
    # Persistence is (within noise) the best classical forecast of a random walk.
    models = base["models"]
    assert models["persistence"]["val"]["rmse"] <= 1.01 * models[base["best"]]["val"]["rmse"]
    r = run_optuna(spec, optuna.create_study().ask(), frame)
    trial = TrialView(
        number=0,
        state="COMPLETE",
        params={},
        value=r.val["val_rmse"],
        info={"val": r.val},
        test_metrics=r.test,
        created_at=datetime.now(UTC),
    )
    v = service_baselines.verdict({**base, "status": "done"}, trial, "forecast")
    assert v is not None and v["beats_baseline"] is False
    assert v["trial_val"] > v["baseline_val"]
    assert "does not beat" in v["message"]
    # Scored on the same targets: the trial's test count is the baselines'.
    assert r.test["test_n_targets"] == base["n_test_targets"]
