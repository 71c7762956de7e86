"""The training engine's hyperparameters: their names, types, bounds and defaults, in one table.

To add a hyperparameter, add one field to ``Hyper`` below (then read it in ``worker/engine.py``).

``Hyper`` is both the table and the engine's config: each field's default and its ``HParam``
(kind, bounds, choices, help) sit on one line, ``HPARAMS`` is read off the fields, and the
worker's engine trains from a ``Hyper`` value (``worker.engine.Hyper`` is this class). A study's
search space may search any of these; every one it does not search is fixed, either to the
study's ``fixed`` value or to the default here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

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


# Each returns a dataclass field whose default is typed as the value (so mypy checks ``Hyper``'s
# annotations against it) and whose metadata holds the HParam, named once the class is made.
def _hp(param: HParam) -> Any:
    return field(default=param.default, metadata={"hparam": param})


def integer(default: int, low: int, high: int, *, help: str = "") -> int:
    """An integer hyperparameter searchable within ``[low, high]``."""
    out: int = _hp(HParam("", "int", default, low, high, help=help))
    return out


def real(default: float, low: float, high: float, *, help: str = "") -> float:
    """A real hyperparameter searchable within ``[low, high]``."""
    out: float = _hp(HParam("", "float", default, low, high, help=help))
    return out


def boolean(default: bool, *, help: str = "") -> bool:
    """A true/false hyperparameter."""
    out: bool = _hp(HParam("", "bool", default, help=help))
    return out


def choice(default: str, choices: tuple[str, ...], *, help: str = "") -> str:
    """A hyperparameter taking one of ``choices``."""
    out: str = _hp(HParam("", "categorical", default, choices=choices, help=help))
    return out


@dataclass(frozen=True)
class Hyper:
    """Every engine hyperparameter, one value each: the table, and the engine's config."""

    # model
    hidden_size: int = integer(64, 1, 4096, help="LSTM units per layer")
    num_layers: int = integer(1, 1, 16, help="stacked LSTM layers")
    dropout: float = real(0.0, 0.0, 0.95, help="dropout between LSTM layers")
    head_dropout: float = real(0.0, 0.0, 0.95, help="dropout before the linear head")
    bidirectional: bool = boolean(False, help="bidirectional LSTM (classification)")
    init: str = choice("default", ("default", "xavier", "orthogonal"))
    freeze_layers: int = integer(
        0, 0, 16, help="lowest LSTM layers kept frozen at the init_from model's weights"
    )
    # optimisation
    optimizer: str = choice("adam", ("adam", "adamw", "rmsprop", "sgd"))
    lr: float = real(1e-3, 1e-7, 10.0, help="learning rate")
    weight_decay: float = real(0.0, 0.0, 1.0)
    momentum: float = real(0.9, 0.0, 0.999, help="sgd and rmsprop momentum")
    nesterov: bool = boolean(False, help="Nesterov momentum (sgd)")
    scheduler: str = choice(
        "none", ("none", "plateau", "exponential", "step", "cosine", "onecycle", "cyclic")
    )
    scheduler_gamma: float = real(0.95, 0.01, 1.0, help="exponential/step decay factor")
    scheduler_step_size: int = integer(10, 1, 10000, help="step scheduler period (epochs)")
    scheduler_patience: int = integer(5, 0, 1000, help="plateau scheduler patience")
    scheduler_factor: float = real(0.5, 0.01, 0.99, help="plateau scheduler factor")
    max_lr_factor: float = real(10.0, 1.0, 1000.0, help="onecycle/cyclic peak = lr*factor")
    clip_norm: float = real(1.0, 0.0, 1e4, help="gradient-norm clip; 0 turns it off")
    clip_value: float = real(0.0, 0.0, 1e4, help="gradient-value clip; 0 turns it off")
    loss: str = choice(
        "mse",
        ("mse", "mae", "huber"),
        help="forecast loss (classification always uses cross-entropy)",
    )
    precision: str = choice(
        "auto", ("auto", "fp32", "bf16", "fp16"), help="auto: bf16 on CUDA, fp32 on CPU"
    )
    batch_size: int = integer(64, 1, 65536)
    seq_len: int = integer(24, 2, 20000, help="input window length")
    max_epochs: int = integer(50, 1, 100000)
    noise_std: float = real(0.0, 0.0, 10.0, help="Gaussian input noise (augmentation)")
    curriculum: bool = boolean(False, help="train on shorter windows in early epochs")
    scaler: str = choice("standard", ("standard", "minmax", "none"))
    target_transform: str = choice(
        "none",
        ("none", "diff", "window_norm", "residual"),
        help="forecast targets as levels, first differences, relative to the window's last "
        "value, or levels in and the change from the last value out",
    )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Hyper:
        """A config from hyperparameter values by name (the rest default); integer kinds are
        cast to int (Optuna may hand back 3.0). Raises ValueError naming unknown names."""
        unknown = set(params) - set(HPARAMS)
        if unknown:
            raise ValueError(f"unknown hyperparameters {sorted(unknown)}")
        cast: dict[str, Any] = {
            k: (int(v) if HPARAMS[k].kind == "int" else v) for k, v in params.items()
        }
        return cls(**cast)


HPARAMS: dict[str, HParam] = {
    f.name: replace(f.metadata["hparam"], name=f.name) for f in fields(Hyper)
}


def defaults() -> dict[str, int | float | bool | str]:
    """Every hyperparameter's default value."""
    return {p.name: p.default for p in HPARAMS.values()}
