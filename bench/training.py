"""Training throughput: seqtune's engine against a reference "tutorial" loop.

    python bench/training.py [--device cpu|cuda] [--steps 20] [--quick] [--graphs] [--precision P]

Reference: a per-window ``Dataset`` (windows cut in ``__getitem__``), ``DataLoader(shuffle=True)``,
``.to(device)`` per batch; the same LSTM, Adam and MSE. Engine: ``worker.engine.train`` with its
windows on the device and batches sliced there. Both run 3 epochs of ``steps`` batches over
the same synthetic series; the first epoch is warm-up, and samples/s is training samples over
training time of epochs 2-3 (median of ``--repeats`` runs). On CUDA the engine also reports
model-FLOPs utilisation against the GPU's dense bf16/fp32 peak given with --peak-tflops, and
with --graphs the same step captured once as a CUDA graph and replayed (``graphed``; a capture
that fails is reported in the table, not raised). --precision bf16|fp32 picks the autocast.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine import Hyper, TrainConfig, autocast_dtype, train  # noqa: E402
from worker.model import LSTMModel, ModelArgs  # noqa: E402
from worker.preprocessing import prepare  # noqa: E402


class WindowDataset(Dataset):
    def __init__(self, series: np.ndarray, seq_len: int) -> None:
        self.s, self.L = series.astype(np.float32), seq_len

    def __len__(self) -> int:
        return len(self.s) - self.L

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(self.s[i : i + self.L, None]),
            torch.from_numpy(self.s[i + self.L : i + self.L + 1, None]),
        )


EPOCHS = 3  # the first is warm-up; throughput is measured over the rest


def reference(
    series: np.ndarray,
    hidden: int,
    layers: int,
    batch: int,
    seq_len: int,
    device: str,
    epochs: int = EPOCHS,
) -> float:
    torch.manual_seed(0)
    loader = DataLoader(WindowDataset(series, seq_len), batch_size=batch, shuffle=True)
    model = LSTMModel(ModelArgs(1, hidden, layers, 0.0, False, 0.0, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()
    n, seconds = 0, 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        count = 0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb[:, 0])
            loss.backward()
            opt.step()
            count += len(xb)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if epoch > 0:
            n, seconds = n + count, seconds + time.perf_counter() - t0
    return n / seconds


def engine(
    series: np.ndarray,
    hidden: int,
    layers: int,
    batch: int,
    seq_len: int,
    device: str,
    precision: str,
) -> float:
    # fractions put (almost) everything in train; val/test just big enough for one window
    n = len(series)
    small = (seq_len + 2) / n
    frame = pd.DataFrame({"y": series})
    data = prepare(
        frame,
        task="forecast",
        seq_len=seq_len,
        horizon=1,
        fractions=(1 - 2 * small, small, small),
        scaler="none",
        device=device,
    )
    hp = Hyper(
        hidden_size=hidden,
        num_layers=layers,
        batch_size=batch,
        seq_len=seq_len,
        max_epochs=EPOCHS,
        clip_norm=0.0,
        precision=precision,
    )
    r = train(TrainConfig(hp=hp, patience=None, device=device), data)
    steady = r.curve[1:]
    return len(data.train.x) * len(steady) / sum(c["train_seconds"] for c in steady)


def graphed(
    series: np.ndarray,
    hidden: int,
    layers: int,
    batch: int,
    seq_len: int,
    device: str,
    precision: str,
    epochs: int = EPOCHS,
) -> float:
    """The engine's step (gather a batch of windows on the device, forward, MSE, backward,
    Adam) captured once as a CUDA graph and replayed: one launch per step instead of dozens.
    Full batches only (a graph has static shapes). Raises if the capture fails."""
    torch.manual_seed(0)
    s = torch.as_tensor(series, dtype=torch.float32, device=device)
    x = s.unfold(0, seq_len, 1)[:-1, :, None].contiguous()  # (n, seq_len, 1)
    y = s[seq_len:, None]
    n = (len(x) // batch) * batch
    model = LSTMModel(ModelArgs(1, hidden, layers, 0.0, False, 0.0, 1)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    loss_fn = nn.MSELoss()
    amp = autocast_dtype(precision, device)
    idx = torch.arange(batch, device=device)  # the graph's static input: which windows

    def step() -> torch.Tensor:
        xb, yb = x[idx], y[idx]
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(model(xb).float(), yb)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN plans, optimizer state)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # .grad is then allocated from the graph's pool
    with torch.cuda.graph(graph):
        step()
    done, seconds = 0, 0.0
    for epoch in range(epochs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        perm = torch.randperm(n, device=device)
        for i in range(0, n, batch):
            idx.copy_(perm[i : i + batch])
            graph.replay()  # backward refills .grad in place: no zero_grad needed
        torch.cuda.synchronize()
        if epoch > 0:
            done, seconds = done + n, seconds + time.perf_counter() - t0
    return done / seconds


def lstm_flops_per_sample(hidden: int, layers: int, seq_len: int, n_in: int = 1) -> float:
    """Forward + backward matmul FLOPs of one sample (3x the forward's 2*MACs)."""
    fwd = 0.0
    for layer in range(layers):
        inp = n_in if layer == 0 else hidden
        fwd += 2 * 4 * hidden * (inp + hidden) * seq_len
    return 3 * fwd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20, help="batches per epoch")
    ap.add_argument("--quick", action="store_true", help="hidden 32/128 only")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    ap.add_argument(
        "--graphs",
        action="store_true",
        help="CUDA only: also time the step captured as a CUDA graph",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="GPU peak for MFU (e.g. 989 for H100 bf16 dense)",
    )
    args = ap.parse_args()
    hiddens = [32, 128] if args.quick else [32, 128, 512]
    rows = []
    for hidden, batch, seq_len, layers in itertools.product(hiddens, [32, 256], [50, 200], [1, 2]):
        steps = 2 if hidden >= 512 and not args.device.startswith("cuda") else args.steps
        n = batch * steps + seq_len + 1
        series = np.sin(np.arange(n + 2 * (seq_len + 2)) / 7.0) + 0.1 * np.random.default_rng(
            0
        ).standard_normal(n + 2 * (seq_len + 2))
        heavy = hidden >= 512 and not args.device.startswith("cuda")
        reps = 1 if heavy else args.repeats  # CPU at hidden 512: minutes per run
        ref = float(
            np.median(
                [
                    reference(series[:n], hidden, layers, batch, seq_len, args.device)
                    for _ in range(reps)
                ]
            )
        )
        eng = float(
            np.median(
                [
                    engine(series, hidden, layers, batch, seq_len, args.device, args.precision)
                    for _ in range(reps)
                ]
            )
        )
        graph: float | str = "—"
        if args.graphs and args.device.startswith("cuda"):
            try:
                graph = float(
                    np.median(
                        [
                            graphed(
                                series, hidden, layers, batch, seq_len, args.device, args.precision
                            )
                            for _ in range(reps)
                        ]
                    )
                )
            except Exception as exc:  # noqa: BLE001 - a failed capture is a result too
                graph = f"capture failed: {type(exc).__name__}"
        mfu = ""
        if args.device.startswith("cuda") and args.peak_tflops > 0:
            mfu = f"{100 * eng * lstm_flops_per_sample(hidden, layers, seq_len) / (args.peak_tflops * 1e12):.2f}%"
        rows.append((hidden, batch, seq_len, layers, ref, eng, eng / ref, mfu, graph))
        print(rows[-1], file=sys.stderr, flush=True)
    dev = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    )
    print(
        f"\nDevice: {dev}; torch {torch.__version__}; {args.steps} batches/epoch (2 at hidden 512 on CPU), epochs 2-3 timed, median of {args.repeats} runs (1 at hidden 512 on CPU)\n"
    )
    print(f"Precision: {args.precision}\n")
    print(
        "| hidden | batch | seq_len | layers | reference samples/s | engine samples/s | "
        "speed-up | MFU | CUDA-graph samples/s | graph vs engine |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for h, b, s, layer, ref, eng, ratio, mfu, graph in rows:
        vs = f"{graph / eng:.2f}x" if isinstance(graph, float) else "—"
        shown = f"{graph:,.0f}" if isinstance(graph, float) else graph
        print(
            f"| {h} | {b} | {s} | {layer} | {ref:,.0f} | {eng:,.0f} | {ratio:.2f}x | "
            f"{mfu or '—'} | {shown} | {vs} |"
        )


if __name__ == "__main__":
    main()
