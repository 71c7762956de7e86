"""Classical baselines a tuned LSTM is compared with, computed once per study.

Contract (forecast): :func:`forecast_baselines` scores every model on exactly the evaluation
targets an LSTM is scored on. With ``bounds = (0, b, c, d)`` the validation origins are
``t0 in range(b, c - H + 1)`` and the test origins ``t0 in range(c, d - H + 1)``; from each
origin a model forecasts ``values[t0 : t0 + H]`` (every target column) from the actual history
``values[:t0]`` alone, earlier splits included, never ``values[t0:]``. Parameters are frozen:
fitted on ``values[:b]`` for the validation forecasts and refitted once on ``values[:c]`` for
the test forecasts. Each column is modelled on its own (univariate). Metrics are those of
``worker.metrics.forecast_errors`` (rmse, mae, mape in percent) over the whole
``(origins, H, targets)`` array, plus ``mase`` (mae over the mean absolute one-step change of
the training split). The result is plain JSON (floats, ints, strings, lists; ``None`` for a
non-finite number); a model that cannot be fitted is left out and named under ``"skipped"``.

``params`` of a model holds its training fit (the one behind the validation forecasts) and,
under ``"refit"``, its train+val fit (behind the test forecasts); with several target
columns it is ``{"targets": [one such dict per column]}``.

Contract (classify): :func:`classify_baselines` scores a majority-class model and an
L2-regularised multinomial logistic regression on the flattened windows, with the engine's
accuracy, macro F1 and mean cross-entropy.

numpy, scipy and statsmodels only: this module never imports torch.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.optimize import minimize
from statsmodels.tsa.holtwinters import ExponentialSmoothing
from statsmodels.tsa.stattools import acf

from worker.metrics import forecast_errors, macro_f1

# (forecasts of shape (n_origins, horizon), params): one model, one column, one fit.
_Forecaster = Callable[
    [np.ndarray, int, np.ndarray, int, int | None], tuple[np.ndarray, dict[str, Any]]
]

_ACF_MIN = 0.3  # a season's autocorrelation must clear this to count as one


# ---- season ---------------------------------------------------------------------------------


def _peak_near(a: np.ndarray, centre: int, tol: int, floor: float) -> bool:
    """Whether ``a`` has a local maximum >= floor within ``centre +- tol`` (lags >= 2)."""
    lo, hi = max(2, centre - tol), min(len(a) - 2, centre + tol)
    return any(a[k] >= floor and a[k] >= a[k - 1] and a[k] >= a[k + 1] for k in range(lo, hi + 1))


def detect_season(y: np.ndarray, max_lag: int | None = None) -> int | None:
    """The seasonal period of ``y`` (a training series), or None when there is none.

    The autocorrelation of the first differences (differencing removes the trend, which would
    otherwise dominate every lag) over lags 2..min(len // 3, max_lag or 400): its highest
    value must be a local maximum above 0.3. A seasonal ACF repeats at every multiple of the
    period with nearly equal height, so on noisy data the highest peak is often a multiple
    (co2 weekly peaks at 156 = 3 x 52); the lag k is therefore divided by the largest j for
    which the ACF also peaks at every i*k/j (i < j, within 5% of the lag) at a height
    statistically indistinguishable from the top one (within two standard errors,
    2/sqrt(n), and at least half of it)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    n_lags = min(len(y) // 3, 400 if max_lag is None else max_lag)
    if n_lags < 2 or len(y) < 8:
        return None
    dy = np.diff(y)
    if not np.isfinite(dy).all() or np.ptp(dy) == 0:
        return None
    a = acf(dy, nlags=n_lags + 1, fft=True)  # one lag more, to see whether n_lags is a peak
    k = int(np.argmax(a[2 : n_lags + 1])) + 2
    if not (a[k] > _ACF_MIN and a[k] >= a[k - 1] and a[k] >= a[k + 1]):
        return None
    floor = max(0.5 * a[k], a[k] - 2 / np.sqrt(len(dy)))
    for j in range(k // 2, 1, -1):
        period = k / j
        if all(
            _peak_near(a, round(i * period), round(0.05 * i * period), floor) for i in range(1, j)
        ):
            return round(period)
    return k


# ---- metrics --------------------------------------------------------------------------------


def _num(x: float) -> float | None:
    """A JSON-safe float: None for NaN or infinity."""
    x = float(x)
    return x if math.isfinite(x) else None


def _forecast_metrics(pred: np.ndarray, true: np.ndarray, scale: float) -> dict[str, Any]:
    e = forecast_errors(pred, true)
    return {k: _num(v) for k, v in {**e, "mase": e["mae"] / scale}.items()}


# ---- forecast models (one column y, fitted on y[:fit_end], forecasts from each origin) ------


def _persistence(
    y: np.ndarray, fit_end: int, origins: np.ndarray, h: int, m: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    return np.repeat(y[origins - 1][:, None], h, axis=1), {}


def _seasonal_naive(
    y: np.ndarray, fit_end: int, origins: np.ndarray, h: int, m: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    assert m is not None
    steps = np.arange(h)
    # Step s repeats the last observed value of the same phase: always strictly before t0.
    return y[origins[:, None] + steps - m * (steps // m + 1)], {"season": m}


def _mean(
    y: np.ndarray, fit_end: int, origins: np.ndarray, h: int, m: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    mu = float(np.mean(y[:fit_end]))
    return np.full((len(origins), h), mu), {"mean": mu}


def _ets(
    y: np.ndarray, fit_end: int, origins: np.ndarray, h: int, m: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    seasonal = m is not None and fit_end >= 2 * m
    with warnings.catch_warnings():  # convergence chatter; a bad fit is caught below
        warnings.simplefilter("ignore")
        model = ExponentialSmoothing(
            y[:fit_end],
            trend="add",
            damped_trend=True,
            seasonal="add" if seasonal else None,
            seasonal_periods=m if seasonal else None,
            initialization_method="estimated",
        )
        p = model.fit().params
    alpha, beta, phi = p["smoothing_level"], p["smoothing_trend"], p["damping_trend"]
    gamma = p["smoothing_seasonal"] if seasonal else 0.0
    period = m if seasonal and m is not None else 1
    n = len(y)
    # State after observing y[:t]: level[t], trend[t]; season[t + period] is the seasonal
    # term updated at time t (season[:period] are the initial ones). statsmodels' recursion,
    # run with the frozen parameters over the whole series: O(n) for every origin at once.
    level, trend = np.empty(n + 1), np.empty(n + 1)
    season = np.zeros(n + period)
    level[0], trend[0] = p["initial_level"], p["initial_trend"]
    if seasonal:
        season[:period] = p["initial_seasons"]
    for t in range(n):
        prev = level[t] + phi * trend[t]
        level[t + 1] = alpha * (y[t] - season[t]) + (1 - alpha) * prev
        trend[t + 1] = beta * (level[t + 1] - level[t]) + (1 - beta) * phi * trend[t]
        season[t + period] = gamma * (y[t] - prev) + (1 - gamma) * season[t]
    steps = np.arange(1, h + 1)
    damp = np.cumsum(phi**steps)  # phi + phi^2 + ... + phi^s
    phase = origins[:, None] + steps - 1 - period * ((steps - 1) // period)
    pred = level[origins][:, None] + damp * trend[origins][:, None] + season[phase]
    params = {
        "alpha": float(alpha),
        "beta": float(beta),
        "phi": float(phi),
        "gamma": float(gamma) if seasonal else None,
        "season": m if seasonal else None,
    }
    return pred, params


def _ar_max_order(fit_len: int, m: int | None) -> int:
    max_p = min(60, fit_len // 4)
    if m is not None and m <= 60:
        # Lag m+1 lets an AR model carry a season forward; allow it while the sample holds
        # at least three points per coefficient.
        max_p = max(max_p, min(m + 1, (fit_len - 1) // 3))
    return max(1, max_p)


def _fit_ar(z: np.ndarray, max_p: int) -> tuple[float, np.ndarray]:
    """AR(p) with a constant by least squares, p in 1..max_p by AIC: (const, coefficients)."""
    rows = len(z) - max_p
    if rows < max_p + 2:
        raise ValueError(f"{len(z)} points are too few for AR order selection")
    # Every order is compared on the same sample (rows max_p..): AICs of different samples
    # are not comparable. Column k of lags is z[t-1-k]. One QR of the largest design gives
    # every nested model's residual sum of squares at once.
    lags = sliding_window_view(z, max_p)[:rows, ::-1]
    design = np.column_stack([np.ones(rows), lags])
    target = z[max_p:]
    q, _ = np.linalg.qr(design)
    qty = q.T @ target
    rss_full = float(np.sum((target - q @ qty) ** 2))
    tail = np.cumsum((qty**2)[::-1])[::-1]  # tail[k] = sum of qty[k:]**2
    orders = np.arange(1, max_p + 1)
    rss = rss_full + np.append(tail[orders[:-1] + 1], 0.0)
    aic = rows * np.log(np.maximum(rss, 1e-300) / rows) + 2 * (orders + 1)
    p = int(orders[np.argmin(aic)])
    # Refit the chosen order on every row it can use.
    lags = sliding_window_view(z, p)[: len(z) - p, ::-1]
    coef, *_ = np.linalg.lstsq(np.column_stack([np.ones(len(lags)), lags]), z[p:], rcond=None)
    return float(coef[0]), coef[1:]


def _ar_recursive(
    z: np.ndarray, origins: np.ndarray, h: int, const: float, coef: np.ndarray
) -> np.ndarray:
    """h-step recursive AR forecasts of z[t0:t0+h] from z[:t0], for all origins at once."""
    p = len(coef)
    hist = z[origins[:, None] - 1 - np.arange(p)]  # column k: z[t0-1-k]
    out = np.empty((len(origins), h))
    for s in range(h):
        out[:, s] = const + hist @ coef
        hist = np.column_stack([out[:, s], hist[:, :-1]])
    return out


def _ar_params(const: float, coef: np.ndarray) -> dict[str, Any]:
    return {"p": len(coef), "const": const, "coef": [float(v) for v in coef]}


def _ar(
    y: np.ndarray, fit_end: int, origins: np.ndarray, h: int, m: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    const, coef = _fit_ar(y[:fit_end], _ar_max_order(fit_end, m))
    return _ar_recursive(y, origins, h, const, coef), _ar_params(const, coef)


def _arima(
    y: np.ndarray, fit_end: int, origins: np.ndarray, h: int, m: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    # ARIMA(p,1,0): AR on dy[t] = y[t+1] - y[t]; the constant becomes a drift. From origin
    # t0 the known differences are dy[:t0-1]; the forecast differences are summed back onto
    # the last level y[t0-1].
    dy = np.diff(y)
    const, coef = _fit_ar(dy[: fit_end - 1], _ar_max_order(fit_end - 1, m))
    steps = _ar_recursive(dy, origins - 1, h, const, coef)
    params = {"order": [len(coef), 1, 0], **_ar_params(const, coef)}
    return y[origins - 1][:, None] + np.cumsum(steps, axis=1), params


_MODELS: dict[str, _Forecaster] = {
    "persistence": _persistence,
    "seasonal_naive": _seasonal_naive,
    "mean": _mean,
    "ets": _ets,
    "ar": _ar,
    "arima": _arima,
}


# ---- forecast driver ------------------------------------------------------------------------


def _check(values: np.ndarray, bounds: tuple[int, int, int, int], horizon: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2:
        raise ValueError(f"values must be (n, n_targets), got shape {v.shape}")
    a, b, c, d = (int(x) for x in bounds)
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if a != 0 or d != len(v) or not a <= b <= c <= d:
        raise ValueError(f"bounds {tuple(bounds)} do not split {len(v)} points as (0, b, c, n)")
    if b < 3:
        raise ValueError(f"the training split has {b} points; at least 3 are needed")
    for name, lo, hi in (("validation", b, c), ("test", c, d)):
        if hi - lo < horizon:
            raise ValueError(
                f"the {name} split has {hi - lo} points, fewer than the horizon "
                f"{horizon}: no forecast target in it"
            )
    if not np.isfinite(v).all():
        raise ValueError("values hold NaN or infinite entries; fill them first")
    return v


def _resolve_season(v: np.ndarray, b: int, season: int | None) -> int | None:
    if season is None:
        return detect_season(v[:b, 0])
    return int(season) if season >= 2 else None  # 0 or 1: explicitly no season


def _forecast_arrays(
    values: np.ndarray, bounds: tuple[int, int, int, int], horizon: int, season: int | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, str], int | None]:
    """Every model's forecasts: ``({name: {"val": (N_val, H, T), "test": (N_test, H, T),
    "params": ...}}, skipped, season)``. The engine behind :func:`forecast_baselines`."""
    v = _check(values, bounds, horizon)
    _, b, c, d = (int(x) for x in bounds)
    m = _resolve_season(v, b, season)
    splits = {"val": (b, np.arange(b, c - horizon + 1)), "test": (c, np.arange(c, d - horizon + 1))}
    models: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name, fn in _MODELS.items():
        if name == "seasonal_naive" and (m is None or b <= m):
            skipped[name] = "no season" if m is None else f"training split <= season {m}"
            continue
        try:
            preds: dict[str, list[np.ndarray]] = {"val": [], "test": []}
            fits: dict[str, list[dict[str, Any]]] = {"val": [], "test": []}
            for col in range(v.shape[1]):
                for split, (fit_end, origins) in splits.items():
                    pred, params = fn(v[:, col], fit_end, origins, horizon, m)
                    if not np.isfinite(pred).all():
                        raise ValueError(f"non-finite forecasts for column {col} ({split})")
                    preds[split].append(pred)
                    fits[split].append(params)
        except Exception as exc:  # a baseline that cannot be fitted is dropped, not fatal
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        per_col = [
            {**fv, "refit": ft} if fv or ft else {}
            for fv, ft in zip(fits["val"], fits["test"], strict=True)
        ]
        models[name] = {
            "val": np.stack(preds["val"], axis=-1),
            "test": np.stack(preds["test"], axis=-1),
            "params": per_col[0] if len(per_col) == 1 else {"targets": per_col},
        }
    return models, skipped, m


def _targets(v: np.ndarray, lo: int, hi: int, horizon: int) -> np.ndarray:
    origins = np.arange(lo, hi - horizon + 1)
    return v[origins[:, None] + np.arange(horizon)]  # (N, H, T)


def forecast_baselines(
    values: np.ndarray,
    bounds: tuple[int, int, int, int],
    horizon: int,
    *,
    season: int | None = None,
) -> dict[str, Any]:
    """Score persistence, seasonal naive, mean, damped Holt-Winters (ets), AR(p) and
    ARIMA(p,1,0) on the study's validation and test targets (see the module docstring).

    ``values`` is (n, n_targets) in original units, time-ordered and filled; ``bounds`` is
    ``(0, b, c, n)``. ``season`` is the seasonal period (detected on the first column's
    training split when None; 0 or 1 turns seasonality off). ``best`` is the model with the
    lowest validation RMSE. Raises ValueError on an empty split or fewer than 3 training
    points."""
    t_start = time.perf_counter()
    v = _check(values, bounds, horizon)
    _, b, c, d = (int(x) for x in bounds)
    models, skipped, m = _forecast_arrays(v, bounds, horizon, season)
    # MASE's scale: the in-sample one-step naive error of the training split, all columns.
    scale = max(float(np.mean(np.abs(np.diff(v[:b], axis=0)))), 1e-12)
    true = {"val": _targets(v, b, c, horizon), "test": _targets(v, c, d, horizon)}
    out_models: dict[str, dict[str, Any]] = {}
    for name, res in models.items():
        out_models[name] = {
            split: _forecast_metrics(res[split], true[split], scale) for split in ("val", "test")
        }
        out_models[name]["params"] = res["params"]
    ranked = [
        (r["val"]["rmse"], name) for name, r in out_models.items() if r["val"]["rmse"] is not None
    ]
    return {
        "task": "forecast",
        "horizon": int(horizon),
        "season": m,
        "n_val_targets": int(true["val"].shape[0]),
        "n_test_targets": int(true["test"].shape[0]),
        "mase_scale": scale,
        "models": out_models,
        "best": min(ranked)[1] if ranked else None,
        "skipped": skipped,
        "seconds": time.perf_counter() - t_start,
    }


# ---- classification -------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _class_metrics(log_p: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, Any]:
    pred = log_p.argmax(axis=1)
    return {
        "accuracy": float(np.mean(pred == y)),
        "f1": macro_f1(pred, y, n_classes),
        "loss": _num(-np.mean(log_p[np.arange(len(y)), y])),
    }


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Multinomial logistic regression, mean cross-entropy + l2/2 |W|^2 (bias unpenalised),
    by L-BFGS with the analytic gradient: (W, bias, iterations)."""
    n, dim = x.shape
    onehot = np.eye(n_classes)[y]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, bias = theta[: dim * n_classes].reshape(dim, n_classes), theta[dim * n_classes :]
        log_p = _log_softmax(x @ w + bias)
        loss = -float(np.sum(log_p * onehot)) / n + 0.5 * l2 * float(np.sum(w * w))
        resid = (np.exp(log_p) - onehot) / n
        grad = np.concatenate([(x.T @ resid + l2 * w).ravel(), resid.sum(axis=0)])
        return loss, grad

    res = minimize(
        objective,
        np.zeros(dim * n_classes + n_classes),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter},
    )
    theta = res.x
    return (
        theta[: dim * n_classes].reshape(dim, n_classes),
        theta[dim * n_classes :],
        int(res.nit),
    )


def classify_baselines(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_classes: int,
) -> dict[str, Any]:
    """Score a majority-class model and multinomial logistic regression on val and test.

    Each split is ``(x, y)``: x (N, L, F) scaled input windows, y (N,) class ids in
    0..n_classes-1. ``majority`` predicts the most frequent training class and, for the loss,
    the training class frequencies (floored at 1e-7); ``logistic`` is fitted on the flattened
    training windows (L2 1e-3 on the mean loss, at most 200 L-BFGS iterations). Metrics:
    accuracy, macro F1 and mean cross-entropy; ``best`` has the highest validation accuracy."""
    t_start = time.perf_counter()
    data = {}
    for name, (x, y) in (("train", train), ("val", val), ("test", test)):
        xs = np.asarray(x, dtype=np.float64)
        ys = np.asarray(y, dtype=np.int64).ravel()
        if len(ys) == 0 or len(xs) != len(ys):
            raise ValueError(f"the {name} split is empty or its x and y lengths differ")
        if ys.min() < 0 or ys.max() >= n_classes:
            raise ValueError(f"the {name} split has class ids outside 0..{n_classes - 1}")
        data[name] = (xs.reshape(len(xs), -1), ys)

    x_tr, y_tr = data["train"]
    freq = np.bincount(y_tr, minlength=n_classes) / len(y_tr)
    prior = np.maximum(freq, 1e-7)
    prior /= prior.sum()
    majority = int(np.argmax(freq))
    l2, max_iter = 1e-3, 200
    w, bias, n_iter = _fit_logistic(x_tr, y_tr, n_classes, l2, max_iter)

    def log_probs(model: str, x: np.ndarray) -> np.ndarray:
        if model == "majority":
            return np.broadcast_to(np.log(prior), (len(x), n_classes))
        return _log_softmax(x @ w + bias)

    params = {
        "majority": {"class": majority},
        "logistic": {"l2": l2, "iterations": n_iter, "max_iterations": max_iter},
    }
    models: dict[str, dict[str, Any]] = {}
    for name in ("majority", "logistic"):
        models[name] = {
            split: _class_metrics(log_probs(name, data[split][0]), data[split][1], n_classes)
            for split in ("val", "test")
        }
        models[name]["params"] = params[name]
    # Ties go to the first listed, the simpler majority model.
    best = max(models, key=lambda k: float(models[k]["val"]["accuracy"]))
    return {
        "task": "classify",
        "n_val_targets": len(data["val"][1]),
        "n_test_targets": len(data["test"][1]),
        "models": models,
        "best": best,
        "skipped": {},
        "seconds": time.perf_counter() - t_start,
    }
