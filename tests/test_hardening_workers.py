"""Hardening of the worker fleet (issue 13, items 2 and 4), on real processes and Postgres.

- A frozen worker never holds a trial hostage: every seqtune session (ours and Optuna's)
  carries server-side limits, so Postgres ends a session frozen inside a transaction, its row
  locks go, and the reaper (which skips locked trials) recovers the trial.
- No orphans: a slot whose ``seqtune worker`` (or ``seqtune up``) died stops within seconds,
  claims nothing more and hands its trial back.

The SIGSTOP test needs the worker stopped while a transaction holding the trial's row lock is
open. Real windows are milliseconds wide (inside ``leases.report``: the row is locked, Optuna
writes on its own connection, then our update and the commit), so the test widens the real
one instead of hoping to hit it: a ``sitecustomize`` module, put on the victim's PYTHONPATH
only, makes its first ``leases.report`` transaction sleep after its writes and before its
commit (row locked, session "idle in transaction"), and prints a line. The test SIGSTOPs the
worker there. Production code carries no test hook.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text, update

from seqtune.errors import Unavailable
from service.settings import Settings
from service.store import migrate, recovery
from service.store.db import Database, engine_kwargs, session_limits
from service.store.optuna import make_storage
from service.store.tables import Study, Trial, Worker, utcnow
from tests.conftest import free_port, seqtune_cmd
from tests.test_fleet import SLOW, create, trials, wait_for

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)"
)

LEASE_S = 5.0
IDLE_S = 5.0  # SEQTUNE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S of the frozen worker
# How often the other worker reaps: its Settings' default (the test sets no SEQTUNE_ variable
# for it).
REAP_EVERY_S = Settings.model_fields["worker_reap_every_s"].default
# How long the hook keeps the victim's transaction open: only the time the test needs to see
# the hook's line and SIGSTOP the worker (a stopped sleep does not end). Without server-side
# limits the transaction then stays open for as long as the worker is stopped.
HOLD_S = 10.0

HOLD_HOOK = '''\
"""Test hook (tests/test_hardening_workers.py): hold the first leases.report transaction
open after its writes, before its commit, so that the test can SIGSTOP the worker there."""
import os
import sys
import time

_HOLD = float(os.environ.get("SEQTUNE_TEST_HOLD_REPORT_S", "0") or 0)
if _HOLD:
    from service.store import db as _db

    _plain = _db.Database._write_once
    _held = []

    def _write_once(self, fn):
        if _held or "report" not in getattr(fn, "__qualname__", ""):
            return _plain(self, fn)
        _held.append(True)
        with self.engine.begin() as conn:
            out = fn(conn)  # the trial's row is locked and updated, not committed
            print(f"TEST-HOOK holding the report transaction open (pid {os.getpid()})",
                  file=sys.stderr, flush=True)
            time.sleep(_HOLD)
            return out

    _db.Database._write_once = _write_once
'''


def epochs_of(n: int) -> dict[str, Any]:
    """test_fleet's SLOW spec (about 0.3 s an epoch on a free core) with ``n`` epochs."""
    base: dict[str, Any] = SLOW
    return {**base, "fixed": {**base["fixed"], "max_epochs": n}}


# -- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, process group) of a live process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[2])


def alive_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that still run (zombies do not: pid 1 of a container may
    never reap the orphans it inherits)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


