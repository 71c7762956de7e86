"""The training engine: one trial's config in, metrics, curves and a checkpoint out.

Reads top to bottom: config → model, optimizer, schedule → epochs of device-resident batches
→ validation, pruning and early stopping each epoch → best weights restored → test metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# The engine's hyperparameter config is the one table of them (one field per hyperparameter).
from seqtune.hparams import Hyper
from worker.metrics import forecast_errors, macro_f1
from worker.model import LSTMModel, ModelArgs, param_count
from worker.preprocessing import DataError, Prepared, Scaler, TargetTransform

EVAL_BATCH = 4096  # windows per forward pass when predicting (on CUDA, training's own batch)
DIVERGED_GRAD_NORM = 1e6
CHECK_EVERY_CUDA = 8  # steps between divergence checks on CUDA (each check syncs the device)
CHECK_EVERY_CPU = 4  # steps between gradient-norm checks on CPU when not clipping by norm


@dataclass(frozen=True)
class TrainConfig:
    hp: Hyper
    monitor: str = "val_loss"  # the validation metric for early stopping and pruning
    direction: str = "minimize"
    patience: int | None = 10
    min_delta: float = 0.0
    seed: int = 0
    device: str = "cpu"
    timeout_s: float | None = None


@dataclass(frozen=True)
class InitModel:
    """A pretrained model a trial starts from (a study's ``init_from``): its checkpoint
    (``make_checkpoint``'s plain data, read with ``weights_only=True``) and where it came
    from (``{"study", "trial"}`` or ``{"model", "name"}``), which the new checkpoint's
    lineage names."""

    checkpoint: dict[str, Any] = field(repr=False)
    source: dict[str, Any]

    @classmethod
    def from_file(cls, path: str | Path) -> InitModel:
        """A model file (a downloaded ``.pt``), for notebooks: ``run_optuna(..., init=...)``."""
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        return cls(ckpt, {"file": Path(path).name})


@dataclass
class TrialResult:
    reason: str  # early_stopped | max_epochs | pruned | diverged | timeout | interrupted
    best_epoch: int | None
    epochs: int
    val: dict[str, float]  # validation metrics of the best epoch
    test: dict[str, float]  # test metrics of the restored best weights (+ persistence)
    curve: list[dict[str, float]]
    param_count: int
    train_seconds: float
    wall_seconds: float
    samples_per_s: float
    peak_gpu_mem_bytes: int | None
    precision: str
    checkpoint: dict[str, Any] | None = field(default=None, repr=False)
    folds: list[dict[str, Any]] | None = None  # walk-forward: each fold's summary
    lineage: dict[str, Any] | None = None  # fine-tuned: what it started from (``start_from``)

    def metric(self, name: str) -> float:
        """An objective's value: a validation metric, param_count or train_seconds."""
        if name == "param_count":
            return float(self.param_count)
        if name == "train_seconds":
            return self.train_seconds
        return self.val[name]


# ---- building blocks (pure functions of the config) -----------------------------------------


def make_optimizer(hp: Hyper, params: Any) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=hp.lr, weight_decay=hp.weight_decay, momentum=hp.momentum
        )
    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            momentum=hp.momentum,
            nesterov=hp.nesterov and hp.momentum > 0,
        )
    raise ValueError(f"unknown optimizer {hp.optimizer}")


def make_scheduler(
    hp: Hyper, opt: torch.optim.Optimizer, steps_per_epoch: int, mode: str
) -> tuple[Any, str]:
    """The LR scheduler and when it steps: 'step' (per batch), 'epoch', 'val' (on the
    monitored metric), or 'none'."""
    s = hp.scheduler
    sched = torch.optim.lr_scheduler
    if s == "none":
        return None, "none"
    if s == "plateau":
        return sched.ReduceLROnPlateau(
            opt,
            mode="min" if mode == "minimize" else "max",
            factor=hp.scheduler_factor,
            patience=hp.scheduler_patience,
        ), "val"
    if s == "exponential":
        return sched.ExponentialLR(opt, gamma=hp.scheduler_gamma), "epoch"
    if s == "step":
        return sched.StepLR(
            opt, step_size=hp.scheduler_step_size, gamma=hp.scheduler_gamma
        ), "epoch"
    if s == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=max(1, hp.max_epochs)), "epoch"
    if s == "onecycle":
        return sched.OneCycleLR(
            opt,
            max_lr=hp.lr * hp.max_lr_factor,
            total_steps=max(2, hp.max_epochs * steps_per_epoch),
        ), "step"
    if s == "cyclic":
        return sched.CyclicLR(
            opt,
            base_lr=hp.lr,
            max_lr=hp.lr * hp.max_lr_factor,
            step_size_up=max(1, 2 * steps_per_epoch),
            cycle_momentum=False,
        ), "step"
    raise ValueError(f"unknown scheduler {s}")


