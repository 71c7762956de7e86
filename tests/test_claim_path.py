"""The claim and report hot paths on Postgres (issue 15): an epoch report is one statement on
seqtune's connection, a new trial is sketched and written inside the claim's transaction, and
a claim that finds the buffer empty stocks it for the claims waiting behind it, which wait
for it side by side and pop. Real Postgres, real Optuna: what is written is read back with
Optuna's own API."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState as OptunaState
from sqlalchemy import event, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from seqtune.spec import StudySpec
from service.store import buffer, leases, studies, trials
from service.store.db import Database
from service.store.optuna import ASKED_BY, asking_study, optuna_study, sketch
from service.store.tables import Study, Suggestion, Trial
from tests.test_leases import make


@pytest.fixture
def storage(settings):  # type: ignore[no-untyped-def]
    from service.store.optuna import make_storage

    return make_storage(settings)


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements ``engine`` runs inside the block (BEGIN and COMMIT excluded)."""
    seen: list[str] = []

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def optuna_engine(storage: Any) -> Engine:
    return storage.engine  # type: ignore[no-any-return]


def loaded(storage: Any, name: str = "L") -> optuna.Study:
    return optuna.load_study(study_name=f"acme/{name}", storage=storage)


def study_row(db: Database) -> Study:
    return db.run(lambda s: s.scalar(select(Study)))


def test_an_epoch_report_is_one_statement_on_seqtune_s_connection(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 0})
    c = leases.claim(db, storage, owner="w")
    assert c is not None
    trial = optuna.trial.Trial(
        optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec)),
        c.optuna_trial_id,
    )
    with statements(db.engine) as ours, statements(optuna_engine(storage)) as theirs:
        for step, v in enumerate([0.5, math.inf, -math.inf, math.nan, 0.25]):
            leases.report(db, claim=c, trial=trial, epoch=step, record={"val_rmse": v}, value=v)
    assert len(ours) == 5 and theirs == []  # one statement per epoch, none of Optuna's
    got = loaded(storage).trials[c.number].intermediate_values
    assert got[0] == 0.5 and got[1] == math.inf and got[2] == -math.inf
    assert math.isnan(got[3]) and got[4] == 0.25
    assert trial.should_prune() is False  # the Trial's own copy is kept in step
    assert trial._cached_frozen_trial.intermediate_values[4] == 0.25
    # A step reported again (an attempt resumed after its checkpoint) replaces the value.
    leases.report(db, claim=c, trial=trial, epoch=4, record={"val_rmse": 0.125}, value=0.125)
    assert loaded(storage).trials[c.number].intermediate_values[4] == 0.125
    row = db.run(lambda s: s.get(Trial, c.trial_row_id))
    assert row.epochs == 6 and len(row.curve) == 6


def test_a_report_after_optuna_s_trial_ended_writes_nothing(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 0})
    c = leases.claim(db, storage, owner="w")
    assert c is not None
    ost = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
    trial = optuna.trial.Trial(ost, c.optuna_trial_id)
    leases.report(db, claim=c, trial=trial, epoch=0, record={"val_rmse": 1.0}, value=1.0)
    storage.set_trial_state_values(c.optuna_trial_id, OptunaState.FAIL)  # an outside client
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        leases.report(db, claim=c, trial=trial, epoch=1, record={"val_rmse": 0.5}, value=0.5)
    row = db.run(lambda s: s.get(Trial, c.trial_row_id))
    assert row.epochs == 1 and len(row.curve) == 1  # the curve's append rolled back with it
    assert loaded(storage).trials[c.number].intermediate_values == {0: 1.0}


