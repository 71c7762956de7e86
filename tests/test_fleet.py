"""The worker fleet as real processes on real Postgres, through PgBouncer in transaction
pooling mode as deployed at scale: exact budgets with 8 workers, a kill -9 of one of several
workers mid-trial, SIGTERM hand-over to another worker, and a Postgres restart behind
PgBouncer. The tests' own reads and the study's creation go to Postgres directly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from seqtune.spec import check_spec, parse_spec
from service.settings import Settings
from service.store import migrate, studies
from service.store.db import Database
from service.store.optuna import make_storage
from service.store.tables import Checkpoint, Study, Trial
from tests.pgbouncer import PgBouncer

# Trials of a few seconds each (about 0.3 s an epoch on one core), long enough to interrupt.
SLOW = {
    "dataset": {"kind": "synthetic", "generator": "mackey_glass", "n_points": 4000},
    "objectives": [{"metric": "val_rmse"}],
    "search_space": {"hidden_size": {"type": "int", "low": 6, "high": 10}},
    "fixed": {"seq_len": 16, "batch_size": 8, "max_epochs": 10},
    "early_stopping": {"patience": None},
    "pruner": {"name": "none"},
}
FAST = {
    "dataset": {"kind": "builtin", "name": "sunspots"},
    "objectives": [{"metric": "val_rmse"}],
    "search_space": {
        "hidden_size": {"type": "int", "low": 4, "high": 16},
        "lr": {"type": "float", "low": 0.001, "high": 0.03, "log": True},
    },
    "fixed": {"seq_len": 6, "max_epochs": 3},
}


def create(db: Database, settings: Settings, name: str, base: dict, **budget: Any) -> None:
    spec = parse_spec({**base, "name": name, "budget": budget})
    check_spec(spec)
    studies.create_study(db, make_storage(settings), tenant="default", spec=spec)


class Workers:
    def __init__(self, url: str, tmp: Path, **env: str) -> None:
        self.url, self.tmp, self.env = url, tmp, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        exe = shutil.which("seqtune")
        cmd = [exe] if exe else [sys.executable, "-m", "seqtune.cli"]
        env = {
            **os.environ,
            "SEQTUNE_DATABASE_URL": self.url,
            "SEQTUNE_DATA_DIR": str(self.tmp),
            "SEQTUNE_CHECKPOINT_EVERY_S": "0",
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [*cmd, "worker", "--gpus", "none", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def owner(self, worker_id: str) -> str:
        """The name of the started worker whose slot is ``worker_id`` (host-pid-sN)."""
        slot_pid = int(worker_id.rsplit("-", 2)[1])
        stat = Path(f"/proc/{slot_pid}/stat").read_text()
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        return next(n for n, p in self.procs.items() if p.pid == parent)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def fleet(settings: Settings, tmp_path: Path, pgbouncer: PgBouncer) -> Iterator[Workers]:
    """Workers that reach the test database through PgBouncer (transaction pooling), set up
    as a deployment behind it is: the session limits on the role (the upgrade, run through
    PgBouncer, sets them), none in the startup packet."""
    url = pgbouncer.url(settings.url)
    behind = settings.model_copy(update={"database_url": url, "db_session_limits": "role"})
    db = Database(behind)
    migrate.upgrade(db.engine, settings=behind)
    db.dispose()
    # Optuna's storage by a second entry for the same database: a pool of its own.
    w = Workers(
        url,
        tmp_path,
        SEQTUNE_DB_SESSION_LIMITS="role",
        SEQTUNE_OPTUNA_DATABASE_URL=pgbouncer.optuna_url(settings.url),
    )
    yield w
    w.stop_all()


class PoolWatch(threading.Thread):
    """The most client and server connections PgBouncer held for one database at once (its
    entry and Optuna's), sampled from its admin console while the fleet runs."""

    def __init__(self, bouncer: PgBouncer, database: str) -> None:
        super().__init__(daemon=True)
        self.bouncer, self.database = bouncer, database
        self.clients = self.servers = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.2):
            n = {
                what: sum(
                    r["database"] in (self.database, f"{self.database}__optuna")
                    for r in self.bouncer.show(what)
                )
                for what in ("CLIENTS", "SERVERS")
            }
            self.clients = max(self.clients, n["CLIENTS"])
            self.servers = max(self.servers, n["SERVERS"])


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def study_row(db: Database, name: str) -> Study:
    return db.run(lambda s: s.scalar(select(Study).where(Study.name == name)))


