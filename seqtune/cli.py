"""The ``seqtune`` command line."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

from seqtune.errors import Invalid, SeqtuneError, Unavailable


class CommandFailed(Exception):
    """A command could not do its job for a reason outside its input (a port in use, a service
    that failed to start): ``message`` is one line that says what to do, ``code`` the exit code
    (see ``seqtune.commands.EXIT_CODES``)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Settings from the environment and ``--database-url``; a bad value is ``Invalid``."""
    from pydantic import ValidationError

    from service.settings import Settings

    overrides = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        var = "SEQTUNE_" + "_".join(str(x) for x in err["loc"]).upper()
        raise Invalid(msg if var in msg else f"{var}: {msg}") from None


def check_port_free(host: str, port: int) -> None:
    """Raise ``CommandFailed`` (exit 6) naming ``host``:``port`` when the service could not
    listen there. Binds the way uvicorn does (SO_REUSEADDR, IPv6 for a host with a colon), so
    the answer is uvicorn's; checked before anything starts, since uvicorn itself would log the
    error and exit with its code 3, which seqtune's exit codes read as "not found"."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandFailed(
                    f"port {port} on {host} is already in use (another seqtune?); stop what "
                    f"listens there or pick another with --port", 6) from None
            raise CommandFailed(f"cannot listen on {host}:{port}: "
                                f"{exc.strerror or exc}; check --host and --port", 6) from None


