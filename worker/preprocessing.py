"""Leak-free preprocessing: chronological splits, fixed evaluation targets, a scaler fit on the
training split only, and target transforms for trending series.

The series is cut into train | val | test by the study's fractions, at ``bounds = (0, b, c, d)``.
What each split scores is fixed by the study, not by the trial:

- a *forecast origin* ``t0`` is the first time step a window predicts; the window's inputs are
  ``[t0 - seq_len, t0)`` and its targets ``[t0, t0 + horizon)``;
- validation scores every origin in ``[b, c - horizon]`` and test every origin in
  ``[c, d - horizon]``, whatever the trial's seq_len: a window's inputs may reach back into
  earlier splits (the past is known at forecast time), its targets never cross into a later one;
- training windows have inputs and targets inside the training split (minus ``gap`` points
  before validation, for walk-forward folds).

Classification scores the label at a window's last input step, with the same rules.

Target transforms (the ``target_transform`` hyperparameter) change what the network sees for the
target columns, and are inverted before any metric in original units:

- ``none``: scaled levels in, scaled levels out;
- ``diff``: first differences in and out, integrated back from the last observed value;
- ``window_norm``: each window relative to its last observed value, in and out;
- ``residual``: levels in, the change from the last observed value out (the head predicts a
  residual to persistence).
Differences and relative values are divided by a scale fit on the training split only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

TRANSFORMS = ("none", "diff", "window_norm", "residual")


class DataError(ValueError):
    """The data cannot feed this trial (too short for the window, no such column, ...)."""


@dataclass
class Scaler:
    """Per-column affine scaling ``(x - shift) / scale``, fit on the training split only."""

    kind: str
    shift: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, kind: str, train: np.ndarray) -> Scaler:
        if kind == "standard":
            shift, scale = train.mean(axis=0), train.std(axis=0)
        elif kind == "minmax":
            shift, scale = train.min(axis=0), train.max(axis=0) - train.min(axis=0)
        elif kind == "none":
            shift, scale = np.zeros(train.shape[1]), np.ones(train.shape[1])
        else:
            raise ValueError(f"unknown scaler {kind}")
        scale = np.where(scale > 1e-12, scale, 1.0)  # a constant column stays finite
        return cls(kind, shift.astype(np.float64), scale.astype(np.float64))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.shift) / self.scale

    def inverse(self, x: np.ndarray, cols: list[int] | slice = slice(None)) -> np.ndarray:
        return x * self.scale[cols] + self.shift[cols]

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> Scaler:
        return cls(s["kind"], np.asarray(s["shift"]), np.asarray(s["scale"]))


@dataclass
class TargetTransform:
    """How the target columns are presented to the network, and how its output is inverted.

    ``scale`` (one per target) divides differences or relative values so they are of unit
    size; it is fit on the training split only. ``input_cols`` are the positions, among the
    input features, of columns that are targets (``input_targets`` their target index): those
    inputs are transformed too, so the network sees the same kind of values it predicts.
    """

    kind: str = "none"
    scale: np.ndarray = field(default_factory=lambda: np.ones(1))
    input_cols: list[int] = field(default_factory=list)
    input_targets: list[int] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "scale": self.scale.tolist(),
            "input_cols": self.input_cols,
            "input_targets": self.input_targets,
        }

    @classmethod
    def from_state(cls, s: dict[str, Any] | None) -> TargetTransform:
        if s is None:  # checkpoints from before transforms existed
            return cls()
        return cls(
            s["kind"],
            np.asarray(s["scale"], dtype=np.float64),
            list(s["input_cols"]),
            list(s["input_targets"]),
        )

    def inputs(
        self, z: np.ndarray, origins: np.ndarray, seq_len: int, n_in: int, target_idx: list[int]
    ) -> np.ndarray:
        """The network's input windows ``(N, seq_len, n_in)`` for forecast ``origins`` from
        the scaled series ``z`` (all columns). Reads only ``z[origin - seq_len : origin]``
        (and, for ``diff``, the point before the window)."""
        idx = (origins - seq_len)[:, None] + np.arange(seq_len)[None, :]
        x = z[idx][:, :, :n_in].copy()
        if self.kind in ("none", "residual") or not self.input_cols:
            return x
        for col, t in zip(self.input_cols, self.input_targets, strict=True):
            level = z[:, target_idx[t]]
            if self.kind == "diff":
                d = np.diff(level, prepend=level[:1])  # no point before the series: 0
                x[:, :, col] = d[idx]
            else:  # window_norm: relative to the window's last observed value
                x[:, :, col] = level[idx] - level[origins - 1][:, None]
            x[:, :, col] /= self.scale[t]
        return x

    def targets(
        self, z: np.ndarray, origins: np.ndarray, horizon: int, target_idx: list[int]
    ) -> np.ndarray:
        """What the network is trained to output, ``(N, horizon, n_targets)``."""
        tidx = origins[:, None] + np.arange(horizon)[None, :]
        y = z[tidx][:, :, target_idx]
        if self.kind == "none":
            return y
        if self.kind == "diff":
            y = y - z[tidx - 1][:, :, target_idx]
        else:  # window_norm, residual: the change from the last observed value
            y = y - z[origins - 1][:, None, target_idx]
        return y / self.scale

    def invert(self, out: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        """Network output ``(N, horizon, n_targets)`` back to scaled levels, given each
        window's last observed scaled level ``anchor`` ``(N, n_targets)``."""
        if self.kind == "none":
            return out
        out = out * self.scale
        if self.kind == "diff":
            out = np.cumsum(out, axis=1)
        return out + anchor[:, None, :]