def trials(db: Database, name: str) -> list[Trial]:
    return db.run(
        lambda s: list(
            s.scalars(select(Trial).join(Study).where(Study.name == name).order_by(Trial.number))
        )
    )


def assert_accounted(db: Database, settings: Settings, name: str, n: int) -> None:
    """Exactly n trials finished, none running, in seqtune's records and in Optuna's."""
    row = study_row(db, name)
    assert row.status == "completed", row.status
    assert row.n_complete + row.n_pruned + row.n_failed == n and row.n_running == 0
    assert row.n_claimed == n
    rows = trials(db, name)
    assert len(rows) == n and all(t.state in ("COMPLETE", "PRUNED", "FAIL") for t in rows)
    ours = {t.optuna_trial_id for t in rows}
    ot = optuna.load_study(study_name=f"default/{name}", storage=settings.url).trials
    assert not [t for t in ot if t.state == optuna.trial.TrialState.RUNNING]
    assert {t._trial_id for t in ot if t.state.is_finished()} >= ours


def test_budget_is_exact_with_8_concurrent_workers(
    db: Database, settings: Settings, fleet: Workers, pgbouncer: PgBouncer
) -> None:
    create(db, settings, "eight", FAST, n_trials=20)
    watch = PoolWatch(pgbouncer, str(make_url(settings.url).database))
    watch.start()
    procs = [fleet.start(f"w{i}", "--burst", "--threads", "1") for i in range(8)]
    try:
        for i, p in enumerate(procs):
            assert p.wait(timeout=240) == 0, fleet.log(f"w{i}")
    finally:
        watch.halt.set()
        watch.join()
    assert_accounted(db, settings, "eight", 20)
    assert len({t.worker for t in trials(db, "eight")}) > 1  # the work was shared
    # The fleet's traffic went through PgBouncer, whose server connections stayed within
    # its two pools (3 each in the fixture): fewer than the 8 slots, which held more.
    assert watch.clients >= 8, (watch.clients, watch.servers)
    assert 0 < watch.servers <= 6, (watch.clients, watch.servers)


def _running_after_epochs(db: Database, name: str, epochs: int) -> Trial | None:
    return next((t for t in trials(db, name) if t.state == "RUNNING" and t.epochs >= epochs), None)


def _assert_resumed(t: Trial) -> None:
    epochs = [r["epoch"] for r in t.curve]
    assert epochs == list(range(10)), epochs  # every epoch once: no gap, no repeat
    first = [r["epoch"] for r in t.curve if r["attempt"] == 1]
    second = [r["epoch"] for r in t.curve if r["attempt"] == 2]
    # Resumed from the checkpoint, not from scratch: attempt 1's epochs were kept.
    assert first and second and max(first) < min(second)
    assert t.attempts == 2


def test_kill_9_of_one_worker_mid_trial_keeps_the_budget_exact(
    db: Database, settings: Settings, fleet: Workers
) -> None:
    """Three workers; the one running a trial mid-way is killed with SIGKILL (slot process
    included). Another recovers the trial and resumes it from its checkpoint, and the study
    ends with exactly n_trials finished, in seqtune's records and in Optuna's storage."""
    create(db, settings, "killed", SLOW, n_trials=4, lease_timeout_s=5)
    for i in range(3):
        fleet.start(f"w{i}", "--burst", "--threads", "1")
    victim = wait_for(lambda: _running_after_epochs(db, "killed", 2), 120, "a trial mid-way")
    killed = fleet.owner(victim.lease_owner or victim.worker or "")
    os.killpg(fleet.procs[killed].pid, signal.SIGKILL)  # the whole worker, slot included
    fleet.procs[killed].wait()
    others = [n for n in fleet.procs if n != killed]
    for n in others:
        assert fleet.procs[n].wait(timeout=240) == 0, fleet.log(n)
    assert_accounted(db, settings, "killed", 4)
    t = next(t for t in trials(db, "killed") if t.number == victim.number)
    assert t.state == "COMPLETE"
    _assert_resumed(t)
    assert any("resuming trial" in fleet.log(n) for n in others)


