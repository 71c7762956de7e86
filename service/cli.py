"""The server's ``seqtune`` verbs: ``serve``, ``up`` (the service and local workers), ``db
upgrade``, ``keys create`` / ``keys revoke``.

``seqtune.cli`` loads this module by name, only when one of these verbs runs; importing it
needs the server extra (uvicorn, SQLAlchemy, pydantic-settings), and failing to is how a base
install finds out that it lacks it. Each verb reads its Settings once (``_settings``), sets up
logging from them, and hands child processes their settings from them (``Settings.child_env``).
A database error that reaches a verb becomes one line and an exit code (``database_problem``).
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib.util
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from seqtune.errors import CommandFailed, Exit, Invalid, MissingExtra
from service.logs import quiet_uvicorn_start, setup_logging
from service.settings import Settings
from service.store import keys, migrate
from service.store.db import Database, role_limits

Command = Callable[[argparse.Namespace], int]


def add_arguments(verb: str, parser: argparse.ArgumentParser) -> None:
    """Give ``seqtune.cli``'s verb ``verb`` (serve, up, db, keys) its options, subcommands and
    function (the parsers' default ``fn``). KeyError for any other verb."""
    {"serve": _serve_arguments, "up": _up_arguments, "db": _db_arguments, "keys": _keys_arguments}[
        verb
    ](parser)


def _database_url_option(parser: argparse.ArgumentParser) -> None:
    # Also after the verb; SUPPRESS keeps a value given before it.
    parser.add_argument(
        "--database-url", default=argparse.SUPPRESS, help="overrides SEQTUNE_DATABASE_URL"
    )


def _reports_database_errors(fn: Command) -> Command:
    """``fn``, with a database error it lets through turned into CommandFailed: one line that
    says what to fix instead of the driver's traceback (``database_problem``)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except sa_exc.DBAPIError as exc:
            message, exit_ = database_problem(exc, _database_url(args))
            raise CommandFailed(message, exit_) from None

    return run


# -- settings ------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment and ``--database-url`` (Invalid for a bad value, naming
    its variable), with this process's logging set up from them."""
    url = getattr(args, "database_url", None)
    settings = Settings.load(**({"database_url": url} if url else {}))
    setup_logging(settings)  # alembic's chatter at INFO included: quiet (service.logs)
    return settings


def _database_url(args: argparse.Namespace) -> str | None:
    url = getattr(args, "database_url", None)
    try:
        return Settings.load(**({"database_url": url} if url else {})).url
    except Invalid:
        return None


def _replace_environ(env: Mapping[str, str]) -> None:
    """Make this process's environment exactly ``env``."""
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)


