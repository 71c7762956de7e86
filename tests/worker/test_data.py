"""Datasets and preprocessing: names in step with the catalog, no leakage, right shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from service import catalog
from service.spec import SyntheticData
from worker import datasets
from worker.preprocessing import DataError, Scaler, prepare

F = (0.7, 0.15, 0.15)


def test_registry_matches_the_catalog() -> None:
    assert set(datasets.BUILTIN) == set(catalog.BUILTIN)
    assert set(datasets.GENERATORS) == set(catalog.SYNTHETIC)
    for name, info in catalog.SYNTHETIC.items():
        frame = datasets.generate(SyntheticData(kind="synthetic", generator=name, n_points=300))
        numeric = [c for c in frame.columns if c != "label"]
        assert tuple(numeric) == catalog.synthetic_columns(name, {}), name
        assert ("label" in frame.columns) == ("classify" in info.tasks)
        assert len(frame) == 300
    assert list(datasets.sunspots().columns) == list(catalog.BUILTIN["sunspots"].columns)
    assert list(datasets.co2().columns) == list(catalog.BUILTIN["co2"].columns)


def test_generators_are_seeded() -> None:
    a = datasets.generate(SyntheticData(kind="synthetic", generator="ar", n_points=200, seed=3))
    b = datasets.generate(SyntheticData(kind="synthetic", generator="ar", n_points=200, seed=3))
    c = datasets.generate(SyntheticData(kind="synthetic", generator="ar", n_points=200, seed=4))
    assert a.equals(b) and not a.equals(c)


def test_scaler_is_fit_on_the_training_split_only() -> None:
    # A series whose later part has a very different level: leakage would show in the stats.
    values = np.concatenate([np.linspace(0, 1, 700), np.linspace(100, 200, 300)])
    frame = pd.DataFrame({"y": values})
    for kind in ("standard", "minmax"):
        data = prepare(frame, task="forecast", seq_len=10, horizon=2, fractions=F, scaler=kind)
        a, b, _, _ = data.bounds
        expected = Scaler.fit(kind, values[a:b, None])
        assert np.allclose(data.scaler.shift, expected.shift)
        assert np.allclose(data.scaler.scale, expected.scale)
        assert data.scaler.shift[0] < 1.0  # nowhere near the val/test level


def test_no_window_reaches_into_another_split() -> None:
    frame = pd.DataFrame({"y": np.arange(1000, dtype=float)})
    L, H = 24, 5
    data = prepare(frame, task="forecast", seq_len=L, horizon=H, fractions=F, scaler="none")
    a, b, c, d = data.bounds
    for split, lo, hi in [(data.train, a, b), (data.val, b, c), (data.test, c, d)]:
        first_input = split.window_starts.min()
        last_target = split.window_starts.max() + L + H - 1
        assert lo <= first_input and last_target < hi
        # With scaler 'none' the values are the series indices: check the tensors themselves.
        xs, ys = split.x.numpy(), split.y.numpy()
        assert xs.min() >= lo and ys.max() < hi
        assert np.array_equal(xs[:, -1, 0] + 1, ys[:, 0, 0])  # targets follow the inputs


def test_forecast_shapes_multivariate_multistep() -> None:
    frame = datasets.generate(SyntheticData(kind="synthetic", generator="ar", n_points=600,
                                            options={"n_series": 4}))
    data = prepare(frame, task="forecast", seq_len=16, horizon=3, fractions=F,
                   target=["x0", "x2"], features=["x0", "x1", "x2", "x3"])
    assert data.train.x.shape[1:] == (16, 4) and data.train.y.shape[1:] == (3, 2)
    assert data.out_dim == 6 and data.target_idx == [0, 2]
    assert data.test.persistence is not None and data.test.persistence.shape == data.test.y.shape


def test_targets_outside_the_inputs_are_scaled_too() -> None:
    frame = pd.DataFrame({"a": np.arange(500.0), "b": np.arange(500.0) * 10})
    data = prepare(frame, task="forecast", seq_len=5, horizon=1, fractions=F,
                   target=["b"], features=["a"])
    assert data.n_features == 1 and data.targets == ["b"] and data.target_idx == [1]


def test_classify_shapes_and_labels() -> None:
    frame = datasets.generate(SyntheticData(kind="synthetic", generator="waveforms",
                                            n_points=2000))
    data = prepare(frame, task="classify", seq_len=20, horizon=1, fractions=F)
    assert data.train.x.shape[1:] == (20, 1) and data.train.y.ndim == 1
    assert data.classes == [0, 1, 2, 3] and data.out_dim == 4
    # The label is the one at each window's last step.
    s = data.train
    assert np.array_equal(s.y.numpy(), frame["label"].to_numpy()[s.window_starts + 19])


def test_missing_values_interpolated_or_dropped() -> None:
    co2 = datasets.co2()
    assert co2["co2"].isna().sum() == 59
    interp = prepare(co2, task="forecast", seq_len=52, horizon=4, fractions=F)
    assert np.isfinite(interp.train.x.numpy()).all()
    dropped = prepare(co2, task="forecast", seq_len=52, horizon=4, fractions=F, missing="drop")
    assert dropped.bounds[3] == len(co2) - 59


def test_too_short_splits_and_bad_columns_are_clear_errors() -> None:
    frame = pd.DataFrame({"y": np.arange(100.0)})
    with pytest.raises(DataError, match="validation split has 15 points"):
        prepare(frame, task="forecast", seq_len=30, horizon=1, fractions=F)
    with pytest.raises(DataError, match="column 'z'"):
        prepare(frame, task="forecast", seq_len=3, horizon=1, fractions=F, target=["z"])


def test_uploads_are_fetched_once_and_cached_by_hash(tmp_path: Path) -> None:
    calls = []
    content = b"y\n1\n2\n3\n"

    def fetch(dataset_id: str) -> tuple[str, bytes]:
        calls.append(dataset_id)
        import hashlib

        return hashlib.sha256(content).hexdigest(), content

    for _ in range(3):
        frame = datasets.cached_upload("abc", tmp_path, fetch)
        assert frame["y"].tolist() == [1, 2, 3]
    assert calls == ["abc"]
    import hashlib

    assert (tmp_path / f"{hashlib.sha256(content).hexdigest()}.csv").exists()
