"""What a study may name: built-in and synthetic datasets, metrics per task.

The worker implements each dataset named here (``worker/datasets.py``); a test holds the two
in step. This module imports no torch, so the service can validate studies without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("forecast", "classify")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    tasks: tuple[str, ...]
    columns: tuple[str, ...]  # numeric columns, in order
    default_target: tuple[str, ...]
    # generator options: name -> (low, high, default); empty for built-in series
    options: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    description: str = ""
    n_points: int | None = None  # a built-in series' length (sizes the default seq_len range)


BUILTIN: dict[str, DatasetInfo] = {
    "sunspots": DatasetInfo(
        "sunspots", ("forecast",), ("SUNACTIVITY",), ("SUNACTIVITY",),
        description="yearly sunspot numbers 1700-2008 (statsmodels), 309 points",
        n_points=309,
    ),
    "co2": DatasetInfo(
        "co2", ("forecast",), ("co2",), ("co2",),
        description="weekly Mauna Loa CO2 1958-2001 (statsmodels), 2284 points, 59 missing",
        n_points=2284,
    ),
    "elnino": DatasetInfo(
        "elnino", ("forecast",), ("sst",), ("sst",),
        description="monthly El Nino sea surface temperature 1950-2010 (statsmodels), 732 "
                    "points, seasonal",
        n_points=732,
    ),
    "realgdp": DatasetInfo(
        "realgdp", ("forecast",), ("realgdp",), ("realgdp",),
        description="quarterly US real GDP 1959-2009 (statsmodels macrodata), 203 points, "
                    "trending",
        n_points=203,
    ),
}

SYNTHETIC: dict[str, DatasetInfo] = {
    "sine": DatasetInfo(
        "sine", ("forecast",), ("y",), ("y",),
        {"n_components": (1, 32, 3), "noise": (0.0, 10.0, 0.1)},
        "mixture of sines of random periods plus Gaussian noise",
    ),
    "mackey_glass": DatasetInfo(
        "mackey_glass", ("forecast",), ("x",), ("x",),
        {"tau": (1, 200, 17), "noise": (0.0, 10.0, 0.0)},
        "Mackey-Glass delay differential equation (chaotic for tau >= 17)",
    ),
    "ar": DatasetInfo(
        "ar", ("forecast",), tuple(f"x{i}" for i in range(64)), ("x0",),
        {"n_series": (1, 64, 3), "order": (1, 16, 3), "noise": (0.0, 10.0, 0.5)},
        "stable multivariate VAR(order) process; columns x0..x{n_series-1}",
    ),
    "parity": DatasetInfo(
        "parity", ("classify",), ("bit",), ("label",),
        {"k": (1, 64, 4)},
        "random bits; the label is the parity of the last k bits (harder as k grows)",
    ),
    "waveforms": DatasetInfo(
        "waveforms", ("classify",), ("signal",), ("label",),
        {"n_classes": (2, 4, 4), "noise": (0.0, 10.0, 0.3), "segment": (8, 10000, 64)},
        "noisy segments of sine/square/sawtooth/triangle waves; label = the current wave",
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