class Procs:
    """``seqtune`` processes, each leading its own process group, all killed at the end
    (SIGCONT first: a stopped process keeps its group)."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("SEQTUNE_")}
        full.update(
            SEQTUNE_DATABASE_URL=self.url,
            SEQTUNE_DATA_DIR=str(self.tmp),
            SEQTUNE_CHECKPOINT_EVERY_S="0",
            PYTHONUNBUFFERED="1",
            **(env or {}),
        )
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [*seqtune_cmd(), *args],
            env=full,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()  # the child has its own copy
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def kill_all(self) -> None:
        for p in self.procs:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


@pytest.fixture
def procs(settings: Settings, tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(settings.url, tmp_path)
    try:
        yield ps
    finally:
        ps.kill_all()


def _with_hook(tmp: Path) -> dict[str, str]:
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOLD_HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SEQTUNE_TEST_HOLD_REPORT_S": str(HOLD_S)}


# -- item 2: server-side session limits -------------------------------------------------------


def _show(conn: Any, *names: str) -> list[str]:
    return [conn.execute(text(f"SHOW {n}")).scalar() for n in names]


def test_every_connection_carries_the_session_limits(settings: Settings) -> None:
    """Ours and Optuna's (the same database, Optuna's own pool): both hold row locks."""
    s = settings.model_copy(
        update={
            "db_idle_in_transaction_timeout_s": 7,
            "db_statement_timeout_s": 120,
            "db_lock_timeout_s": 2.5,
            "db_keepalives_idle_s": 11,
            "db_keepalives_interval_s": 4,
            "db_keepalives_count": 2,
        }
    )
    names = (
        "idle_in_transaction_session_timeout",
        "statement_timeout",
        "lock_timeout",
        "tcp_keepalives_idle",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
        "tcp_user_timeout",
    )
    want = ["7s", "2min", "2500ms", "11", "4", "2", "19000"]
    db = Database(s)
    try:
        assert db.read(lambda c: _show(c, *names)) == want
        with db.engine.connect() as c:  # the client's side: libpq keepalives
            dsn = c.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
        assert (
            dsn["keepalives"],
            dsn["keepalives_idle"],
            dsn["keepalives_interval"],
            dsn["keepalives_count"],
        ) == ("1", "11", "4", "2")
    finally:
        db.dispose()
    storage = make_storage(s)
    with storage.engine.connect() as c:
        assert _show(c, *names) == want


def test_limits_can_be_turned_off_keep_url_options_and_leave_sqlite_alone(tmp_path: Path) -> None:
    off = Settings(
        database_url="postgresql://u@h/db?options=-csearch_path%3Dx",
        db_idle_in_transaction_timeout_s=0,
        db_statement_timeout_s=0,
        db_keepalives_idle_s=0,
    )
    assert session_limits(off) == {}  # nothing sent; the URL's options reach libpq as is
    on = Settings(database_url="postgresql://u@h/db?options=-csearch_path%3Dx")
    opts = session_limits(on)["options"]  # replaces the URL's: so it carries them first
    assert opts.startswith("-csearch_path=x -c idle_in_transaction_session_timeout=30000 ")
    assert "lock_timeout" not in opts  # off by default: claimers queue on a study's row
    # SQLite (the embedded default) gets none of it, and still works.
    lite = Settings(data_dir=tmp_path)
    assert engine_kwargs(lite) == {"connect_args": {"check_same_thread": False, "timeout": 30}}
    db = Database(lite)
    try:
        assert db.run(lambda s: s.execute(text("SELECT 1")).scalar()) == 1
    finally:
        db.dispose()


def test_a_session_ended_for_idling_in_a_transaction_is_retried(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """What a frozen worker meets when it wakes up: the server ended its session; the work
    was rolled back and is done again on a new connection, on both transaction paths."""
    db = Database(settings.model_copy(update={"db_idle_in_transaction_timeout_s": 0.5}))
    calls = {"run": 0, "write": 0}

    def slow_once(kind: str, conn: Any) -> int:
        calls[kind] += 1
        conn.execute(text("SELECT 1"))  # in a transaction from here
        if calls[kind] == 1:
            time.sleep(1.5)  # "frozen" inside it
        return int(conn.execute(text("SELECT 2")).scalar())

    try:
        assert db.run(lambda s: slow_once("run", s)) == 2
        assert db.write(lambda c: slow_once("write", c)) == 2
        assert calls == {"run": 2, "write": 2}
        assert caplog.text.count("likely for idling longer than") == 2  # says why
    finally:
        db.dispose()


def test_a_statement_timeout_is_reported_not_retried(settings: Settings) -> None:
    db = Database(settings.model_copy(update={"db_statement_timeout_s": 0.3}))
    calls = []
    try:
        with pytest.raises(Unavailable, match="STATEMENT_TIMEOUT"):
            db.run(lambda s: calls.append(s.execute(text("SELECT pg_sleep(2)"))))
        assert calls == []  # one attempt, cancelled
        assert db.run(lambda s: s.execute(text("SELECT 1")).scalar()) == 1  # the pool is fine
    finally:
        db.dispose()


def test_migrations_are_exempt_from_statement_and_lock_timeouts(settings: Settings) -> None:
    """An upgrade waits behind another process's upgrade (the advisory lock) as long as that
    takes, whatever the statement and lock timeouts of ordinary sessions."""
    s = settings.model_copy(update={"db_statement_timeout_s": 0.3, "db_lock_timeout_s": 0.2})
    held, hold_s = threading.Event(), 1.5

    def other_upgrade() -> None:
        eng = create_engine(settings.url)
        try:
            with eng.begin() as c:
                c.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": migrate._ADVISORY_LOCK_KEY}
                )
                held.set()
                time.sleep(hold_s)
        finally:
            eng.dispose()

    holder = threading.Thread(target=other_upgrade)
    holder.start()
    db = Database(s)
    try:
        assert held.wait(30)
        t = time.monotonic()
        migrate.upgrade(db.engine)  # a no-op at head, after waiting for the lock
        assert time.monotonic() - t >= hold_s - 0.3  # it did wait, past both timeouts
        with pytest.raises(Unavailable):  # while ordinary statements are bounded
            db.run(lambda x: x.execute(text("SELECT pg_sleep(1)")))
    finally:
        holder.join()
        db.dispose()


def _set_lease(db: Database, name: str, seconds: float) -> None:
    db.run(
        lambda s: s.execute(update(Study).where(Study.name == name).values(lease_timeout_s=seconds))
    )


def _idle_in_transaction(db: Database, at_least_s: float) -> int:
    return int(
        db.run(
            lambda s: s.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
                    "application_name = 'seqtune' AND state = 'idle in transaction' AND "
                    "now() - state_change >= make_interval(secs => :t)"
                ),
                {"t": at_least_s},
            )
        )
    )


def test_a_sigstopped_worker_inside_a_transaction_loses_its_trial_within_the_lease(
    db: Database, settings: Settings, procs: Procs, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker stopped while its session is idle in a transaction that locks the trial's
    row. Without server-side limits the lock stays for as long as the process is stopped and
    the reaper's SKIP LOCKED never sees the trial. With them, Postgres ends the session after
    SEQTUNE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S, the lease expires, and the other worker reaps
    and resumes the trial. Woken up, the frozen worker finds its session gone, retries,
    learns it was fenced off and goes on."""
    # The lease starts long: on a loaded machine worker a's first epoch can take longer than
    # LEASE_S, and b would reap the trial before a's report is ever held (seen in CI). It is
    # shortened once a holds its report transaction; the reaper reads the study's lease.
    create(db, settings, "frozen", epochs_of(6), n_trials=1, lease_timeout_s=120)
    timeouts = {"SEQTUNE_DB_IDLE_IN_TRANSACTION_TIMEOUT_S": str(IDLE_S)}
    a = procs.start(
        "a", "worker", "--gpus", "none", "--threads", "1", env={**timeouts, **_with_hook(procs.tmp)}
    )
    owned = wait_for(
        lambda: next((t for t in trials(db, "frozen") if t.lease_owner), None),
        120,
        "worker a to claim the trial",
    )
    b = procs.start("b", "worker", "--gpus", "none", "--threads", "1", "--burst", env=timeouts)
    wait_for(lambda: "TEST-HOOK holding" in procs.log("a"), 120, "a's report transaction")
    os.killpg(a.pid, signal.SIGSTOP)  # the fleet parent and its slot
    _set_lease(db, "frozen", LEASE_S)
    stopped_at = time.monotonic()
    assert _idle_in_transaction(db, 0.0) >= 1, "the frozen session is not in a transaction"

    def taken() -> Trial | None:
        (t,) = trials(db, "frozen")
        return t if t.lease_owner != owned.lease_owner else None

    bound = LEASE_S + IDLE_S + REAP_EVERY_S + 8.0  # + the other worker's start and poll
    recovered = wait_for(
        taken, bound, f"the trial to be taken from the frozen worker within {bound:.0f}s"
    )
    took = time.monotonic() - stopped_at
    with capsys.disabled():
        print(
            f"\n[frozen worker] trial taken from it {took:.1f}s after SIGSTOP "
            f"(lease {LEASE_S:.0f}s, idle-in-transaction timeout {IDLE_S:.0f}s)"
        )
    assert recovered.fence > owned.fence
    assert _idle_in_transaction(db, IDLE_S + 1) == 0  # the server ended the frozen session
    assert alive(a.pid)  # still stopped, not dead: the database did all of it
    # From here the test checks that both workers go on correctly. A 5 s lease is shorter
    # than the heartbeat period (Settings.heartbeat_s) and than a resume's start on a loaded
    # machine: the new attempt's lease could lapse for no fault of its own. Lengthen it.
    _set_lease(db, "frozen", 120)

    os.killpg(a.pid, signal.SIGCONT)
    # Woken: its commit fails on the ended session, the retry finds the trial fenced off.
    wait_for(
        lambda: "abandoning trial" in procs.log("a"),
        HOLD_S + 60,
        "the woken worker to abandon the trial",
    )
    log_a = procs.log("a")
    assert "likely for idling longer than" in log_a, log_a[-3000:]
    assert a.poll() is None, log_a[-3000:]  # the slot went on; nothing crashed
    assert b.wait(timeout=240) == 0, procs.log("b")[-3000:]
    (t,) = trials(db, "frozen")
    assert t.state == "COMPLETE" and t.attempts == 2, (t.state, t.attempts)
    assert "resuming trial" in procs.log("b") or t.curve[0]["attempt"] == 2


