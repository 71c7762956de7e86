"""A trial's end and its study's budget: the counters, the Pareto front, completion, the final
phase.

Every way a trial ends (a worker's ``finish``, the reaper failing or reconciling it, an outside
Optuna client's result) goes through ``close_trial``: it tells Optuna (unless Optuna is where
the end came from), records the trial's end, moves the study's counters and, once the budget is
spent and nothing runs, either starts the final phase (re-training the top configurations) or
completes the study (``end_of_budget``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from seqtune.search import CONSTRAINTS_ATTR
from seqtune.spec import StopWhen, StudySpec
from seqtune.states import StudyPhase, StudyStatus, TrialState, study_transition, trial_transition
from service.store import buffer
from service.store.tables import Study, Trial, Worker, utcnow
from service.store.trials import count_deltas, count_move, update_front

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
    constraints: list[float] | None = None,
    last: bool = False,
) -> list[int]:
    """Record the end of trial ``t`` (the caller holds its row lock) as ``state`` through the
    transition ``action``, telling Optuna first when ``tell`` (and ``ostudy`` is given); free
    its lease and its worker; move the study's counters (and its Pareto front); watch for
    automatic stopping (``watch_improvement``); and, once the budget is spent and nothing
    runs, call ``end_of_budget``. ``constraints``: the violation of each of the study's
    constraints (<= 0 met), stored on the Optuna trial before the tell, where the sampler's
    ``constraints_func`` reads them; the trial is feasible when all are met. Raises Conflict
    (from the transition table) for an end the trial's state does not allow. Returns the
    Optuna trial ids of suggestions an automatic stop cancelled: the caller fails them in
    Optuna once its transaction has committed (``buffer.fail_cancelled``)."""
    # The move is checked before anything is written: Optuna's tell commits on its own
    # connection, and a refused move after it would leave Optuna and seqtune disagreeing.
    old_state = t.state
    new_state = trial_transition(action, old_state, state, number=t.number)
    if constraints is not None:
        t.feasible = all(v <= 0 for v in constraints)
        if tell and ostudy is not None and state in (TrialState.COMPLETE, TrialState.PRUNED):
            # A retried transaction finds the trial told already (the tell below skips it):
            # then the attribute is there too.
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                ostudy._storage.set_trial_user_attr(
                    t.optuna_trial_id, CONSTRAINTS_ATTR, [float(v) for v in constraints]
                )
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
    if last:
        # The caller commits right after (Postgres, a study with one objective and no
        # automatic stopping): the study's row, which every claim and finish of the study
        # updates, is locked by this one statement until that commit, not for the reads
        # and writes the full path makes under it (measured at 32 workers: tell p50 0.45 s
        # with the row held across them).
        left = s.execute(
            update(Study)
            .where(Study.id == t.study_id)
            .values(**count_deltas(old_state, state))
            .returning(Study.status, Study.n_claimed, Study.n_trials, Study.n_running)
        ).one()
        if not (
            left.status == StudyStatus.RUNNING
            and left.n_claimed >= left.n_trials
            and left.n_running == 0
        ):
            return []
        study = s.scalar(
            select(Study).where(Study.id == t.study_id).execution_options(populate_existing=True)
        )
        assert study is not None
        end_of_budget(s, study)
        return []
    study = s.scalar(select(Study).where(Study.id == t.study_id).with_for_update())
    assert study is not None
    count_move(s, study.id, old_state, state)
    if state == TrialState.COMPLETE and values and len(study.directions) > 1:
        update_front(s, study, t)
    s.flush()
    s.refresh(study)
    cancelled = watch_improvement(s, study, t)
    if (
        study.status == StudyStatus.RUNNING
        and study.n_claimed >= study.n_trials
        and study.n_running == 0
    ):
        end_of_budget(s, study)
    return cancelled


def watch_improvement(s: Session, study: Study, t: Trial) -> list[int]:
    """Automatic stopping by ``budget.stop_when.no_improvement_trials``: after trial ``t``
    ended (study row locked and counters moved), keep the best value and the number of
    finished search trials since it last improved by more than ``min_delta``; once that number
    reaches the limit (and ``min_trials`` completed), stop the study early (``stop_early``).
    A pruned trial counts as one without improvement; a failed one does not count; an
    infeasible one never improves the best. Returns what ``stop_early`` cancelled."""
    raw = ((study.spec or {}).get("budget") or {}).get("stop_when")
    if not raw or study.status != StudyStatus.RUNNING or study.phase != StudyPhase.SEARCH:
        return []
    if t.final_of is not None or t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        return []
    rule = StopWhen.model_validate(raw)
    if rule.no_improvement_trials is None:
        return []
    sign = -1.0 if study.directions[0] == "maximize" else 1.0
    value = t.value if t.state == TrialState.COMPLETE and t.feasible is not False else None
    if value is not None and (
        study.stop_best is None or sign * (value - study.stop_best) < -rule.min_delta
    ):
        study.stop_best, study.stop_stale = value, 0
        return []
    study.stop_stale += 1
    if study.stop_stale >= rule.no_improvement_trials and study.n_complete >= rule.min_trials:
        return stop_early(
            s,
            study,
            f"no improvement larger than {rule.min_delta:g} in the last {study.stop_stale} "
            f"finished trials (best {study.stop_best:.6g})"
            if study.stop_best is not None
            else f"no feasible completed trial in the last {study.stop_stale} trials",
        )
    return []


def stop_early(s: Session, study: Study, reason: str) -> list[int]:
    """End a running study's search before its budget is spent (automatic stopping; the study
    row locked): no new trial starts (the budget shrinks to the trials already started or
    queued, and suggestions asked ahead are cancelled), those
    running finish, and the study then completes as any study does at the end of its budget
    (a final phase, if the spec asks for one, still runs). ``reason`` is kept, with the budget
    it had, in ``stop_reason``. Only the search phase stops: the final phase's re-trains, once
    begun, all run. Returns the Optuna trial ids of the cancelled suggestions (the caller fails
    them in Optuna after its commit)."""
    if (
        study.status != StudyStatus.RUNNING
        or study.stop_reason is not None
        or study.phase != StudyPhase.SEARCH
    ):
        return []
    started = study.n_claimed + study.n_waiting
    study.stop_reason = f"{reason}; stopped after {started} of {study.n_trials} trials"
    log.info("study %s stops early: %s", study.name, study.stop_reason)
    study.n_trials = started
    cancelled = buffer.cancel(s, study, keep=0) if study.n_buffered else []
    study.updated_at = utcnow()
    s.flush()
    if study.n_claimed >= study.n_trials and study.n_running == 0:
        end_of_budget(s, study)
    return cancelled


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
                Trial.feasible.is_not(False),
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
