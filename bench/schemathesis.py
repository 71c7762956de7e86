"""Schemathesis against a real `seqtune serve`: every operation, all checks, a bearer key.

    python bench/schemathesis.py [--max-examples 25] [--seed 1] [--workers 2] [--max-time S]

Starts `seqtune serve` (auth on) on a fresh Postgres database (SEQTUNE_BENCH_PG, default the
machine's 127.0.0.1:5432, database `seqtune_schemathesis`), creates an API key with
`seqtune keys create --tenant fuzz`, and seeds what the routes look up: a study with finished
trials and saved models, a two-objective study, a study without trials, and an uploaded
dataset. Schemathesis (`st run`, all checks, all phases) then tests every operation of
/openapi.json; a config file binds the path parameters `name`, `number` and `dataset_id` to the
seeded values half of the time, so requests reach the routes' logic and not only their 404.

Prints the requests the service answered (counted by the service itself, from its /metrics),
the server errors among them, and schemathesis's failures by check. Exits 1 on any failure.

One check is narrowed, for three operations: `positive_data_acceptance` also accepts 422 for
POST /v1/studies, POST /v1/studies/{name}/trials and POST /v1/datasets. Their bodies have
meaning the schema cannot state: a study's hyperparameter names, ranges and options are checked
against the engine and each other (low <= high, options of the chosen sampler), enqueued params
against the study's own search space, an upload's bytes are parsed as CSV. A body can match the
schema and still be refused with 422 naming the field; every other check stays on for them.

And `negative_data_rejection` takes 413 as a rejection for the four routes with a body: a
schema-violating body can also be over the size cap (SEQTUNE_MAX_BODY_BYTES, 1 MiB), and then
its 413 (documented on those routes) comes first, before the body is parsed. schemathesis's
default list of rejecting statuses has 400, 422 and others but not 413.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402

ADMIN = os.environ.get("SEQTUNE_BENCH_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
DB_NAME = "seqtune_schemathesis"
TENANT = "fuzz"
SEEDED = "seeded"  # single objective, finished trials with models
SEEDED_MULTI = "seeded-multi"  # two objectives: a Pareto front, no single best model
SEEDED_EMPTY = "seeded-empty"  # no trial yet: /best and the models answer 409
SEMANTIC_BODIES = (
    ("POST", "/v1/studies"),
    ("POST", "/v1/studies/{name}/trials"),
    ("POST", "/v1/datasets"),
)
BODIES = (*SEMANTIC_BODIES, ("PATCH", "/v1/studies/{name}"))
# schemathesis's default rejections for negative_data_rejection, plus 413 (see the docstring)
REJECTIONS = [
    "400",
    "401",
    "403",
    "404",
    "405",
    "406",
    "409",
    "413",
    "415",
    "422",
    "428",
    "429",
    "5xx",
]


def study(name: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "dataset": {"kind": "builtin", "name": "sunspots"},
        "search_space": {
            "hidden_size": {"type": "int", "low": 8, "high": 64},
            "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        },
        "budget": {"n_trials": 40},
    }
    body.update(over)
    return body


def run_trials(url: str, data_dir: Path, name: str, values: list[list[float]]) -> None:
    """Finish trials the way a worker does (claim, epoch reports, a saved model, finish),
    without training: the API's read routes need finished trials, not good ones."""
    import optuna

    from seqtune.spec import StudySpec
    from service.settings import Settings
    from service.store import leases
    from service.store.db import Database
    from service.store.optuna import make_storage, optuna_study

    settings = Settings(database_url=url, data_dir=data_dir)
    db, storage = Database(settings), make_storage(settings)
    try:
        for vals in values:
            c = leases.claim(db, storage, owner="seed", studies=[name])
            assert c is not None, f"nothing to claim in {name}"
            ostudy = optuna_study(storage, c.optuna_study_name, StudySpec.model_validate(c.spec))
            single = len(vals) == 1
            trial = optuna.trial.Trial(ostudy, c.optuna_trial_id) if single else None
            for e in range(3):
                leases.report(
                    db,
                    claim=c,
                    trial=trial,
                    epoch=e,
                    value=vals[0] + 3 - e if single else None,
                    record={"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": vals[0] + e},
                )
            leases.save_checkpoint(db, claim=c, kind="best", epoch=2, data=b"seeded-model")
            leases.finish(
                db,
                ostudy=ostudy,
                claim=c,
                state="COMPLETE",
                values=vals,
                reason="max_epochs",
                test_metrics={"test_rmse": vals[0] * 1.1},
            )
    finally:
        db.dispose()