def test_a_claim_writes_its_new_trial_in_its_own_transaction(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(
        db,
        storage,
        sampler={"name": "random", "buffer": 0},
        search_space={
            "hidden_size": {"type": "int", "low": 4, "high": 64},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        },
    )
    with statements(optuna_engine(storage)) as theirs:
        c = leases.claim(db, storage, owner="w")
    assert c is not None
    assert not [q for q in theirs if q.startswith(("INSERT", "UPDATE"))]  # only reads there
    frozen = loaded(storage).trials[c.number]
    assert frozen._trial_id == c.optuna_trial_id and frozen.state == OptunaState.RUNNING
    assert frozen.params == c.params and set(frozen.params) == {"hidden_size", "lr", "optimizer"}
    assert frozen.distributions["lr"] == optuna.distributions.FloatDistribution(
        1e-4, 1e-1, log=True
    )
    assert frozen.system_attrs[ASKED_BY] == "w" and frozen.datetime_start is not None
    # Numbered as Optuna numbers them, and Optuna's own ask goes on from there.
    nxt = loaded(storage).ask()
    assert nxt.number == c.number + 1


def test_a_claim_that_fails_leaves_nothing_in_optuna(db: Database, storage, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 0})

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("the worker died mid-claim")

    monkeypatch.setattr(leases, "_claim_view", boom)
    with pytest.raises(RuntimeError):
        leases.claim(db, storage, owner="w")
    assert loaded(storage).trials == []  # ask() would have left a RUNNING orphan
    monkeypatch.undo()
    c = leases.claim(db, storage, owner="w")
    assert c is not None and c.number == 0


def test_a_batch_of_sketches_sees_the_earlier_ones_as_running(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    spec = make(db, storage, sampler={"name": "random", "seed": 1}, budget={"n_trials": 9})
    st = study_row(db)
    first = sketch(storage, asking_study(storage, st.optuna_study_name, spec, 1), spec, "w")
    assert first is not None
    batch = buffer.sketch_many(storage, st, spec, "w", k=3, seed_from=2, siblings=[first])
    assert [b.trial.number for b in batch] == [1, 2, 3]
    running = batch[-1].get_all_trials(batch[-1].study_id, states=(OptunaState.RUNNING,))
    assert [t.number for t in running] == [0, 1, 2, 3]
    # Seeded per slot: four different points.
    assert len({b.trial.params["hidden_size"] for b in [first, *batch]}) > 1


def test_a_claim_that_finds_the_buffer_empty_stocks_it_for_the_waiters(
    db: Database, storage, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 8}, budget={"n_trials": 20})
    monkeypatch.setattr(buffer, "waiters", lambda s, study_id: 5)  # five claims wait behind
    c = leases.claim(db, storage, owner="w")
    assert c is not None
    row = study_row(db)
    # One per waiter besides the study's target (1: no claims yet), so that the claims
    # after the waiters still find one to pop.
    assert (row.n_claimed, row.n_buffered) == (1, 6)
    sugs = db.run(lambda s: list(s.scalars(select(Suggestion).order_by(Suggestion.id))))
    assert len(sugs) == 6 and len({x.number for x in sugs} | {c.number}) == 7
    assert [x.number for x in sugs] == sorted(x.number for x in sugs)  # popped in order
    states = {t.number: t.state for t in loaded(storage).trials}
    assert states == dict.fromkeys(range(7), OptunaState.RUNNING)


def test_waiters_counts_the_claims_waiting_for_the_asker(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage)
    sid = study_row(db).id
    with Session(db.engine) as holder, holder.begin():
        assert buffer.ask_lock(holder, sid, wait=False)
        t = threading.Thread(
            target=lambda: db.run(lambda s: buffer.wait_for_asker(s, sid)), daemon=True
        )
        t.start()
        deadline = time.monotonic() + 10
        while db.run(lambda s: buffer.waiters(s, sid)) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    t.join(10)
    assert not t.is_alive() and db.run(lambda s: buffer.waiters(s, sid)) == 0