def make_loss(task: str, loss: str) -> nn.Module:
    if task == "classify":
        return nn.CrossEntropyLoss()
    return {"mse": nn.MSELoss(), "mae": nn.L1Loss(), "huber": nn.HuberLoss()}[loss]


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype: bf16/fp16 on CUDA only; CPU trains in fp32."""
    if not device.startswith("cuda"):
        return None
    if precision in ("auto", "bf16"):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return None


def curriculum_len(seq_len: int, epoch: int, max_epochs: int) -> int:
    """Window length for an epoch under the curriculum: a quarter of seq_len at first,
    the full length from half-way through training on."""
    ramp = max(1, max_epochs // 2)
    frac = min(1.0, 0.25 + 0.75 * epoch / ramp)
    return max(2, min(seq_len, int(round(seq_len * frac))))


# ---- fine-tuning: start from an earlier model ----------------------------------------------

_LSTM_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def load_init(model: LSTMModel, init: InitModel) -> str:
    """Copy the pretrained model's LSTM weights into ``model``: all of them, strictly (a
    missing or differently shaped one raises DataError naming it), and its linear head when
    the head's shape matches (a different output size leaves the new head as initialised).
    Returns what happened to the head: "loaded" or "new"."""
    state = init.checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise DataError("the init_from model holds no weights (state_dict)")
    own = model.lstm.state_dict()
    theirs = {k.removeprefix("lstm."): v for k, v in state.items() if k.startswith("lstm.")}
    problems = [f"no {k}" for k in own if k not in theirs]
    problems += [f"an extra {k}" for k in theirs if k not in own]
    problems += [
        f"{k} is {tuple(theirs[k].shape)} there, {tuple(v.shape)} here"
        for k, v in own.items()
        if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise DataError(
            "the init_from model's LSTM does not fit this trial's"
            + _args_difference(init.checkpoint.get("model"), model.args)
            + ": "
            + "; ".join(problems[:4])
        )
    model.lstm.load_state_dict(theirs, strict=True)
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    mine = model.head.state_dict()
    if set(head) == set(mine) and all(tuple(head[k].shape) == mine[k].shape for k in mine):
        model.head.load_state_dict(head)
        return "loaded"
    return "new"


def _args_difference(theirs: Any, mine: ModelArgs) -> str:
    """' (hidden_size 32 there, 16 here; ...)' for the shape-setting arguments that differ."""
    if not isinstance(theirs, dict):
        return ""
    keys = ("n_features", "hidden_size", "num_layers", "bidirectional")
    diff = [
        f"{k} {theirs.get(k)} there, {getattr(mine, k)} here"
        for k in keys
        if theirs.get(k) != getattr(mine, k)
    ]
    return f" ({'; '.join(diff)})" if diff else ""


def freeze_layers(model: LSTMModel, k: int) -> None:
    """Stop training the lowest ``k`` LSTM layers (both directions): their weights keep the
    values they start with. The optimizer must then be built over the trainable parameters
    only (``make_optimizer(hp, trainable(model))``). Raises DataError when the model has
    fewer than ``k`` layers."""
    if k > model.args.num_layers:
        raise DataError(
            f"freeze_layers={k} but the model has {model.args.num_layers} LSTM layer(s)"
        )
    for layer in range(k):
        for suffix in ("", "_reverse"):
            for name in _LSTM_PARAMS:
                p = getattr(model.lstm, f"{name}_l{layer}{suffix}", None)
                if p is not None:
                    p.requires_grad_(False)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters training updates (frozen layers left out)."""
    return [p for p in model.parameters() if p.requires_grad]


