"""Search efficiency: best model found against epochs consumed, per search strategy.

Whole studies run through a real `seqtune serve` and a real `seqtune worker` (on Postgres, or
SQLite with --database-url sqlite:///...). Each study gets the same budget of training epochs:
the bench stops it once its trials consumed that many, then reads every trial back, orders
them by finish time and draws best-so-far validation (and the test metric of that best trial)
against cumulative epochs. Strategies: random search and TPE without pruning, TPE + median,
TPE + hyperband, and seqtune's defaults (a study that names no sampler and no pruner).

    python bench/search.py --problems sunspots --epochs 1500 --seeds 0 1 2
    python bench/search.py --problems mackey_glass --mg-points 20000 --epochs 200
    python bench/search.py --problems elnino --strategies defaults defaults-buffer0 --slots 4
    python bench/search.py --problems sunspots --strategies conditional unconditioned --epochs 800

Writes bench/results/search-<problem>.json, a markdown table on stdout and a PNG plot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from seqtune.client import ApiError, Client  # noqa: E402

# Multivariate, grouped TPE (what a conditional space gets by default), with Optuna's pruning
# off so that the two spaces differ in nothing else.
_GROUPED_TPE: dict[str, Any] = {
    "sampler": {"name": "tpe", "options": {"multivariate": True, "group": True}},
    "pruner": {"name": "none"},
}

STRATEGIES: dict[str, dict[str, Any]] = {
    "random": {"sampler": {"name": "random"}, "pruner": {"name": "none"}},
    "tpe": {"sampler": {"name": "tpe"}, "pruner": {"name": "none"}},
    "tpe+median": {
        "sampler": {"name": "tpe"},
        "pruner": {"name": "median", "options": {"n_startup_trials": 5, "n_warmup_steps": 5}},
    },
    "tpe+hyperband": {
        "sampler": {"name": "tpe"},
        "pruner": {"name": "hyperband", "options": {"min_resource": 3, "reduction_factor": 3}},
    },
    # hyperband from the first epoch (the defaults' first rule, max_epochs / 20 with no floor)
    "tpe+hyperband-min1": {
        "sampler": {"name": "tpe"},
        "pruner": {"name": "hyperband", "options": {"min_resource": 1, "reduction_factor": 3}},
    },
    # Optuna's MedianPruner as it comes (5 startup trials, no warm-up): seqtune's old default
    "tpe+median-w0": {"sampler": {"name": "tpe"}, "pruner": {"name": "median"}},
    "defaults": {},
    # seqtune's defaults without the suggestion buffer (every claim asks): what the buffer costs
    "defaults-buffer0": {"sampler": {"name": "tpe", "buffer": 0}},
    # The optimizer's and scheduler's own knobs, searched only where they act (issue 16) ...
    "conditional": {"space": "conditional", **_GROUPED_TPE},
    # ... and the same space with every knob searched on every trial: the same sampler
    "unconditioned": {"space": "unconditioned", **_GROUPED_TPE},
}

SPACE = {
    "hidden_size": {"type": "int", "low": 8, "high": 128, "log": True},
    "num_layers": {"type": "int", "low": 1, "high": 2},
    "dropout": {"type": "float", "low": 0.0, "high": 0.4},
    "lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "seq_len": {"type": "int", "low": 6, "high": 36, "step": 3},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    "optimizer": {"type": "categorical", "choices": ["adam", "adamw", "rmsprop", "sgd"]},
    "scheduler": {"type": "categorical", "choices": ["none", "plateau", "cosine"]},
}


# SPACE with the knobs that act under one optimizer or scheduler only, each made conditional on
# it ("conditional") or searched always ("unconditioned").
_KNOBS: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "momentum": ({"type": "float", "low": 0.5, "high": 0.99}, {"optimizer": ["sgd", "rmsprop"]}),
    "nesterov": ({"type": "categorical", "choices": [False, True]}, {"optimizer": ["sgd"]}),
    "scheduler_gamma": (
        {"type": "float", "low": 0.8, "high": 0.999},
        {"scheduler": ["exponential", "step"]},
    ),
    "scheduler_step_size": ({"type": "int", "low": 5, "high": 30}, {"scheduler": ["step"]}),
    "scheduler_patience": ({"type": "int", "low": 2, "high": 10}, {"scheduler": ["plateau"]}),
    "scheduler_factor": ({"type": "float", "low": 0.1, "high": 0.7}, {"scheduler": ["plateau"]}),
}


def space_of(kind: str) -> dict[str, Any]:
    space = dict(
        SPACE,
        optimizer={"type": "categorical", "choices": ["adam", "rmsprop", "sgd"]},
        scheduler={"type": "categorical", "choices": ["none", "plateau", "exponential", "step"]},
    )
    for name, (dist, when) in _KNOBS.items():
        space[name] = dict(dist, when=when) if kind == "conditional" else dict(dist)
    return space


def problem(name: str, mg_points: int) -> dict[str, Any]:
    if name == "sunspots":
        return {
            "dataset": {"kind": "builtin", "name": "sunspots"},
            "search_space": SPACE,
            "fixed": {"max_epochs": 60, "clip_norm": 1.0},
        }
    if name == "elnino":  # monthly sea surface temperatures, 1950-2010 (732 values)
        return {
            "dataset": {"kind": "builtin", "name": "elnino"},
            "search_space": SPACE,
            "fixed": {"max_epochs": 60, "clip_norm": 1.0},
        }
    if name == "mackey_glass":
        space = dict(
            SPACE,
            hidden_size={"type": "int", "low": 8, "high": 64, "log": True},
            batch_size={"type": "categorical", "choices": [128, 256, 512]},
            seq_len={"type": "int", "low": 8, "high": 48, "step": 8},
        )
        return {
            "dataset": {
                "kind": "synthetic",
                "generator": "mackey_glass",
                "n_points": mg_points,
                "seed": 0,
            },
            "search_space": space,
            "fixed": {"max_epochs": 20, "clip_norm": 1.0},
        }
    raise SystemExit(f"unknown problem {name}")


def run_study(c: Client, name: str, body: dict[str, Any], epochs: int) -> list[Any]:
    with contextlib.suppress(ApiError):  # a rerun replaces the study
        c.delete(name, force=True)
    c.submit(body)
    while True:
        trials = list(c.iter_trials(name, limit=1000))
        used = sum(t.epochs for t in trials)
        if used >= epochs:
            c.stop(name)
            break
        if c.study(name).status != "running":
            break
        time.sleep(0.5)
    while c.study(name).trials.running:  # let the running trials end (stopped: no new ones)
        time.sleep(0.5)
    return list(c.iter_trials(name, limit=1000))


def curve(trials: list[Any], epochs: int, minimize: bool = True) -> dict[str, Any]:
    """Best-so-far validation value and that trial's test RMSE against cumulative epochs."""
    done = sorted((t for t in trials if t.finished_at is not None), key=lambda t: t.finished_at)
    xs, best, test = [], [], []
    cum, b, bt = 0, None, None
    for t in done:
        cum += t.epochs
        if cum > epochs:
            break
        if (
            t.state == "COMPLETE"
            and t.value is not None
            and (b is None or (t.value < b if minimize else t.value > b))
        ):
            b, bt = t.value, (t.test_metrics or {}).get("test_rmse")
        xs.append(cum)
        best.append(b)
        test.append(bt)
    return {
        "epochs": xs,
        "best": best,
        "test": test,
        "final_best": b,
        "final_test": bt,
        "n_trials": len(xs),
        "n_pruned": sum(1 for t in done[: len(xs)] if t.state == "PRUNED"),
    }