def test_a_claim_waits_for_the_asker_and_pops_what_it_stored(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    spec = make(db, storage, sampler={"name": "random", "buffer": 8}, budget={"n_trials": 10})
    sid = study_row(db).id
    got: list[leases.Claim | None] = []
    with Session(db.engine) as asker, asker.begin():
        assert buffer.ask_lock(asker, sid, wait=False)  # an asker, mid-ask
        waiter = threading.Thread(
            target=lambda: got.append(leases.claim(db, storage, owner="waiter")), daemon=True
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while db.run(lambda s: buffer.waiters(s, sid)) != 1:  # it waits beside, not asks
            assert time.monotonic() < deadline
            time.sleep(0.05)
        study = asker.get(Study, sid)
        assert study is not None
        batch = buffer.sketch_many(storage, study, spec, "asker", k=2)
        assert buffer.store(asker, study, batch) == 2
        stocked = set(asker.scalars(select(Suggestion.optuna_trial_id)))
    waiter.join(20)
    [c] = got
    assert c is not None and c.optuna_trial_id in stocked  # popped, not asked for itself
    assert loaded(storage).trials[c.number].system_attrs[ASKED_BY] == "asker"
    row = study_row(db)
    assert (row.n_claimed, row.n_buffered) == (1, 1)


def test_sketch_leaves_waiting_trials_to_ask(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    spec = make(db, storage, sampler={"name": "random", "buffer": 0})
    st = study_row(db)
    ost = asking_study(storage, st.optuna_study_name, spec, 1)
    ost.enqueue_trial({"hidden_size": 7})  # an outside client's queued trial
    assert sketch(storage, ost, spec, "w") is None
    c = leases.claim(db, storage, owner="w")
    assert c is not None and c.params == {"hidden_size": 7}


def test_an_enqueue_waits_for_the_asker_instead_of_deadlocking(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    """An asker holds the ask lock and Optuna's study row (writing its trials), then takes
    seqtune's study row. An enqueue that took seqtune's row first and then waited for
    Optuna's (on Optuna's own connection, a wait Postgres cannot see as a deadlock) would
    stall both; it takes the ask lock first instead."""
    make(db, storage, sampler={"name": "random", "buffer": 0}, budget={"n_trials": 10})
    row = study_row(db)
    done: list[Any] = []
    with Session(db.engine) as asker, asker.begin():
        asker.execute(text("SET LOCAL lock_timeout = '5s'"))  # a deadlock fails the test
        assert buffer.ask_lock(asker, row.id, wait=False)
        asker.execute(
            text("SELECT study_id FROM studies WHERE study_id = :i FOR UPDATE"),
            {"i": row.optuna_study_id},
        )
        t = threading.Thread(
            target=lambda: done.append(
                trials.enqueue_trial(
                    db, storage, tenant="acme", name="L", params={"hidden_size": 7}
                )
            ),
            daemon=True,
        )
        t.start()
        deadline = time.monotonic() + 10
        while not db.run(
            lambda s: s.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        asker.execute(update(Study).where(Study.id == row.id).values(n_buffered=0))
    t.join(30)
    assert done and done[0].state == "WAITING"


def stock(db: Database, storage: Any, k: int) -> None:
    """Store ``k`` suggestions now, as an asker does."""

    def txn(s: Session) -> int:
        assert buffer.ask_lock(s, study_row(db).id, wait=False)
        study = s.get(Study, study_row(db).id)
        assert study is not None
        spec = StudySpec.model_validate(study.spec)
        return buffer.store(s, study, buffer.sketch_many(storage, study, spec, "asker", k=k))

    assert db.run(txn) == k


def test_pops_go_on_where_a_race_left_more_suggestions_than_slots(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 8}, budget={"n_trials": 10})
    stock(db, storage, 5)
    # A race (a cut or an enqueue beside a pop in flight) left 6 claimed + 5 buffered of 10.
    db.run(lambda s: s.execute(update(Study).values(n_claimed=6)))
    assert leases.claim(db, storage, owner="w") is not None  # a pop keeps the sum: allowed
    assert study_row(db).n_claimed == 7


def test_a_budget_cut_beside_a_pop_in_flight_cancels_enough(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 8}, budget={"n_trials": 10})
    assert leases.claim(db, storage, owner="w") is not None
    row = study_row(db)
    extra = 5 - row.n_buffered
    if extra:
        stock(db, storage, extra)
    assert study_row(db).n_buffered == 5
    with Session(db.engine) as popper, popper.begin():  # holds the oldest, as a pop does
        oldest = popper.scalar(
            select(Suggestion).order_by(Suggestion.id).limit(1).with_for_update()
        )
        assert oldest is not None
        studies.update_study(db, tenant="acme", name="L", n_trials=4, storage=storage)
    row = study_row(db)
    assert row.n_claimed + row.n_waiting + row.n_buffered <= 4  # 1 + 3: two newest went
    assert row.n_buffered == 3


def test_a_claim_of_a_stocked_study_is_one_statement_committing_itself(db, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 8}, budget={"n_trials": 10})
    stock(db, storage, 3)
    oldest = suggestions_of(db)[0]
    with statements(db.engine) as ours, statements(optuna_engine(storage)) as theirs:
        c = leases.claim(db, storage, owner="w")
    assert c is not None and c.number == oldest.number and c.params == oldest.params
    assert len(ours) == 1 and theirs == []  # no BEGIN/COMMIT round trips: autocommit
    row = study_row(db)
    assert (row.n_claimed, row.n_running, row.n_buffered) == (1, 1, 2)
    t = db.run(lambda s: s.scalar(select(Trial).where(Trial.number == c.number)))
    assert (t.state, t.lease_owner, t.fence, t.optuna_trial_id) == (
        "RUNNING",
        "w",
        1,
        oldest.optuna_trial_id,
    )
    assert oldest.id not in {x.id for x in suggestions_of(db)}


def test_the_one_statement_claim_resumes_first_and_leaves_what_it_cannot_take(db, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 8}, budget={"n_trials": 10})
    first = leases.claim(db, storage, owner="w1")
    assert first is not None
    stock(db, storage, 2)
    before = [x.id for x in suggestions_of(db)]
    counters = study_row(db).n_buffered
    # A trial that lost its owner waits to be resumed: the pop leaves the buffer alone.
    db.run(
        lambda s: s.execute(
            update(Trial).where(Trial.id == first.trial_row_id).values(lease_owner=None)
        )
    )
    assert leases._claim_popped(db, "w2", None) is None
    resumed = leases.claim(db, storage, owner="w2")
    assert resumed is not None and resumed.number == first.number and resumed.attempt == 2
    # A queued trial goes first: the statement finds the study's row unable to move (the
    # study is picked, the suggestion locked) and changes nothing. (A study at its
    # concurrency cap is not picked at all.)
    db.run(lambda s: s.execute(update(Study).values(n_waiting=1)))
    assert leases._claim_popped(db, "w3", None) is None
    db.run(lambda s: s.execute(update(Study).values(n_waiting=0, max_concurrent=1)))
    assert leases._claim_popped(db, "w3", None) is None
    assert [x.id for x in suggestions_of(db)] == before
    row = study_row(db)
    assert (row.n_claimed, row.n_running, row.n_buffered) == (1, 1, counters)


def test_a_batch_is_written_to_optuna_in_a_fixed_number_of_statements(db, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 16}, budget={"n_trials": 20})
    counts = []
    for k in (1, 6):
        with statements(db.engine) as ours:
            stock(db, storage, k)
        counts.append(len([x for x in ours if "trials" in x or "seqtune_" in x]))
    assert counts[0] == counts[1]  # not one more per suggestion
    trials_ = loaded(storage).trials
    assert [t.number for t in trials_] == list(range(7))
    assert {t.state for t in trials_} == {OptunaState.RUNNING}
    by_number = {x.number: x for x in suggestions_of(db)}
    for t in trials_:
        assert t.params == by_number[t.number].params
        assert t.system_attrs[ASKED_BY] == "asker"
        assert t.distributions["hidden_size"] == optuna.distributions.IntDistribution(4, 64)


