"""The metrics every score in a study uses, trials and baselines alike (numpy only, no torch),
so a trial and a classical baseline are measured by the same arithmetic."""

from __future__ import annotations

import math

import numpy as np


def forecast_errors(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and MAPE (percent, over targets with ``|true| > 1e-8``; NaN when none) over
    whole arrays of the same shape."""
    err = pred - true
    nz = np.abs(true) > 1e-8
    mape = float(np.mean(np.abs(err[nz]) / np.abs(true[nz])) * 100) if nz.any() else math.nan
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "mape": mape,
    }


def macro_f1(pred: np.ndarray, true: np.ndarray, n_classes: int) -> float:
    """Macro F1 over the classes present in ``pred`` or ``true`` (0.0 when none is)."""
    f1s = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0
