"""Trials of several shapes trained one after another in this process, as a slot trains
them: each one's GPU memory estimate (from its windows prepared on the CPU, as the slot
makes it) beside the peak the engine measured. One JSON line per trial on stdout.

    python -m tests.gpu.peaks
"""

from __future__ import annotations

import json
import sys
from typing import Any

from seqtune.spec import SyntheticData
from worker import admission, datasets
from worker.engine import Hyper, TrainConfig, train
from worker.preprocessing import prepare

SHAPES: list[tuple[str, dict[str, Any]]] = [  # bench/gpu_slots.py's sizes, and two more
    ("small", {"hidden_size": 32, "num_layers": 1, "batch_size": 64, "seq_len": 32}),
    ("medium", {"hidden_size": 128, "num_layers": 2, "batch_size": 64, "seq_len": 64}),
    ("large", {"hidden_size": 512, "num_layers": 2, "batch_size": 128, "seq_len": 64}),
    ("long", {"hidden_size": 256, "num_layers": 2, "batch_size": 256, "seq_len": 200}),
    (
        "bidirectional",
        {
            "hidden_size": 64,
            "num_layers": 2,
            "batch_size": 128,
            "seq_len": 48,
            "bidirectional": True,
        },
    ),
]


def main() -> None:
    frames = {
        "mackey_glass": datasets.generate(
            SyntheticData(kind="synthetic", generator="mackey_glass", n_points=20000, seed=0)
        ),
        "sunspots": datasets.builtin("sunspots"),
    }
    runs = [(n, "mackey_glass", kw) for n, kw in SHAPES] + [
        ("sunspots", "sunspots", {"hidden_size": 16, "batch_size": 64, "seq_len": 12})
    ]
    for precision in ("bf16", "fp32"):
        for name, dataset, kw in runs:
            hp = Hyper(**kw, precision=precision, max_epochs=1)
            args: dict[str, Any] = dict(
                task="forecast", seq_len=hp.seq_len, horizon=1, fractions=(0.7, 0.15, 0.15)
            )
            est = admission.estimate(hp, prepare(frames[dataset], **args), "cuda")
            data = prepare(frames[dataset], **args, device="cuda")
            r = train(TrainConfig(hp=hp, patience=None, device="cuda"), data)
            del data
            row = {"name": name, "dataset": dataset, "precision": precision}
            row |= {"estimate": est, "peak": r.peak_gpu_mem_bytes, "reason": r.reason}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
