"""Per-trial scheduling overhead: seqtune's claim + ask + 20 fenced epoch reports + tell,
against a plain ``optuna.Study.optimize`` loop doing the same 20 reports, on the same Postgres.

    python bench/coordination.py [--workers 1,8,32] [--prefill 100,10000] [--trials-per-worker 8]

No training: the objective only reports. Both sides use RandomSampler and NopPruner, so what
is measured is coordination, not the sampler (TPE's cost is Optuna's and the same for both).
Each worker is its own process; a trial's time is the interval between its worker's
consecutive trial ends. The study is prefilled with finished trials by SQL first.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ADMIN = os.environ.get("SEQTUNE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
EPOCHS = 20
SPACE = {
    "hidden_size": {"type": "int", "low": 8, "high": 64},
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
}


def seqtune_worker(url: str, name: str, n: int, out: mp.Queue) -> None:
    import optuna

    from seqtune.spec import StudySpec
    from service.settings import Settings
    from service.store import leases
    from service.store.db import Database
    from service.store.optuna import make_storage, optuna_study

    settings = Settings(database_url=url, pool_size=2, max_overflow=2)
    db, storage = Database(settings), make_storage(settings)
    owner = f"bench-{os.getpid()}"
    times, last = [], time.perf_counter()
    while len(times) < n:
        c = leases.claim(db, storage, owner=owner, studies=[name])
        if c is None:  # as a slot does: wait while the study still has work
            if not leases.has_work(db, studies=[name]):
                break
            time.sleep(0.01)
            continue
        ostudy = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
        trial = optuna.trial.Trial(ostudy, c.optuna_trial_id)
        for e in range(EPOCHS):
            leases.report(
                db,
                claim=c,
                trial=trial,
                epoch=e,
                record={"epoch": e, "val_rmse": 1.0 / (e + 1)},
                value=1.0 / (e + 1),
            )
            trial.should_prune()
        leases.finish(
            db, ostudy=ostudy, claim=c, state="COMPLETE", values=[float(np.random.rand())]
        )
        now = time.perf_counter()
        times.append(now - last)
        last = now
    out.put(times)


def optuna_worker(url: str, name: str, n: int, out: mp.Queue) -> None:
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
        for e in range(EPOCHS):
            trial.report(1.0 / (e + 1), e)
            trial.should_prune()
        return float(np.random.rand())

    def done(_study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    study.optimize(objective, n_trials=n, callbacks=[done])
    out.put(times)


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


def run_case(kind: str, workers: int, pre: int, per_worker: int) -> list[float]:
    import optuna
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from bench import harness
    from seqtune.spec import parse_spec
    from service.settings import Settings
    from service.store import migrate
    from service.store.db import Database
    from service.store.optuna import _cached_storage, make_storage
    from service.store.studies import create_study

    url = make_url(ADMIN).set(database="seqtune_coord").render_as_string(hide_password=False)
    harness.fresh_database(url)
    settings = Settings(database_url=url)
    db = Database(settings)
    migrate.upgrade(db.engine)
    _cached_storage.cache_clear()  # the database was just recreated under the same URL
    storage = make_storage(settings)
    total = pre + workers * per_worker
    if kind == "seqtune":
        spec = parse_spec(
            {
                "name": "coord",
                "dataset": {"kind": "builtin", "name": "sunspots"},
                "objectives": [{"metric": "val_rmse"}],
                "search_space": SPACE,
                "sampler": {"name": "random"},
                "pruner": {"name": "none"},
                "budget": {"n_trials": total},
            }
        )
        view = create_study(db, storage, tenant="b", spec=spec)
        sid = db.run(
            lambda s: s.execute(
                text("SELECT id, optuna_study_id FROM seqtune_studies WHERE name='coord'")
            ).one()
        )
        prefill(db.engine, sid[1], sid[0], pre)
        name, target = "coord", seqtune_worker
        assert view.name == "coord"
    else:
        study = optuna.create_study(study_name="plain", storage=storage)
        prefill(db.engine, study._study_id, None, pre)
        name, target = "plain", optuna_worker
    db.dispose()
    storage.engine.dispose()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, name, per_worker, q)) for _ in range(workers)]
    for p in procs:
        p.start()
    times: list[float] = []
    for _ in procs:
        times.extend(q.get(timeout=1200)[1:])  # the first includes start-up
    for p in procs:
        p.join()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,8,32")
    ap.add_argument("--prefill", default="100,10000")
    ap.add_argument("--trials-per-worker", type=int, default=8)
    args = ap.parse_args()
    rows = []
    for pre in [int(x) for x in args.prefill.split(",")]:
        for w in [int(x) for x in args.workers.split(",")]:
            per = max(4, args.trials_per_worker if w > 1 else 3 * args.trials_per_worker)
            for kind in ("optuna", "seqtune"):
                t = np.array(run_case(kind, w, pre, per)) * 1e3
                rows.append((pre, w, kind, len(t), np.percentile(t, 50), np.percentile(t, 99)))
                print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"\nMachine: {platform.node()} ({os.cpu_count()} CPUs), Postgres 15 local; "
        f"{EPOCHS} reports per trial, RandomSampler, NopPruner\n"
    )
    print("| trials before | workers | loop | trials timed | p50 ms | p99 ms | p50 vs Optuna |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    base: dict[tuple[int, int], float] = {}
    for pre, w, kind, n, p50, p99 in rows:
        if kind == "optuna":
            base[(pre, w)] = p50
        ratio = f"{p50 / base[(pre, w)]:.2f}x" if kind == "seqtune" else "1.00x"
        label = "plain Optuna optimize" if kind == "optuna" else "seqtune claim/report/tell"
        print(f"| {pre:,} | {w} | {label} | {n} | {p50:.0f} | {p99:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
