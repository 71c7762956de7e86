"""A trial's end and its study's budget: the counters, the Pareto front, completion, the final
phase.

Every way a trial ends (a worker's ``finish``, the reaper failing or reconciling it, an outside
Optuna client's result) goes through ``close_trial``: it tells Optuna (unless Optuna is where
the end came from), records the trial's end, moves the study's counters and, once the budget is
spent and nothing runs, either starts the final phase (re-training the top configurations) or
completes the study (``end_of_budget``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from seqtune.spec import StudySpec
from seqtune.states import StudyPhase, StudyStatus, TrialState, study_transition, trial_transition
from service.store.tables import Study, Trial, Worker, utcnow
from service.store.trials import count_move, update_front

log = logging.getLogger(__name__)


def close_trial(
    s: Session,
    ostudy: optuna.Study | None,
    t: Trial,
    *,
    action: str,
    state: str,
    values: list[float] | None,
    reason: str | None,
    test_metrics: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    error: str | None = None,
    tell: bool = True,
) -> None:
    """Record the end of trial ``t`` (the caller holds its row lock) as ``state`` through the
    transition ``action``, telling Optuna first when ``tell`` (and ``ostudy`` is given); free
    its lease and its worker; move the study's counters (and its Pareto front); and, once the
    budget is spent and nothing runs, call ``end_of_budget``. Raises Conflict (from the
    transition table) for an end the trial's state does not allow."""
    # The move is checked before anything is written: Optuna's tell commits on its own
    # connection, and a refused move after it would leave Optuna and seqtune disagreeing.
    old_state = t.state
    new_state = trial_transition(action, old_state, state, number=t.number)
    # Optuna first, under the trial's lock only: the study row is what claimers queue on while
    # they ask(), so it is taken last and held just for the counters and the completion check.
    if tell and ostudy is not None:
        ostudy.tell(
            t.number,
            values=values if state == TrialState.COMPLETE else None,
            state=OptunaState[state],
            skip_if_finished=True,
        )
    t.state = new_state
    t.reason, t.error = reason, error
    t.values = list(values) if values is not None else None
    t.value = values[0] if values else None
    t.test_metrics = finite(test_metrics)
    t.info = finite(info or t.info or {})
    t.lease_owner, t.fence = None, t.fence + 1
    t.finished_at = utcnow()
    s.execute(update(Worker).where(Worker.trial_id == t.id).values(trial_id=None))
    s.flush()
    study = s.scalar(select(Study).where(Study.id == t.study_id).with_for_update())
    assert study is not None
    count_move(s, study.id, old_state, state)
    if state == TrialState.COMPLETE and values and len(study.directions) > 1:
        update_front(s, study, t)
    s.flush()
    s.refresh(study)
    if (
        study.status == StudyStatus.RUNNING
        and study.n_claimed >= study.n_trials
        and study.n_running == 0
    ):
        end_of_budget(s, study)


def finite(v: Any) -> Any:
    """JSON has no NaN or infinity (Postgres' jsonb refuses them): they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [finite(x) for x in v]
    return v


def end_of_budget(s: Session, study: Study) -> bool:
    """The budget is spent and nothing runs: start the final phase (the spec asks for one and
    the search completed a trial: the budget grows by top_k x seeds re-trains), else
    complete the study. Returns True when the study completed."""
    final = (study.spec or {}).get("final")
    if final and study.phase == StudyPhase.SEARCH and len(study.directions) == 1:
        n_top = len(top_trials(s, study, final["top_k"]))
        if n_top:
            study.phase = StudyPhase.FINAL
            study.n_trials += n_top * final["seeds"]
            log.info(
                "study %s: search done; re-training its top %d with %d seeds",
                study.name,
                n_top,
                final["seeds"],
            )
            return False
    study.status = study_transition("complete", study.status, name=study.name)
    study.finished_at = utcnow()
    return True


def top_trials(s: Session, study: Study, k: int) -> list[Trial]:
    """The study's k best COMPLETE search trials (final re-trains excluded), best first."""
    desc = study.directions[0] == "maximize"
    return list(
        s.scalars(
            select(Trial)
            .where(
                Trial.study_id == study.id,
                Trial.state == TrialState.COMPLETE,
                Trial.final_of.is_(None),
                Trial.value.is_not(None),
            )
            .order_by(Trial.value.desc() if desc else Trial.value.asc(), Trial.number)
            .limit(k)
        )
    )


def enqueue_retrain(s: Session, ostudy: optuna.Study, study: Study, spec: StudySpec) -> int:
    """Final phase: queue the next (configuration, seed) re-train in Optuna so that the
    ask() that follows pops it. Re-trains go in order: each of the top-k configurations
    ``seeds`` times; each gets its own trial number, and the trial number seeds training.
    Returns the number of the search trial it re-trains."""
    assert spec.final is not None
    done = (
        s.scalar(
            select(func.count())
            .select_from(Trial)
            .where(Trial.study_id == study.id, Trial.final_of.is_not(None))
        )
        or 0
    )
    source = top_trials(s, study, spec.final.top_k)[done // spec.final.seeds]
    ostudy.enqueue_trial(
        source.params, user_attrs={"seqtune_final_of": source.number}, skip_if_exists=False
    )
    return source.number