def test_sigterm_hands_the_trial_to_another_worker(
    db: Database, settings: Settings, fleet: Workers
) -> None:
    create(db, settings, "handover", SLOW, n_trials=1, lease_timeout_s=600)
    a = fleet.start("a")
    wait_for(lambda: _running_after_epochs(db, "handover", 2), 120, "a trial mid-way")
    os.kill(a.pid, signal.SIGTERM)  # the fleet parent forwards it to its slot once
    assert a.wait(timeout=60) == 0, fleet.log("a")
    (t,) = trials(db, "handover")
    assert t.state == "RUNNING" and t.lease_owner is None  # handed back, not failed
    ck = db.run(
        lambda s: s.scalar(
            select(Checkpoint.epoch).where(Checkpoint.trial_id == t.id, Checkpoint.kind == "resume")
        )
    )
    assert ck is not None and ck == t.curve[-1]["epoch"]
    # The lease timeout is 10 minutes: only the release lets b start at once.
    b = fleet.start("b", "--burst")
    assert b.wait(timeout=120) == 0, fleet.log("b")
    assert_accounted(db, settings, "handover", 1)
    _assert_resumed(trials(db, "handover")[0])


def _restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.skipif(
    not shutil.which("pg_ctlcluster") or not os.path.isdir("/etc/postgresql"),
    reason="needs a local Postgres cluster this test may restart",
)
def test_a_postgres_restart_mid_study_is_survived(
    db: Database, settings: Settings, fleet: Workers
) -> None:
    create(db, settings, "restart", SLOW, n_trials=3, lease_timeout_s=120)
    from sqlalchemy import text

    def started() -> Any:
        return db.run(lambda s: s.scalar(text("SELECT pg_postmaster_start_time()")))

    a = fleet.start("a", "--burst")
    wait_for(lambda: _running_after_epochs(db, "restart", 2), 120, "a trial mid-way")
    before = started()
    _restart_postgres()
    assert started() > before  # the server really restarted while the trial ran
    assert a.poll() is None, "the worker died with the database"
    assert a.wait(timeout=300) == 0, fleet.log("a")  # the same process finished the study
    assert_accounted(db, settings, "restart", 3)


def test_second_sigterm_stops_at_once_and_hands_the_trial_back(
    db: Database, settings: Settings, fleet: Workers
) -> None:
    create(
        db,
        settings,
        "twice",
        {**SLOW, "fixed": {**SLOW["fixed"], "max_epochs": 200}},
        n_trials=1,
        lease_timeout_s=600,
    )
    a = fleet.start("a")
    wait_for(lambda: _running_after_epochs(db, "twice", 1), 120, "a trial under way")
    os.kill(a.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.kill(a.pid, signal.SIGTERM)
    assert a.wait(timeout=60) == 0
    assert "second signal" in fleet.log("a")
    (t,) = trials(db, "twice")
    assert t.state == "RUNNING" and t.lease_owner is None and t.epochs < 200


def test_cuda_oom_ends_the_trial_and_the_slot_goes_on(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: the engine raises the error CUDA raises, and the slot must survive it."""
    import torch

    from worker import runner
    from worker import slot as slot_mod

    create(db, settings, "oom", FAST, n_trials=2)
    calls = {"n": 0}
    real_fit = runner.fit

    def flaky_fit(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(*args, **kw)

    monkeypatch.setattr(runner, "fit", flaky_fit)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        done = slot_mod.Slot(slot_mod.SlotConfig(burst=True), settings).run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert done == 2
    rows = trials(db, "oom")
    assert [t.reason for t in rows][0] == "oom" and rows[0].state == "FAIL"
    assert "out of memory" in (rows[0].error or "")
    assert rows[1].state in ("COMPLETE", "PRUNED")
    assert study_row(db, "oom").status == "completed"


def test_a_signal_during_stop_wait_cannot_deadlock() -> None:
    """The signal handler runs on the main thread, which may hold the stop event's lock
    (inside stop.wait()); setting the event from the handler deadlocked a slot for good.
    Here the lock is held on purpose while the handler runs."""
    code = (
        "import time\n"
        "from worker.signals import Signals\n"
        "s = Signals()\n"
        "with s.stop._cond:\n"
        "    s._handle(15, None)\n"
        "t = time.monotonic()\n"
        "assert s.stop.wait(10), 'stop never set'\n"
        "print('ok', round(time.monotonic() - t, 3))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