# -- item 4: no orphans -----------------------------------------------------------------------

LONG = epochs_of(400)  # minutes per trial
LONG_LEASE_S = 60.0


def _slot_pids(db: Database, leader: int) -> list[int]:
    pids = db.run(lambda s: list(s.scalars(select(Worker.pid).where(Worker.stopped_at.is_(None)))))
    return [p for p in pids if p != leader and (_stat(p) or ("", 0, 0))[2] == leader]


def _claims(db: Database, name: str) -> tuple[int, dict[int, int]]:
    row = db.run(lambda s: s.scalar(select(Study).where(Study.name == name)))
    assert row is not None
    return row.n_claimed, {t.id: t.attempts for t in trials(db, name)}


def _assert_handed_back(db: Database, settings: Settings, name: str, running: list[Trial]) -> None:
    """Each trial that ran is handed back (RUNNING, no owner), or left to the reaper, which
    frees it once its lease is out."""
    for t in running:
        (now,) = [x for x in trials(db, name) if x.id == t.id]
        assert now.state == "RUNNING", now.state
        if now.lease_owner is not None:  # left for the reaper: its lease is not renewed
            later = utcnow() + timedelta(seconds=LONG_LEASE_S + 1)
            recovery.reap(db, make_storage(settings), now=later)
            (now,) = [x for x in trials(db, name) if x.id == t.id]
        assert now.lease_owner is None and now.fence > t.fence


