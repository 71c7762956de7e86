"""What the regret-bound stopping rule (``budget.stop_when.regret_bound``) costs per trial.

After each completed trial, the worker that told it asks Optuna's Terminator
(``worker.stopping.judge``), which fits a Gaussian process to the study's completed trials.
This times that call against the number of completed trials, on a study of seqtune's default
search space shape (8 parameters: ints, log floats, categoricals) with a synthetic objective,
so that only the judgement is timed. The Terminator is made afresh for each size, as a new
worker process would make it.

    python bench/stopping.py --sizes 20 50 100 200 400 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import warnings
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seqtune.spec import StopWhen  # noqa: E402
from worker import stopping  # noqa: E402


def objective(t: optuna.Trial) -> float:
    h = t.suggest_int("hidden_size", 16, 256, log=True)
    layers = t.suggest_int("num_layers", 1, 2)
    drop = t.suggest_float("dropout", 0.0, 0.5)
    lr = t.suggest_float("lr", 1e-4, 1e-2, log=True)
    bs = t.suggest_categorical("batch_size", [32, 64, 128])
    seq = t.suggest_int("seq_len", 4, 64)
    opt = t.suggest_categorical("optimizer", ["adam", "adamw", "rmsprop", "sgd"])
    tt = t.suggest_categorical("target_transform", ["none", "diff"])
    return (
        (math.log10(lr) + 2.5) ** 2
        + 0.1 * (math.log2(h) - 6) ** 2
        + 0.5 * drop
        + 0.05 * layers
        + 0.001 * abs(seq - 24)
        + 0.01 * (bs == 128)
        + 0.2 * (opt == "sgd")
        + 0.1 * (tt == "diff")
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[20, 50, 100, 200, 400])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stopping.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rule = StopWhen(regret_bound=True, min_trials=10)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    stopping.judge(study, rule, seed=0)  # imports and first-call set-up, untimed
    rows = []
    for n in args.sizes:
        study.optimize(objective, n_trials=n - len(study.trials))
        times, stop = [], False
        for _ in range(args.repeats):
            stopping._TERMINATORS.clear()  # a fresh Terminator, as in a new worker process
            v = stopping.judge(study, rule, seed=0)
            times.append(v.seconds)
            stop = bool(v.stop)
        rows.append(
            {
                "trials": n,
                "median_s": statistics.median(times),
                "max_s": max(times),
                "says_stop": stop,
            }
        )
        print(
            f"{n:5d} trials: {statistics.median(times):.3f} s (max {max(times):.3f}), stop={stop}",
            flush=True,
        )
    Path(args.out).write_text(
        json.dumps(
            {"machine": platform.node(), "cpus": __import__("os").cpu_count(), "rows": rows},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
