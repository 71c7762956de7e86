"""Leak-free preprocessing: chronological splits, a scaler fit on the training split only, and
windows that never straddle two splits.

The series is cut into train | val | test by the study's fractions. Each split is windowed on
its own, so no window's inputs or targets reach into a neighbouring split: between two splits
lies a gap of ``seq_len + horizon - 1`` points that no window of the later split targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch


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
class Split:
    """One split's windows, already on the training device."""

    x: torch.Tensor  # (N, seq_len, n_features), scaled
    y: torch.Tensor  # forecast: (N, horizon, n_targets) scaled; classify: (N,) class ids
    start: int  # index in the series of the split's first point
    # index in the series of each window's first input point (for leakage checks)
    window_starts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    persistence: torch.Tensor | None = None  # forecast: last observed target, scaled


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
    test: Split
    bounds: tuple[int, int, int, int]  # series index where train, val, test start, and the end

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.task == "classify" else self.horizon * len(self.targets)


def split_bounds(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int, int]:
    n_train = int(round(n * fractions[0]))
    n_val = int(round(n * fractions[1]))
    return 0, n_train, n_train + n_val, n


def _handle_missing(frame: pd.DataFrame, how: str, columns: list[str]) -> pd.DataFrame:
    if how == "drop":
        return frame.dropna(subset=columns).reset_index(drop=True)
    out = frame.copy()
    out[columns] = out[columns].interpolate(method="linear", limit_direction="both")
    return out


def prepare(frame: pd.DataFrame, *, task: str, seq_len: int, horizon: int,
            fractions: tuple[float, float, float], scaler: str = "standard",
            target: list[str] | None = None, features: list[str] | None = None,
            missing: str = "interpolate", device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> Prepared:
    """Turn a time-ordered frame into device-resident windows for train, val and test.

    Forecast: inputs ``features[t : t+seq_len]``, targets ``target[t+seq_len : +horizon]``.
    Classify: inputs the same, the class is the label at the window's last step.
    Raises DataError when a column is unknown or a split is too short for one window.
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
    frame = _handle_missing(frame, missing, cols)
    values = frame[cols].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError("the inputs hold NaN or infinite values after missing-value handling")
    bounds = split_bounds(len(values), fractions)
    a, b, c, d = bounds
    sc = Scaler.fit(scaler, values[a:b])  # training split only: no peeking at val/test
    scaled = sc.transform(values)
    target_idx = [cols.index(t) for t in targets] if task == "forecast" else []
    n_in = len(feats)

    classes: list[Any] = []
    codes = np.empty(0, dtype=np.int64)
    if task == "classify":
        raw = frame[targets[0]].to_numpy()
        classes = sorted(pd.unique(raw[~pd.isna(raw)]).tolist())
        lookup = {v: i for i, v in enumerate(classes)}
        codes = np.array([lookup.get(v, -1) for v in raw], dtype=np.int64)

    def windows(lo: int, hi: int, name: str) -> Split:
        span = seq_len + (horizon if task == "forecast" else 0)
        n = hi - lo - span + 1
        if n < 1:
            raise DataError(f"the {name} split has {hi - lo} points, fewer than seq_len + "
                            f"horizon = {span}; lower seq_len or horizon, or use more data")
        starts = np.arange(lo, lo + n)
        idx = starts[:, None] + np.arange(seq_len)[None, :]
        x = scaled[idx][:, :, :n_in]
        persistence = None
        if task == "forecast":
            tidx = (starts + seq_len)[:, None] + np.arange(horizon)[None, :]
            y = scaled[tidx][:, :, target_idx]
            last = scaled[starts + seq_len - 1][:, target_idx]
            persistence = torch.as_tensor(np.repeat(last[:, None, :], horizon, axis=1),
                                          dtype=dtype, device=device)
            yt = torch.as_tensor(y, dtype=dtype, device=device)
        else:
            labels = codes[starts + seq_len - 1]
            keep = labels >= 0
            x, starts, labels = x[keep], starts[keep], labels[keep]
            yt = torch.as_tensor(labels, dtype=torch.long, device=device)
        return Split(x=torch.as_tensor(x, dtype=dtype, device=device), y=yt, start=lo,
                     window_starts=starts, persistence=persistence)

    return Prepared(task=task, features=feats, targets=targets, seq_len=seq_len,
                    horizon=horizon, scaler=sc, target_idx=target_idx, classes=classes,
                    train=windows(a, b, "train"), val=windows(b, c, "validation"),
                    test=windows(c, d, "test"), bounds=bounds)