# -- failures as one line ------------------------------------------------------------------------
def check_port_free(host: str, port: int) -> None:
    """Raise ``CommandFailed`` (exit 6) naming ``host``:``port`` when the service could not
    listen there. Binds the way uvicorn does (SO_REUSEADDR, IPv6 for a host with a colon), so
    the answer is uvicorn's; checked before anything starts, since uvicorn itself would log the
    error and exit with its code 3, which seqtune's exit codes read as "not found"."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandFailed(
                    f"port {port} on {host} is already in use (another seqtune?); stop what "
                    f"listens there or pick another with --port",
                    Exit.UNAVAILABLE,
                ) from None
            raise CommandFailed(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port",
                Exit.UNAVAILABLE,
            ) from None


def database_problem(exc: sa_exc.DBAPIError, url: str | None) -> tuple[str, Exit]:
    """One line and an exit code for a database error that reached the command line. A
    database that does not exist, or a login it refuses, is bad input (2: the URL must change;
    retrying will not help); a server that cannot be reached, or another operational failure,
    is 6, as an unreachable service is."""
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
        return (
            f"the SQLite database {name} failed ({reason}); check {where} or SEQTUNE_DATA_DIR",
            Exit.BAD_INPUT if "unable to open" in low else Exit.UNAVAILABLE,
        )
    if re.search(r'database ".*" does not exist', low):
        return (
            f"the database '{name}' does not exist on {host}:{port}; create it "
            f'(createdb -h {host} -p {port} -U {user} {name}, or CREATE DATABASE "{name}")'
            f" or fix {where}",
            Exit.BAD_INPUT,
        )
    if any(
        m in low
        for m in ("password authentication failed", "role", "pg_hba.conf", "authentication")
    ):
        return (
            f"Postgres at {host}:{port} refused the login ({reason}); fix {where}",
            Exit.BAD_INPUT,
        )
    if isinstance(exc, sa_exc.OperationalError):
        return (
            f"cannot reach the database at {host}:{port} ({reason}); is Postgres running "
            f"there? check {where}",
            Exit.UNAVAILABLE,
        )
    return f"the database refused the command: {reason}", Exit.BAD_INPUT


# -- seqtune serve -------------------------------------------------------------------------------
def _listen_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        help="the address to listen on (default $SEQTUNE_HOST or 127.0.0.1: this machine only; "
        "0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--port", type=int, help="the port to listen on (default $SEQTUNE_PORT or 8000)"
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log one line per request (API keys redacted)"
    )


def _serve_arguments(s: argparse.ArgumentParser) -> None:
    _listen_options(s)
    s.add_argument(
        "--no-auth",
        action="store_true",
        help="turn authentication off (local use only; logs a warning)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes (default 1), each serving the API; none trains trials",
    )
    _database_url_option(s)
    s.set_defaults(fn=_reports_database_errors(cmd_serve))


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the REST service until it is stopped; CommandFailed (6) when it cannot start."""
    settings = _settings(args)
    if args.no_auth:
        settings = settings.model_copy(update={"auth_enabled": False})
    return _serve(args, settings)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the service with ``settings`` on ``--host``/``--port`` (else the settings')."""
    # Here, not at the top: the app brings FastAPI, Optuna and the plots, which the db and
    # keys verbs never need.
    from service.api.app import create_app

    host = args.host or settings.host
    port = args.port or settings.port
    check_port_free(host, port)
    common = {
        "host": host,
        "port": port,
        "log_level": settings.log_level.lower(),
        "access_log": args.access_log,
    }
    if args.workers > 1:
        if settings.migrate_on_start:  # once, before the processes race for it
            migrate.upgrade(Database(settings).engine, settings=settings)
        # uvicorn spawns the server processes itself, and each builds its app (the factory
        # below) from the environment it inherits: the one way to hand them these settings
        # (--database-url, --no-auth, migrations done) is to make this process's environment
        # their rendering.
        _replace_environ(settings.model_copy(update={"migrate_on_start": False}).child_env())
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
            raise CommandFailed(
                f"the service failed to start on {host}:{port} (its log above says why)",
                Exit.UNAVAILABLE,
            ) from None
        raise
    return Exit.OK


# -- seqtune up ----------------------------------------------------------------------------------
def _up_arguments(u: argparse.ArgumentParser) -> None:
    _listen_options(u)
    u.add_argument(
        "--auth",
        action="store_true",
        help="keep API-key authentication on (default: off, every caller is tenant 'default'; "
        "for local use)",
    )
    u.add_argument(
        "--gpus",
        default="all",
        help="which GPUs get worker slots: 'all' (default: every visible GPU, the CPU when "
        "there is none), 'none' (CPU only) or indices like 0,2",
    )
    u.add_argument(
        "--slots-per-gpu",
        type=int,
        default=1,
        metavar="K",
        help="trials trained at once per GPU, or on the CPU without one (default 1)",
    )
    u.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads per CPU slot (default: this machine's cores split among the "
        "slots); lower it when other work shares the machine",
    )
    u.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes (default 1); the trials' workers are set by --gpus and "
        "--slots-per-gpu",
    )
    _database_url_option(u)
    u.set_defaults(fn=_reports_database_errors(cmd_up))


def cmd_up(args: argparse.Namespace) -> int:
    """Service plus local workers in one command (the laptop default: SQLite, auth off).
    MissingExtra without the worker's torch: `up` runs both halves."""
    if importlib.util.find_spec("torch") is None:  # looked up, not imported: service ↛ torch
        raise MissingExtra("seqtune up", "all")
    if args.threads is not None and args.threads < 1:
        raise Invalid("--threads must be 1 or more")
    settings = _settings(args)
    host, port = args.host or settings.host, args.port or settings.port
    # Before migrating or starting the worker: a port in use is the common failure of `up`.
    check_port_free(host, port)
    db = Database(settings)
    # Before the worker starts, so neither races the other; with the session limits on the
    # role (SEQTUNE_DB_SESSION_LIMITS=role), before its first connection too.
    migrate.upgrade(db.engine, settings=settings)
    db.dispose()
    # The worker runs with these settings (a --database-url included), rendered into its
    # environment. It stops its slots and exits once this process is gone (kill -9 included),
    # and each slot stops once the worker is gone: no trials trained by orphans.
    threads = ["--threads", str(args.threads)] if args.threads else []
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "seqtune.cli",
            "worker",
            "--gpus",
            args.gpus,
            "--slots-per-gpu",
            str(args.slots_per_gpu),
            *threads,
            "--exit-with-pid",
            str(os.getpid()),
        ],
        env=settings.child_env(),
    )
    # Migrated above; auth off unless --auth.
    settings = settings.model_copy(
        update={"migrate_on_start": False, "auth_enabled": args.auth and settings.auth_enabled}
    )
    _log_up(settings, args, host, port)
    quiet_uvicorn_start()  # the lines above say what its start-up lines would
    # uvicorn shuts down on SIGTERM and then re-raises it; with the default action that would
    # kill this process before `finally` stops the worker, orphaning it. Exit cleanly instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return _serve(args, settings)
    finally:
        worker.terminate()  # the worker hands its trial back at the next epoch boundary
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            worker.kill()


