"""The training engine's hyperparameters: their names, types, bounds and defaults, in one place.

A study's search space may search any of these; every one it does not search is fixed, either
to the study's ``fixed`` value or to the default here. The worker's engine reads exactly these
names (a test holds the two in step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["int", "float", "bool", "categorical"]


@dataclass(frozen=True)
class HParam:
    name: str
    kind: Kind
    default: int | float | bool | str
    low: float | None = None  # inclusive bounds that any searched range must lie within
    high: float | None = None
    choices: tuple[str, ...] | None = None  # for categorical
    help: str = ""


_PARAMS: tuple[HParam, ...] = (
    # model
    HParam("hidden_size", "int", 64, 1, 4096, help="LSTM units per layer"),
    HParam("num_layers", "int", 1, 1, 16, help="stacked LSTM layers"),
    HParam("dropout", "float", 0.0, 0.0, 0.95, help="dropout between LSTM layers"),
    HParam("head_dropout", "float", 0.0, 0.0, 0.95, help="dropout before the linear head"),
    HParam("bidirectional", "bool", False, help="bidirectional LSTM (classification)"),
    HParam("init", "categorical", "default", choices=("default", "xavier", "orthogonal")),
    # optimisation
    HParam("optimizer", "categorical", "adam", choices=("adam", "adamw", "rmsprop", "sgd")),
    HParam("lr", "float", 1e-3, 1e-7, 10.0, help="learning rate"),
    HParam("weight_decay", "float", 0.0, 0.0, 1.0),
    HParam("momentum", "float", 0.9, 0.0, 0.999, help="sgd and rmsprop momentum"),
    HParam("nesterov", "bool", False, help="Nesterov momentum (sgd)"),
    HParam("scheduler", "categorical", "none",
           choices=("none", "plateau", "exponential", "step", "cosine", "onecycle", "cyclic")),
    HParam("scheduler_gamma", "float", 0.95, 0.01, 1.0, help="exponential/step decay factor"),
    HParam("scheduler_step_size", "int", 10, 1, 10000, help="step scheduler period (epochs)"),
    HParam("scheduler_patience", "int", 5, 0, 1000, help="plateau scheduler patience"),
    HParam("scheduler_factor", "float", 0.5, 0.01, 0.99, help="plateau scheduler factor"),
    HParam("max_lr_factor", "float", 10.0, 1.0, 1000.0, help="onecycle/cyclic peak = lr*factor"),
    HParam("clip_norm", "float", 1.0, 0.0, 1e4, help="gradient-norm clip; 0 turns it off"),
    HParam("clip_value", "float", 0.0, 0.0, 1e4, help="gradient-value clip; 0 turns it off"),
    HParam("loss", "categorical", "mse", choices=("mse", "mae", "huber"),
           help="forecast loss (classification always uses cross-entropy)"),
    HParam("precision", "categorical", "auto", choices=("auto", "fp32", "bf16", "fp16"),
           help="auto: bf16 on CUDA, fp32 on CPU"),
    HParam("batch_size", "int", 64, 1, 65536),
    HParam("seq_len", "int", 24, 2, 20000, help="input window length"),
    HParam("max_epochs", "int", 50, 1, 100000),
    HParam("noise_std", "float", 0.0, 0.0, 10.0, help="Gaussian input noise (augmentation)"),
    HParam("curriculum", "bool", False, help="train on shorter windows in early epochs"),
    HParam("scaler", "categorical", "standard", choices=("standard", "minmax", "none")),
    HParam("target_transform", "categorical", "none",
           choices=("none", "diff", "window_norm", "residual"),
           help="forecast targets as levels, first differences, relative to the window's last "
                "value, or levels in and the change from the last value out"),
)

HPARAMS: dict[str, HParam] = {p.name: p for p in _PARAMS}


def defaults() -> dict[str, int | float | bool | str]:
    """Every hyperparameter's default value."""
    return {p.name: p.default for p in _PARAMS}