# ---- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, amp: torch.dtype | None, batch: int = EVAL_BATCH
) -> torch.Tensor:
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            outs.append(model(x[i : i + batch]).float())
    return torch.cat(outs) if outs else torch.empty(0, device=x.device)


def _forecast_metrics(pred: np.ndarray, true: np.ndarray, prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in forecast_errors(pred, true).items()}


def evaluate(
    model: nn.Module,
    data: Prepared,
    split: str,
    loss_fn: nn.Module,
    amp: torch.dtype | None,
    *,
    baseline: bool = False,
    batch: int = EVAL_BATCH,
) -> dict[str, float]:
    """Metrics of one split. Forecast: loss, RMSE, MAE and MAPE in original units (after the
    target transform is inverted), the same in the network's space (``*_scaled``), and how many
    forecast origins were scored (``*_n_targets``); with ``baseline`` the persistence
    forecast's metrics on the same targets. Classify: loss (cross-entropy), accuracy, macro F1.
    ``batch``: windows per forward pass.
    """
    s = getattr(data, split)
    p = split[:4] if split != "train" else "train"
    out = predict(model, s.x, amp, batch)
    if data.task == "classify":
        ce = float(loss_fn(out, s.y).item())
        pred = out.argmax(dim=1).cpu().numpy()
        true = s.y.cpu().numpy()
        return {
            f"{p}_loss": ce,
            f"{p}_cross_entropy": ce,
            f"{p}_accuracy": float(np.mean(pred == true)),
            f"{p}_f1": macro_f1(pred, true, len(data.classes)),
            f"{p}_n_targets": float(len(true)),
        }
    pred_t = out.reshape(s.y.shape)
    metrics = {f"{p}_loss": float(loss_fn(pred_t, s.y).item())}
    pred_s, true_s = pred_t.cpu().numpy(), s.y.float().cpu().numpy()
    scaled = _forecast_metrics(pred_s, true_s, p)
    metrics |= {k + "_scaled": v for k, v in scaled.items()}
    metrics |= _forecast_metrics(data.to_original(pred_s.astype(np.float64), s), s.truth, p)
    metrics[f"{p}_n_targets"] = float(s.n_targets)
    if baseline and s.persistence is not None:
        metrics |= _forecast_metrics(s.persistence, s.truth, f"{p}_persistence")
    return metrics


# ---- the loop -------------------------------------------------------------------------------


class _Diverged(Exception):
    pass


