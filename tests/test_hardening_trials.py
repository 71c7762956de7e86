"""Hardening of a trial's writes, resumes and outside Optuna clients (issue 13, items 3, 5, 10).

- Every write of an attempt is fenced: a stale attempt can store no model, and a trial's model
  is stored with its value in one transaction, so ``/trials/N/model`` serves the weights of the
  attempt whose value the trial shows.
- Resume is exact: a stop request (Ctrl+C in the terminal of ``seqtune worker`` or ``seqtune
  up``) finishes the epoch, snapshots and hands back, and the next attempt starts at the next
  epoch; where an attempt does redo epochs, Optuna's intermediate values are the new attempt's.
- Outside Optuna clients are handled on purpose: the reaper fails only trials seqtune asked;
  a seqtune-queued trial that an outside client runs is followed, recorded and counted once;
  trials an outside client asked stay out of ``/trials``, ``/best``, plots and importances.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import select

from seqtune.errors import Fenced, SeqtuneError
from seqtune.spec import check_spec, parse_spec
from service import plots
from service.settings import Settings
from service.store import leases, recovery, studies, trials
from service.store.db import Database
from service.store.optuna import ASKED_BY, make_storage
from service.store.tables import Checkpoint, Study, Trial, utcnow
from tests.conftest import free_port
from tests.test_fleet import create, wait_for
from tests.test_fleet import trials as trial_rows
from tests.test_leases import age_lease, make, ostudy

SPACE = {"hidden_size": {"type": "int", "low": 4, "high": 64}}


@pytest.fixture
def storage(settings: Settings) -> optuna.storages.RDBStorage:
    return make_storage(settings)


def _row(db: Database, trial_row_id: int) -> Trial:
    return db.run(lambda s: s.scalar(select(Trial).where(Trial.id == trial_row_id)))


def _study(db: Database, name: str) -> Study:
    return db.run(lambda s: s.scalar(select(Study).where(Study.name == name)))


def _steal(db: Database, storage: Any, old: leases.Claim) -> leases.Claim:
    """The lease of ``old`` expires, the reaper frees the trial, another worker resumes it."""
    age_lease(db, old)
    assert recovery.reap(db, storage).freed == 1
    new = leases.claim(db, storage, owner="alive")
    assert new is not None and new.number == old.number and new.fence > old.fence
    return new


# ---- item 3: every write of an attempt is fenced -------------------------------------------


def test_a_stale_attempt_cannot_store_a_model_for_a_trial_another_attempt_finished(
    db: Database, storage: Any
) -> None:
    make(db, storage)
    old = leases.claim(db, storage, owner="dead")
    assert old is not None
    trial = optuna.trial.Trial(ostudy(storage, old), old.optuna_trial_id)
    leases.report(
        db, claim=old, trial=trial, epoch=0, record={"epoch": 0, "val_rmse": 9.0}, value=9.0
    )
    new = _steal(db, storage, old)
    # The live attempt stores its model while it holds the lease, then finishes.
    leases.save_checkpoint(
        db, claim=new, kind="best", epoch=0, data=b"weights of the attempt that scored 1.5"
    )
    leases.finish(db, ostudy=ostudy(storage, new), claim=new, state="COMPLETE", values=[1.5])
    # The stale attempt ends its training later and tries to store its own model.
    with pytest.raises(Fenced):
        leases.save_checkpoint(db, claim=old, kind="best", epoch=3, data=b"stale weights")
    with pytest.raises(Fenced):
        leases.finish(
            db,
            ostudy=ostudy(storage, old),
            claim=old,
            state="COMPLETE",
            values=[0.1],
            model=b"stale weights",
        )
    number, served = trials.model_checkpoint(db, tenant="acme", name="L", number=new.number)
    assert number == new.number and served == b"weights of the attempt that scored 1.5"
    row = _row(db, new.trial_row_id)
    assert row.value == 1.5 and row.attempts == 2


def test_a_refused_finish_stores_no_model_and_the_winner_stores_model_and_value_together(
    db: Database, storage: Any
) -> None:
    make(db, storage)
    old = leases.claim(db, storage, owner="dead")
    assert old is not None
    new = _steal(db, storage, old)
    # The stale attempt finishes first: its result and its model are refused together.
    with pytest.raises(Fenced):
        leases.finish(
            db,
            ostudy=ostudy(storage, old),
            claim=old,
            state="COMPLETE",
            values=[0.1],
            model=b"stale weights",
            model_epoch=4,
        )
    with pytest.raises(SeqtuneError):  # no model yet: nothing of the stale attempt landed
        trials.model_checkpoint(db, tenant="acme", name="L", number=new.number)
    leases.finish(
        db,
        ostudy=ostudy(storage, new),
        claim=new,
        state="COMPLETE",
        values=[2.5],
        model=b"live weights",
        model_epoch=2,
    )
    assert trials.model_checkpoint(db, tenant="acme", name="L")[1] == b"live weights"
    ck = db.run(
        lambda s: s.scalar(
            select(Checkpoint).where(
                Checkpoint.trial_id == new.trial_row_id, Checkpoint.kind == "best"
            )
        )
    )
    assert ck.epoch == 2 and ck.size_bytes == len(b"live weights")
    assert _row(db, new.trial_row_id).value == 2.5


# ---- item 5: resume is exact ----------------------------------------------------------------


def test_a_resumed_attempt_replaces_optuna_intermediate_values_of_the_epochs_it_redoes(
    db: Database, storage: Any
) -> None:
    """Attempt 1 reports epochs 0-4 and snapshots after epoch 1, then dies (kill -9): attempt
    2 resumes after epoch 1 and redoes 2-4. Optuna must hold attempt 2's values for them, as
    seqtune's curve does, and the pruner must judge those."""
    make(db, storage, pruner={"name": "threshold", "options": {"upper": 5.0}})
    first = leases.claim(db, storage, owner="dead")
    assert first is not None
    t1 = optuna.trial.Trial(ostudy(storage, first), first.optuna_trial_id)
    for e in range(5):
        value = 10.0 + e  # a poor start: above the pruner's threshold
        leases.report(
            db, claim=first, trial=t1, epoch=e, record={"epoch": e, "val_rmse": value}, value=value
        )
        if e == 1:
            leases.save_checkpoint(db, claim=first, kind="resume", epoch=1, data=b"after epoch 1")
    second = _steal(db, storage, first)
    assert second.resumed
    # The slot builds a fresh Optuna Trial per attempt: it sees attempt 1's values.
    t2 = optuna.trial.Trial(ostudy(storage, second), second.optuna_trial_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's "already reported" warning fails the test
        for e in range(2, 5):
            value = 1.0 + e / 10
            leases.report(
                db,
                claim=second,
                trial=t2,
                epoch=e,
                record={"epoch": e, "val_rmse": value},
                value=value,
            )
    curve = _row(db, second.trial_row_id).curve
    assert [r["epoch"] for r in curve] == [0, 1, 2, 3, 4]
    assert [r["attempt"] for r in curve] == [1, 1, 2, 2, 2]
    last_per_epoch = {r["epoch"]: r["val_rmse"] for r in curve}
    loaded = optuna.load_study(study_name="acme/L", storage=storage)
    (ft,) = [t for t in loaded.trials if t.number == second.number]
    assert ft.intermediate_values == last_per_epoch
    assert not t2.should_prune()  # judged on attempt 2's 1.4, not attempt 1's 14.0


# Slow enough to interrupt mid-trial (about a second an epoch here), short enough to finish.
RESUMABLE = {
    "dataset": {"kind": "synthetic", "generator": "mackey_glass", "n_points": 2000},
    "objectives": [{"metric": "val_rmse"}],
    "search_space": {"hidden_size": {"type": "int", "low": 6, "high": 10}},
    "fixed": {"seq_len": 16, "batch_size": 8, "max_epochs": 8},
    "early_stopping": {"patience": None},
    "pruner": {"name": "none"},
}


class Procs:
    """seqtune processes in their own session (so that a test signals their whole process
    group, as a terminal does with Ctrl+C), with periodic snapshots off: the only snapshot of
    a trial is the one taken when it is stopped."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp, self.procs = url, tmp, []  # type: ignore[var-annotated]

    def start(self, name: str, *args: str) -> subprocess.Popen:
        exe = shutil.which("seqtune")
        cmd = [exe] if exe else [sys.executable, "-m", "seqtune.cli"]
        env = {
            **os.environ,
            "SEQTUNE_DATABASE_URL": self.url,
            "SEQTUNE_DATA_DIR": str(self.tmp),
            "SEQTUNE_CHECKPOINT_EVERY_S": "3600",
            "SEQTUNE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [*cmd, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def procs(settings: Settings, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(settings.url, tmp_path)
    yield p
    p.stop_all()


def _interrupt_mid_trial(
    db: Database,
    procs: Procs,
    name: str,
    proc: subprocess.Popen,
    log_name: str,
    codes: tuple[int, ...] = (0,),
) -> Trial:
    """Ctrl+C once the trial is under way: SIGINT to the process group, as a terminal sends
    it. Returns the trial after the process exited with one of ``codes``."""
    wait_for(
        lambda: any(t.state == "RUNNING" and t.epochs >= 2 for t in trial_rows(db, name)),
        240,
        "a trial mid-way",
    )
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) in codes, procs.log(log_name)[-3000:]
    (t,) = trial_rows(db, name)
    return t


def _assert_handed_back_after_its_epoch(db: Database, t: Trial, log: str) -> None:
    assert t.state == "RUNNING" and t.lease_owner is None, (t.state, t.lease_owner)
    ck = db.run(
        lambda s: s.scalar(
            select(Checkpoint.epoch).where(Checkpoint.trial_id == t.id, Checkpoint.kind == "resume")
        )
    )
    # Periodic snapshots are off: this one was taken at the stop, after the last epoch.
    assert ck is not None and ck == t.curve[-1]["epoch"], (ck, t.curve[-1]["epoch"], log[-3000:])
    assert "handed back" in log


def _assert_resumed_exactly(
    db: Database, settings: Settings, name: str, handed_back_after: int
) -> None:
    (t,) = trial_rows(db, name)
    assert t.state == "COMPLETE" and t.attempts == 2
    epochs = [r["epoch"] for r in t.curve]
    assert epochs == list(range(8)), epochs  # every epoch once: no gap, no repeat
    first = [r["epoch"] for r in t.curve if r["attempt"] == 1]
    second = [r["epoch"] for r in t.curve if r["attempt"] == 2]
    assert max(first) == handed_back_after and min(second) == handed_back_after + 1
    ft = optuna.load_study(study_name=f"default/{name}", storage=settings.url).trials[t.number]
    assert ft.intermediate_values == {r["epoch"]: r["val_rmse"] for r in t.curve}


def test_ctrl_c_on_seqtune_worker_finishes_the_epoch_and_the_next_attempt_resumes_after_it(
    db: Database, settings: Settings, procs: Procs
) -> None:
    """The terminal sends SIGINT to the worker and to its slot processes; the worker forwards
    its copy. Counted twice, the slot stopped mid-epoch with no snapshot ("a second signal
    stops at once"), and the next attempt redid every epoch since the last periodic one."""
    create(db, settings, "ctrlc", RESUMABLE, n_trials=1, lease_timeout_s=600)
    a = procs.start("a", "worker", "--gpus", "none", "--threads", "1")
    t = _interrupt_mid_trial(db, procs, "ctrlc", a, "a")
    _assert_handed_back_after_its_epoch(db, t, procs.log("a"))
    b = procs.start("b", "worker", "--gpus", "none", "--threads", "1", "--burst")
    assert b.wait(timeout=240) == 0, procs.log("b")[-3000:]
    assert "resuming trial" in procs.log("b")
    _assert_resumed_exactly(db, settings, "ctrlc", t.curve[-1]["epoch"])


def test_ctrl_c_on_seqtune_up_finishes_the_epoch_and_the_next_attempt_resumes_after_it(
    db: Database, settings: Settings, procs: Procs
) -> None:
    """`seqtune up`: the terminal's SIGINT reaches up, its worker and the slot, and up
    terminates its worker once the server is down: one request, however many copies."""
    create(db, settings, "upc", RESUMABLE, n_trials=1, lease_timeout_s=600)
    up = procs.start("up", "up", "--gpus", "none", "--port", str(free_port()))
    t = _interrupt_mid_trial(db, procs, "upc", up, "up", codes=(0, 130))  # 130: interrupted
    _assert_handed_back_after_its_epoch(db, t, procs.log("up"))
    b = procs.start("b", "worker", "--gpus", "none", "--threads", "1", "--burst")
    assert b.wait(timeout=240) == 0, procs.log("b")[-3000:]
    _assert_resumed_exactly(db, settings, "upc", t.curve[-1]["epoch"])


def test_a_stop_at_a_walk_forward_fold_boundary_snapshots_there() -> None:
    """A stop requested in the epoch that ends a fold by early stopping: the trial stops at
    the boundary, with a snapshot from which the next fold starts afresh, instead of training
    an epoch of the next fold first; resuming from it gives the uninterrupted result."""
    from worker import datasets, runner
    from worker.objective import fit, resolve

    spec = parse_spec(
        {
            "name": "wf",
            "dataset": {"kind": "synthetic", "generator": "sine", "n_points": 600},
            "objectives": [{"metric": "val_rmse"}],
            "search_space": {},
            "fixed": {"seq_len": 8, "batch_size": 32, "max_epochs": 4, "hidden_size": 8},
            # Every epoch after the first is stale: each fold ends by early stopping at epoch 1.
            "early_stopping": {"patience": 1, "min_delta": 1e9},
            "validation": {"scheme": "walk_forward", "folds": 2},
            "budget": {"n_trials": 1},
        }
    )
    check_spec(spec)
    frame = datasets.load(spec.dataset, cache_dir=None)
    hp = resolve(spec, {})
    cfg = runner.train_config(spec, hp, seed=0, device="cpu")  # patience 1, min_delta 1e9
    whole = fit(spec, hp, frame, cfg)
    assert [r["fold"] for r in whole.curve] == [0, 0, 1, 1]

    stop = {"now": False}
    snaps: list[dict[str, Any]] = []

    def on_epoch(step: int, record: dict[str, float]) -> bool:
        stop["now"] = stop["now"] or step == 1  # the request comes in fold 0's last epoch
        return False

    cut = fit(
        spec,
        hp,
        frame,
        cfg,
        on_epoch=on_epoch,
        should_stop=lambda: stop["now"],
        on_snapshot=snaps.append,
        snapshot_every_s=3600,
    )
    assert cut.reason == "interrupted"
    assert [r["fold"] for r in cut.curve] == [0, 0]  # no epoch of fold 1 was trained
    assert len(snaps) == 1 and snaps[0]["epoch"] == hp.max_epochs - 1
    assert snaps[0]["state"] is None and len(snaps[0]["folds_done"]) == 1
    resumed = fit(spec, hp, frame, cfg, resume=snaps[0])
    assert [r["epoch"] for r in resumed.curve] == [r["epoch"] for r in whole.curve]
    assert resumed.val == pytest.approx(whole.val)


# ---- item 10: outside Optuna clients ---------------------------------------------------------


def _later(seconds: float) -> Any:
    return utcnow() + timedelta(seconds=seconds)


def test_the_reaper_fails_only_trials_seqtune_asked(db: Database, storage: Any) -> None:
    make(db, storage, budget={"n_trials": 3, "lease_timeout_s": 30})
    outside = optuna.load_study(study_name="acme/L", storage=storage)
    live = outside.ask()  # a plain Optuna client's trial, still training
    live.suggest_float("x", 0, 1)
    report = recovery.reap(db, storage, now=_later(3600))  # long past the lease timeout
    assert report.orphans == 0
    assert storage.get_trial(live._trial_id).state == TrialState.RUNNING  # left alone
    # A seqtune claim that died between Optuna's ask and its own commit.
    dead = outside.ask()
    storage.set_trial_system_attr(dead._trial_id, ASKED_BY, "dead-worker")
    report = recovery.reap(db, storage, now=_later(3600))
    assert report.orphans == 1
    assert storage.get_trial(dead._trial_id).state == TrialState.FAIL
    assert storage.get_trial(live._trial_id).state == TrialState.RUNNING
    outside.tell(live, 0.5)
    assert storage.get_trial(live._trial_id).state == TrialState.COMPLETE
    view = studies.get_study(db, tenant="acme", name="L")
    assert view.trials.running == 0 and view.trials.remaining == 3  # not in seqtune's budget


def test_a_claim_marks_the_trials_it_asks(db: Database, storage: Any) -> None:
    make(db, storage)
    c = leases.claim(db, storage, owner="w1")
    assert c is not None
    ft = storage.get_trial(c.optuna_trial_id)
    assert ft.system_attrs[ASKED_BY] == "w1" and set(ft.params) == {"hidden_size"}


def test_a_queued_trial_run_by_an_outside_client_is_followed_counted_once_and_never_rerun(
    db: Database, storage: Any
) -> None:
    make(db, storage, budget={"n_trials": 3, "lease_timeout_s": 30})
    queued = trials.enqueue_trial(db, storage, tenant="acme", name="L", params={"hidden_size": 7})
    # A plain Optuna client pops it (ask() takes queued trials first) and trains it.
    outside = optuna.load_study(study_name="acme/L", storage=storage)
    ot = outside.ask()
    assert ot.number == queued.number and ot.suggest_int("hidden_size", 4, 64) == 7
    a = leases.claim(db, storage, owner="w")
    b = leases.claim(db, storage, owner="w")
    assert a is not None and b is not None and queued.number not in (a.number, b.number)
    # The last slot is the queued trial's: no third claim, and no stray trial left in Optuna.
    assert leases.claim(db, storage, owner="w") is None
    assert len(outside.get_trials(deepcopy=False)) == 3
    for c, v in ((a, 1.0), (b, 2.0)):
        leases.finish(db, ostudy=ostudy(storage, c), claim=c, state="COMPLETE", values=[v])
    assert _study(db, "L").status == "running"  # the queued trial is not done yet
    # Past the lease timeout, the outside client is still training: followed, not failed.
    report = recovery.reap(db, storage, now=_later(3600))
    assert report.orphans == 0 and report.outside == 1
    assert storage.get_trial(ot._trial_id).state == TrialState.RUNNING
    row = db.run(lambda s: s.scalar(select(Trial).where(Trial.number == queued.number)))
    assert row.state == "RUNNING" and row.lease_owner == recovery.OUTSIDE
    view = studies.get_study(db, tenant="acme", name="L")
    assert (view.trials.waiting, view.trials.running, view.trials.remaining) == (0, 1, 0)
    outside.tell(ot, 0.25)
    assert recovery.reap(db, storage).outside == 1
    row = db.run(lambda s: s.scalar(select(Trial).where(Trial.number == queued.number)))
    assert (row.state, row.value, row.reason) == ("COMPLETE", 0.25, recovery.OUTSIDE_REASON)
    assert row.params == {"hidden_size": 7} and row.worker == recovery.OUTSIDE
    st = _study(db, "L")
    assert st.status == "completed" and st.n_claimed == 3 and st.n_complete == 3
    assert st.n_waiting == 0 and st.n_running == 0
    assert len(outside.get_trials(deepcopy=False)) == 3  # the queued params ran once
    assert studies.best(db, tenant="acme", name="L").best.number == queued.number


def test_a_queued_trial_an_outside_client_finished_is_recorded_by_the_next_claim(
    db: Database, storage: Any
) -> None:
    make(db, storage, budget={"n_trials": 2, "lease_timeout_s": 30})
    queued = trials.enqueue_trial(db, storage, tenant="acme", name="L", params={"hidden_size": 9})
    outside = optuna.load_study(study_name="acme/L", storage=storage)
    ot = outside.ask()
    ot.suggest_int("hidden_size", 4, 64)
    outside.tell(ot, state=TrialState.PRUNED)  # popped and ended between two looks
    c = leases.claim(db, storage, owner="w")
    assert c is not None and c.number != queued.number
    assert leases.claim(db, storage, owner="w") is None  # 2 of 2 started
    row = db.run(lambda s: s.scalar(select(Trial).where(Trial.number == queued.number)))
    assert (row.state, row.reason) == ("PRUNED", recovery.OUTSIDE_REASON)
    st = _study(db, "L")
    assert (st.n_waiting, st.n_pruned, st.n_running, st.n_claimed) == (0, 1, 1, 2)
    leases.finish(db, ostudy=ostudy(storage, c), claim=c, state="COMPLETE", values=[1.0])
    assert _study(db, "L").status == "completed"


def test_trials_an_outside_client_asked_stay_out_of_trials_best_plots_and_importances(
    db: Database, storage: Any
) -> None:
    make(
        db,
        storage,
        search_space=SPACE,
        sampler={"name": "random", "seed": 3},
        budget={"n_trials": 5},
    )
    for v in (5.0, 4.0, 3.0, 2.0, 1.0):
        c = leases.claim(db, storage, owner="w")
        assert c is not None
        leases.finish(db, ostudy=ostudy(storage, c), claim=c, state="COMPLETE", values=[v])
    # A plain Optuna client adds a better trial over a parameter seqtune does not search.
    outside = optuna.load_study(study_name="acme/L", storage=storage)
    outside.optimize(lambda t: t.suggest_float("outside_param", 0, 1) * 0 + 0.001, n_trials=1)
    assert len(outside.trials) == 6
    listed = trials.list_trials(
        db, tenant="acme", name="L", state=None, sort="number", limit=100, offset=0
    ).items
    assert len(listed) == 5 and all(t.value != 0.001 for t in listed)
    assert studies.best(db, tenant="acme", name="L").best.value == 1.0
    imp = studies.importance(db, storage, tenant="acme", name="L")
    assert set(imp.importances) == {"hidden_size"} and imp.n_trials == 5
    view = studies.get_study(db, tenant="acme", name="L")
    shown = studies.seqtune_study(db, storage, view)
    assert sorted(t.value for t in shown.trials) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert shown.directions == outside.directions
    html, media = plots.render(storage, view, "history", db=db, fmt="html")
    figure = html[html.index(b"Plotly.newPlot(") :]  # the figure's data, after plotly.js
    assert media == "text/html" and b"0.001" not in figure
    # seqtune's trial numbers on the axis, as /trials lists them (the outside trial is #5)
    assert b'"x":[0,1,2,3,4],"y":[5.0,4.0,3.0,2.0,1.0]' in figure
