"""`seqtune predict`'s table, with real trained models: the input's time carried through to
each forecast's time (dates by their inferred frequency, numbers by their constant step, the
row number otherwise), the self-explaining `last_input_row`, class probabilities for
classification, and the columns documented in `--help`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import torch

from seqtune.cli import main
from seqtune.spec import SyntheticData
from worker import datasets
from worker.engine import Hyper, Predictor, TrainConfig, train
from worker.preprocessing import prepare

F = (0.7, 0.15, 0.15)
SEQ_LEN, HORIZON = 8, 2


def _fast(**kw: Any) -> Hyper:
    return Hyper(**{"hidden_size": 8, "max_epochs": 2, "batch_size": 64, **kw})


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = prepare(
        datasets.builtin("sunspots"), task="forecast", seq_len=SEQ_LEN, horizon=HORIZON, fractions=F
    )
    r = train(TrainConfig(hp=_fast(seq_len=SEQ_LEN)), data)
    path = tmp_path_factory.mktemp("models") / "sun.pt"
    torch.save(r.checkpoint, path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = datasets.generate(
        SyntheticData(
            kind="synthetic", generator="waveforms", n_points=800, options={"segment": 40}
        )
    )
    data = prepare(frame, task="classify", seq_len=16, horizon=1, fractions=F)
    r = train(TrainConfig(hp=_fast(), monitor="val_accuracy", direction="maximize"), data)
    path = tmp_path_factory.mktemp("models") / "clf.pt"
    torch.save(r.checkpoint, path)
    return path


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """Run `seqtune predict ARGS --json` in this process: (exit code, rows, stderr)."""
    code = main(["predict", *args, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def test_numeric_years_carry_through(
    forecaster: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the README's recent.csv: the last 30 years, YEAR and SUNACTIVITY
    recent = sm.datasets.sunspots.load_pandas().data.tail(30)
    recent.to_csv(tmp_path / "recent.csv", index=False)
    code, rows, err = _predict(capsys, str(forecaster), "--csv", str(tmp_path / "recent.csv"))
    assert code == 0, err
    assert list(rows[0]) == [
        "last_input_row",
        "YEAR",
        "YEAR_t+1",
        "SUNACTIVITY_t+1",
        "YEAR_t+2",
        "SUNACTIVITY_t+2",
    ]
    assert len(rows) == 30 - SEQ_LEN + 1
    assert [r["last_input_row"] for r in rows] == list(range(SEQ_LEN - 1, 30))
    last = rows[-1]
    assert last["YEAR"] == 2008 and last["YEAR_t+1"] == 2009 and last["YEAR_t+2"] == 2010
    assert all(r["YEAR_t+1"] == r["YEAR"] + 1 for r in rows)
    # the values are the model's forecasts, step by step
    pred = Predictor.load(str(forecaster)).predict(recent)
    got = np.array([[r["SUNACTIVITY_t+1"], r["SUNACTIVITY_t+2"]] for r in rows])
    assert np.allclose(got, pred[:, :, 0])


def test_dates_get_their_frequency_and_irregular_ones_the_row(
    forecaster: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].tail(12).to_numpy()
    monthly = pd.DataFrame(
        {
            "when": pd.date_range("2024-01-01", periods=12, freq="MS").strftime("%Y-%m-%d"),
            "SUNACTIVITY": values,
        }
    )
    monthly.to_csv(tmp_path / "m.csv", index=False)
    code, rows, err = _predict(capsys, str(forecaster), "--csv", str(tmp_path / "m.csv"))
    assert code == 0, err
    assert rows[-1]["when"] == "2024-12-01"  # the input's text, as read
    assert rows[-1]["when_t+1"] == "2025-01-01" and rows[-1]["when_t+2"] == "2025-02-01"
    assert rows[0]["last_input_row"] == SEQ_LEN - 1 and rows[0]["when_t+1"] == "2024-09-01"

    hourly = monthly.assign(
        when=pd.date_range("2024-03-30 22:00", periods=12, freq="h").strftime("%Y-%m-%d %H:%M")
    )
    hourly.to_csv(tmp_path / "h.csv", index=False)
    code, rows, err = _predict(capsys, str(forecaster), "--csv", str(tmp_path / "h.csv"))
    assert code == 0, err
    assert rows[-1]["when_t+1"] == "2024-03-31T10:00:00"

    gappy = monthly.drop(index=[3])  # a missing month: no frequency to infer
    gappy.to_csv(tmp_path / "g.csv", index=False)
    code, rows, err = _predict(capsys, str(forecaster), "--csv", str(tmp_path / "g.csv"))
    assert code == 0, err
    assert list(rows[0]) == [
        "last_input_row",
        "when",
        "row_t+1",
        "SUNACTIVITY_t+1",
        "row_t+2",
        "SUNACTIVITY_t+2",
    ]
    assert rows[-1]["last_input_row"] == 10 and rows[-1]["row_t+2"] == 12

    bare = monthly[["SUNACTIVITY"]]
    bare.to_csv(tmp_path / "b.csv", index=False)
    code, rows, err = _predict(capsys, str(forecaster), "--csv", str(tmp_path / "b.csv"))
    assert code == 0 and list(rows[0])[:3] == ["last_input_row", "row_t+1", "SUNACTIVITY_t+1"]

    # --time-column names it; a column that is not there is bad input
    renamed = monthly.rename(columns={"when": "stamp"}).assign(idx=range(12))
    renamed.to_csv(tmp_path / "r.csv", index=False)
    args = (str(forecaster), "--csv", str(tmp_path / "r.csv"))
    code, rows, err = _predict(capsys, *args, "--time-column", "idx")
    assert code == 0, err
    assert rows[-1]["idx"] == 11 and rows[-1]["idx_t+1"] == 12
    code, _, err = _predict(capsys, *args, "--time-column", "nope")
    assert code == 2 and "has no column 'nope'" in err


def test_classification_gives_each_class_probability(
    classifier: Path, forecaster: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = datasets.generate(
        SyntheticData(
            kind="synthetic", generator="waveforms", n_points=120, seed=5, options={"segment": 40}
        )
    )
    frame.to_csv(tmp_path / "w.csv", index=False)
    predictor = Predictor.load(str(classifier))
    classes = [str(c) for c in predictor.ckpt["classes"]]
    code, rows, err = _predict(capsys, str(classifier), "--csv", str(tmp_path / "w.csv"))
    assert code == 0, err
    assert list(rows[0]) == ["last_input_row", "label", *(f"p_{c}" for c in classes)]
    p = np.array([[r[f"p_{c}"] for c in classes] for r in rows])
    assert np.allclose(p.sum(axis=1), 1.0) and (p > 0).all()
    assert np.allclose(p, predictor.predict_proba(frame))
    # the label is the most probable class, as Predictor.predict says
    assert [r["label"] for r in rows] == predictor.predict(frame).tolist()
    assert [str(r["label"]) for r in rows] == [classes[i] for i in p.argmax(axis=1)]
    with pytest.raises(ValueError, match="classification model"):
        Predictor.load(str(forecaster)).predict_proba(frame)


def test_help_documents_the_columns(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["predict", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for words in ("last_input_row", "<time>_t+h", "row_t+h", "<target>_t+h", "p_<class>"):
        assert words in out, words
    assert "--time-column" in out
