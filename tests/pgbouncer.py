"""A real PgBouncer (Debian's package) in transaction pooling mode in front of a Postgres, for
the tests (``tests/conftest.py``'s ``pgbouncer`` fixture) and the benchmarks
(``bench/coordination.py --pgbouncer``).

Every database name is served by a ``*`` entry. ``optuna_url`` adds a second entry for one
database, so that Optuna's connections get a pool of their own, as ``deploy/pgbouncer``
advises (``Settings.optuna_database_url``).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url


class Unavailable(RuntimeError):
    """PgBouncer is not installed or did not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgBouncer:
    """A running PgBouncer; ``running`` starts one and stops it (by its PID) afterwards."""

    host: str
    port: int
    pid: int
    folder: Path
    admin_user: str
    target: str  # "host=... port=..." of the Postgres behind it
    aliases: dict[str, str] = field(default_factory=dict)  # entry name -> database
    pool_size: int = 4  # server connections per database entry (and user)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.folder / "pgbouncer.log"

    def url(self, direct: str) -> str:
        """``direct`` (a URL of the Postgres behind it) pointed at PgBouncer instead."""
        return make_url(direct).set(host=self.host, port=self.port).render_as_string(False)

    def optuna_url(self, direct: str) -> str:
        """A second route to ``direct``'s database through PgBouncer, with a pool of its own
        (an entry ``<database>__optuna``, added and loaded now): for Optuna's storage."""
        u = make_url(direct)
        alias = f"{u.database}__optuna"
        if alias not in self.aliases:
            self.aliases[alias] = str(u.database)
            self._write_config()
            self.show("RELOAD", rows=False)
        return u.set(host=self.host, port=self.port, database=alias).render_as_string(False)

    def show(self, what: str, *, rows: bool = True) -> list[dict[str, Any]]:
        """Rows of the admin console's ``SHOW <what>`` (POOLS, CLIENTS, SERVERS ...), or, with
        ``rows=False``, run the command ``what`` (RELOAD, RECONNECT ...)."""
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=self.port, user=self.admin_user, dbname="pgbouncer"
        )
        conn.autocommit = True  # the console accepts no transactions
        try:
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}" if rows else what)
                if not rows:
                    return []
                names = [d[0] for d in cur.description or ()]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def _write_config(self) -> None:
        entries = "".join(
            f"{alias} = {self.target} dbname={db}\n" for alias, db in sorted(self.aliases.items())
        )
        (self.folder / "pgbouncer.ini").write_text(
            f"""[databases]
{entries}; every other database name (the per-test clones) goes to the Postgres behind
* = {self.target}

[pgbouncer]
listen_addr = {self.host}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.folder / "userlist.txt"}
admin_users = {self.admin_user}
pool_mode = transaction
max_client_conn = 2000
; server connections per database entry and user: fewer than the workers' slots
default_pool_size = {self.pool_size}
; let go of idle server connections soon (the test databases are dropped after each test)
server_idle_timeout = 10
; after a Postgres restart, reconnect within a second
server_login_retry = 1
logfile = {self.log}
"""
        )

    @classmethod
    @contextlib.contextmanager
    def running(cls, admin_url: str, *, pool_size: int = 4) -> Iterator[PgBouncer]:
        """Start PgBouncer on a free 127.0.0.1 port in front of ``admin_url``'s Postgres,
        with ``pool_size`` server connections per database entry; stop it on exit. Raises
        ``Unavailable`` when it is not installed or does not start within 15 s."""
        import psycopg2

        exe = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
        )
        if exe is None:
            raise Unavailable("pgbouncer is not installed (apt-get install pgbouncer)")
        up = make_url(admin_url)
        target = f"host={up.host or '127.0.0.1'} port={up.port or 5432}"
        if up.password:
            target += f" password={up.password}"
        user = up.username or "postgres"
        folder = Path(tempfile.mkdtemp(prefix="seqtune-pgbouncer-"))
        users = sorted({user, getpass.getuser()})
        (folder / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in users))
        bouncer = cls("127.0.0.1", _free_port(), 0, folder, user, target, pool_size=pool_size)
        bouncer._write_config()
        run_as: list[str] = []
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root: it drops to postgres, which must own its files
            # (and may rewrite the config: optuna_url reloads it).
            pw = pwd.getpwnam("postgres")
            for path in (folder, *folder.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            os.chmod(folder, 0o777)
            run_as = ["-u", "postgres"]
        err = open(folder / "stderr.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [exe, *run_as, str(folder / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        bouncer.pid = proc.pid
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    bouncer.show("VERSION")
                    break
                except psycopg2.Error as exc:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        logs = [folder / n for n in ("stderr.log", "pgbouncer.log")]
                        tail = " | ".join(p.read_text()[-500:] for p in logs if p.exists())
                        raise Unavailable(f"pgbouncer did not start ({exc}): {tail}") from exc
                    time.sleep(0.1)
            yield bouncer
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # PgBouncer's immediate shutdown
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            err.close()
            shutil.rmtree(folder, ignore_errors=True)
