"""Datasets and preprocessing: catalog entries true to their loaders, no leakage, right shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seqtune import catalog
from seqtune.spec import SyntheticData
from worker import datasets
from worker.preprocessing import DataError, Scaler, prepare

F = (0.7, 0.15, 0.15)


def test_catalog_entries_describe_what_their_loaders_make() -> None:
    for name, info in catalog.SYNTHETIC.items():
        frame = datasets.generate(SyntheticData(kind="synthetic", generator=name, n_points=300))
        numeric = [c for c in frame.columns if c != "label"]
        assert tuple(numeric) == catalog.synthetic_columns(name, {}), name
        assert ("label" in frame.columns) == ("classify" in info.tasks)
        assert len(frame) == 300
    for name in catalog.BUILTIN:
        frame = datasets.builtin(name)
        assert list(frame.columns) == list(catalog.BUILTIN[name].columns), name
        assert len(frame) == catalog.BUILTIN[name].n_points, name


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


def test_targets_never_cross_into_a_later_split_inputs_may_reach_back() -> None:
    frame = pd.DataFrame({"y": np.arange(1000, dtype=float)})
    L, H = 24, 5
    data = prepare(frame, task="forecast", seq_len=L, horizon=H, fractions=F, scaler="none")
    a, b, c, d = data.bounds
    assert data.test is not None
    for split, lo, hi in [(data.train, a, b), (data.val, b, c), (data.test, c, d)]:
        # With scaler 'none' the values are the series indices: check the tensors themselves.
        xs, ys = split.x.numpy(), split.y.numpy()
        assert ys.min() >= lo and ys.max() < hi  # every target inside its own split
        assert xs.min() >= a and xs.max() < split.origins.max()  # inputs: only the past
        assert np.array_equal(xs[:, -1, 0] + 1, ys[:, 0, 0])  # targets follow the inputs
    # No training target lies in validation or test; validation and test windows reach back.
    assert data.train.y.numpy().max() < b
    assert data.val.x.numpy().min() < b and data.test.x.numpy().min() < c


def test_trials_with_any_seq_len_score_the_same_targets() -> None:
    frame = datasets.builtin("sunspots")
    short = prepare(frame, task="forecast", seq_len=6, horizon=1, fractions=F)
    long = prepare(frame, task="forecast", seq_len=30, horizon=1, fractions=F)
    assert short.test is not None and long.test is not None
    for s, ll in [(short.val, long.val), (short.test, long.test)]:
        assert np.array_equal(s.origins, ll.origins)
        assert s.truth is not None and ll.truth is not None
        assert np.array_equal(s.truth, ll.truth) and s.n_targets == ll.n_targets
    _, b, c, d = short.bounds
    assert short.val.n_targets == c - b and short.test.n_targets == d - c
    # The same targets: persistence scores the same whatever the window.
    assert np.array_equal(short.test.persistence, long.test.persistence)  # type: ignore[arg-type]


@pytest.mark.parametrize("transform", ["none", "diff", "window_norm", "residual"])
def test_target_transforms_invert_exactly_and_fit_on_train(transform: str) -> None:
    co2 = datasets.builtin("co2")
    data = prepare(
        co2, task="forecast", seq_len=20, horizon=3, fractions=F, target_transform=transform
    )
    assert data.test is not None
    for split in (data.val, data.test):
        back = data.to_original(split.y.double().numpy(), split)
        assert np.allclose(back, split.truth, atol=1e-3)  # float32 targets, ppm units
    if transform != "none":
        # The scale comes from the training split alone: later data does not move it.
        _, b, _, _ = data.bounds
        tail = co2.copy()
        tail.loc[b + 50 :, "co2"] += 100.0
        other = prepare(
            tail, task="forecast", seq_len=20, horizon=3, fractions=F, target_transform=transform
        )
        assert np.allclose(other.transform.scale, data.transform.scale)
        # And on a trending series, the network's targets stay in the training range.
        assert abs(float(data.test.y.mean())) < 3


def test_walk_forward_folds_are_chronological_with_their_own_scaler() -> None:
    frame = pd.DataFrame({"y": np.arange(1000, dtype=float) ** 1.5})
    folds = [
        prepare(frame, task="forecast", seq_len=8, horizon=2, fractions=F, fold=(k, 3), gap=4)
        for k in range(3)
    ]
    ends = []
    for k, f in enumerate(folds):
        a, b, c, d = f.bounds
        train_last_target = f.train.origins.max() + 1  # horizon 2
        assert train_last_target < b - 4  # the gap holds
        assert f.val.origins.min() == b and f.val.origins.max() + 1 < c
        # The fold's scaler saw its training part only: fit it again on exactly that.
        expected = Scaler.fit("standard", frame["y"].to_numpy()[: b - 4, None])
        assert np.allclose(f.scaler.shift, expected.shift)
        assert (f.test is not None) == (k == 2)
        ends.append(b)
    assert ends == sorted(ends) and len(set(ends)) == 3
    # The folds' validation blocks tile the hold-out validation split.
    holdout = prepare(frame, task="forecast", seq_len=8, horizon=2, fractions=F)
    assert folds[0].bounds[1] == holdout.bounds[1] and folds[2].bounds[2] == holdout.bounds[2]


def test_missing_values_are_filled_within_their_split() -> None:
    y = np.arange(100, dtype=float)
    y[68:73] = np.nan  # a gap across the train/val boundary at 70
    frame = pd.DataFrame({"y": y})
    data = prepare(frame, task="forecast", seq_len=5, horizon=1, fractions=F, scaler="none")
    # Training's last points are carried from 67, never interpolated towards 73 (validation).
    assert data.train.y.numpy().max() == 67.0
    assert data.val.truth is not None and data.val.truth[0, 0, 0] == 73.0


def test_forecast_shapes_multivariate_multistep() -> None:
    frame = datasets.generate(
        SyntheticData(kind="synthetic", generator="ar", n_points=600, options={"n_series": 4})
    )
    data = prepare(
        frame,
        task="forecast",
        seq_len=16,
        horizon=3,
        fractions=F,
        target=["x0", "x2"],
        features=["x0", "x1", "x2", "x3"],
    )
    assert data.train.x.shape[1:] == (16, 4) and data.train.y.shape[1:] == (3, 2)
    assert data.out_dim == 6 and data.target_idx == [0, 2]
    assert data.test is not None and data.test.persistence is not None
    assert data.test.persistence.shape == data.test.y.shape


def test_targets_outside_the_inputs_are_scaled_too() -> None:
    frame = pd.DataFrame({"a": np.arange(500.0), "b": np.arange(500.0) * 10})
    data = prepare(
        frame, task="forecast", seq_len=5, horizon=1, fractions=F, target=["b"], features=["a"]
    )
    assert data.n_features == 1 and data.targets == ["b"] and data.target_idx == [1]


def test_classify_shapes_and_labels() -> None:
    frame = datasets.generate(SyntheticData(kind="synthetic", generator="waveforms", n_points=2000))
    data = prepare(frame, task="classify", seq_len=20, horizon=1, fractions=F)
    assert data.train.x.shape[1:] == (20, 1) and data.train.y.ndim == 1
    assert data.classes == [0, 1, 2, 3] and data.out_dim == 4
    # The label is the one at each window's last step, and validation scores every label in
    # its split whatever the window length.
    s = data.train
    assert np.array_equal(s.y.numpy(), frame["label"].to_numpy()[s.window_starts + 19])
    _, b, c, _ = data.bounds
    assert data.val.origins.min() == b and data.val.origins.max() == c - 1


def test_missing_values_interpolated_or_dropped() -> None:
    co2 = datasets.builtin("co2")
    assert co2["co2"].isna().sum() == 59
    interp = prepare(co2, task="forecast", seq_len=52, horizon=4, fractions=F)
    assert np.isfinite(interp.train.x.numpy()).all()
    dropped = prepare(co2, task="forecast", seq_len=52, horizon=4, fractions=F, missing="drop")
    assert dropped.bounds[3] == len(co2) - 59


def test_too_short_splits_and_bad_columns_are_clear_errors() -> None:
    frame = pd.DataFrame({"y": np.arange(100.0)})
    with pytest.raises(DataError, match="training split has 70 points"):
        prepare(frame, task="forecast", seq_len=70, horizon=1, fractions=F)
    with pytest.raises(DataError, match="validation split has 15 points"):
        prepare(frame, task="forecast", seq_len=5, horizon=16, fractions=F)
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
