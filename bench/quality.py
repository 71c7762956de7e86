"""Forecast quality: the tuned LSTM against classical baselines on the same test targets.

Each study names only its dataset, the task, a horizon and a budget (plus the sampler's seed),
so it runs seqtune's defaults: the default search space (with ``target_transform``), TPE and
hyperband. Studies run through a real `seqtune serve` and a real `seqtune worker` on Postgres,
one at a time; the baselines are the ones the worker computed for the study and `/best` shows.

    python bench/quality.py --series sunspots co2 elnino realgdp --seeds 0 1 2 --trials 20

Writes bench/results/quality.json (merged run by run, so an interrupted run keeps what it
finished; --merge skips studies already there) and prints a markdown table.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from seqtune.client import Client  # noqa: E402

BASELINES = ("persistence", "seasonal_naive", "mean", "ets", "ar", "arima")


def run_study(
    c: Client, series: str, seed: int, trials: int, horizon: int, timeout_s: float
) -> dict[str, Any]:
    name = f"q-{series}-s{seed}"
    t0 = time.perf_counter()
    c.submit(
        {
            "name": name,
            "task": "forecast",
            "horizon": horizon,
            "dataset": {"kind": "builtin", "name": series},
            "budget": {"n_trials": trials},
            "sampler": {"seed": seed},
        }
    )
    final = c.wait(name, timeout_s=timeout_s)
    wall = time.perf_counter() - t0
    best = c.best(name)
    b = best.best
    assert b is not None and b.test_metrics is not None
    base = best.baselines or {}
    return {
        "series": series,
        "seed": seed,
        "status": final.status,
        "wall_s": wall,
        "trials": final.trials.model_dump(),
        "best_trial": b.number,
        "params": b.params,
        "val_rmse": (b.info.get("val") or {}).get("val_rmse"),
        "test_rmse": b.test_metrics.get("test_rmse"),
        "test_n_targets": b.test_metrics.get("test_n_targets"),
        "baselines": {k: v for k, v in (base.get("models") or {}).items()},
        "best_baseline": base.get("best"),
        "season": base.get("season"),
        "baseline_seconds": base.get("seconds"),
        "verdict": best.verdict,
    }


def table(runs: list[dict[str, Any]]) -> str:
    rows = [
        "| series | tuned LSTM test RMSE | "
        + " | ".join(BASELINES)
        + " | best baseline (by val) | LSTM / best | beats it on val (seeds) | wall time |",
        "|---|---:|" + "---:|" * len(BASELINES) + "---|---:|---|---:|",
    ]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["series"], []).append(r)
    for series, rs in by.items():
        lstm = np.array([r["test_rmse"] for r in rs])
        cells = [f"{lstm.mean():.4g} ± {lstm.std():.2g} (n={len(rs)})"]
        first = rs[0]["baselines"]
        for name in BASELINES:
            m = first.get(name)
            cells.append(f"{m['test']['rmse']:.4g}" if m else "—")
        bb = rs[0]["best_baseline"]
        ratio = lstm.mean() / first[bb]["test"]["rmse"] if bb in first else float("nan")
        beats = sum(bool((r["verdict"] or {}).get("beats_baseline")) for r in rs)
        wall = np.mean([r["wall_s"] for r in rs])
        rows.append(
            f"| {series} (season {rs[0]['season']}) | "
            + " | ".join(cells)
            + f" | {bb} | {ratio:.2f} | {beats}/{len(rs)} | {wall / 60:.1f} min |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", nargs="+", default=["sunspots", "co2", "elnino", "realgdp"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--horizon", type=int, default=1)
    ap.add_argument("--slots", type=int, default=2, help="worker slots (trials at once)")
    ap.add_argument(
        "--database-url",
        default="postgresql+psycopg2://postgres@127.0.0.1:5432/seqtune_bench_quality",
    )
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--timeout", type=float, default=3600, help="per study, seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    ap.add_argument("--merge", action="store_true", help="keep runs already in --out")
    args = ap.parse_args()

    done: list[dict[str, Any]] = []
    if args.merge and args.out.exists():
        done = json.loads(args.out.read_text())["runs"]
    have = {(r["series"], r["seed"]) for r in done}
    work = Path("/tmp/seqtune-bench-quality")
    work.mkdir(parents=True, exist_ok=True)
    harness.fresh_database(args.database_url)
    env = harness.service_env(args.database_url, work / "data")
    meta = {
        "machine": platform.node(),
        "processor": platform.processor(),
        "slots": args.slots,
        "trials": args.trials,
        "horizon": args.horizon,
        "date": datetime.now().isoformat(timespec="seconds"),
    }
    with harness.service(env, args.port, work / "serve.log") as c:
        worker = harness.start(
            ["worker", "--gpus", "none", "--slots-per-gpu", str(args.slots)],
            env,
            work / "worker.log",
        )
        try:
            for seed in args.seeds:  # seed-major: a run cut short still covers every series
                for series in args.series:
                    if (series, seed) in have:
                        continue
                    r = run_study(c, series, seed, args.trials, args.horizon, args.timeout)
                    done.append(r)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"meta": meta, "runs": done}, indent=1))
                    v = r["verdict"] or {}
                    print(
                        f"{series} seed {seed}: LSTM test RMSE {r['test_rmse']:.4g}, best "
                        f"baseline {r['best_baseline']}, {v.get('message', '')} "
                        f"({r['wall_s'] / 60:.1f} min)",
                        flush=True,
                    )
        finally:
            harness.stop(worker)
    print(table(done))


if __name__ == "__main__":
    main()
