"""Automatic stopping by the regret bound (``budget.stop_when.regret_bound``), in the manner of
Optuna's Terminator.

After a trial completes, the worker that told it asks Optuna's ``Terminator`` whether the
study's search has converged: a Gaussian process fitted to the completed trials bounds how much
better the best value could still get (``RegretBoundEvaluator``), and the study stops once that
bound falls below the statistical error of the objective, estimated by the median-error rule
(``MedianErrorEvaluator``: a small fraction of the bound's median over the first trials). The
GP fit costs time that grows with the study (BENCHMARKS.md, "Automatic stopping"): it runs in
the worker, after its result is recorded and outside every transaction.

The other criterion, ``no_improvement_trials``, is counted by the store as each trial ends
(``service.store.budget.watch_improvement``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import optuna
from optuna.terminator import MedianErrorEvaluator, RegretBoundEvaluator, Terminator

from seqtune.spec import StopWhen

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judgement:
    stop: bool
    seconds: float  # what asking cost
    reason: str


_TERMINATORS: dict[str, Terminator] = {}


def terminator(key: str, rule: StopWhen, seed: int | None = None) -> Terminator:
    """The study's Terminator, one per process (the median-error rule keeps its threshold once
    it has computed it from the first trials)."""
    t = _TERMINATORS.get(key)
    if t is None:
        n = max(rule.min_trials, 2)
        t = Terminator(
            improvement_evaluator=RegretBoundEvaluator(min_n_trials=n, seed=seed),
            error_evaluator=MedianErrorEvaluator(
                paired_improvement_evaluator=RegretBoundEvaluator(min_n_trials=n, seed=seed),
                warm_up_trials=min(10, n),
                n_initial_trials=n,
            ),
            min_n_trials=n,
        )
        if len(_TERMINATORS) > 64:
            _TERMINATORS.clear()
        _TERMINATORS[key] = t
    return t


def judge(ostudy: optuna.Study, rule: StopWhen, *, seed: int | None = None) -> Judgement:
    """Whether the regret bound says ``ostudy`` should stop, and what asking cost."""
    start = time.perf_counter()
    stop = terminator(ostudy.study_name, rule, seed).should_terminate(ostudy)
    took = time.perf_counter() - start
    n = len(ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    return Judgement(
        stop,
        took,
        f"the regret bound fell below the objective's estimated error after {n} completed "
        "trials (Optuna's Terminator)",
    )