def database_problem(exc: BaseException, url: str | None) -> tuple[str, int] | None:
    """One line and an exit code for a database error that reached the command line, or None
    when ``exc`` is not one. A database that does not exist, or a login it refuses, is bad input
    (2: the URL must change; retrying will not help); a server that cannot be reached, or
    another operational failure, is 6, as an unreachable service is."""
    import re

    sa_exc = sys.modules.get("sqlalchemy.exc")  # not imported: cannot be a database error
    if sa_exc is None or not isinstance(exc, sa_exc.DBAPIError):
        return None
    from sqlalchemy.engine import make_url

    driver = str(exc.orig if exc.orig is not None else exc).strip()
    first = driver.splitlines()[0] if driver else type(exc).__name__
    reason = first.split(" failed: ", 1)[-1].removeprefix("FATAL:").strip()
    host = port = user = name = "?"
    sqlite = False
    try:
        u = make_url(url or "")
        sqlite = u.drivername.startswith("sqlite")
        host, port = u.host or "localhost", str(u.port or 5432)
        user, name = u.username or "postgres", u.database or "?"
    except Exception:  # noqa: BLE001 - the message is still useful without the URL's parts
        pass
    where = "--database-url or SEQTUNE_DATABASE_URL"
    low = driver.lower()
    if sqlite:
        return (f"the SQLite database {name} failed ({reason}); check {where} or "
                "SEQTUNE_DATA_DIR", 2 if "unable to open" in low else 6)
    if re.search(r'database ".*" does not exist', low):
        return (f"the database '{name}' does not exist on {host}:{port}; create it "
                f"(createdb -h {host} -p {port} -U {user} {name}, or CREATE DATABASE \"{name}\")"
                f" or fix {where}", 2)
    if any(m in low for m in ("password authentication failed", "role", "pg_hba.conf",
                              "authentication")):
        return f"Postgres at {host}:{port} refused the login ({reason}); fix {where}", 2
    if isinstance(exc, sa_exc.OperationalError):
        return (f"cannot reach the database at {host}:{port} ({reason}); is Postgres running "
                f"there? check {where}", 6)
    return f"the database refused the command: {reason}", 2


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    settings = _settings(args)
    if args.no_auth:
        settings.auth_enabled = False
    host = args.host or settings.host
    port = args.port or settings.port
    check_port_free(host, port)
    common = {"host": host, "port": port, "log_level": settings.log_level.lower(),
              "access_log": args.access_log}
    if args.workers > 1:
        # Several processes: each builds its app from the environment (the factory below).
        import os

        from service.store import migrate
        from service.store.db import Database

        if settings.migrate_on_start:  # once, before the processes race for it
            migrate.upgrade(Database(settings).engine)
        os.environ["SEQTUNE_AUTH_ENABLED"] = "true" if settings.auth_enabled else "false"
        os.environ["SEQTUNE_MIGRATE_ON_START"] = "false"
        if settings.database_url:
            os.environ["SEQTUNE_DATABASE_URL"] = settings.database_url
        target: Any = "service.api.app:create_app"
        options: dict[str, Any] = {"factory": True, "workers": args.workers}
    else:
        target, options = create_app(settings), {}
    try:
        uvicorn.run(target, **options, **common)
    except SystemExit as exc:
        # uvicorn exits with its code 3 (STARTUP_FAILURE) after logging why (the port was
        # taken since the check above, the app's startup failed): the service is failing (6).
        if exc.code == 3:
            raise CommandFailed(f"the service failed to start on {host}:{port} (its log above "
                                "says why)", 6) from None
        raise
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Service plus local workers in one command (the laptop default: SQLite, auth off)."""
    import os
    import signal
    import subprocess

    from service.store import migrate
    from service.store.db import Database

    settings = _settings(args)
    # Before migrating or starting the worker: a port in use is the common failure of `up`.
    check_port_free(args.host or settings.host, args.port or settings.port)
    db = Database(settings)
    migrate.upgrade(db.engine)  # before the worker starts, so neither races the other
    db.dispose()
    env = dict(os.environ)
    if settings.database_url:
        env["SEQTUNE_DATABASE_URL"] = settings.database_url
    # The worker stops its slots and exits once this process is gone (kill -9 included),
    # and each slot stops once the worker is gone: no trials trained by orphans.
    env["SEQTUNE_WORKER_EXIT_WITH_PID"] = str(os.getpid())
    worker = subprocess.Popen([sys.executable, "-m", "seqtune.cli", "worker", "--gpus",
                               args.gpus, "--slots-per-gpu", str(args.slots_per_gpu)], env=env)
    args.no_auth = not args.auth
    # uvicorn shuts down on SIGTERM and then re-raises it; with the default action that would
    # kill this process before `finally` stops the worker, orphaning it. Exit cleanly instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return cmd_serve(args)
    finally:
        worker.terminate()  # the worker hands its trial back at the next epoch boundary
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            worker.kill()


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from service.store import migrate
    from service.store.db import Database

    db = Database(_settings(args))
    migrate.upgrade(db.engine)
    print(f"seqtune schema at {migrate.current_revision(db.engine)}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from service.store import keys, migrate
    from service.store.db import Database

    db = Database(_settings(args))
    migrate.upgrade(db.engine)
    key = keys.create_key(db, tenant=args.tenant)
    print(f"created a key for tenant '{args.tenant}'; it is shown once, keep it:",
          file=sys.stderr)
    print(key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from service.store import keys
    from service.store.db import Database

    keys.revoke_key(Database(_settings(args)), key=args.key)
    print("revoked")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker import fleet
    from worker.slot import SlotConfig

    studies = tuple(x.strip() for x in (args.studies or "").split(",") if x.strip())
    base = SlotConfig(database_url=getattr(args, "database_url", None), studies=studies,
                      max_trials=args.max_trials, burst=args.burst, max_idle_s=args.max_idle,
                      threads=args.threads)
    try:
        return fleet.run(base, gpus=args.gpus, slots_per_gpu=args.slots_per_gpu)
    except ValueError as exc:
        print(f"seqtune: {exc}", file=sys.stderr)
        return 2


def _seconds(text: str) -> float:
    """argparse type of ``--timeout``: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from seqtune.commands import EXIT_CODES, add_client_commands

    p = argparse.ArgumentParser(
        prog="seqtune", description="Hyperparameter search for LSTMs.", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", help="overrides SEQTUNE_DATABASE_URL")
    timeout_help = ("client commands: seconds to wait for each answer of the service (default "
                    "$SEQTUNE_TIMEOUT or 60); a slower answer is reported as a timeout")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS", help=timeout_help)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service (default $SEQTUNE_URL or "
                        "http://127.0.0.1:8000)")
    common.add_argument("--key", help="API key (default $SEQTUNE_API_KEY)")
    common.add_argument("--json", action="store_true", help="JSON for scripts")
    # Also after the command name; SUPPRESS keeps a value given before it.
    common.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        default=argparse.SUPPRESS, help=timeout_help)
    add_client_commands(sub, common)

    s = sub.add_parser("serve", help="run the REST service")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--no-auth", action="store_true",
                   help="turn authentication off (local use only; logs a warning)")
    s.add_argument("--access-log", action="store_true")
    s.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    s.set_defaults(fn=cmd_serve)

    u = sub.add_parser("up", help="service + local workers in one command (auth off unless "
                       "--auth)")
    u.add_argument("--host")
    u.add_argument("--port", type=int)
    u.add_argument("--auth", action="store_true", help="keep API-key authentication on")
    u.add_argument("--gpus", default="all")
    u.add_argument("--slots-per-gpu", type=int, default=1)
    u.add_argument("--access-log", action="store_true")
    u.add_argument("--workers", type=int, default=1, help="server processes")
    u.set_defaults(fn=cmd_up)

    w = sub.add_parser("worker", help="run trials: one process per GPU slot (CPU if none)")
    w.add_argument("--gpus", default="all", help="'all', 'none' or indices like 0,2")
    w.add_argument("--slots-per-gpu", type=int, default=1, help="trials at once per GPU")
    w.add_argument("--studies", help="only these studies (comma-separated names)")
    w.add_argument("--max-trials", type=int, help="each slot exits after this many trials")
    w.add_argument("--burst", action="store_true",
                   help="exit once no running study has work left")
    w.add_argument("--max-idle", type=float, help="exit after this many idle seconds")
    w.add_argument("--threads", type=int,
                   help="torch CPU threads per CPU slot (default: the cores split among this "
                   "worker's slots; set it when several workers share one machine)")
    w.set_defaults(fn=cmd_worker)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_cmd", required=True)
    db.add_parser("upgrade", help="apply seqtune's migrations").set_defaults(fn=cmd_db_upgrade)
    db_cmds = db

    k = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    kc = k.add_parser("create", help="create a key; printed alone on the last line")
    kc.add_argument("--tenant", required=True)
    kc.set_defaults(fn=cmd_keys_create)
    kr = k.add_parser("revoke", help="revoke a key")
    kr.add_argument("key")
    kr.set_defaults(fn=cmd_keys_revoke)
    for sp in (s, u, w, kc, kr, *db_cmds.choices.values()):
        sp.add_argument("--database-url", default=argparse.SUPPRESS,
                        help="overrides SEQTUNE_DATABASE_URL")
    return p