def test_kill_9_of_the_worker_stops_its_slots(
    db: Database, settings: Settings, procs: Procs, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of `seqtune worker`: its slots notice within seconds, claim nothing more, hand
    their trials back and exit; no process of the worker is left."""
    create(db, settings, "orphans", LONG, n_trials=6, lease_timeout_s=LONG_LEASE_S)
    w = procs.start("w", "worker", "--gpus", "none", "--slots-per-gpu", "2", "--threads", "1")
    running = wait_for(
        lambda: (lambda r: r if len(r) == 2 else None)(
            [t for t in trials(db, "orphans") if t.state == "RUNNING" and t.epochs >= 1]
        ),
        180,
        "both slots training",
    )
    slots = wait_for(
        lambda: (lambda p: p if len(p) == 2 else None)(_slot_pids(db, w.pid)),
        30,
        "the two slot processes",
    )
    before = _claims(db, "orphans")
    os.kill(w.pid, signal.SIGKILL)  # the fleet parent only: its slots are orphaned
    killed_at = time.monotonic()
    w.wait()
    assert all(alive(p) for p in slots), "the slots died with the parent: nothing tested"
    wait_for(
        lambda: not alive_in_group(w.pid),
        10,
        f"every process of the worker to end (left: {alive_in_group(w.pid)})",
    )
    gone = time.monotonic() - killed_at
    with capsys.disabled():
        print(f"\n[orphans] all slot processes gone {gone:.1f}s after kill -9 of the worker")
    assert _claims(db, "orphans") == before  # no trial claimed, none resumed, after the kill
    _assert_handed_back(db, settings, "orphans", running)
    log = procs.log("w")
    # Each slot says why it stopped (from its parent-death signal or its watch, whichever
    # comes first).
    for i in range(2):
        assert any(
            f"slot{i} " in line and "that started this slot is gone" in line
            for line in log.splitlines()
        ), log[-3000:]


def test_kill_9_of_seqtune_up_stops_its_worker_and_slots(
    db: Database, settings: Settings, procs: Procs, capsys: pytest.CaptureFixture[str]
) -> None:
    """`seqtune up` starts `seqtune worker` as its child: kill -9 of `up` must not leave the
    worker and its slot training on."""
    create(db, settings, "upped", LONG, n_trials=3, lease_timeout_s=LONG_LEASE_S)
    up = procs.start(
        "up", "up", "--gpus", "none", "--port", str(free_port()), env={"SEQTUNE_LOG_LEVEL": "INFO"}
    )
    running = wait_for(
        lambda: [t for t in trials(db, "upped") if t.state == "RUNNING" and t.epochs >= 1],
        180,
        "a trial training under seqtune up",
    )
    before = _claims(db, "upped")
    group = alive_in_group(up.pid)
    assert len(group) >= 3, group  # up, its worker, the slot (and helpers)
    os.kill(up.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    up.wait()
    wait_for(
        lambda: not alive_in_group(up.pid),
        15,
        f"the worker and its slot to end (left: {alive_in_group(up.pid)})",
    )
    with capsys.disabled():
        print(
            f"\n[up] worker and slot gone {time.monotonic() - killed_at:.1f}s after "
            "kill -9 of seqtune up"
        )
    assert _claims(db, "upped") == before
    _assert_handed_back(db, settings, "upped", running)
    assert re.search(r"process \d+, which started this worker, is gone", procs.log("up"))