@dataclass
class Split:
    """One split's windows, already on the training device."""

    x: torch.Tensor  # (N, seq_len, n_features), scaled (and transformed)
    y: torch.Tensor  # forecast: (N, horizon, n_targets) in the network's space; classify: (N,)
    start: int  # index in the series of the split's first point
    # index in the series of each window's first input point (for leakage checks)
    window_starts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # forecast: each window's first target time (fixed per study); classify: the label's time
    origins: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    anchor: np.ndarray | None = None  # forecast: last observed scaled level (N, n_targets)
    truth: np.ndarray | None = None  # forecast: targets in original units (N, horizon, n_t)
    persistence: np.ndarray | None = None  # forecast: last value carried forward, original

    @property
    def n_targets(self) -> int:
        """How many forecast origins (or labels) the split scores."""
        return len(self.origins)


@dataclass
class Prepared:
    task: str
    features: list[str]
    targets: list[str]
    seq_len: int
    horizon: int
    scaler: Scaler
    target_idx: list[int]  # positions of the targets within the scaled columns
    classes: list[Any]
    train: Split
    val: Split
    test: Split | None
    bounds: tuple[int, int, int, int]  # series index where train, val, test start, and the end
    transform: TargetTransform = field(default_factory=TargetTransform)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.task == "classify" else self.horizon * len(self.targets)

    def to_original(self, out: np.ndarray, split: Split) -> np.ndarray:
        """Network output for a split's windows, in the data's original units."""
        assert split.anchor is not None
        return self.scaler.inverse(self.transform.invert(out, split.anchor), self.target_idx)


def split_bounds(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int, int]:
    n_train = int(round(n * fractions[0]))
    n_val = int(round(n * fractions[1]))
    return 0, n_train, n_train + n_val, n