def test_a_sketch_under_hyperband_does_not_look_its_study_up_by_name(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    spec = make(db, storage, pruner={"name": "hyperband"}, budget={"n_trials": 20})
    st = study_row(db)
    ost = asking_study(storage, st.optuna_study_name, spec, 1)
    first = sketch(storage, ost, spec, "w")
    assert first is not None
    with statements(optuna_engine(storage)) as theirs:
        for _ in range(3):
            assert sketch(storage, ost, spec, "w", siblings=[first]) is not None
    # Hyperband's brackets each made a Study object, which looked the study up by name in
    # Optuna's `studies` table: four queries per sketch.
    assert [x for x in theirs if "study_name" in x] == []


def test_a_finish_locks_the_study_row_for_its_last_statement_only(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, sampler={"name": "random", "buffer": 0}, budget={"n_trials": 2})
    a, b = (leases.claim(db, storage, owner=w) for w in ("w1", "w2"))
    assert a is not None and b is not None
    for c in (a, b):
        ost = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
        with statements(db.engine) as ours:
            leases.finish(db, ostudy=ost, claim=c, state="COMPLETE", values=[0.5], model=b"m")
        on_study = [i for i, x in enumerate(ours) if "seqtune_studies" in x]
        assert ours[on_study[0]].startswith("UPDATE seqtune_studies")
        if c is a:  # the counters are the transaction's last statement: the commit follows
            assert on_study == [len(ours) - 1]
    row = study_row(db)
    assert (row.n_complete, row.n_running, row.status) == (2, 0, "completed")
    assert leases.load_checkpoint(db, trial_row_id=a.trial_row_id, kind="best") == (0, b"m")


def suggestions_of(db: Database) -> list[Suggestion]:
    return db.run(lambda s: list(s.scalars(select(Suggestion).order_by(Suggestion.id))))