def main(argv: list[str] | None = None) -> int:
    from seqtune.client import ApiError, ServiceTimeout, ServiceUnreachable
    from seqtune.commands import exit_code_of
    from service.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    # Alembic announces each of its plugins at INFO on every migration: noise around the one
    # line a command prints.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        return int(args.fn(args))
    except CommandFailed as exc:
        print(f"seqtune: {exc.message}", file=sys.stderr)
        return exc.code
    except Unavailable as exc:  # the database stayed unreachable through the retries
        print(f"seqtune: {exc.message}", file=sys.stderr)
        return 6
    except SeqtuneError as exc:
        print(f"seqtune: {exc.message}", file=sys.stderr)
        for d in exc.details:
            print(f"  {d.get('field')}: {d.get('reason')}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"seqtune: {exc}", file=sys.stderr)
        return exit_code_of(exc)
    except (ServiceUnreachable, ServiceTimeout) as exc:
        print(f"seqtune: {exc}", file=sys.stderr)
        return 6
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `seqtune … | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except Exception as exc:
        # A database error from a command that talks to the database directly (db upgrade,
        # keys, up): one line saying what to fix instead of the driver's traceback.
        problem = database_problem(exc, _database_url(args))
        if problem is None:
            raise
        print(f"seqtune: {problem[0]}", file=sys.stderr)
        return problem[1]


def _database_url(args: argparse.Namespace) -> str | None:
    try:
        return str(_settings(args).url)
    except Invalid:
        return None


if __name__ == "__main__":
    sys.exit(main())
