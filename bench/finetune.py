"""Fine-tuning against training from scratch: epochs to a validation RMSE, and the best RMSE.

A model is pretrained once on a long Mackey-Glass series (tau 17, seed 0). The target is a
short series of the same system from another start (seed 1) with measurement noise: the
setting ``init_from`` is for (a related series, little data). On the target, the same
hyperparameters train from scratch, fine-tune the whole pretrained model (freeze 0) and
fine-tune with its first layer frozen (freeze 1), each with ``--seeds`` training seeds, for a
fixed number of epochs (no early stopping). Reported per arm: the epochs each run needed to
reach the threshold (``--factor`` × the median best validation RMSE of the scratch runs, i.e.
"nearly as good as scratch gets"), and the best validation RMSE. Everything runs through
``worker.engine.train``, as a worker's trial does.

    python bench/finetune.py [--seeds 3] [--epochs 25] [--factor 1.1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seqtune.spec import SyntheticData  # noqa: E402
from worker import datasets  # noqa: E402
from worker.engine import Hyper, InitModel, TrainConfig, train  # noqa: E402
from worker.preprocessing import prepare  # noqa: E402

F = (0.6, 0.2, 0.2)
HP = Hyper(hidden_size=16, num_layers=2, lr=5e-3, batch_size=64, seq_len=16, max_epochs=25)


def series(seed: int, n: int, noise: float) -> Any:
    ref = SyntheticData(
        kind="synthetic",
        generator="mackey_glass",
        n_points=n,
        seed=seed,
        options={"tau": 17, "noise": noise},
    )
    return prepare(
        datasets.generate(ref), task="forecast", seq_len=HP.seq_len, horizon=1, fractions=F
    )


def epochs_to(curve: list[dict[str, float]], threshold: float) -> int | None:
    """1-based epoch at which val_rmse first reached ``threshold``; None if never."""
    return next((i + 1 for i, r in enumerate(curve) if r["val_rmse"] <= threshold), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--factor", type=float, default=1.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--source-points", type=int, default=1500)
    ap.add_argument("--target-points", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hp = replace(HP, max_epochs=args.epochs)
    t0 = time.perf_counter()

    source = series(0, args.source_points, 0.0)
    pre = train(TrainConfig(hp=hp, patience=None, seed=0), source)
    assert pre.checkpoint is not None
    init = InitModel(pre.checkpoint, {"study": "pretrain", "trial": 0})
    target = series(1, args.target_points, 0.02)

    arms: dict[str, list[dict[str, Any]]] = {
        "scratch": [],
        "fine-tune": [],
        "fine-tune, freeze 1": [],
    }
    for seed in range(args.seeds):
        for arm, k, start in (
            ("scratch", 0, None),
            ("fine-tune", 0, init),
            ("fine-tune, freeze 1", 1, init),
        ):
            cfg = TrainConfig(hp=replace(hp, freeze_layers=k), patience=None, seed=seed)
            r = train(cfg, target, init=start)
            arms[arm].append(
                {
                    "seed": seed,
                    "curve": [c["val_rmse"] for c in r.curve],
                    "best": min(c["val_rmse"] for c in r.curve),
                    "train_seconds": r.train_seconds,
                }
            )
    threshold = args.factor * statistics.median(x["best"] for x in arms["scratch"])
    rows = []
    for arm, runs in arms.items():
        reach = [epochs_to([{"val_rmse": v} for v in x["curve"]], threshold) for x in runs]
        rows.append(
            {
                "arm": arm,
                "epochs_to_threshold": reach,
                "best_val_rmse": [round(x["best"], 5) for x in runs],
                "seconds_per_epoch": statistics.mean(x["train_seconds"] for x in runs)
                / args.epochs,
            }
        )
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "torch": torch.__version__,
        "source": f"mackey_glass tau 17 seed 0, {args.source_points} points, noise 0",
        "target": f"mackey_glass tau 17 seed 1, {args.target_points} points, noise 0.02",
        "hparams": {
            k: getattr(hp, k)
            for k in ("hidden_size", "num_layers", "lr", "batch_size", "seq_len", "max_epochs")
        },
        "pretrain_best_val_rmse": min(c["val_rmse"] for c in pre.curve),
        "threshold_val_rmse": threshold,
        "rows": rows,
        "wall_seconds": time.perf_counter() - t0,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"threshold: val RMSE <= {threshold:.4f} ({args.factor} x scratch's median best)")
    print("| arm | epochs to threshold (per seed) | median | best val RMSE (per seed) | s/epoch |")
    print("|---|---|---|---|---|")
    for row in rows:
        reach = row["epochs_to_threshold"]
        done = [e for e in reach if e is not None]
        med = statistics.median(done) if len(done) == len(reach) else "not all"
        print(
            f"| {row['arm']} | {', '.join(str(e) if e else '>' + str(args.epochs) for e in reach)} "
            f"| {med} | {', '.join(f'{b:.4f}' for b in row['best_val_rmse'])} "
            f"| {row['seconds_per_epoch']:.3f} |"
        )
    print(f"wall {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