def fold_bounds(
    bounds: tuple[int, int, int, int], k: int, n_folds: int
) -> tuple[int, int, int, int]:
    """Walk-forward fold ``k`` of ``n_folds``: the validation region ``[b, c)`` is cut into
    ``n_folds`` consecutive blocks; fold k trains on everything before block k and validates
    on it. Only the last fold keeps the test split (``c == d`` means none)."""
    a, b, c, d = bounds
    edges = [b + (c - b) * i // n_folds for i in range(n_folds + 1)]
    if k == n_folds - 1:
        return a, edges[k], c, d
    return a, edges[k], edges[k + 1], edges[k + 1]


def fill_missing(
    frame: pd.DataFrame, how: str, columns: list[str], fractions: tuple[float, float, float]
) -> pd.DataFrame:
    """Drop rows with a missing value, or interpolate within each split: a gap is never filled
    from the other side of a split boundary (that would carry later values into earlier
    splits)."""
    if how == "drop":
        return frame.dropna(subset=columns).reset_index(drop=True)
    out = frame.copy()
    _, b, c, d = split_bounds(len(out), fractions)
    for lo, hi in ((0, b), (b, c), (c, d)):
        part = out.loc[lo : hi - 1, columns]
        out.loc[lo : hi - 1, columns] = part.interpolate(method="linear", limit_direction="both")
    return out


def fit_transform(
    kind: str,
    z: np.ndarray,
    train_end: int,
    seq_len: int,
    horizon: int,
    target_idx: list[int],
    n_in: int,
) -> TargetTransform:
    """A target transform whose scale is fit on the training split ``[0, train_end)`` only."""
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown target_transform {kind}")
    input_cols = [i for i in range(n_in) if i in target_idx]
    input_targets = [target_idx.index(i) for i in input_cols]
    t = TargetTransform(kind, np.ones(len(target_idx)), input_cols, input_targets)
    if kind == "none":
        return t
    origins = np.arange(max(seq_len, 1), train_end - horizon + 1)
    y = t.targets(z, origins, horizon, target_idx)  # scale 1 so far
    scale = y.reshape(-1, len(target_idx)).std(axis=0)
    t.scale = np.where(scale > 1e-8, scale, 1.0)
    return t


def prepare(
    frame: pd.DataFrame,
    *,
    task: str,
    seq_len: int,
    horizon: int,
    fractions: tuple[float, float, float],
    scaler: str = "standard",
    target: list[str] | None = None,
    features: list[str] | None = None,
    missing: str = "interpolate",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    target_transform: str = "none",
    fold: tuple[int, int] | None = None,
    gap: int = 0,
) -> Prepared:
    """Turn a time-ordered frame into device-resident windows for train, val and test.

    Forecast: inputs ``features[t0-seq_len : t0]``, targets ``target[t0 : t0+horizon]`` for the
    fixed origins described in the module docstring. Classify: the class is the label at the
    window's last step. ``fold = (k, K)`` makes walk-forward fold k of K (``fold_bounds``); then
    ``gap`` keeps training targets that many points before the fold's validation block.
    Raises DataError when a column is unknown or a split is too short.
    """
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    if task == "classify":
        label = (target or ["label"])[0]
        if label not in frame.columns:
            raise DataError(f"no label column '{label}'")
        targets = [label]
        feats = features or [c for c in numeric if c != label]
    else:
        targets = target or numeric[:1]
        feats = features or numeric
    for col in [*feats, *(targets if task == "forecast" else [])]:
        if col not in numeric:
            raise DataError(f"column '{col}' is missing or not numeric")
    if not feats:
        raise DataError("no numeric input column")

    # Inputs and forecast targets share one scaled block: columns = feats + extra targets.
    cols = list(dict.fromkeys([*feats, *(targets if task == "forecast" else [])]))
    frame = fill_missing(frame, missing, cols, fractions)
    values = frame[cols].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError("the inputs hold NaN or infinite values after missing-value handling")
    a, b, c, d = split_bounds(len(values), fractions)
    if fold is not None:
        a, b, c, d = fold_bounds((a, b, c, d), *fold)
        if c - b < max(horizon, 1) + 1:
            raise DataError(
                f"walk-forward fold {fold[0]} validates on {c - b} points; use "
                "fewer folds or a larger validation split"
            )
    train_end = b - gap
    sc = Scaler.fit(scaler, values[a:train_end])  # training split only: no peeking at val/test
    z = sc.transform(values)
    target_idx = [cols.index(t) for t in targets] if task == "forecast" else []
    n_in = len(feats)
    H = horizon if task == "forecast" else 0
    need = seq_len + max(H, 1)
    if train_end - a < need:
        raise DataError(
            f"the training split has {train_end - a} points, fewer than seq_len + "
            f"horizon = {need}; lower seq_len or horizon, or use more data"
        )

    classes: list[Any] = []
    codes = np.empty(0, dtype=np.int64)
    tf = TargetTransform()
    if task == "classify":
        raw = frame[targets[0]].to_numpy()
        classes = sorted(pd.unique(raw[~pd.isna(raw)]).tolist())
        lookup = {v: i for i, v in enumerate(classes)}
        codes = np.array([lookup.get(v, -1) for v in raw], dtype=np.int64)
    else:
        tf = fit_transform(target_transform, z, train_end, seq_len, horizon, target_idx, n_in)

    def windows(first: int, last: int, name: str, span: int) -> Split:
        """Windows whose origin (forecast) or label time + 1 (classify) lies in [first, last]."""
        if last < first:
            raise DataError(
                f"the {name} split has {span} points, fewer than the horizon "
                f"({max(H, 1)}); lower the horizon or use more data"
            )
        origins = np.arange(first, last + 1)
        x = tf.inputs(z, origins, seq_len, n_in, target_idx)
        starts = origins - seq_len
        if task == "classify":
            labels = codes[origins - 1]
            keep = labels >= 0
            return Split(
                x=torch.as_tensor(x[keep], dtype=dtype, device=device),
                y=torch.as_tensor(labels[keep], dtype=torch.long, device=device),
                start=first,
                window_starts=starts[keep],
                origins=origins[keep] - 1,
            )
        tidx = origins[:, None] + np.arange(H)[None, :]
        truth = values[tidx][:, :, target_idx]
        last_seen = values[origins - 1][:, target_idx]
        return Split(
            x=torch.as_tensor(x, dtype=dtype, device=device),
            y=torch.as_tensor(tf.targets(z, origins, H, target_idx), dtype=dtype, device=device),
            start=first,
            window_starts=starts,
            origins=origins,
            anchor=z[origins - 1][:, target_idx],
            truth=truth,
            persistence=np.repeat(last_seen[:, None, :], H, axis=1),
        )

    # Forecast: origins t0, targets [t0, t0 + H). Classify: "origin" = label time + 1.
    if H:
        spans = [(a + seq_len, train_end - H), (b, c - H), (c, d - H)]
    else:
        spans = [(a + seq_len, train_end), (b + 1, c), (c + 1, d)]
    train = windows(*spans[0], "training", train_end - a)
    val = windows(*spans[1], "validation", c - b)
    test = windows(*spans[2], "test", d - c) if d > c else None
    return Prepared(
        task=task,
        features=feats,
        targets=targets,
        seq_len=seq_len,
        horizon=horizon,
        scaler=sc,
        target_idx=target_idx,
        classes=classes,
        train=train,
        val=val,
        test=test,
        bounds=(a, b, c, d),
        transform=tf,
    )