def _log_up(settings: Settings, args: argparse.Namespace, host: str, port: int) -> None:
    """What `seqtune up` runs, in four lines: where it serves, on which database (password
    masked), with which workers, and whether callers need a key."""
    log = logging.getLogger("seqtune.up")
    where = f"[{host}]" if ":" in host else host
    log.info("serving http://%s:%d (API /v1, docs /docs, pages /ui/ and /dashboard/)", where, port)
    if settings.is_sqlite:
        log.info("database: SQLite %s", make_url(settings.url).database)
    else:
        log.info("database: %s", make_url(settings.url).render_as_string(hide_password=True))
    log.info("workers: %s", workers_summary(args.gpus, args.slots_per_gpu, args.threads))
    if settings.auth_enabled:
        log.info("auth: on; callers need an API key (seqtune keys create --tenant NAME)")
    else:
        log.info("auth: off; every caller is tenant 'default' (--auth turns keys on)")


def workers_summary(gpus: str, slots_per_gpu: int, threads: int | None) -> str:
    """How many trial slots `seqtune worker --gpus GPUS --slots-per-gpu K --threads N` runs,
    on what, with how many torch threads: exact for 'none' and a list of GPUs; for 'all',
    which needs torch to count the GPUs (the service never imports it), both cases."""
    per = "slot" if slots_per_gpu == 1 else "slots"
    # worker.fleet's default: the machine's cores split among the CPU slots.
    n = threads or max(1, (os.cpu_count() or 1) // max(1, slots_per_gpu))
    cpu = f"{slots_per_gpu} {per} on the CPU, {n} torch thread{'s' if n > 1 else ''} each"
    if gpus == "none":
        return cpu
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if gpus != "all" and ids:
        total = slots_per_gpu * len(ids)
        return f"{total} slot(s) on GPU {', '.join(ids)} ({slots_per_gpu} per GPU)"
    return f"{slots_per_gpu} {per} per visible GPU (without one: {cpu})"


# -- seqtune db, seqtune keys --------------------------------------------------------------------
def _db_arguments(db: argparse.ArgumentParser) -> None:
    sub = db.add_subparsers(dest="db_cmd", required=True)
    up = sub.add_parser("upgrade", help="apply seqtune's migrations")
    _database_url_option(up)
    up.set_defaults(fn=_reports_database_errors(cmd_db_upgrade))


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply the migrations; with SEQTUNE_DB_SESSION_LIMITS=role, also set the session limits
    on the connecting role in this database (``migrate.set_role_limits``)."""
    settings = _settings(args)
    db = Database(settings)
    migrate.upgrade(db.engine, settings=settings)
    print(f"seqtune schema at {migrate.current_revision(db.engine)}")
    limits = role_limits(settings)
    if limits:
        shown = ", ".join(f"{k}={v}" for k, v in limits.items() if v) or "none"
        print(f"session limits set on the role in this database: {shown}")
    return Exit.OK


def _keys_arguments(k: argparse.ArgumentParser) -> None:
    sub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = sub.add_parser("create", help="create a key; printed alone on the last line")
    kc.add_argument("--tenant", required=True)
    _database_url_option(kc)
    kc.set_defaults(fn=_reports_database_errors(cmd_keys_create))
    kr = sub.add_parser("revoke", help="revoke a key")
    kr.add_argument("key")
    _database_url_option(kr)
    kr.set_defaults(fn=_reports_database_errors(cmd_keys_revoke))


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = _settings(args)
    db = Database(settings)
    migrate.upgrade(db.engine, settings=settings)
    key = keys.create_key(db, tenant=args.tenant)
    print(f"created a key for tenant '{args.tenant}'; it is shown once, keep it:", file=sys.stderr)
    print(key)
    return Exit.OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    keys.revoke_key(Database(_settings(args)), key=args.key)
    print("revoked")
    return Exit.OK