def train(
    cfg: TrainConfig,
    data: Prepared,
    on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
    *,
    resume: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[], None] | None = None,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
    snapshot_every_s: float = 30.0,
    init: InitModel | None = None,
) -> TrialResult:
    """Train one trial.

    ``on_epoch(epoch, record)`` runs after each epoch's validation and returns True to prune
    (Optuna's should_prune); it may raise to abandon the trial. ``on_step()`` runs after every
    batch (progress, for leases). ``on_snapshot(state)`` receives a resumable snapshot at an
    epoch boundary at most every ``snapshot_every_s`` seconds, and always before an
    interruption; ``train(..., resume=state)`` continues from it. When ``should_stop()`` turns
    true the trial stops at the next epoch boundary with reason ``interrupted``.
    With ``init`` the model starts from that pretrained model's weights (``load_init``) and
    its lowest ``hp.freeze_layers`` layers stay frozen (also when resuming); the result and
    its checkpoint record the lineage. Never raises for a diverging trial: it comes back
    with reason ``diverged``; raises DataError when ``init`` does not fit the model."""
    t_start = time.perf_counter()
    hp = cfg.hp
    device = cfg.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    model = LSTMModel(
        ModelArgs(
            n_features=data.n_features,
            hidden_size=hp.hidden_size,
            num_layers=hp.num_layers,
            dropout=hp.dropout,
            bidirectional=hp.bidirectional,
            head_dropout=hp.head_dropout,
            out_dim=data.out_dim,
            init=hp.init,
        )
    ).to(device)
    lineage = None
    if init is not None:
        lineage = {
            **init.source,
            "frozen_layers": hp.freeze_layers,
            "head": load_init(model, init),
            "parent": init.checkpoint.get("lineage"),
        }
    # Before the optimizer and any resume: a resumed attempt freezes the same layers, and its
    # optimizer state is that of the same trainable parameters.
    freeze_layers(model, hp.freeze_layers)
    opt = make_optimizer(hp, trainable(model))
    x, y = data.train.x, data.train.y
    n = len(x)
    bs = min(hp.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    sched, sched_when = make_scheduler(hp, opt, steps_per_epoch, cfg.direction)
    loss_fn = make_loss(data.task, hp.loss)
    amp = autocast_dtype(hp.precision, device)
    grad_scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    on_cuda = device.startswith("cuda")
    check_every = CHECK_EVERY_CUDA if on_cuda else CHECK_EVERY_CPU
    # On CUDA, validation and test go through the model a training batch at a time. In
    # batches of EVAL_BATCH windows, cuDNN's inference buffers made a trial's peak up to 27x
    # its training's (7.1 GiB against 0.26 GiB: hidden 512, batch 32, 200 steps, an H100), in
    # no proportion that the memory estimate (the trial's share of a shared GPU) could follow.
    eval_batch = bs if on_cuda else EVAL_BATCH
    clip = hp.clip_norm if hp.clip_norm > 0 else math.inf
    sign = 1.0 if cfg.direction == "minimize" else -1.0

    best: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    stale, epoch, samples, train_s = 0, -1, 0, 0.0
    curve: list[dict[str, float]] = []
    first_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if sched is not None and resume.get("scheduler") is not None:
            sched.load_state_dict(resume["scheduler"])
        # A snapshot may come from another kind of device (a GPU worker handed the trial
        # back and a CPU worker took it, or the reverse): a scaler state only where both
        # scale (fp16 on CUDA), the generator's state only on a generator of the same kind.
        if resume["grad_scaler"] and grad_scaler.is_enabled():
            grad_scaler.load_state_dict(resume["grad_scaler"])
        if resume.get("generator_device", gen.device.type) == gen.device.type:
            gen.set_state(resume["generator"])  # generator states are CPU byte tensors
        else:
            gen.manual_seed(cfg.seed + resume["epoch"] + 1)
        best, best_epoch, stale = resume["best"], resume["best_epoch"], resume["stale"]
        best_state = resume["best_state"]
        curve, samples, train_s = list(resume["curve"]), resume["samples"], resume["train_s"]
        first_epoch = resume["epoch"] + 1
    last_snapshot = time.perf_counter()
    reason = "max_epochs"
    for epoch in range(first_epoch, hp.max_epochs):
        t_epoch = time.perf_counter()
        model.train()
        seq = curriculum_len(data.seq_len, epoch, hp.max_epochs) if hp.curriculum else data.seq_len
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        try:
            for step, i in enumerate(range(0, n, bs)):
                idx = perm[i : i + bs]
                xb, yb = x[idx], y[idx]  # slices of device tensors: no host copies
                if seq < data.seq_len:
                    xb = xb[:, -seq:]
                if hp.noise_std > 0:
                    xb = xb + hp.noise_std * torch.randn(xb.shape, device=device, generator=gen)
                with torch.autocast(
                    x.device.type, dtype=amp or torch.float32, enabled=amp is not None
                ):
                    out = model(xb)
                    loss = loss_fn(out if data.task == "classify" else out.reshape(yb.shape), yb)
                opt.zero_grad(set_to_none=True)
                grad_scaler.scale(loss).backward()
                check = (step + 1) % check_every == 0
                # The gradient norm costs a pass over all gradients: take it when clipping
                # needs it anyway, else only on divergence-check steps.
                norm = None
                if clip < math.inf or check:
                    grad_scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if hp.clip_value > 0:
                    if norm is None:
                        grad_scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_value_(model.parameters(), hp.clip_value)
                if on_cuda:
                    # No host sync per step: gather the flags, look every few steps.
                    bad |= ~torch.isfinite(loss.detach())
                    if norm is not None and grad_scaler.is_enabled():
                        # fp16: a step whose scaled gradients overflowed has an infinite
                        # norm; the scaler skips that step and lowers its scale. Only a
                        # finite, huge norm is divergence (a non-finite loss still is).
                        bad |= torch.isfinite(norm) & (norm > DIVERGED_GRAD_NORM)
                    elif norm is not None:
                        bad |= ~torch.isfinite(norm) | (norm > DIVERGED_GRAD_NORM)
                    if check and bool(bad):
                        raise _Diverged
                    loss_sum += loss.detach().float() * len(idx)
                else:
                    value = float(loss.item())  # no device to wait for on the CPU
                    if not math.isfinite(value) or (
                        norm is not None and not (float(norm) <= DIVERGED_GRAD_NORM)
                    ):
                        raise _Diverged
                    loss_sum += value * len(idx)
                grad_scaler.step(opt)
                grad_scaler.update()
                if sched_when == "step":
                    sched.step()
                if on_step is not None:
                    on_step()
            if on_cuda and bool(bad):
                raise _Diverged
        except _Diverged:
            reason = "diverged"
            curve.append({"epoch": epoch, "train_loss": math.nan})
            break
        epoch_train_s = time.perf_counter() - t_epoch
        train_s += epoch_train_s
        samples += n

        val = evaluate(model, data, "val", loss_fn, amp, batch=eval_batch)
        monitored = val[cfg.monitor]
        if sched_when == "epoch":
            sched.step()
        elif sched_when == "val":
            sched.step(monitored)
        record = {
            "epoch": epoch,
            "train_loss": float(loss_sum.item()) / n,
            **val,
            "lr": opt.param_groups[0]["lr"],
            "train_seconds": epoch_train_s,
            "seconds": time.perf_counter() - t_epoch,
        }
        curve.append(record)
        if not math.isfinite(monitored):
            reason = "diverged"
            break
        if best is None or sign * (monitored - best) < -cfg.min_delta:
            best, best_epoch, stale = monitored, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if on_epoch is not None and on_epoch(epoch, record):
            reason = "pruned"
            break
        if cfg.patience is not None and stale >= cfg.patience:
            reason = "early_stopped"
            break
        if cfg.timeout_s is not None and time.perf_counter() - t_start > cfg.timeout_s:
            reason = "timeout"
            break
        stop = should_stop is not None and should_stop()
        if on_snapshot is not None and (
            stop or time.perf_counter() - last_snapshot >= snapshot_every_s
        ):
            on_snapshot(
                {
                    "epoch": epoch,
                    "model": _cpu(model.state_dict()),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "grad_scaler": grad_scaler.state_dict(),
                    "generator": gen.get_state().cpu(),
                    "generator_device": gen.device.type,
                    "best": best,
                    "best_epoch": best_epoch,
                    "stale": stale,
                    "best_state": _cpu(best_state) if best_state is not None else None,
                    "curve": curve,
                    "samples": samples,
                    "train_s": train_s,
                }
            )
            last_snapshot = time.perf_counter()
        if stop:
            reason = "interrupted"
            break

    val_best: dict[str, float] = {}
    test: dict[str, float] = {}
    checkpoint = None
    if best_state is not None and reason not in ("diverged", "interrupted"):
        model.load_state_dict(best_state)  # the test split sees the best epoch's weights
        val_best = {k: v for k, v in curve[best_epoch or 0].items() if k.startswith("val_")}
        if data.test is not None:
            test = evaluate(model, data, "test", loss_fn, amp, baseline=True, batch=eval_batch)
        checkpoint = make_checkpoint(model, data, hp, lineage=lineage)
    peak = int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None
    return TrialResult(
        reason=reason,
        best_epoch=best_epoch,
        epochs=len(curve),
        val=val_best,
        test=test,
        curve=curve,
        param_count=param_count(model),
        train_seconds=train_s,
        wall_seconds=time.perf_counter() - t_start,
        samples_per_s=samples / train_s if train_s > 0 else 0.0,
        peak_gpu_mem_bytes=peak,
        precision=str(amp).replace("torch.", "") if amp else "fp32",
        checkpoint=checkpoint,
        lineage=lineage,
    )


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


# ---- checkpoints and prediction -------------------------------------------------------------


def make_checkpoint(
    model: LSTMModel, data: Prepared, hp: Hyper, *, lineage: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything needed to rebuild the model and predict on new data, and its ``lineage``:
    None when trained from scratch, else what it was fine-tuned from (``{"study", "trial"}``
    or ``{"model", "name"}``), ``frozen_layers``, ``head`` ("loaded" or "new") and
    ``parent``, the starting model's own lineage."""
    return {
        "format": 2,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": model.args.to_dict(),
        "task": data.task,
        "features": data.features,
        "targets": data.targets,
        "seq_len": data.seq_len,
        "horizon": data.horizon,
        "target_idx": data.target_idx,
        "scaler": data.scaler.state(),
        "classes": data.classes,
        "target_transform": data.transform.state(),
        "hparams": {f.name: getattr(hp, f.name) for f in fields(hp)},
        "lineage": lineage,
    }


class Predictor:
    """A trained model rebuilt from a checkpoint: forecasts or classifies new data."""

    def __init__(self, ckpt: dict[str, Any], device: str = "cpu") -> None:
        self.ckpt = ckpt
        self.model = LSTMModel(ModelArgs(**ckpt["model"])).to(device)
        self.model.load_state_dict(ckpt["state_dict"])
        self.model.eval()
        self.scaler = Scaler.from_state(ckpt["scaler"])
        self.transform = TargetTransform.from_state(ckpt.get("target_transform"))
        self.device = device

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> Predictor:
        # weights_only: a downloaded file is plain data (tensors, dicts, lists), never code.
        return cls(torch.load(path, map_location=device, weights_only=True), device)

    def predict(self, frame: Any) -> np.ndarray:
        """Predict from every full window of ``frame`` (a DataFrame with the feature columns).

        Forecast: array (n_windows, horizon, n_targets) in original units, for the steps after
        each window (the same windows, transform and inverse as in training). Classify: the
        class of each window's last step.
        """
        c = self.ckpt
        out, z, origins = self._outputs(frame)
        if c["task"] == "classify":
            return np.asarray(c["classes"])[out.argmax(axis=1)]
        out = out.reshape(len(out), c["horizon"], len(c["targets"])).astype(np.float64)
        anchor = z[origins - 1][:, c["target_idx"]]
        return self.scaler.inverse(self.transform.invert(out, anchor), c["target_idx"])

    def predict_proba(self, frame: Any) -> np.ndarray:
        """Classify: each class's probability for every full window of ``frame``, an array
        (n_windows, n_classes) in the order of ``ckpt["classes"]`` whose rows sum to 1 (the
        softmax of the model's outputs, which training scored with cross-entropy). ValueError
        for a forecasting model."""
        if self.ckpt["task"] != "classify":
            raise ValueError("class probabilities need a classification model")
        logits = self._outputs(frame)[0].astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(e / e.sum(axis=1, keepdims=True))

    def _outputs(self, frame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's raw outputs for every full window of ``frame``, the scaled input
        values, and each window's origin (the row after it). ValueError for fewer rows than
        seq_len."""
        c = self.ckpt
        n_in, L = len(c["features"]), c["seq_len"]
        cols = list(
            dict.fromkeys([*c["features"], *(c["targets"] if c["task"] == "forecast" else [])])
        )
        values = frame[cols].to_numpy(dtype=np.float64)
        if len(values) < L:
            raise ValueError(f"need at least seq_len={L} rows, got {len(values)}")
        z = self.scaler.transform(values)
        origins = np.arange(L, len(values) + 1)  # after each full window
        x = self.transform.inputs(z, origins, L, n_in, c["target_idx"])
        out = (
            predict(self.model, torch.as_tensor(x, dtype=torch.float32, device=self.device), None)
            .cpu()
            .numpy()
        )
        return out, z, origins
