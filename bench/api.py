"""API read benchmark: /best and /studies/{name} beside /healthz, at 1,000 and 100,000 trials.

    python bench/api.py [--clients 64] [--seconds 10] [--sizes 1000,100000]

Needs Postgres (SEQTUNE_BENCH_PG, default the machine's 127.0.0.1:5432) and `wrk`
(apt-get install wrk). The fixture is loaded with INSERT ... SELECT generate_series, the fastest
way to put 100,000 finished trials into both seqtune's table and Optuna's (a benchmark fixture
only: the service itself writes Optuna's tables through Optuna). The same run times Optuna's
own `study.best_trial` on the same study for comparison. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import optuna
from sqlalchemy import text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from seqtune.spec import parse_spec  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store import keys, migrate  # noqa: E402
from service.store.db import Database  # noqa: E402
from service.store.optuna import make_storage  # noqa: E402
from service.store.studies import create_study  # noqa: E402

ADMIN = os.environ.get("SEQTUNE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
DB_NAME = "seqtune_bench"


def fresh_database() -> str:
    url = make_url(ADMIN).set(database=DB_NAME).render_as_string(hide_password=False)
    harness.fresh_database(url)
    return url


def load_trials(db: Database, study_name: str, n: int) -> None:
    """n finished trials in seqtune_trials and in Optuna's trials/values/params tables."""
    with db.engine.begin() as c:
        sid, osid = c.execute(
            text("SELECT id, optuna_study_id FROM seqtune_studies WHERE name = :n"),
            {"n": study_name},
        ).one()
        c.execute(
            text("""
            INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete)
            SELECT g, :osid, 'COMPLETE', now(), now() FROM generate_series(0, :n - 1) g"""),
            {"osid": osid, "n": n},
        )
        c.execute(
            text("""
            INSERT INTO trial_values (trial_id, objective, value, value_type)
            SELECT trial_id, 0, 1.0 + random(), 'FINITE' FROM trials WHERE study_id = :osid"""),
            {"osid": osid},
        )
        c.execute(
            text("""
            INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json)
            SELECT trial_id, 'hidden_size', 8 + (random() * 56)::int,
              '{"name": "IntDistribution", "attributes": {"log": false, "step": 1, "low": 8, "high": 64}}'
            FROM trials WHERE study_id = :osid"""),
            {"osid": osid},
        )
        c.execute(
            text("""
            INSERT INTO seqtune_trials (study_id, number, optuna_trial_id, state, params, value,
              "values", on_front, curve, epochs, info, attempts, created_at, started_at,
              finished_at)
            SELECT :sid, t.number, t.trial_id, 'COMPLETE',
              jsonb_build_object('hidden_size', p.param_value::int), v.value,
              jsonb_build_array(v.value), false, '[]'::jsonb, 20, '{}'::jsonb, 1, now(),
              now() - interval '1 minute', now()
            FROM trials t JOIN trial_values v USING (trial_id)
              JOIN trial_params p USING (trial_id)
            WHERE t.study_id = :osid"""),
            {"sid": sid, "osid": osid},
        )
        c.execute(
            text("UPDATE seqtune_studies SET n_complete = :n, n_trials = :n WHERE id = :sid"),
            {"n": n, "sid": sid},
        )
        c.execute(text("ANALYZE"))


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(s: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    assert m, s
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, key: str, clients: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{clients}",
            f"-d{seconds}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {key}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    return {"rps": rps, "p50": p50, "p99": p99, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--sizes", default="1000,100000")
    ap.add_argument("--port", type=int, default=8799)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn processes")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    sizes = [int(s) for s in args.sizes.split(",")]

    url = fresh_database()
    settings = Settings(database_url=url)
    db = Database(settings)
    migrate.upgrade(db.engine)
    storage = make_storage(settings)
    key = keys.create_key(db, tenant="bench")
    for n in sizes:
        spec = parse_spec(
            {
                "name": f"bench-{n}",
                "dataset": {"kind": "builtin", "name": "sunspots"},
                "objectives": [{"metric": "val_rmse"}],
                "search_space": {"hidden_size": {"type": "int", "low": 8, "high": 64}},
            }
        )
        create_study(db, storage, tenant="bench", spec=spec)
        t0 = time.perf_counter()
        load_trials(db, f"bench-{n}", n)
        print(f"loaded {n} trials in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    env = {
        **os.environ,
        "SEQTUNE_DATABASE_URL": url,
        "SEQTUNE_LOG_LEVEL": "WARNING",
        "SEQTUNE_POOL_SIZE": "20",
        "SEQTUNE_MAX_OVERFLOW": "50",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "seqtune.cli",
            "serve",
            "--port",
            str(args.port),
            "--workers",
            str(args.workers),
        ],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        rows = []
        for n in sizes:
            for label, path in [
                ("GET /healthz", "/healthz"),
                ("GET /v1/studies/{name}/best", f"/v1/studies/bench-{n}/best"),
                ("GET /v1/studies/{name}", f"/v1/studies/bench-{n}"),
            ]:
                r = httpx.get(base + path, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, (path, r.text)
                m = run_wrk(base + path, key, args.clients, args.seconds)
                rows.append((n, label, m))
            study = optuna.load_study(study_name=f"bench/bench-{n}", storage=storage)
            t0 = time.perf_counter()
            optuna_best = study.best_trial
            dt = (time.perf_counter() - t0) * 1e3
            api_best = httpx.get(
                base + f"/v1/studies/bench-{n}/best", headers={"Authorization": f"Bearer {key}"}
            ).json()
            assert api_best["best"]["number"] == optuna_best.number
            rows.append(
                (
                    n,
                    "optuna study.best_trial (one call, in-process)",
                    {"rps": float("nan"), "p50": dt, "p99": float("nan"), "errors": 0},
                )
            )
    finally:
        server.terminate()
        server.wait(10)

    print(
        f"\nMachine: {platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), "
        f"Postgres local, uvicorn {args.workers} process(es), wrk -t2 -c{args.clients} -d{args.seconds}s\n"
    )
    print("| trials in study | endpoint | requests/s | p50 ms | p99 ms | non-2xx |")
    print("|---:|---|---:|---:|---:|---:|")
    for n, label, m in rows:
        rps = "—" if m["rps"] != m["rps"] else f"{m['rps']:.0f}"
        p99 = "—" if m["p99"] != m["p99"] else f"{m['p99']:.1f}"
        print(f"| {n:,} | {label} | {rps} | {m['p50']:.1f} | {p99} | {m['errors']} |")


if __name__ == "__main__":
    main()