def seed(base: str, key: str, url: str, data_dir: Path) -> dict[str, list[Any]]:
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=auth, timeout=60) as c:
        for body in (
            study(SEEDED),
            study(SEEDED_EMPTY),
            study(SEEDED_MULTI, objectives=[{"metric": "val_rmse"}, {"metric": "val_mae"}]),
        ):
            c.post("/v1/studies", json=body).raise_for_status()
        csv = "t,y,x\n" + "".join(f"{i},{math.sin(i / 7):.5f},{i % 13}\n" for i in range(300))
        r = c.post(
            "/v1/datasets",
            files={"file": ("seeded.csv", csv.encode(), "text/csv")},
            data={"name": "seeded"},
        )
        r.raise_for_status()
        dataset_id = r.json()["id"]
    run_trials(url, data_dir, SEEDED, [[v] for v in (0.9, 0.4, 0.7, 0.2, 0.6, 0.5)])
    run_trials(url, data_dir, SEEDED_MULTI, [[0.3, 0.9], [0.6, 0.2], [0.5, 0.5]])
    with httpx.Client(base_url=base, headers=auth, timeout=60) as c:
        c.post(
            f"/v1/studies/{SEEDED}/trials",
            json={"params": {"hidden_size": 32, "lr": 0.01, "optimizer": "adam"}},
        ).raise_for_status()
    return {
        "studies": [SEEDED, SEEDED_MULTI, SEEDED_EMPTY],
        "trials": list(range(8)),
        "datasets": [dataset_id],
    }


def config(seeded: dict[str, list[Any]], args: argparse.Namespace) -> str:
    """schemathesis.toml: the seeded identifiers as dictionaries bound to the path parameters
    (not for the DELETE routes, so the seeds live through the run), and the one narrowed
    check (see the module's docstring)."""
    lines = ["[dictionaries]"]
    lines += [f"{k} = {{ values = {json.dumps(v)} }}" for k, v in seeded.items()]
    binding = (
        'parameters = {{ "path.name" = {{ dictionary = "studies", probability = {p} }}, '
        '"path.number" = {{ dictionary = "trials", probability = {p} }}, '
        '"path.dataset_id" = {{ dictionary = "datasets", probability = {p} }} }}'
    )
    lines += [
        "",
        "[[operations]]",
        'include-method = ["GET", "PATCH", "POST"]',
        binding.format(p=args.seeded_share),
    ]
    for method, path in BODIES:
        lines += [
            "",
            "[[operations]]",
            f'include-method = "{method}"',
            f'include-path = "{path}"',
            f"checks.negative_data_rejection.expected-statuses = {json.dumps(REJECTIONS)}",
        ]
        if (method, path) in SEMANTIC_BODIES:
            lines += [
                "checks.positive_data_acceptance.expected-statuses = "
                '["2xx", "401", "403", "404", "409", "422", "429"]'
            ]
    return "\n".join(lines) + "\n"