def epochs_to_reach(cur: dict[str, Any], target: float) -> int | None:
    for x, b in zip(cur["epochs"], cur["best"], strict=True):
        if b is not None and b <= target:
            return int(x)
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", nargs="+", default=["sunspots"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1500, help="epoch budget per study")
    ap.add_argument("--mg-points", type=int, default=20000)
    ap.add_argument("--slots", type=int, default=2, help="worker slots (trials at once)")
    ap.add_argument(
        "--database-url", default="postgresql://postgres@127.0.0.1:5432/seqtune_bench_search"
    )
    ap.add_argument("--port", type=int, default=8977)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs already in search-<problem>.json (same budget) and "
        "run only the missing ones",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    harness.fresh_database(args.database_url)
    env = harness.service_env(args.database_url, out / "data")
    with harness.service(env, args.port, out / "serve.log") as c:
        worker = harness.start(
            ["worker", "--gpus", "none", "--slots-per-gpu", str(args.slots)],
            env,
            out / "worker.log",
        )
        try:
            run_all(c, args, out)
        finally:
            harness.stop(worker)


def run_all(c: Client, args: argparse.Namespace, out: Path) -> None:
    for prob in args.problems:
        results: dict[str, Any] = {
            "problem": prob,
            "epochs": args.epochs,
            "slots": args.slots,
            "machine": platform.node(),
            "started": datetime.now().isoformat(),
            "runs": {},
        }
        old = out / f"search-{prob}.json"
        if args.merge and old.exists():
            kept = json.loads(old.read_text())
            if kept["epochs"] != args.epochs:
                raise SystemExit(
                    f"{old} has a budget of {kept['epochs']} epochs, not "
                    f"{args.epochs}; cannot merge"
                )
            results["runs"] = kept["runs"]
        for seed in args.seeds:  # seed-major: a cut-short run still compares every strategy
            for strat in args.strategies:
                if f"{strat}/{seed}" in results["runs"] and args.merge:
                    continue  # kept from the merged file
                body = {
                    "name": f"{prob}-{strat.replace('+', '-')}-s{seed}",
                    "task": "forecast",
                    "objectives": [{"metric": "val_rmse"}],
                    "early_stopping": {"patience": 10},
                    "budget": {"n_trials": 100000, "max_concurrent_trials": args.slots},
                    **problem(prob, args.mg_points),
                    **{k: v for k, v in STRATEGIES[strat].items() if k != "space"},
                }
                if "space" in STRATEGIES[strat]:
                    body["search_space"] = space_of(STRATEGIES[strat]["space"])
                if "sampler" in body:
                    body["sampler"] = dict(body["sampler"], seed=seed)
                else:
                    body["sampler"] = {"seed": seed}  # the default sampler, seeded
                t0 = time.perf_counter()
                trials = run_study(c, body["name"], body, args.epochs)
                cur = curve(trials, args.epochs)
                cur["wall_s"] = time.perf_counter() - t0
                results["runs"][f"{strat}/{seed}"] = cur
                (out / f"search-{prob}.json").write_text(json.dumps(results, indent=1))
                print(
                    f"{prob} {strat} seed {seed}: best val {cur['final_best']:.4g} "
                    f"test {cur['final_test']} trials {cur['n_trials']} "
                    f"pruned {cur['n_pruned']} ({cur['wall_s']:.0f} s)",
                    flush=True,
                )
        (out / f"search-{prob}.json").write_text(json.dumps(results, indent=1))
        report(results, out)


