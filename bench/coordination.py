"""Per-trial scheduling overhead: seqtune's claim + 20 fenced epoch reports + tell, against a
plain ``optuna.Study.optimize`` loop doing the same 20 reports, on the same Postgres, with
seqtune's suggestion buffer on (the default) and off (``sampler.buffer: 0``).

    python bench/coordination.py [--workers 1,8,32,64] [--prefill 100,10000]
                                 [--trials-per-worker 8] [--epochs 20] [--loops ...]
                                 [--pgbouncer [--pool-size 10]] [--json FILE]

No training: the objective only reports. Both sides use RandomSampler and NopPruner, so what
is measured is coordination, not the sampler (TPE's cost is Optuna's and the same for both).
Each worker is its own process; a trial's time is the interval between its worker's
consecutive trial ends. seqtune's workers also time each call (claim, report, tell), which the
capacity estimate in BENCHMARKS.md is computed from; a claim that finds the buffer empty
stocks it, as a worker slot's does. The study is prefilled with finished trials by
SQL first. While the workers run, the main process samples the Postgres connections of the
benchmark database (``pg_stat_activity``; behind PgBouncer, its server connections) and reports
the peak per worker. ``--pgbouncer`` runs every loop through a PgBouncer in transaction mode
started for the run (Debian's package), with seqtune's session limits set on the role.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.settings import Settings  # noqa: E402

ADMIN = os.environ.get("SEQTUNE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
DB = "seqtune_coord"
EPOCHS = 20
STOCK_AHEAD = os.environ.get("SEQTUNE_BENCH_STOCK_AHEAD", "1") == "1"
# A worker slot's pools (Settings.worker_pool_size, worker_max_overflow): each of its engines.
POOL = {
    "pool_size": Settings.model_fields["worker_pool_size"].default,
    "max_overflow": Settings.model_fields["worker_max_overflow"].default,
}
# The URLs a worker connects with: seqtune's, and Optuna's storage's (the same unless behind
# PgBouncer, where Optuna gets an entry, and so a pool, of its own).
Route = tuple[str, str]
SPACE = {
    "hidden_size": {"type": "int", "low": 8, "high": 64},
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
}


def seqtune_worker(route: Route, name: str, n: int, epochs: int, out: mp.Queue) -> None:
    import optuna

    from seqtune.spec import StudySpec
    from service.settings import Settings
    from service.store import leases
    from service.store.db import Database
    from service.store.optuna import make_storage, optuna_study
    from service.store.stocker import Stocker

    url, optuna_url = route
    settings = Settings(
        database_url=url,
        optuna_database_url=optuna_url,
        db_session_limits="role" if url != optuna_url else "startup",
        **POOL,
    )
    db, storage = Database(settings), make_storage(settings)
    owner = f"bench-{os.getpid()}"
    stocker = Stocker(db, storage, owner) if STOCK_AHEAD else None
    times: list[float] = []
    last = time.perf_counter()
    calls: dict[str, list[float]] = {"claim": [], "report": [], "tell": []}
    while len(times) < n:
        t0 = time.perf_counter()
        c = leases.claim(db, storage, owner=owner, studies=[name], stocker=stocker)
        if c is None:  # as a slot does: wait while the study still has work
            if not leases.has_work(db, studies=[name]):
                break
            time.sleep(0.01)
            continue
        calls["claim"].append(time.perf_counter() - t0)
        ostudy = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
        trial = optuna.trial.Trial(ostudy, c.optuna_trial_id)
        for e in range(epochs):
            t0 = time.perf_counter()
            leases.report(
                db,
                claim=c,
                trial=trial,
                epoch=e,
                record={"epoch": e, "val_rmse": 1.0 / (e + 1)},
                value=1.0 / (e + 1),
            )
            trial.should_prune()
            calls["report"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        leases.finish(
            db, ostudy=ostudy, claim=c, state="COMPLETE", values=[float(np.random.rand())]
        )
        now = time.perf_counter()
        calls["tell"].append(now - t0)
        times.append(now - last)
        last = now
    if stocker is not None:
        stocker.close()
    out.put((times, calls))


def optuna_worker(route: Route, name: str, n: int, epochs: int, out: mp.Queue) -> None:
    url = route[0]
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(),
        pruner=optuna.pruners.NopPruner(),
    )
    times, last = [], [time.perf_counter()]

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_int("hidden_size", 8, 64)
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        for e in range(epochs):
            trial.report(1.0 / (e + 1), e)
            trial.should_prune()
        return float(np.random.rand())

    def done(_study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    study.optimize(objective, n_trials=n, callbacks=[done])
    out.put((times, {}))


def prefill(engine, optuna_study_id: int, seqtune_study_id: int | None, n: int) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    with engine.begin() as c:
        c.execute(
            text("""INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete)
            SELECT g, :o, 'COMPLETE', now(), now() FROM generate_series(0, :n - 1) g"""),
            {"o": optuna_study_id, "n": n},
        )
        c.execute(
            text("""INSERT INTO trial_values (trial_id, objective, value, value_type)
            SELECT trial_id, 0, random(), 'FINITE' FROM trials WHERE study_id = :o"""),
            {"o": optuna_study_id},
        )
        c.execute(
            text("""INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json)
            SELECT trial_id, 'hidden_size', 8 + (random() * 56)::int,
              '{"name": "IntDistribution", "attributes": {"log": false, "step": 1, "low": 8, "high": 64}}'
            FROM trials WHERE study_id = :o"""),
            {"o": optuna_study_id},
        )
        if seqtune_study_id is not None:
            c.execute(
                text("""INSERT INTO seqtune_trials (study_id, number, optuna_trial_id, state,
                  params, value, "values", on_front, curve, epochs, info, attempts, fence,
                  created_at, started_at, finished_at)
                SELECT :s, number, trial_id, 'COMPLETE', '{}'::jsonb, 0.5, '[0.5]'::jsonb, false,
                  '[]'::jsonb, 20, '{}'::jsonb, 1, 2, now(), now(), now()
                FROM trials WHERE study_id = :o"""),
                {"s": seqtune_study_id, "o": optuna_study_id},
            )
            c.execute(
                text("UPDATE seqtune_studies SET n_claimed = :n, n_complete = :n WHERE id = :s"),
                {"n": n, "s": seqtune_study_id},
            )
        c.execute(text("ANALYZE"))


def run_case(
    kind: str,
    workers: int,
    pre: int,
    per_worker: int,
    route: Callable[[str], Route],
    epochs: int = EPOCHS,
) -> tuple[list[float], dict[str, list[float]], int]:
    """One loop at one size: (trial times, seqtune's per-call times, peak connections)."""
    import optuna
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from bench import harness
    from seqtune.spec import parse_spec
    from service.settings import Settings
    from service.store import migrate
    from service.store.db import Database
    from service.store.optuna import _cached_storage, make_storage
    from service.store.studies import create_study

    direct = make_url(ADMIN).set(database=DB).render_as_string(hide_password=False)
    harness.fresh_database(direct)
    settings = Settings(database_url=direct)
    db = Database(settings)
    migrate.upgrade(db.engine)
    _cached_storage.cache_clear()  # the database was just recreated under the same URL
    storage = make_storage(settings)
    total = pre + workers * per_worker
    if kind.startswith("seqtune"):
        spec = parse_spec(
            {
                "name": "coord",
                "dataset": {"kind": "builtin", "name": "sunspots"},
                "objectives": [{"metric": "val_rmse"}],
                "search_space": SPACE,
                "sampler": {"name": "random", **({"buffer": 0} if kind == "seqtune-b0" else {})},
                "pruner": {"name": "none"},
                "budget": {"n_trials": total},
            }
        )
        create_study(db, storage, tenant="b", spec=spec)
        sid = db.run(
            lambda s: s.execute(
                text("SELECT id, optuna_study_id FROM seqtune_studies WHERE name='coord'")
            ).one()
        )
        prefill(db.engine, sid[1], sid[0], pre)
        name, target = "coord", seqtune_worker
    else:
        study = optuna.create_study(study_name="plain", storage=storage)
        prefill(db.engine, study._study_id, None, pre)
        name, target = "plain", optuna_worker
    db.dispose()
    storage.engine.dispose()
    admin = create_engine(ADMIN, pool_size=1)
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    urls = route(direct)
    if urls[0] != urls[1]:  # behind PgBouncer: seqtune's session limits are the role's
        from service.store.db import role_limits

        with create_engine(direct).begin() as conn:
            migrate.set_role_limits(conn, role_limits(settings))
    procs = [
        ctx.Process(target=target, args=(urls, name, per_worker, epochs, q)) for _ in range(workers)
    ]
    cpu0 = server_cpu()
    for p in procs:
        p.start()
    times: list[float] = []
    calls: dict[str, list[float]] = {}
    peak, got = 0, 0
    with admin.connect() as conn:
        while got < workers:
            try:
                t, c = q.get(timeout=0.25)
            except queue.Empty:
                n = conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": DB}
                ).scalar()
                conn.rollback()
                peak = max(peak, int(n or 0))
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError(f"{kind}: a worker died") from None
                continue
            got += 1
            times.extend(t[1:])  # the first includes start-up
            for k, v in c.items():  # a worker's first claim also loads the study: dropped
                calls.setdefault(k, []).extend(v[1:] if k == "claim" else v)
    for p in procs:
        p.join()
    time.sleep(1.0)  # the workers' backends exit and are reaped
    cpu1 = server_cpu()
    admin.dispose()
    calls["server_cpu_s"] = [cpu1[k] - cpu0[k] for k in ("postgres", "pgbouncer")]
    return times, calls, peak


