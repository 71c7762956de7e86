"""Several trials per GPU: aggregate throughput of one GPU with K = 1, 2, 4, 8 slots.

For each model size and each K, a real `seqtune worker --gpus G --slots-per-gpu K` trains a
study of identical trials (an empty search space: every hyperparameter fixed, no pruning, no
early stopping) from a real `seqtune serve`. From the trials it reads back:

- aggregate samples/s: the training samples of all trials (samples/s x train seconds, as each
  trial recorded them) over the wall time from the first trial's start to the last one's end;
- trials/hour over the same wall time;
- the memory-aware policy's estimate for a trial beside the peak the trial measured.

    python bench/gpu_slots.py                       # on a GPU machine: GPU 0, K = 1 2 4 8
    python bench/gpu_slots.py --precision fp32 bf16 # the same with each precision
    python bench/gpu_slots.py --device cpu --slots 1 2 --sizes small --trials-per-slot 1 \\
        --epochs 2 --points 4000                    # a smoke run of the harness on a CPU

Prints a markdown table and writes bench/results/gpu-slots.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from seqtune.client import Client  # noqa: E402

SIZES = {  # name -> fixed hyperparameters
    "small": {"hidden_size": 32, "num_layers": 1, "batch_size": 64, "seq_len": 32},
    "medium": {"hidden_size": 128, "num_layers": 2, "batch_size": 64, "seq_len": 64},
    "large": {"hidden_size": 512, "num_layers": 2, "batch_size": 128, "seq_len": 64},
}


def study(name: str, size: str, precision: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": name,
        "task": "forecast",
        "objectives": [{"metric": "val_rmse"}],
        "dataset": {
            "kind": "synthetic",
            "generator": "mackey_glass",
            "n_points": args.points,
            "seed": 0,
        },
        "search_space": {},
        "fixed": {
            **SIZES[size],
            "max_epochs": args.epochs,
            "precision": precision,
            "clip_norm": 1.0,
        },
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "early_stopping": {"patience": None},
        "budget": {"n_trials": k * args.trials_per_slot, "max_concurrent_trials": k},
    }


def measure(c: Client, body: dict[str, Any]) -> dict[str, Any]:
    c.submit(body)
    view = c.wait(body["name"], poll_s=1.0)
    trials = [t for t in c.iter_trials(body["name"], limit=1000) if t.state == "COMPLETE"]
    if not trials:
        raise SystemExit(f"{body['name']} ended {view.status} with no COMPLETE trial")
    t0 = min(t.started_at for t in trials if t.started_at)
    t1 = max(t.finished_at for t in trials if t.finished_at)
    wall = (t1 - t0).total_seconds()
    samples = sum(t.info["samples_per_s"] * t.info["train_seconds"] for t in trials)
    peaks = [t.info.get("peak_gpu_mem_bytes") for t in trials]
    est = [t.info.get("gpu_mem_estimate_bytes") for t in trials]
    return {
        "trials": len(trials),
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "trials_per_hour": 3600 * len(trials) / wall,
        "per_trial_samples_per_s": sum(t.info["samples_per_s"] for t in trials) / len(trials),
        "peak_bytes": max((p for p in peaks if p), default=None),
        "estimate_bytes": max((e for e in est if e), default=None),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--gpu", default="0", help="the GPU to use (CUDA_VISIBLE_DEVICES form)")
    ap.add_argument("--slots", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["small", "medium"])
    ap.add_argument(
        "--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16", "fp16"]
    )
    ap.add_argument("--trials-per-slot", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per trial")
    ap.add_argument("--points", type=int, default=20000, help="Mackey-Glass series length")
    ap.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/seqtune_bench_slots"
    )
    ap.add_argument("--port", type=int, default=8978)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.fresh_database(args.database_url)
    env = harness.service_env(args.database_url, out / "data-slots")
    gpus = args.gpu if args.device == "cuda" else "none"
    rows: list[dict[str, Any]] = []
    with harness.service(env, args.port, out / "serve-slots.log") as c:
        for size in args.sizes:
            for precision in args.precision:
                for k in args.slots:
                    worker = harness.start(
                        ["worker", "--gpus", gpus, "--slots-per-gpu", str(k)],
                        env,
                        out / f"worker-slots-{size}-{k}.log",
                    )
                    try:
                        name = f"slots-{size}-{precision}-k{k}"
                        t0 = time.perf_counter()
                        r = measure(c, study(name, size, precision, k, args))
                    finally:
                        harness.stop(worker)
                    r |= {
                        "size": size,
                        "precision": precision,
                        "k": k,
                        "bench_wall_s": time.perf_counter() - t0,
                    }
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
    device = args.device
    if device == "cuda":
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
    result = {
        "machine": platform.node(),
        "device": device,
        "started": datetime.now().isoformat(),
        "epochs": args.epochs,
        "points": args.points,
        "rows": rows,
    }
    (out / "gpu-slots.json").write_text(json.dumps(result, indent=1))
    report(result)


def report(result: dict[str, Any]) -> None:
    print(
        f"\nDevice: {result['device']}; Mackey-Glass {result['points']} points, "
        f"{result['epochs']} epochs per trial\n"
    )
    print(
        "| size | precision | K | trials | aggregate samples/s | vs K=1 | trials/hour | "
        "per-trial samples/s | estimate (MiB) | measured peak (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    single = {
        (r["size"], r["precision"]): r["samples_per_s"] for r in result["rows"] if r["k"] == 1
    }

    def mib(b: int | None) -> str:
        return "—" if not b else f"{b / 2**20:,.0f}"

    for r in result["rows"]:
        one = single.get((r["size"], r["precision"]))
        ratio = r["samples_per_s"] / one if one else float("nan")
        print(
            f"| {r['size']} | {r['precision']} | {r['k']} | {r['trials']} | "
            f"{r['samples_per_s']:,.0f} | {ratio:.2f}x | {r['trials_per_hour']:,.0f} | "
            f"{r['per_trial_samples_per_s']:,.0f} | {mib(r['estimate_bytes'])} | "
            f"{mib(r['peak_bytes'])} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--report":
        report(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
