"""The states of studies and trials, and the one table of the moves between them; the statuses
of worker slots and of a study's baselines record.

Pure Python: the client, the service and the worker all read it. The values are the strings
stored in the database and shown by the API (a ``StrEnum`` member equals its string), so the
columns stay plain strings.

Studies::

    running --pause--> paused --resume--> running
    running | paused | completed --stop--> stopped                     (final)
    running --complete--> completed --extend (raise n_trials)--> running
    running --time_out--> timed_out                                  (final)

A study in its ``search`` phase may enter its ``final`` phase (re-training the top
configurations) once its budget is spent; the phase never goes back.

Trials::

    WAITING (enqueued) --claim | adopt--> RUNNING
    RUNNING --finish | reap | record--> COMPLETE | PRUNED | FAIL
    WAITING --record--> COMPLETE | PRUNED | FAIL      (an outside Optuna client ran it)

RUNNING with no lease owner means "waiting for a worker to resume it": the lease, not the
state, tells a live attempt from a freed one (``service.store.leases``).

Worker slots (``WorkerStatus``) and baselines records (``BaselinesStatus``) have no table here:
a slot's status is derived when it is listed, and the baselines record moves by compare-and-set
(``service.store.baselines``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from seqtune.errors import Conflict


class StudyStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    COMPLETED = "completed"
    TIMED_OUT = "timed_out"


class StudyPhase(StrEnum):
    SEARCH = "search"
    FINAL = "final"


class TrialState(StrEnum):
    """Named as Optuna names its trial states (``optuna.trial.TrialState[state]`` maps)."""

    WAITING = "WAITING"
    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"


class WorkerStatus(StrEnum):
    """A worker slot as GET /v1/workers shows it (``service.store.workers``): heartbeating,
    silent for ``Settings.lost_after_s``, or shut down."""

    LIVE = "live"
    LOST = "lost"
    STOPPED = "stopped"


class BaselinesStatus(StrEnum):
    """The ``status`` of a study's baselines record (``service.store.baselines``)."""

    COMPUTING = "computing"  # claimed by a worker (its "owner") "since" a time
    DONE = "done"
    FAILED = "failed"  # with the "error"; not retried automatically


# Studies that still take trials (enqueue, claim after a resume) and hold their dataset.
ACTIVE_STATUSES: frozenset[StudyStatus] = frozenset({StudyStatus.RUNNING, StudyStatus.PAUSED})
# Studies that start no more trials unless someone acts (raising a completed study's budget
# resumes it): where a client watching a study stops watching.
FINISHED_STATUSES: frozenset[StudyStatus] = frozenset(
    {StudyStatus.COMPLETED, StudyStatus.STOPPED, StudyStatus.TIMED_OUT}
)
FINISHED_STATES: frozenset[TrialState] = frozenset(
    {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
)

S = TypeVar("S", StudyStatus, TrialState)


@dataclass(frozen=True)
class Transition(Generic[S]):
    """One named move: from any of ``sources`` to any of ``targets``."""

    sources: frozenset[S]
    targets: frozenset[S]
    by_user: bool = False  # asked for through the API (PATCH status), not by the system


def _t(sources: set[S], targets: set[S], *, by_user: bool = False) -> Transition[S]:
    return Transition(frozenset(sources), frozenset(targets), by_user)


_St, _Tr = StudyStatus, TrialState

# THE table: every move a study or trial makes, by the name of the action that makes it.
STUDY_TRANSITIONS: dict[str, Transition[StudyStatus]] = {
    "pause": _t({_St.RUNNING}, {_St.PAUSED}, by_user=True),
    "resume": _t({_St.PAUSED}, {_St.RUNNING}, by_user=True),
    "stop": _t({_St.RUNNING, _St.PAUSED, _St.COMPLETED}, {_St.STOPPED}, by_user=True),
    "extend": _t({_St.COMPLETED}, {_St.RUNNING}),  # n_trials raised above the trials started
    "complete": _t({_St.RUNNING}, {_St.COMPLETED}),  # budget spent, nothing runs
    "time_out": _t({_St.RUNNING}, {_St.TIMED_OUT}),  # past spec.budget.timeout_s
}
TRIAL_TRANSITIONS: dict[str, Transition[TrialState]] = {
    "claim": _t({_Tr.WAITING}, {_Tr.RUNNING}),  # a seqtune claim's ask() popped it
    "adopt": _t({_Tr.WAITING}, {_Tr.RUNNING}),  # an outside Optuna client popped it
    "finish": _t({_Tr.RUNNING}, set(FINISHED_STATES)),  # the attempt holding the lease
    "reap": _t({_Tr.RUNNING}, {_Tr.FAIL}),  # max_retries leases lost
    "reconcile": _t({_Tr.RUNNING}, set(FINISHED_STATES)),  # Optuna finished it, we had not
    "record": _t({_Tr.WAITING, _Tr.RUNNING}, set(FINISHED_STATES)),  # outside client's end
}

# What PATCH /v1/studies/{name} may set, in the enum's order: status -> the action.
SETTABLE_STATUSES: dict[StudyStatus, str] = dict(
    sorted(
        ((to, action) for action, t in STUDY_TRANSITIONS.items() if t.by_user for to in t.targets),
        key=lambda pair: list(StudyStatus).index(pair[0]),
    )
)


def study_transition(
    action: str, current: str, *, name: str, target: StudyStatus | None = None
) -> StudyStatus:
    """The status ``action`` moves a study called ``name`` to from ``current``.

    ``target`` picks one when the action has several (none has today). Raises Conflict when
    the table has no such move from ``current`` (a stopped or timed-out study stays so);
    KeyError for an action the table does not name (a programming error).
    """
    t = STUDY_TRANSITIONS[action]
    to = target if target is not None else next(iter(t.targets))
    if StudyStatus(current) not in t.sources or to not in t.targets:
        hint = " (raise n_trials to resume it)" if current == StudyStatus.COMPLETED else ""
        raise Conflict(f"study '{name}' is {current}; it cannot become {to}{hint}")
    return to


def trial_transition(action: str, current: str, target: str, *, number: int) -> TrialState:
    """``target`` as a TrialState when ``action`` may move trial ``number`` there from
    ``current``. Raises Conflict otherwise; KeyError for an action the table does not name."""
    t = TRIAL_TRANSITIONS[action]
    to = TrialState(target)
    if TrialState(current) not in t.sources or to not in t.targets:
        raise Conflict(f"trial {number} is {current}; '{action}' cannot make it {to}")
    return to
