"""What a study may name: built-in and synthetic datasets with their loaders, metrics per task.

To add a dataset, add one entry to ``BUILTIN`` or ``SYNTHETIC`` below, with its loader beside it.

Each entry is the catalog row the service validates studies against (tasks, columns, length)
and the function the worker loads the data with (``worker/datasets.py`` calls it). The loaders
import numpy, pandas and statsmodels inside themselves: this module is imported by the base
install (client and CLI), which has none of them, and by the service, which has no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    import numpy as np
    import pandas as pd

TASKS = ("forecast", "classify")


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset a study may name, and how to make it.

    ``load`` returns a ``pandas.DataFrame`` in time order with ``columns`` (plus a ``label``
    column for classification): a built-in's is ``load()``; a generator's is
    ``load(n, rng, **options)``, ``n`` rows drawn from the numpy Generator ``rng``, every option
    of ``options`` given (their defaults filled in).
    """

    name: str
    tasks: tuple[str, ...]
    columns: tuple[str, ...]  # numeric columns, in order
    default_target: tuple[str, ...]
    # generator options: name -> (low, high, default); empty for built-in series
    options: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    description: str = ""
    n_points: int | None = None  # a built-in series' length (sizes the default seq_len range)
    load: Callable[..., pd.DataFrame] = field(kw_only=True)


# ---- built-in series (statsmodels ships them: no download) ----------------------------------


def _sunspots() -> pd.DataFrame:
    import statsmodels.api as sm

    data = sm.datasets.sunspots.load_pandas().data
    return data[["SUNACTIVITY"]].reset_index(drop=True).astype("float64")


def _co2() -> pd.DataFrame:
    import statsmodels.api as sm

    # the 59 missing weeks stay NaN: the study's ``missing`` setting decides what to do
    return sm.datasets.co2.load_pandas().data[["co2"]].reset_index(drop=True).astype("float64")


def _elnino() -> pd.DataFrame:
    import numpy as np
    import pandas as pd
    import statsmodels.api as sm

    wide = sm.datasets.elnino.load_pandas().data.drop(columns="YEAR")  # a row per year
    return pd.DataFrame({"sst": wide.to_numpy(dtype=np.float64).ravel()})


def _realgdp() -> pd.DataFrame:
    import statsmodels.api as sm

    data = sm.datasets.macrodata.load_pandas().data
    return data[["realgdp"]].reset_index(drop=True).astype("float64")


BUILTIN: dict[str, DatasetInfo] = {
    "sunspots": DatasetInfo(
        "sunspots",
        ("forecast",),
        ("SUNACTIVITY",),
        ("SUNACTIVITY",),
        description="yearly sunspot numbers 1700-2008 (statsmodels), 309 points",
        n_points=309,
        load=_sunspots,
    ),
    "co2": DatasetInfo(
        "co2",
        ("forecast",),
        ("co2",),
        ("co2",),
        description="weekly Mauna Loa CO2 1958-2001 (statsmodels), 2284 points, 59 missing",
        n_points=2284,
        load=_co2,
    ),
    "elnino": DatasetInfo(
        "elnino",
        ("forecast",),
        ("sst",),
        ("sst",),
        description="monthly El Nino sea surface temperature 1950-2010 (statsmodels), 732 "
        "points, seasonal",
        n_points=732,
        load=_elnino,
    ),
    "realgdp": DatasetInfo(
        "realgdp",
        ("forecast",),
        ("realgdp",),
        ("realgdp",),
        description="quarterly US real GDP 1959-2009 (statsmodels macrodata), 203 points, trending",
        n_points=203,
        load=_realgdp,
    ),
}

# ---- seeded synthetic generators ------------------------------------------------------------


def _sine(n: int, rng: np.random.Generator, n_components: float, noise: float) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    t = np.arange(n, dtype=np.float64)
    y = np.zeros(n)
    for _ in range(int(n_components)):
        period = rng.uniform(8, 200)
        y += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    return pd.DataFrame({"y": y + noise * rng.standard_normal(n)})


def _mackey_glass(n: int, rng: np.random.Generator, tau: float, noise: float) -> pd.DataFrame:
    """dx/dt = 0.2 x(t-tau) / (1 + x(t-tau)^10) - 0.1 x(t), Euler steps of 0.1, sampled at 1."""
    import numpy as np
    import pandas as pd

    tau_i, sub = int(tau), 10
    hist = tau_i * sub
    x = np.empty(n * sub + hist)
    x[:hist] = 1.2 + 0.1 * rng.standard_normal(hist)
    for i in range(hist, len(x)):
        lag = x[i - hist]
        x[i] = x[i - 1] + 0.1 * (0.2 * lag / (1 + lag**10) - 0.1 * x[i - 1])
    series = x[hist::sub][:n]
    return pd.DataFrame({"x": series + noise * rng.standard_normal(n)})


