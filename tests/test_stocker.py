"""Stocking ahead (issue 15): a worker's stocker refills a study's buffer before it runs dry,
in a few statements, reading the study's trials lean (``service.store.known``). Real Postgres,
real Optuna: what is written is read back with Optuna's own API, and what the lean read
gives the samplers is compared with what Optuna's storage gives them."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select, text, update

from seqtune.spec import StudySpec
from service.store import buffer, leases, stocker
from service.store.db import Database
from service.store.known import known_trials
from service.store.optuna import make_storage, sketch
from service.store.tables import Study, Suggestion, Trial, utcnow
from tests.test_claim_path import statements
from tests.test_leases import make


@pytest.fixture
def storage(settings):  # type: ignore[no-untyped-def]
    return make_storage(settings)


@pytest.fixture(autouse=True)
def steady(monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets at the cap and leads that last, however slowly the machine runs the test
    (the live clock ages the claims the targets are measured from)."""
    monkeypatch.setattr(buffer, "HORIZON_S", 1000.0)
    monkeypatch.setattr(stocker, "LEAD_S", 120.0)


def study_row(db: Database) -> Study:
    return db.run(lambda s: s.scalar(select(Study)))


def busy_study(db: Database, storage: Any, cap: int = 8, claims: int = 4) -> list[leases.Claim]:
    """A study claimed ``claims`` times within the last second (its first claim under a
    second old: the rate is over 1 s): its target is its cap."""
    make(db, storage, sampler={"name": "random", "buffer": cap}, budget={"n_trials": 100})
    got = [leases.claim(db, storage, owner="w") for _ in range(claims)]
    assert all(got)
    db.run(lambda s: s.execute(update(Trial).values(started_at=utcnow() - timedelta(seconds=0.5))))
    # Empty its buffer (what the claims stocked), as a pause would.
    gone = db.run(lambda s: buffer.cancel(s, s.scalar(select(Study)), keep=0))
    buffer.fail_cancelled(storage, gone)
    assert study_row(db).n_buffered == 0
    return [c for c in got if c is not None]


def drain_to(db: Database, storage: Any, left: int) -> leases.Claim:
    """Claim (one-statement pops) until ``left`` suggestions remain; the last claim."""
    c = None
    while study_row(db).n_buffered > left:
        c = leases.claim(db, storage, owner="w")
        assert c is not None
    assert c is not None
    return c


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    until = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < until, "timed out"
        time.sleep(0.05)


