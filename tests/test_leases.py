"""Claims, leases, fencing and recovery at the data layer (real Postgres, real Optuna)."""

from __future__ import annotations

import threading
from datetime import timedelta

import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from seqtune.errors import Fenced
from seqtune.spec import StudySpec, check_spec, parse_spec
from service.settings import Settings
from service.store import leases, recovery, studies, workers
from service.store.db import Database
from service.store.optuna import ASKED_BY, make_storage, optuna_study
from service.store.tables import Study, Trial, utcnow


def make(db: Database, storage, name: str = "L", **over) -> StudySpec:  # type: ignore[no-untyped-def]
    body = {
        "name": name,
        "dataset": {"kind": "builtin", "name": "sunspots"},
        "objectives": [{"metric": "val_rmse"}],
        "search_space": {"hidden_size": {"type": "int", "low": 4, "high": 64}},
        "budget": {"n_trials": 5, "lease_timeout_s": 30, "max_retries": 1},
    }
    body.update(over)
    spec = parse_spec(body)
    check_spec(spec)
    studies.create_study(db, storage, tenant="acme", spec=spec)
    return spec


@pytest.fixture
def storage(settings: Settings):  # type: ignore[no-untyped-def]
    return make_storage(settings)


def ostudy(storage, c: leases.Claim) -> optuna.Study:  # type: ignore[no-untyped-def]
    return optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))


def age_lease(db: Database, c: leases.Claim, seconds: float = 3600) -> None:
    db.run(
        lambda s: s.execute(
            update(Trial)
            .where(Trial.id == c.trial_row_id)
            .values(lease_renewed_at=utcnow() - timedelta(seconds=seconds))
        )
    )


def test_exactly_n_trials_are_claimed_under_a_race(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 5})
    got: list[leases.Claim] = []
    barrier = threading.Barrier(12)

    def racer(i: int) -> None:
        barrier.wait()
        while (c := leases.claim(db, storage, owner=f"w{i}")) is not None:
            got.append(c)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 5 and len({c.number for c in got}) == 5
    view = studies.get_study(db, tenant="acme", name="L")
    assert view.trials.running == 5 and view.trials.remaining == 0
    assert len(optuna.load_study(study_name="acme/L", storage=storage).trials) == 5