def _ar(
    n: int, rng: np.random.Generator, n_series: float, order: float, noise: float
) -> pd.DataFrame:
    """A stable VAR(order) process: coefficients rescaled until the companion matrix's spectral
    radius is below 0.95."""
    import numpy as np
    import pandas as pd

    k, p = int(n_series), int(order)
    coefs = rng.standard_normal((p, k, k)) / (k * p)
    companion = np.zeros((k * p, k * p))
    companion[:k] = np.concatenate(list(coefs), axis=1)
    companion[k:, :-k] = np.eye(k * (p - 1))
    radius = max(abs(np.linalg.eigvals(companion)))
    if radius >= 0.95:
        coefs *= 0.9 / radius
    x = np.zeros((n + 100, k))
    for t in range(p, n + 100):
        x[t] = sum(coefs[j] @ x[t - 1 - j] for j in range(p)) + noise * rng.standard_normal(k)
    return pd.DataFrame(x[100:], columns=[f"x{i}" for i in range(k)])


def _parity(n: int, rng: np.random.Generator, k: float) -> pd.DataFrame:
    """Random bits; the label at t is the parity of bits t-k+1..t (harder as k grows)."""
    import numpy as np
    import pandas as pd

    bits = rng.integers(0, 2, size=n)
    csum = np.concatenate([[0], np.cumsum(bits)])
    kk = int(k)
    label = np.array([(csum[t + 1] - csum[max(0, t + 1 - kk)]) % 2 for t in range(n)])
    return pd.DataFrame({"bit": bits.astype(np.float64), "label": label})


def _waveforms(
    n: int, rng: np.random.Generator, n_classes: float, noise: float, segment: float
) -> pd.DataFrame:
    """Segments of sine/square/sawtooth/triangle waves with random period and noise; the label
    of each step is the wave it belongs to."""
    import numpy as np
    import pandas as pd

    all_shapes: list[Callable[[Any], Any]] = [
        lambda p: np.sin(p),
        lambda p: np.sign(np.sin(p)),
        lambda p: 2 * ((p / (2 * np.pi)) % 1.0) - 1,
        lambda p: 2 * np.abs(2 * ((p / (2 * np.pi)) % 1.0) - 1) - 1,
    ]
    shapes = all_shapes[: int(n_classes)]
    signal, label = np.empty(n), np.empty(n, dtype=np.int64)
    t, seg = 0, int(segment)
    while t < n:
        c = int(rng.integers(len(shapes)))
        m = min(seg, n - t)
        phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(m) / rng.uniform(6, 30)
        signal[t : t + m] = shapes[c](phase) + noise * rng.standard_normal(m)
        label[t : t + m] = c
        t += m
    return pd.DataFrame({"signal": signal, "label": label})


SYNTHETIC: dict[str, DatasetInfo] = {
    "sine": DatasetInfo(
        "sine",
        ("forecast",),
        ("y",),
        ("y",),
        {"n_components": (1, 32, 3), "noise": (0.0, 10.0, 0.1)},
        "mixture of sines of random periods plus Gaussian noise",
        load=_sine,
    ),
    "mackey_glass": DatasetInfo(
        "mackey_glass",
        ("forecast",),
        ("x",),
        ("x",),
        {"tau": (1, 200, 17), "noise": (0.0, 10.0, 0.0)},
        "Mackey-Glass delay differential equation (chaotic for tau >= 17)",
        load=_mackey_glass,
    ),
    "ar": DatasetInfo(
        "ar",
        ("forecast",),
        tuple(f"x{i}" for i in range(64)),
        ("x0",),
        {"n_series": (1, 64, 3), "order": (1, 16, 3), "noise": (0.0, 10.0, 0.5)},
        "stable multivariate VAR(order) process; columns x0..x{n_series-1}",
        load=_ar,
    ),
    "parity": DatasetInfo(
        "parity",
        ("classify",),
        ("bit",),
        ("label",),
        {"k": (1, 64, 4)},
        "random bits; the label is the parity of the last k bits (harder as k grows)",
        load=_parity,
    ),
    "waveforms": DatasetInfo(
        "waveforms",
        ("classify",),
        ("signal",),
        ("label",),
        {"n_classes": (2, 4, 4), "noise": (0.0, 10.0, 0.3), "segment": (8, 10000, 64)},
        "noisy segments of sine/square/sawtooth/triangle waves; label = the current wave",
        load=_waveforms,
    ),
}


def synthetic_columns(name: str, options: dict[str, float]) -> tuple[str, ...]:
    """The numeric input columns a synthetic generator yields with these options."""
    info = SYNTHETIC[name]
    if name == "ar":
        n = int(options.get("n_series", info.options["n_series"][2]))
        return tuple(f"x{i}" for i in range(n))
    return info.columns


# metric -> (natural direction, tasks it applies to). Validation metrics are objectives.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "val_loss": ("minimize", ("forecast", "classify")),
    "val_rmse": ("minimize", ("forecast",)),
    "val_mae": ("minimize", ("forecast",)),
    "val_mape": ("minimize", ("forecast",)),
    "val_accuracy": ("maximize", ("classify",)),
    "val_f1": ("maximize", ("classify",)),
    "val_cross_entropy": ("minimize", ("classify",)),
    # cost objectives for Pareto studies
    "param_count": ("minimize", ("forecast", "classify")),
    "train_seconds": ("minimize", ("forecast", "classify")),
}
