"""Suggestions asked ahead of claims (service.store.buffer) on real Postgres and real Optuna:
a claim pops a suggestion, budgets stay exact, buffered trials are RUNNING for the sampler,
and a pause, a stop, a lower budget or the reaper cancels what has no slot left."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from seqtune.spec import StudySpec
from service.store import buffer, leases, recovery, studies, trials
from service.store.db import Database
from service.store.optuna import ASKED_BY, asking_study, make_storage, optuna_study
from service.store.tables import Study, Suggestion, Trial, utcnow
from tests.test_leases import make


@pytest.fixture
def storage(settings):  # type: ignore[no-untyped-def]
    return make_storage(settings)


def study_row(db: Database, name: str = "L") -> Study:
    return db.run(lambda s: s.scalar(select(Study).where(Study.name == name)))


def refill(db: Database, storage: Any, name: str = "L", owner: str = "test-refill") -> int:
    """Top the study's buffer up to its target now, as a claim that finds it empty does
    (under the ask lock, only if free); returns how many suggestions it stored."""
    sid = study_row(db, name).id

    def txn(s: Session) -> int:
        if not buffer.ask_lock(s, sid, wait=False):
            return 0
        study = s.get(Study, sid)
        assert study is not None
        spec = StudySpec.model_validate(study.spec)
        want = buffer.target(s, study, spec) - study.n_buffered
        if want <= 0:
            return 0
        return buffer.store(s, study, buffer.sketch_many(storage, study, spec, owner, k=want))

    try:
        return db.run(txn)
    except buffer.Raced:
        return 0


def suggestions(db: Database) -> list[Suggestion]:
    return db.run(lambda s: list(s.scalars(select(Suggestion).order_by(Suggestion.id))))


def optuna_states(storage: Any, name: str = "L") -> dict[int, OptunaState]:
    st = optuna.load_study(study_name=f"acme/{name}", storage=storage)
    return {t._trial_id: t.state for t in st.get_trials(deepcopy=False)}


def finish(db: Database, storage: Any, c: leases.Claim, value: float = 1.0) -> None:
    ostudy = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
    leases.finish(db, ostudy=ostudy, claim=c, state="COMPLETE", values=[value])


def test_a_claim_pops_the_suggestion_a_refill_asked(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 5})
    assert refill(db, storage) == 1  # no recent claims: a buffer of one
    [sug] = suggestions(db)
    assert study_row(db).n_buffered == 1
    counts = studies.get_study(db, tenant="acme", name="L").trials
    assert (counts.buffered, counts.remaining) == (1, 5)  # a buffered trial has not started
    # Asked of Optuna and RUNNING there (TPE's constant liar sees it), not yet a seqtune trial.
    assert optuna_states(storage)[sug.optuna_trial_id] == OptunaState.RUNNING
    assert db.run(lambda s: s.scalar(select(Trial.id))) is None

    c = leases.claim(db, storage, owner="w1")
    assert c is not None
    assert (c.optuna_trial_id, c.number, c.params) == (sug.optuna_trial_id, sug.number, sug.params)
    assert suggestions(db) == []
    row = study_row(db)
    assert (row.n_claimed, row.n_running, row.n_buffered) == (1, 1, 0)
    t = db.run(lambda s: s.get(Trial, c.trial_row_id))
    assert (t.state, t.lease_owner, t.fence, t.attempts) == ("RUNNING", "w1", 1, 1)
    # The popped trial is a normal one: it reports and finishes.
    finish(db, storage, c, 0.5)
    assert optuna_states(storage)[c.optuna_trial_id] == OptunaState.COMPLETE
    assert studies.get_study(db, tenant="acme", name="L").trials.complete == 1


def test_the_budget_stays_exact_with_refills_racing_claims(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 24})
    done: list[leases.Claim] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def racer(i: int) -> None:
        barrier.wait()
        while (c := leases.claim(db, storage, owner=f"w{i}")) is not None:
            refill(db, storage, owner=f"refill-{i}")  # racing the other threads' claims
            time.sleep(0.3)  # training: claims do not come back to back
            finish(db, storage, c)
            with lock:
                done.append(c)

    assert refill(db, storage) == 1  # at least the first claim pops, however the race goes
    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 24 and len({c.number for c in done}) == 24
    st = optuna.load_study(study_name="acme/L", storage=storage)
    askers = [t.system_attrs[ASKED_BY] for t in st.get_trials(deepcopy=False)]
    # Claims popped what refills stored (how many refills got in between the claims' asks
    # depends on the machine's load: 4 to 12 of 24 seen).
    assert sum(a.startswith(("refill-", "test-refill")) for a in askers) >= 1
    row = study_row(db)
    assert (row.n_claimed, row.n_buffered, row.n_complete, row.status) == (24, 0, 24, "completed")
    states = list(optuna_states(storage).values())
    # Nothing asked beyond the budget: every Optuna trial is one of the 24 seqtune trials.
    assert states.count(OptunaState.COMPLETE) == 24 and len(states) == 24
    assert suggestions(db) == []


def test_a_pause_cancels_the_buffer_and_a_resume_refills_it(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 10})
    assert refill(db, storage) == 1
    [sug] = suggestions(db)
    studies.update_study(db, tenant="acme", name="L", status="paused", storage=storage)
    assert suggestions(db) == [] and study_row(db).n_buffered == 0
    st = optuna.load_study(study_name="acme/L", storage=storage)
    cancelled = st._storage.get_trial(sug.optuna_trial_id)
    assert cancelled.state == OptunaState.FAIL and cancelled.system_attrs[buffer.CANCELLED]
    assert refill(db, storage) == 0  # paused: nothing asked
    studies.update_study(db, tenant="acme", name="L", status="running", storage=storage)
    assert refill(db, storage) == 1
    c = leases.claim(db, storage, owner="w")
    assert c is not None and c.number != sug.number  # the cancelled one never runs


def test_a_lower_budget_cancels_the_suggestions_beyond_it(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 4}, budget={"n_trials": 40})
    # 30 claims just now, at many a second: the target is the cap, 4.
    claims = [leases.claim(db, storage, owner="w") for _ in range(30)]
    assert all(claims)
    refill(db, storage)  # on top of what the claims that found the buffer empty stocked
    assert study_row(db).n_buffered == 4
    studies.update_study(db, tenant="acme", name="L", n_trials=31, storage=storage)
    row = study_row(db)
    assert row.n_buffered == 1 and len(suggestions(db)) == 1  # the oldest is kept
    assert leases.claim(db, storage, owner="w") is not None
    assert leases.claim(db, storage, owner="w") is None  # 31 started: exact
    assert study_row(db).n_claimed == 31


def test_target_follows_the_claim_rate_within_the_cap(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 8}, budget={"n_trials": 200})
    now = utcnow()
    assert buffer.HORIZON_S == 4.0 and buffer.RATE_WINDOW_S == 10.0  # the numbers below

    def target() -> int:
        return db.run(
            lambda s: buffer.target(
                s, study_row(db), StudySpec.model_validate(study_row(db).spec), now
            )
        )

    def spread(seconds: float) -> None:  # the claims so far, started over the last seconds
        db.run(
            lambda s: s.execute(
                update(Trial).values(
                    started_at=now - timedelta(seconds=seconds) * (Trial.id % 30) / 29
                )
            )
        )

    assert target() == 1
    for _ in range(16):
        assert leases.claim(db, storage, owner="w") is not None
    spread(30)  # ids 1-16: over the last 16.6 s, ids 1-9 in the last 10 s
    assert target() == 4  # 9 claims in the 10 s window, times 4 s: 3.6
    spread(4)
    # The same 16 in the last 2.2 s: a study that began claiming moments ago is measured
    # over the time since its first claim, not the whole window (16 / 10 s would want 7).
    assert target() == 8  # 16 in 2.2 s would want 30: the study's cap is 8
    for _ in range(44):
        assert leases.claim(db, storage, owner="w") is not None
    spread(30)
    assert target() == 8  # 20 of the 60 in the last 10 s want 8
    # A burst in an older study is averaged over the window: 4 claims in the last second of
    # a study claiming for 40 s want 2.
    db.run(
        lambda s: s.execute(
            update(Trial).where(Trial.id > 4).values(started_at=now - timedelta(seconds=40))
        )
    )
    db.run(lambda s: s.execute(update(Trial).where(Trial.id <= 4).values(started_at=now)))
    assert target() == 2  # 4 in 10 s: 1.6 (over their own 1 s: 16, capped at 8)
    # Claims older than the window no longer count.
    db.run(lambda s: s.execute(update(Trial).values(started_at=now - timedelta(minutes=5))))
    assert target() == 1


def test_target_expects_the_claims_of_the_running_trials(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    """A fleet that started together claims again as its trials end, before the window has
    seen a claim: six running trials that take 2 s each will claim 3 a second."""
    make(db, storage, sampler={"name": "random", "buffer": 64}, budget={"n_trials": 200})
    got = [leases.claim(db, storage, owner="w") for _ in range(10)]
    assert all(got)
    for c in got[:4]:
        assert c is not None
        finish(db, storage, c)
    now = utcnow()
    done = [c.trial_row_id for c in got[:4] if c is not None]
    db.run(
        lambda s: s.execute(
            update(Trial).values(
                started_at=now - timedelta(seconds=20), finished_at=now - timedelta(seconds=18)
            )
        )
    )
    db.run(lambda s: s.execute(update(Trial).where(~Trial.id.in_(done)).values(finished_at=None)))
    row = study_row(db)
    assert row.n_running == 6
    # Nothing started in the last 10 s: observed, the target would be 1.
    got_target = db.run(
        lambda s: buffer.target(s, study_row(db), StudySpec.model_validate(row.spec), now)
    )
    assert got_target == 12  # 6 running / 2 s each, times 4 s


@pytest.mark.parametrize("sampler", [{"name": "tpe", "buffer": 0}, {"name": "grid"}])
def test_no_buffer_when_turned_off_or_for_grid(db: Database, storage, sampler) -> None:  # type: ignore[no-untyped-def]
    space = {"hidden_size": {"type": "int", "low": 8, "high": 32, "step": 8}}
    make(db, storage, sampler=sampler, search_space=space, budget={"n_trials": 4})
    assert refill(db, storage) == 0
    assert leases.claim(db, storage, owner="w") is not None  # claims ask as before


def test_queued_trials_are_claimed_before_the_buffer(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 5})
    assert refill(db, storage) == 1
    [sug] = suggestions(db)
    trials.enqueue_trial(db, storage, tenant="acme", name="L", params={"hidden_size": 33})
    c = leases.claim(db, storage, owner="w")
    assert c is not None and c.params == {"hidden_size": 33}
    assert study_row(db).n_buffered == 1  # the suggestion waits for the next claim
    c2 = leases.claim(db, storage, owner="w")
    assert c2 is not None and (c2.number, c2.params) == (sug.number, sug.params)


def test_a_full_concurrency_cap_rolls_the_pop_back(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 5, "max_concurrent_trials": 1})
    assert refill(db, storage) == 1
    # Another claim fills the cap between this claim's pick and its pop.
    db.run(lambda s: s.execute(update(Study).values(n_running=1)))
    with pytest.raises(buffer.Raced):
        db.run(lambda s: buffer.pop(s, study_id=study_row(db).id, owner="w", now=utcnow()))
    assert len(suggestions(db)) == 1 and study_row(db).n_buffered == 1  # rolled back


def test_the_reaper_cancels_buffers_of_studies_that_stopped_running(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 5, "lease_timeout_s": 5})
    assert refill(db, storage) == 1
    [sug] = suggestions(db)
    # Long after its ask, a live suggestion is not an orphan: the reaper leaves it RUNNING.
    later = utcnow() + timedelta(hours=1)
    report = recovery.reap(db, storage, now=later)
    assert (report.orphans, report.cancelled) == (0, 0)
    assert optuna_states(storage)[sug.optuna_trial_id] == OptunaState.RUNNING
    # A study that left 'running' by a path that did not cancel (here: behind our back).
    db.run(lambda s: s.execute(update(Study).values(status="timed_out")))
    report = recovery.reap(db, storage, now=later)
    assert report.cancelled == 1 and suggestions(db) == [] and study_row(db).n_buffered == 0
    assert optuna_states(storage)[sug.optuna_trial_id] == OptunaState.FAIL


def test_a_deleted_study_takes_its_suggestions_along(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage)
    assert refill(db, storage) == 1
    studies.delete_study(db, storage, tenant="acme", name="L")
    assert suggestions(db) == []


def test_a_pause_does_not_wait_for_a_pop_holding_a_suggestion(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    """A pop locks its suggestion, then the study row; a pause locks the study row, then
    cancels. The cancel skips the locked suggestion instead of waiting for it (a deadlock),
    and the reaper cancels it once its holder let go."""
    make(db, storage, budget={"n_trials": 5})
    assert refill(db, storage) == 1
    popping = db.engine.connect()
    popping.execute(select(Suggestion.id).with_for_update())  # a pop, mid-statement
    done = threading.Event()

    def pause() -> None:
        studies.update_study(db, tenant="acme", name="L", status="paused", storage=storage)
        done.set()

    t = threading.Thread(target=pause, daemon=True)
    t.start()
    try:
        assert done.wait(10), "the pause waited for the suggestion a pop holds"
    finally:
        popping.rollback()
        popping.close()
        t.join(10)
    assert study_row(db).status == "paused" and study_row(db).n_buffered == 1  # skipped
    assert recovery.reap(db, storage).cancelled == 1
    assert suggestions(db) == [] and study_row(db).n_buffered == 0


def test_a_queued_trial_takes_the_last_slot_from_a_suggestion(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 2})
    first = leases.claim(db, storage, owner="w")
    assert first is not None
    refill(db, storage)
    assert study_row(db).n_buffered == 1  # 1 started + 1 buffered: full
    [sug] = suggestions(db)
    trials.enqueue_trial(db, storage, tenant="acme", name="L", params={"hidden_size": 7})
    assert suggestions(db) == [] and study_row(db).n_buffered == 0
    assert optuna_states(storage)[sug.optuna_trial_id] == OptunaState.FAIL
    c = leases.claim(db, storage, owner="w")
    assert c is not None and c.params == {"hidden_size": 7}
    assert leases.claim(db, storage, owner="w") is None
    assert study_row(db).n_claimed == 2


def test_a_refill_leaves_the_cached_study_sampler_alone(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    """The worker's main thread uses the process's cached Optuna study (and its sampler)
    while the refill thread asks: the refill asks through a study object of its own."""
    spec = make(db, storage, sampler={"name": "random", "seed": 3}, budget={"n_trials": 5})
    cached = optuna_study(storage, "acme/L", spec)
    sampler = cached.sampler
    assert refill(db, storage) == 1
    assert cached.sampler is sampler
    # ...but shares the cached object's cache of the study's trials (a Study made on the plain
    # storage reads every trial again: a second per ask at 10^4 trials, measured).
    assert asking_study(storage, "acme/L", spec, seed_offset=1)._storage is cached._storage