def report(results: dict[str, Any], out: Path) -> None:
    """A markdown table and a PNG: best-so-far validation RMSE against epochs consumed."""
    runs, E = results["runs"], results["epochs"]
    strats = [s for s in STRATEGIES if any(k.startswith(s + "/") for k in runs)]
    seeds = sorted({int(k.split("/")[1]) for k in runs})
    print(f"\n### {results['problem']}: budget {E} epochs per study, {len(seeds)} seeds\n")
    print(
        "| strategy | best val RMSE (mean ± sd) | its test RMSE | trials | pruned | "
        "epochs to reach random's final best (share of budget) |"
    )
    print("|---|---|---|---|---|---|")
    for s in strats:
        rs = [runs[f"{s}/{seed}"] for seed in seeds]
        best = np.array([r["final_best"] for r in rs], dtype=float)
        test = np.array([r["final_test"] for r in rs], dtype=float)
        reach = []
        for seed, r in zip(seeds, rs, strict=True):
            target = runs.get(f"random/{seed}", {}).get("final_best")
            reach.append(None if target is None else epochs_to_reach(r, target))
        shown = ", ".join("never" if x is None else f"{x} ({x / E:.0%})" for x in reach)
        print(
            f"| {s} | {best.mean():.4g} ± {best.std():.2g} | {np.nanmean(test):.4g} | "
            f"{np.mean([r['n_trials'] for r in rs]):.0f} | "
            f"{np.mean([r['n_pruned'] for r in rs]):.0f} | {shown} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    grid = np.linspace(0, E, 200)
    for s in strats:
        ys = []
        for seed in seeds:
            r = runs[f"{s}/{seed}"]
            y = np.full_like(grid, np.nan)
            for x, b in zip(r["epochs"], r["best"], strict=True):
                if b is not None:
                    y[grid >= x] = np.fmin(np.where(np.isnan(y[grid >= x]), b, y[grid >= x]), b)
            ys.append(y)
        with warnings.catch_warnings():  # before a strategy's first result: all NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            ax.plot(grid, np.nanmean(np.array(ys), axis=0), label=s)
    ax.set_yscale("log")
    ax.set_xlabel("epochs consumed")
    ax.set_ylabel("best validation RMSE so far (mean of seeds, log scale)")
    ax.set_title(f"{results['problem']}: search efficiency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"search-{results['problem']}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        for f in sys.argv[2:]:
            report(json.loads(Path(f).read_text()), Path(f).parent)
    else:
        main()
