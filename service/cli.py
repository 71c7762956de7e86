"""The ``seqtune`` command line."""

from __future__ import annotations

import argparse
import sys

from service.errors import SeqtuneError


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from service.settings import Settings

    overrides = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    settings = _settings(args)
    if args.no_auth:
        settings.auth_enabled = False
    host = args.host or settings.host
    port = args.port or settings.port
    common = {"host": host, "port": port, "log_level": settings.log_level.lower(),
              "access_log": args.access_log}
    if args.workers > 1:
        # Several processes: each builds its app from the environment (the factory below).
        import os

        from service import migrate
        from service.db import Database

        if settings.migrate_on_start:  # once, before the processes race for it
            migrate.upgrade(Database(settings).engine)
        os.environ["SEQTUNE_AUTH_ENABLED"] = "true" if settings.auth_enabled else "false"
        os.environ["SEQTUNE_MIGRATE_ON_START"] = "false"
        if settings.database_url:
            os.environ["SEQTUNE_DATABASE_URL"] = settings.database_url
        uvicorn.run("service.api.app:create_app", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Service plus local workers in one command (the laptop default: SQLite, auth off)."""
    import os
    import signal
    import subprocess

    from service import migrate
    from service.db import Database

    settings = _settings(args)
    db = Database(settings)
    migrate.upgrade(db.engine)  # before the worker starts, so neither races the other
    db.dispose()
    env = dict(os.environ)
    if settings.database_url:
        env["SEQTUNE_DATABASE_URL"] = settings.database_url
    worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--gpus",
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
    from service import migrate
    from service.db import Database

    db = Database(_settings(args))
    migrate.upgrade(db.engine)
    print(f"seqtune schema at {migrate.current_revision(db.engine)}")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from service import keys, migrate
    from service.db import Database

    db = Database(_settings(args))
    migrate.upgrade(db.engine)
    key = keys.create_key(db, tenant=args.tenant)
    print(f"created a key for tenant '{args.tenant}'; it is shown once, keep it:",
          file=sys.stderr)
    print(key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from service import keys
    from service.db import Database

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


def build_parser() -> argparse.ArgumentParser:
    from service.commands import EXIT_CODES, add_client_commands

    p = argparse.ArgumentParser(
        prog="seqtune", description="Hyperparameter search for LSTMs.", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", help="overrides SEQTUNE_DATABASE_URL")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service (default $SEQTUNE_URL or "
                        "http://127.0.0.1:8000)")
    common.add_argument("--key", help="API key (default $SEQTUNE_API_KEY)")
    common.add_argument("--json", action="store_true", help="JSON for scripts")
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
    from service.client import ApiError, ServiceUnreachable
    from service.commands import exit_code_of
    from service.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return int(args.fn(args))
    except SeqtuneError as exc:
        print(f"seqtune: {exc.message}", file=sys.stderr)
        for d in exc.details:
            print(f"  {d.get('field')}: {d.get('reason')}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"seqtune: {exc}", file=sys.stderr)
        return exit_code_of(exc)
    except ServiceUnreachable as exc:
        print(f"seqtune: {exc}", file=sys.stderr)
        return 6
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `seqtune … | head`: the reader left; not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