def test_no_two_workers_get_the_same_grid_point(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(
        db,
        storage,
        search_space={
            "hidden_size": {"type": "int", "low": 8, "high": 32, "step": 8},
            "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        },
        sampler={"name": "grid"},
        budget={"n_trials": 8},
    )
    got: list[leases.Claim] = []
    lock = threading.Lock()

    def racer(i: int) -> None:
        while (c := leases.claim(db, storage, owner=f"w{i}")) is not None:
            with lock:
                got.append(c)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    points = [tuple(sorted(c.params.items())) for c in got]
    assert len(points) == 8 and len(set(points)) == 8


def test_max_concurrent_and_priority_and_fairness(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, "low", budget={"n_trials": 10, "max_concurrent_trials": 2})
    make(db, storage, "high", priority=5, budget={"n_trials": 1})
    first = leases.claim(db, storage, owner="w")
    assert first is not None and first.study_name == "high"
    names = [c.study_name for c in (leases.claim(db, storage, owner="w") for _ in range(4)) if c]
    assert names == ["low", "low"]  # then max_concurrent_trials holds


def test_paused_and_stopped_studies_hand_out_nothing(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage)
    c = leases.claim(db, storage, owner="w")
    assert c is not None
    studies.update_study(db, tenant="acme", name="L", status="paused")
    assert leases.claim(db, storage, owner="w") is None
    leases.release(db, claim=c)  # even a trial waiting to resume stays put while paused
    assert leases.claim(db, storage, owner="w") is None
    studies.update_study(db, tenant="acme", name="L", status="running")
    again = leases.claim(db, storage, owner="w2")
    assert again is not None and again.number == c.number and again.attempt == 2
    studies.update_study(db, tenant="acme", name="L", status="stopped")
    assert leases.claim(db, storage, owner="w") is None


def test_a_fenced_attempt_is_refused_and_changes_nothing(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage)
    old = leases.claim(db, storage, owner="dead")
    assert old is not None
    trial = optuna.trial.Trial(ostudy(storage, old), old.optuna_trial_id)
    leases.report(
        db, claim=old, trial=trial, epoch=0, record={"epoch": 0, "val_rmse": 9.0}, value=9.0
    )
    age_lease(db, old)
    assert recovery.reap(db, storage).freed == 1
    new = leases.claim(db, storage, owner="alive")
    assert new is not None and new.number == old.number and new.fence > old.fence
    with pytest.raises(Fenced):
        leases.finish(db, ostudy=ostudy(storage, old), claim=old, state="COMPLETE", values=[0.001])
    with pytest.raises(Fenced):
        leases.report(db, claim=old, trial=trial, epoch=1, record={"epoch": 1}, value=0.5)
    with pytest.raises(Fenced):
        leases.save_checkpoint(db, claim=old, kind="resume", epoch=1, data=b"stale")
    frozen = storage.get_trial(old.optuna_trial_id)
    assert frozen.state == optuna.trial.TrialState.RUNNING and frozen.intermediate_values == {
        0: 9.0
    }
    leases.finish(db, ostudy=ostudy(storage, new), claim=new, state="COMPLETE", values=[1.5])
    assert storage.get_trial(new.optuna_trial_id).values == [1.5]
    row = db.run(lambda s: s.scalar(select(Trial).where(Trial.id == new.trial_row_id)))
    assert row.state == "COMPLETE" and row.value == 1.5 and row.attempts == 2


def test_lost_leases_fail_after_max_retries(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 1, "max_retries": 1, "lease_timeout_s": 30})
    for attempt in (1, 2):
        c = leases.claim(db, storage, owner=f"w{attempt}")
        assert c is not None and c.attempt == attempt
        age_lease(db, c)
        recovery.reap(db, storage)
    view = studies.get_study(db, tenant="acme", name="L")
    assert view.trials.failed == 1 and view.trials.running == 0
    assert view.status == "completed"
    trial = db.run(lambda s: s.scalar(select(Trial)))
    assert trial.reason == "lost" and "max_retries=1" in trial.error
    assert storage.get_trial(trial.optuna_trial_id).state == optuna.trial.TrialState.FAIL


def test_reaper_reconciles_orphans_and_deadlines(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, budget={"n_trials": 3, "timeout_s": 60, "lease_timeout_s": 30})
    # A worker that died between Optuna's ask and its own commit leaves an orphan: a RUNNING
    # trial that seqtune's claim marked as its own, with no seqtune record.
    orphan = optuna.load_study(study_name="acme/L", storage=storage).ask()
    storage.set_trial_system_attr(orphan._trial_id, ASKED_BY, "dead-worker")
    report = recovery.reap(db, storage, now=utcnow() + timedelta(seconds=90))
    assert report.orphans == 1 and report.timed_out == 1
    assert storage.get_trial(orphan._trial_id).state == optuna.trial.TrialState.FAIL
    assert studies.get_study(db, tenant="acme", name="L").status == "timed_out"


def test_service_reaper_recovers_when_every_worker_is_dead(
    db: Database, storage, settings: Settings
) -> None:  # type: ignore[no-untyped-def]
    from service.api.app import create_app

    make(db, storage)
    ghost = leases.claim(db, storage, owner="ghost")
    assert ghost is not None
    age_lease(db, ghost)
    settings.reap_interval_s = 0.2
    import time

    with TestClient(create_app(settings)):
        for _ in range(50):
            owner = db.run(lambda s: s.scalar(select(Trial.lease_owner)))
            if owner is None:
                break
            time.sleep(0.1)
    assert owner is None
    assert leases.claim(db, storage, owner="next").number == ghost.number  # type: ignore[union-attr]


def test_workers_endpoint_lists_the_fleet(
    client: TestClient, auth: dict, db: Database, storage
) -> None:  # type: ignore[no-untyped-def]
    make(db, storage)
    workers.register(
        db, worker_id="host-1-s0", host="host", slot=0, device="cpu", pid=1, versions={"torch": "x"}
    )
    c = leases.claim(db, storage, owner="host-1-s0")
    workers.heartbeat(db, worker_id="host-1-s0", trial_row_id=c.trial_row_id)  # type: ignore[union-attr]
    rows = client.get("/v1/workers", headers=auth).json()
    assert rows[0]["id"] == "host-1-s0" and rows[0]["status"] == "live"
    assert rows[0]["study"] == "L" and rows[0]["trial"] == c.number  # type: ignore[union-attr]
    from service.store import keys

    other = {"Authorization": f"Bearer {keys.create_key(db, tenant='globex')}"}
    theirs = client.get("/v1/workers", headers=other).json()
    assert theirs[0]["study"] is None and theirs[0]["trial"] is None
    db.run(lambda s: s.execute(update(Study).values(priority=0)))
    db.run(
        lambda s: s.execute(
            update(workers.Worker).values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )
    )
    assert client.get("/v1/workers", headers=auth).json()[0]["status"] == "lost"


def test_final_phase_retrains_the_top_k_with_seeds_then_completes(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, name="F", budget={"n_trials": 4}, final={"top_k": 2, "seeds": 3})
    values = {}
    for v in (5.0, 1.0, 3.0, 2.0):  # trial numbers 0..3; the two best are #1 (1.0), #3 (2.0)
        c = leases.claim(db, storage, owner="w")
        assert c is not None and c.final_of is None
        leases.finish(db, ostudy=ostudy(storage, c), claim=c, state="COMPLETE", values=[v])
        values[c.number] = (v, c.params)
    st = db.run(lambda s: s.scalar(select(Study).where(Study.name == "F")))
    assert st.status == "running" and st.phase == "final" and st.n_trials == 4 + 2 * 3
    retrains = []
    while (c := leases.claim(db, storage, owner="w")) is not None:
        assert c.final_of is not None and c.params == values[c.final_of][1]
        retrains.append((c.final_of, c.number))
        leases.finish(db, ostudy=ostudy(storage, c), claim=c, state="COMPLETE", values=[1.5])
    assert [r[0] for r in retrains] == [1, 1, 1, 3, 3, 3]
    assert len({r[1] for r in retrains}) == 6  # each re-train its own number, so its own seed
    st = db.run(lambda s: s.scalar(select(Study).where(Study.name == "F")))
    assert st.status == "completed" and st.n_claimed == 10
    # Optuna holds the re-trains as ordinary trials, marked with their source.
    marks = [
        t.user_attrs.get("seqtune_final_of")
        for t in optuna.load_study(study_name=st.optuna_study_name, storage=storage).trials
    ]
    assert marks == [None] * 4 + [1, 1, 1, 3, 3, 3]


def test_no_final_phase_without_a_completed_trial(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    make(db, storage, name="G", budget={"n_trials": 2}, final={"top_k": 2, "seeds": 2})
    for _ in range(2):
        c = leases.claim(db, storage, owner="w")
        assert c is not None
        leases.finish(db, ostudy=ostudy(storage, c), claim=c, state="PRUNED", reason="pruned")
    st = db.run(lambda s: s.scalar(select(Study).where(Study.name == "G")))
    assert st.status == "completed" and st.phase == "search" and st.n_trials == 2


def test_a_refused_end_leaves_optuna_untouched(db: Database, storage) -> None:  # type: ignore[no-untyped-def]
    """The transition table is checked before Optuna is told: a move it refuses (here 'reap',
    which may only fail a trial, asked to complete it) writes nothing anywhere."""
    from seqtune.errors import Conflict
    from service.store.budget import close_trial

    make(db, storage)
    c = leases.claim(db, storage, owner="w1")
    assert c is not None
    os_ = ostudy(storage, c)

    def txn(s) -> None:  # type: ignore[no-untyped-def]
        t = s.get(Trial, c.trial_row_id)
        close_trial(s, os_, t, action="reap", state="COMPLETE", values=[1.0], reason=None)

    with pytest.raises(Conflict):
        db.run(txn)
    assert storage.get_trial(c.optuna_trial_id).state == optuna.trial.TrialState.RUNNING
    assert db.run(lambda s: s.get(Trial, c.trial_row_id).state) == "RUNNING"