def server_cpu() -> dict[str, float]:
    """CPU seconds used so far by Postgres (every live server process, plus the exited
    backends the postmaster has reaped) and by PgBouncer, read from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[str, int, list[int]]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        procs[int(d.name)] = (comm, int(fields[1]), [int(x) for x in fields[11:15]])
    out = {"postgres": 0.0, "pgbouncer": 0.0}
    for comm, ppid, (ut, st, cut, cst) in procs.values():
        if comm == "pgbouncer":
            out["pgbouncer"] += (ut + st) / tick
        elif comm == "postgres":
            out["postgres"] += (ut + st) / tick
            if procs.get(ppid, ("",))[0] != "postgres":  # the postmaster: reaped backends
                out["postgres"] += (cut + cst) / tick
    return out


LOOPS = {
    "optuna": "plain Optuna optimize",
    "seqtune-b0": "seqtune, buffer off",
    "seqtune": "seqtune, buffer on",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,8,32,64")
    ap.add_argument("--prefill", default="100,10000")
    ap.add_argument("--trials-per-worker", type=int, default=8)
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="reports per trial")
    ap.add_argument("--pgbouncer", action="store_true", help="run every loop through PgBouncer")
    ap.add_argument("--pool-size", type=int, default=10, help="PgBouncer's pool per entry")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        route: Callable[[str], Route] = lambda url: (url, url)  # noqa: E731
        if args.pgbouncer:
            from tests.pgbouncer import PgBouncer

            bouncer = stack.enter_context(PgBouncer.running(ADMIN, pool_size=args.pool_size))

            def route(url: str) -> Route:  # seqtune's entry, and Optuna's with its own pool
                return bouncer.url(url), bouncer.optuna_url(url)

        rows = measure(args, route)
    via = "through PgBouncer (transaction pooling)" if args.pgbouncer else "direct"
    print(
        f"\nMachine: {platform.node()} ({os.cpu_count()} CPUs), Postgres 15 local, {via}; "
        f"{args.epochs} reports per trial, RandomSampler, NopPruner\n"
    )
    print(
        "| trials before | workers | loop | trials timed | p50 ms | p99 ms | p50 vs Optuna "
        "| claim p50 ms | claim p99 ms | report mean ms | tell mean ms | connections per worker "
        "| Postgres CPU ms per trial | PgBouncer CPU ms per trial |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {
        (r["prefill"], r["workers"]): r["p50"]
        for r in rows
        if r["loop"] == "optuna" and "error" not in r
    }
    for r in rows:
        if "error" in r:
            print(
                f"| {r['prefill']:,} | {r['workers']} | {LOOPS[r['loop']]} | failed: {r['error']} |"
            )
            continue
        b = base.get((r["prefill"], r["workers"]))
        ratio = f"{r['p50'] / b:.2f}x" if b else "-"
        extra = (
            f"{r['claim_p50']:.1f} | {r['claim_p99']:.1f} | {r['report_mean']:.2f} | "
            f"{r['tell_mean']:.1f}"
            if "claim_p50" in r
            else "- | - | - | -"
        )
        print(
            f"| {r['prefill']:,} | {r['workers']} | {LOOPS[r['loop']]} | {r['n']} | "
            f"{r['p50']:.0f} | {r['p99']:.0f} | {ratio} | {extra} | "
            f"{r['peak_connections'] / r['workers']:.1f} | "
            f"{r['postgres_cpu_ms_per_trial']:.1f} | {r['pgbouncer_cpu_ms_per_trial']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"via": via, "rows": rows}, indent=1))


def measure(args: argparse.Namespace, route: Callable[[str], Route]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for pre in [int(x) for x in args.prefill.split(",")]:
        for w in [int(x) for x in args.workers.split(",")]:
            per = max(4, args.trials_per_worker if w > 1 else 3 * args.trials_per_worker)
            for kind in args.loops.split(","):
                try:
                    times, calls, peak = run_case(kind, w, pre, per, route, args.epochs)
                except RuntimeError as exc:  # a worker died: recorded, the run goes on
                    rows.append({"prefill": pre, "workers": w, "loop": kind, "error": str(exc)})
                    print(rows[-1], file=sys.stderr, flush=True)
                    with contextlib.suppress(Exception):
                        for child in mp.active_children():
                            child.kill()
                    continue
                t = np.array(times) * 1e3
                row: dict[str, Any] = {
                    "prefill": pre,
                    "workers": w,
                    "loop": kind,
                    "epochs": args.epochs,
                    "n": len(t),
                    "p50": float(np.percentile(t, 50)),
                    "p99": float(np.percentile(t, 99)),
                    "peak_connections": peak,
                }
                pg_s, bouncer_s = calls.pop("server_cpu_s")
                trials = w * per
                row |= {
                    "postgres_cpu_ms_per_trial": pg_s / trials * 1e3,
                    "pgbouncer_cpu_ms_per_trial": bouncer_s / trials * 1e3,
                }
                if calls:
                    claim = np.array(calls["claim"]) * 1e3
                    row |= {
                        "claim_p50": float(np.percentile(claim, 50)),
                        "claim_p99": float(np.percentile(claim, 99)),
                        "report_mean": float(np.mean(calls["report"]) * 1e3)
                        if calls["report"]
                        else float("nan"),
                        "tell_mean": float(np.mean(calls["tell"]) * 1e3),
                    }
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