def test_a_pop_that_leaves_the_buffer_low_has_it_restocked_ahead(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    busy_study(db, storage)
    assert stocker.restock(db, storage, study_row(db).id, "s").stored > 0
    assert study_row(db).n_buffered == 8
    last = drain_to(db, storage, 4)  # half the target: no claim would stock it yet
    st = stocker.Stocker(db, storage, "w-stocker")
    try:
        st.poke(last, 4)
        wait_for(lambda: study_row(db).n_buffered == 8)
    finally:
        st.close()
    assert st.restocked == 4
    row = study_row(db)
    assert row.n_claimed + row.n_buffered <= row.n_trials
    ids = db.run(lambda s: set(s.scalars(select(Suggestion.optuna_trial_id))))
    got = optuna.load_study(study_name="acme/L", storage=storage).get_trials(deepcopy=False)
    assert {t._trial_id for t in got if t.state == OptunaState.RUNNING} >= ids
    assert len({t.number for t in got}) == len(got)
    live = [t for t in got if t.state == OptunaState.RUNNING]  # the rest: cancelled, FAIL
    assert len(live) == row.n_claimed + row.n_buffered


def test_a_poke_with_plenty_left_does_nothing(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    busy_study(db, storage)
    stocker.restock(db, storage, study_row(db).id, "s")
    last = drain_to(db, storage, 7)
    st = stocker.Stocker(db, storage, "w-stocker")
    try:
        st.poke(last, 7)  # the target is not known here yet: the thread looks, and leaves it
        wait_for(lambda: last.study_id in st._targets)
        with statements(db.engine) as seen:
            st.poke(last, 7)  # known now: 7 of 8 is more than half
            time.sleep(0.3)
    finally:
        st.close()
    assert seen == [] and st.restocked == 0 and study_row(db).n_buffered == 7


def test_a_restock_leaves_the_study_to_whoever_holds_its_ask_lock(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    busy_study(db, storage)
    sid = study_row(db).id
    with db.engine.connect() as holder:
        holder.execute(
            text("SELECT pg_advisory_xact_lock(:ns, :id)"), {"ns": buffer.ASK_LOCK, "id": sid}
        )
        done = stocker.restock(db, storage, sid, "s")
        holder.rollback()
    assert done.busy and done.stored == 0
    assert study_row(db).n_buffered == 0


def test_a_restock_is_a_fixed_handful_of_statements(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    """The lock, the study, its rate and its waiters in one statement; the trials in one; the
    batch (Optuna's rows, the suggestions, the counter) in one after the Optuna study's lock:
    on a loaded machine each round trip costs most of a restock. Nothing on Optuna's
    connection."""
    busy_study(db, storage, cap=16)
    sid = study_row(db).id
    with statements(db.engine) as ours, statements(storage.engine) as theirs:
        done = stocker.restock(db, storage, sid, "s")
    assert done.stored == 16
    assert len(ours) == 4, "\n".join(x[:80] for x in ours)
    assert theirs == []


def test_a_restock_writes_nothing_when_the_study_lost_its_room(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    busy_study(db, storage)
    sid = study_row(db).id

    def txn(s: Any) -> int:
        study = s.get(Study, sid)
        spec = StudySpec.model_validate(study.spec)
        batch = buffer.sketch_many(storage, study, spec, "s", k=5)
        # The budget is cut from elsewhere while the batch was sampled.
        with db.engine.begin() as other:
            other.execute(update(Study).where(Study.id == sid).values(n_trials=6))
        return buffer.store(s, study, batch)

    n_optuna = len(optuna.load_study(study_name="acme/L", storage=storage).trials)
    with pytest.raises(buffer.Raced):
        db.run(txn)
    assert len(optuna.load_study(study_name="acme/L", storage=storage).trials) == n_optuna
    assert study_row(db).n_buffered == 0


def test_a_leading_stocker_keeps_the_buffer_topped_up(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    busy_study(db, storage)
    stocker.restock(db, storage, study_row(db).id, "s")
    last = drain_to(db, storage, 4)
    st = stocker.Stocker(db, storage, "w-stocker")
    try:
        st.poke(last, 4)
        wait_for(lambda: study_row(db).n_buffered == 8)
        # It leads now: claims (poking no one) that take a quarter of the target get it
        # topped up.
        drain_to(db, storage, 6)
        wait_for(lambda: study_row(db).n_buffered == 8)
        assert st.restocked == 6
    finally:
        st.close()


# -- what the samplers see -------------------------------------------------------------------


def mixed_study(storage: Any) -> optuna.Study:
    st = optuna.create_study(study_name="mixed", storage=storage, directions=["minimize"])
    dists = {
        "h": IntDistribution(4, 64, log=True),
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
        "opt": CategoricalDistribution(["adam", "sgd", None]),
    }
    for i in range(12):
        t = st.ask(dists)
        t.set_user_attr("u", {"i": i})
        t.storage.set_trial_system_attr(t._trial_id, "s", [i, "x"])
        for step in range(3):
            t.report(1.0 / (i + step + 1) if i != 5 else math.nan, step)
        if i % 4 == 0:
            st.tell(t, state=OptunaState.PRUNED)
        elif i % 4 == 1:
            st.tell(t, state=OptunaState.FAIL)
        elif i % 4 == 2:
            st.tell(t, math.inf if i == 6 else float(i))
        # i % 4 == 3: left running
    return st


def test_known_trials_are_optuna_s_less_unused_intermediate_values(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    st = mixed_study(storage)
    theirs = storage.get_all_trials(st._study_id, deepcopy=False)
    with db.engine.connect() as conn:
        ours = known_trials(conn, st._study_id)
    assert len(ours) == len(theirs) == 12
    for a, b in zip(ours, theirs, strict=True):
        assert (a.number, a._trial_id, a.state) == (b.number, b._trial_id, b.state)
        assert a.params == b.params and a.distributions == b.distributions
        assert a.values == b.values
        assert a.user_attrs == b.user_attrs and a.system_attrs == b.system_attrs
        assert a.datetime_start == b.datetime_start
        assert a.datetime_complete == b.datetime_complete
        if b.state == OptunaState.PRUNED:  # what TPE and CMA-ES score a pruned trial by
            assert a.intermediate_values.keys() == b.intermediate_values.keys()
            for k, v in b.intermediate_values.items():
                got = a.intermediate_values[k]
                assert got == v or (math.isnan(v) and math.isnan(got))
        else:
            assert a.intermediate_values == {}


def test_known_trials_are_read_once_finished_and_checked(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    st = optuna.create_study(study_name="once", storage=storage)
    for i in range(5):
        st.tell(st.ask({"x": FloatDistribution(0, 1)}), float(i))
    with db.engine.connect() as conn:
        assert [t.number for t in known_trials(conn, st._study_id)] == list(range(5))
        running = st.ask({"x": FloatDistribution(0, 1)})
        st.tell(st.ask({"x": FloatDistribution(0, 1)}), 9.0)
        with statements(db.engine) as seen:
            again = known_trials(conn, st._study_id)
        assert [t.number for t in again] == list(range(7))
        assert again[5].state == OptunaState.RUNNING and again[6].values == [9.0]
        assert len(seen) == 1
        # Trial 4, the last kept, and those after it: no more.
        assert "number >= " in seen[0]
        st.tell(running, 1.0)
        assert known_trials(conn, st._study_id)[5].values == [1.0]
        # The same study id with other trials (a database recreated under the same URL):
        # the cache notices and reads it all again.
        for child in ("trial_params", "trial_values", "trial_system_attributes"):
            conn.execute(
                text(f"DELETE FROM {child} WHERE trial_id IN (SELECT trial_id FROM trials)")
            )
        conn.execute(text("DELETE FROM trials WHERE study_id = :s"), {"s": st._study_id})
        conn.commit()
        st.tell(st.ask({"x": FloatDistribution(0, 1)}), 42.0)
        fresh = known_trials(conn, st._study_id)
        assert [t.values for t in fresh] == [[42.0]]


def test_a_sketch_samples_from_the_lean_read_as_from_optuna_s(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    """TPE with a seed proposes the same parameters whether it reads the study through
    Optuna's storage or through ``known_trials`` (pruned trials scored by their last
    intermediate value, running ones lied about)."""
    spec = make(
        db,
        storage,
        sampler={"name": "tpe", "seed": 3, "options": {"n_startup_trials": 4}},
        search_space={
            "hidden_size": {"type": "int", "low": 4, "high": 64},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        },
        budget={"n_trials": 40},
    )
    ostudy = optuna.load_study(study_name="acme/L", storage=storage)
    for i in range(14):
        t = ostudy.ask()
        t.suggest_int("hidden_size", 4, 64)
        t.suggest_float("lr", 1e-4, 1e-1, log=True)
        t.report(float(i % 5), 0)
        if i % 3 == 0:
            ostudy.tell(t, state=OptunaState.PRUNED)
        elif i % 3 == 1:
            ostudy.tell(t, float((i * 7) % 11))
    from service.store.optuna import asking_study

    def sampled(known: Any) -> dict[str, Any]:
        st = asking_study(storage, "acme/L", spec, seed_offset=1)
        sk = sketch(storage, st, spec, "o", known=known)
        assert sk is not None
        return sk.trial.params

    with db.engine.connect() as conn:
        lean = sampled(known_trials(conn, ostudy._study_id))
    full = sampled(storage.get_all_trials(ostudy._study_id, deepcopy=False))
    assert lean == full