def served(base: str) -> Counter[str]:
    """Requests the service counted in its latency histogram, by status."""
    from prometheus_client.parser import text_string_to_metric_families

    by_status: Counter[str] = Counter()
    text = httpx.get(base + "/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        if fam.name != "seqtune_api_request_duration_seconds":
            continue
        for s in fam.samples:
            if s.name.endswith("_count"):
                by_status[str(s.labels.get("status", "?"))] += int(s.value)
    return by_status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--max-examples",
        type=int,
        default=25,
        help="test cases per operation and phase (schemathesis -n)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", default="2", help="schemathesis workers")
    ap.add_argument("--max-time", type=int, help="seconds; fuzzing and stateful repeat to it")
    ap.add_argument("--phases", help="schemathesis phases (default: all)")
    ap.add_argument(
        "--seeded-share",
        type=float,
        default=0.5,
        help="how often a path parameter takes a seeded value",
    )
    ap.add_argument("--port", type=int, default=18766)
    ap.add_argument("--out", type=Path, help="keep the reports and logs here")
    ap.add_argument(
        "--ndjson",
        action="store_true",
        help="also write schemathesis's NDJSON event log (every request; large)",
    )
    args = ap.parse_args()

    work = (args.out or Path(tempfile.mkdtemp(prefix="seqtune-st-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    url = make_url(ADMIN).set(database=DB_NAME).render_as_string(hide_password=False)
    harness.fresh_database(url)
    env = harness.service_env(url, work / "data")
    subprocess.run([*harness.EXE, "db", "upgrade"], env=env, check=True, capture_output=True)
    made = subprocess.run(
        [*harness.EXE, "keys", "create", "--tenant", TENANT],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    key = made.stdout.strip().splitlines()[-1]
    base = f"http://127.0.0.1:{args.port}"
    proc = harness.start(["serve", "--port", str(args.port)], env, work / "serve.log")
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"seqtune serve exited; see {work / 'serve.log'}")
            time.sleep(0.2)
        seeded = seed(base, key, url, work / "data")
        (work / "schemathesis.toml").write_text(config(seeded, args))
        before = served(base)
        cmd = [
            "st",
            "--config-file",
            str(work / "schemathesis.toml"),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "-H",
            f"Authorization: Bearer {key}",
            "-n",
            str(args.max_examples),
            "--seed",
            str(args.seed),
            "-w",
            str(args.workers),
            "--request-timeout",
            "120",
            "--report",
            "json",
            "--report-json-path",
            str(work / "report.json"),
            "--no-color",
        ]
        if args.max_time:
            cmd += ["--max-time", str(args.max_time)]
        if args.phases:
            cmd += ["--phases", args.phases]
        if args.ndjson:
            cmd[cmd.index("json")] = "json,ndjson"
            cmd += ["--report-ndjson-path", str(work / "events.ndjson")]
        shown = " ".join(c if "Bearer" not in c else "'Authorization: Bearer $KEY'" for c in cmd)
        print(f"$ {shown}", flush=True)
        t0 = time.monotonic()
        with (work / "schemathesis.log").open("w") as log:
            # In the work directory: schemathesis keeps its cache (.schemathesis/) in the cwd.
            st = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        took = time.monotonic() - t0
        answered = served(base)
        answered.subtract(before)
        answered["200"] -= 1  # our first /metrics read
        answered = +answered
    finally:
        harness.stop(proc, timeout=30)
    report = json.loads((work / "report.json").read_text())
    cases = report["test_cases"]
    by_check = Counter({f"{f['code']} {f['title']}": f["count"] for f in report["failures"]})
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; schemathesis "
        f"{report['schemathesis_version']}; seed {args.seed}; {took:.0f} s"
    )
    print(f"operations tested: {report['operations']['tested']}/{report['operations']['selected']}")
    server_errors = sum(n for status, n in answered.items() if status.startswith("5"))
    print(
        f"requests answered by the service: {sum(answered.values())} ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(answered.items()))
        + ")"
    )
    print(
        f"test cases: {cases['generated']} generated, {cases['with_failures']} with failures, "
        f"{cases['errored']} errored"
    )
    print(f"server errors (5xx): {server_errors}")
    print(f"conformance failures: {sum(by_check.values())}")
    for check, n in sorted(by_check.items()):
        print(f"  {check}: {n}")
    for err in report.get("errors") or []:
        print(f"  error: {json.dumps(err)[:300]}")
    print(f"log: {work / 'schemathesis.log'}")
    failed = by_check or server_errors or report.get("errors") or st.returncode not in (0, 1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
