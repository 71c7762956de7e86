"""Classical baselines and the final phase: the store (claim, store, fail), /best's verdict and
final summary, the study view, the CLI's printing and the /ui/ page's cells."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from seqtune.commands import print_best, status_line
from seqtune.views import BestView, StudyView, TrialView
from service.store import baselines
from service.store.db import Database
from service.store.studies import final_summary
from service.store.tables import Study, Trial
from tests.conftest import _study_id, run_trial, study_body

TENANT = "acme"  # the tenant of the conftest `key`

FORECAST: dict[str, Any] = {
    "task": "forecast",
    "horizon": 1,
    "season": 52,
    "n_val_targets": 340,
    "n_test_targets": 340,
    "mase_scale": 0.31,
    "models": {
        "persistence": {
            "val": {"rmse": 0.9, "mae": 0.7, "mape": 30.0, "mase": 2.2},
            "test": {"rmse": 1.0, "mae": 0.8, "mape": 31.0, "mase": 2.58},
            "params": {},
        },
        "ar": {
            "val": {"rmse": 0.38, "mae": 0.28, "mape": 11.0, "mase": 0.9},
            "test": {"rmse": 0.4, "mae": 0.3, "mape": 12.0, "mase": 0.97},
            "params": {"p": 9},
        },
    },
    "best": "ar",
    "skipped": {"arima": "did not converge"},
    "seconds": 2.1,
}
CLASSIFY: dict[str, Any] = {
    "task": "classify",
    "n_val_targets": 200,
    "n_test_targets": 200,
    "models": {
        "majority": {
            "val": {"accuracy": 0.5, "f1": 0.33, "loss": 0.69},
            "test": {"accuracy": 0.52, "f1": 0.34, "loss": 0.69},
            "params": {},
        },
        "logistic": {
            "val": {"accuracy": 0.7, "f1": 0.68, "loss": 0.55},
            "test": {"accuracy": 0.66, "f1": 0.64, "loss": 0.58},
            "params": {},
        },
    },
    "best": "logistic",
    "skipped": {},
    "seconds": 0.4,
}


def _storage(client: TestClient):  # type: ignore[no-untyped-def]
    return client.app.state.seqtune.storage  # type: ignore[attr-defined]


def _set_trial(db: Database, name: str, number: int, **values: Any) -> None:
    sid = _study_id(db, TENANT, name)
    db.run(
        lambda s: s.execute(
            update(Trial).where(Trial.study_id == sid, Trial.number == number).values(**values)
        )
    )


def _set_study(db: Database, name: str, **values: Any) -> None:
    sid = _study_id(db, TENANT, name)
    db.run(lambda s: s.execute(update(Study).where(Study.id == sid).values(**values)))


def _stored(db: Database, name: str) -> dict[str, Any] | None:
    sid = _study_id(db, TENANT, name)
    return db.run(lambda s: s.scalar(select(Study.baselines).where(Study.id == sid)))


def _trial(**over: Any) -> TrialView:
    base: dict[str, Any] = {
        "number": 3,
        "state": "COMPLETE",
        "params": {},
        "value": 1.0,
        "created_at": datetime.now(UTC),
    }
    return TrialView(**{**base, **over})


# -- the store -------------------------------------------------------------------------------------
def test_claim_is_exclusive_and_a_stale_claim_can_be_retaken(
    client: TestClient, auth: dict, db: Database
) -> None:
    client.post("/v1/studies", json=study_body("c"), headers=auth)
    sid = _study_id(db, TENANT, "c")
    # Many workers at once: exactly one wins the compare-and-set.
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: baselines.claim(db, study_id=sid, owner=f"w{i}"), range(8)))
    assert won.count(True) == 1
    owner = f"w{won.index(True)}"
    marker = _stored(db, "c")
    assert marker is not None and marker["status"] == "computing" and marker["owner"] == owner
    assert not baselines.claim(db, study_id=sid, owner="late")  # fresh: not stale yet
    assert not baselines.claim(db, study_id=sid + 999, owner="late")  # no such study

    # The owner died: twenty minutes later its marker is stale and another worker takes over.
    old = (datetime.now(UTC) - timedelta(minutes=20)).isoformat(timespec="microseconds")
    _set_study(db, "c", baselines={**marker, "since": old})
    assert not baselines.claim(db, study_id=sid, owner="late", stale_after_s=3600)
    assert baselines.claim(db, study_id=sid, owner="late")
    assert _stored(db, "c")["owner"] == "late"  # type: ignore[index]
    # The dead owner's late result does not overwrite the new claim; the new owner's does.
    baselines.store(db, study_id=sid, owner=owner, result={**FORECAST, "seconds": 99.0})
    assert _stored(db, "c")["status"] == "computing"  # type: ignore[index]
    baselines.store(db, study_id=sid, owner="late", result=FORECAST)
    done = _stored(db, "c")
    assert done == {**FORECAST, "status": "done"}
    # Done is final: neither a claim (however stale) nor a failure touches it.
    assert not baselines.claim(db, study_id=sid, owner="again", stale_after_s=0)
    baselines.fail(db, study_id=sid, owner="late", error="x")
    assert _stored(db, "c") == done


def test_store_and_fail_round_trip(client: TestClient, auth: dict, db: Database) -> None:
    client.post("/v1/studies", json=study_body("f"), headers=auth)
    sid = _study_id(db, TENANT, "f")
    assert baselines.claim(db, study_id=sid, owner="w1")
    baselines.fail(db, study_id=sid, owner="w2", error="not mine")  # not the owner: ignored
    assert _stored(db, "f")["status"] == "computing"  # type: ignore[index]
    baselines.fail(db, study_id=sid, owner="w1", error="E" * 5000)
    failed = _stored(db, "f")
    assert failed == {"status": "failed", "error": "E" * 2000}
    view = client.get("/v1/studies/f", headers=auth).json()
    assert view["baselines"] == failed  # the study view says why
    assert not baselines.claim(db, study_id=sid, owner="w3", stale_after_s=0)  # no retry
    # A result that arrives anyway replaces the failure; non-finite floats become null.
    result = {**FORECAST, "mase_scale": float("nan")}
    baselines.store(db, study_id=sid, owner="w1", result=result)
    stored = _stored(db, "f")
    assert stored is not None and stored["status"] == "done" and stored["mase_scale"] is None
    assert stored["models"]["ar"] == FORECAST["models"]["ar"]


# -- the verdict -----------------------------------------------------------------------------------
def test_verdict_forecast_and_classify() -> None:
    done = {**FORECAST, "status": "done"}
    worse = _trial(
        info={"val": {"val_rmse": 1.26}}, test_metrics={"test_rmse": 1.3, "test_mae": 0.62}
    )
    v = baselines.verdict(done, worse, "forecast")
    assert v is not None and v["beats_baseline"] is False and v["beats_on_test"] is False
    assert v["baseline"] == "ar" and v["baseline_label"] == "AR(9)" and v["metric"] == "rmse"
    assert v["message"] == (
        "The best trial does not beat the AR(9) baseline on validation "
        "(RMSE 1.26 vs 0.38): prefer the baseline, or widen the search "
        "(target_transform, seq_len)."
    )
    assert v["trial_test_mase"] == pytest.approx(0.62 / 0.31)
    assert v["baseline_test_mase"] == 0.97
    better = _trial(info={"val": {"val_rmse": 0.3344}}, test_metrics={"test_rmse": 0.364})
    v = baselines.verdict(done, better, "forecast")
    assert v is not None and v["beats_baseline"] is True and v["beats_on_test"] is True
    assert v["val_ratio"] == pytest.approx(0.88) and v["test_ratio"] == pytest.approx(0.91)
    assert v["trial_test_mase"] is None  # no test_mae
    assert v["message"] == (
        "Beats the best classical baseline (ar) on validation: RMSE 0.334 "
        "vs 0.38 (ratio 0.88); on test 0.91."
    )
    # Classification: higher accuracy is better.
    cdone = {**CLASSIFY, "status": "done"}
    hi = _trial(info={"val": {"val_accuracy": 0.8}}, test_metrics={"test_accuracy": 0.6})
    v = baselines.verdict(cdone, hi, "classify")
    assert v is not None and v["beats_baseline"] is True and v["beats_on_test"] is False
    assert v["metric"] == "accuracy" and v["trial_test_mase"] is None
    assert "not better than the baseline on test" in v["message"]
    lo = _trial(info={"val": {"val_accuracy": 0.6}})
    v = baselines.verdict(cdone, lo, "classify")
    assert v is not None and v["beats_baseline"] is False and v["test_ratio"] is None
    assert "does not beat the logistic regression baseline" in v["message"]
    # No verdict without finished baselines or without the metric.
    assert baselines.verdict(None, worse, "forecast") is None
    assert baselines.verdict({"status": "computing", "owner": "w"}, worse, "forecast") is None
    assert baselines.verdict(done, _trial(info={}), "forecast") is None
    assert baselines.verdict({**done, "best": "arima"}, worse, "forecast") is None


# -- /best and the study view ----------------------------------------------------------------------
def test_best_shows_baselines_and_a_verdict(client: TestClient, auth: dict, db: Database) -> None:
    client.post("/v1/studies", json=study_body("b"), headers=auth)
    for v in (0.7, 0.3):
        run_trial(db, _storage(client), client, auth, "b", v)
    r = client.get("/v1/studies/b/best", headers=auth).json()
    assert r["best"]["number"] == 1 and r["baselines"] is None and r["verdict"] is None
    assert r["final"] is None and r["best"]["final_of"] is None
    sid = _study_id(db, TENANT, "b")
    assert baselines.claim(db, study_id=sid, owner="w1")
    r = client.get("/v1/studies/b/best", headers=auth).json()
    assert r["baselines"]["status"] == "computing" and r["verdict"] is None

    baselines.store(db, study_id=sid, owner="w1", result=FORECAST)
    _set_trial(
        db,
        "b",
        1,
        info={"val": {"val_rmse": 1.26, "val_loss": 0.2}},
        test_metrics={"test_rmse": 1.3, "test_mae": 0.62},
    )
    r = client.get("/v1/studies/b/best", headers=auth).json()
    assert r["baselines"]["best"] == "ar" and r["baselines"]["status"] == "done"
    v = r["verdict"]
    assert v["beats_baseline"] is False and v["trial_val"] == 1.26 and v["baseline_val"] == 0.38
    assert "does not beat the AR(9) baseline" in v["message"]

    _set_trial(db, "b", 1, info={"val": {"val_rmse": 0.2}})
    v = client.get("/v1/studies/b/best", headers=auth).json()["verdict"]
    assert v["beats_baseline"] is True and v["val_ratio"] == pytest.approx(0.2 / 0.38)
    assert v["test_ratio"] == pytest.approx(1.3 / 0.4) and v["beats_on_test"] is False

    # The study view (one study and the listing) carries the baselines and the phase.
    view = client.get("/v1/studies/b", headers=auth).json()
    assert view["baselines"] == {**FORECAST, "status": "done"} and view["phase"] == "search"
    listed = client.get("/v1/studies", headers=auth).json()["items"][0]
    assert listed["baselines"]["best"] == "ar" and listed["phase"] == "search"


def test_final_retrains_are_not_the_best_and_are_summarised(
    client: TestClient, auth: dict, db: Database
) -> None:
    client.post("/v1/studies", json=study_body("fin"), headers=auth)
    st = _storage(client)
    # The search (trial 1 is its best by value), then four trials to become re-trains below;
    # all run in the search phase, so the claims do not start the final phase's own re-trains.
    for v in (0.5, 0.3, 0.9):
        run_trial(db, st, client, auth, "fin", v)
    # Re-trains: trial 0's params score 0.3 and 0.4 (mean 0.35); trial 1's 0.1 and 0.8 (mean
    # 0.45). The lone 0.1 is the lowest value of all, yet a re-train is never the best.
    retrains = {3: (0, 0.3), 4: (1, 0.1), 5: (0, 0.4), 6: (1, 0.8)}
    for number, (_, v) in retrains.items():
        assert run_trial(db, st, client, auth, "fin", v) == number
    run_trial(db, st, client, auth, "fin", 0.05, state="PRUNED")
    r = client.get("/v1/studies/fin/best", headers=auth).json()
    assert r["final"] is None and r["best"]["number"] == 4  # no re-train yet, search phase
    _set_study(db, "fin", phase="final")
    r = client.get("/v1/studies/fin/best", headers=auth).json()
    assert r["final"] == {"phase": "final", "groups": [], "winner": None}
    assert client.get("/v1/studies/fin", headers=auth).json()["phase"] == "final"
    for number, (of, _) in retrains.items():
        _set_trial(db, "fin", number, final_of=of)
    _set_trial(db, "fin", 7, final_of=1)  # not COMPLETE: not counted

    r = client.get("/v1/studies/fin/best", headers=auth).json()
    f = r["final"]
    assert f["phase"] == "final" and f["winner"] == 0
    assert [(g["trial"], g["n"]) for g in f["groups"]] == [(0, 2), (1, 2)]
    g0 = f["groups"][0]
    assert g0["value_mean"] == pytest.approx(0.35) and g0["value_sd"] == pytest.approx(0.0707107)
    assert g0["test"]["test_rmse"]["mean"] == pytest.approx(0.385)  # run_trial: 1.1 * value
    assert f["groups"][1]["value_mean"] == pytest.approx(0.45)
    # best is the winning search trial, the one whose model serves.
    assert r["best"]["number"] == 0 and r["best"]["final_of"] is None

    # The trial listing carries final_of.
    items = client.get("/v1/studies/fin/trials", headers=auth).json()["items"]
    assert {t["number"]: t["final_of"] for t in items} == {
        0: None,
        1: None,
        2: None,
        3: 0,
        4: 1,
        5: 0,
        6: 1,
        7: 1,
    }
    # The winner follows the means: trial 0's re-trains get worse, trial 1 wins.
    _set_trial(db, "fin", 3, value=2.0)
    _set_trial(db, "fin", 5, value=2.0)
    r = client.get("/v1/studies/fin/best", headers=auth).json()
    assert r["final"]["winner"] == 1 and r["best"]["number"] == 1
    # A winner whose search trial is gone: the index's best search trial, never a re-train
    # (#4 scored 0.1, below every search trial).
    for number in retrains:
        _set_trial(db, "fin", number, final_of=42)
    r = client.get("/v1/studies/fin/best", headers=auth).json()
    assert r["final"]["winner"] == 42 and r["best"]["number"] == 1


def test_final_summary_follows_the_direction() -> None:
    rows: list[tuple[int, float | None, dict[str, Any] | None]] = [
        (2, 0.9, {"test_accuracy": 0.8}),
        (2, 0.7, None),
        (5, 0.85, {"test_accuracy": 0.9}),
    ]
    mx = final_summary("final", ["maximize"], rows)
    assert mx["winner"] == 5 and [g["trial"] for g in mx["groups"]] == [5, 2]
    assert mx["groups"][0]["value_sd"] is None  # one re-train: no SD
    assert mx["groups"][1]["test"] == {"test_accuracy": {"mean": 0.8, "sd": None}}
    assert final_summary("final", ["minimize"], rows)["winner"] == 2
    assert final_summary("final", ["minimize", "minimize"], rows)["winner"] is None


# -- the CLI and the page --------------------------------------------------------------------------
def _best_view(client: TestClient, auth: dict, db: Database, val_rmse: float) -> BestView:
    client.post("/v1/studies", json=study_body("cli"), headers=auth)
    st = _storage(client)
    run_trial(db, st, client, auth, "cli", 0.3)
    for of, v in ((0, 0.32), (0, 0.36)):
        number = run_trial(db, st, client, auth, "cli", v)
        _set_trial(db, "cli", number, final_of=of)
    _set_study(db, "cli", phase="final")
    _set_trial(
        db,
        "cli",
        0,
        info={"val": {"val_rmse": val_rmse}},
        test_metrics={"test_rmse": 1.3, "test_mae": 0.62},
    )
    sid = _study_id(db, TENANT, "cli")
    assert baselines.claim(db, study_id=sid, owner="w")
    baselines.store(db, study_id=sid, owner="w", result=FORECAST)
    return BestView.model_validate(client.get("/v1/studies/cli/best", headers=auth).json())


def test_cli_prints_baselines_verdict_and_final(
    client: TestClient, auth: dict, db: Database
) -> None:
    b = _best_view(client, auth, db, val_rmse=1.26)
    out = io.StringIO()
    print_best(b, out)
    text = out.getvalue()
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("MODEL"))
    assert lines[header].split() == ["MODEL", "VAL", "RMSE", "TEST", "RMSE", "TEST", "MASE"]
    assert lines[header + 1].split() == ["persistence", "0.9", "1", "2.58"]
    assert lines[header + 2].split() == ["AR(9)", "*", "0.38", "0.4", "0.97"]
    assert lines[header + 3].split() == ["trial", "0", "1.26", "1.3", "2"]  # 0.62 / 0.31
    assert "  skipped arima: did not converge" in lines
    assert b.verdict is not None and b.verdict["message"] in lines
    assert "does not beat the AR(9) baseline" in b.verdict["message"]
    assert "winner: trial 0 (2 re-trains); test metrics: test_rmse=0.374 ± 0.0311" in text
    tested = next(i for i, ln in enumerate(lines) if ln.startswith("test metrics: "))
    assert lines.index(b.verdict["message"]) > tested > 0  # after the params and test metrics
    # Still computing, or failed: one line says so.
    for stored, said in (
        (
            {"status": "computing", "owner": "w7", "since": "t"},
            "baselines: still computing (by w7 since t)",
        ),
        ({"status": "failed", "error": "boom"}, "baselines: failed: boom"),
    ):
        out = io.StringIO()
        print_best(b.model_copy(update={"baselines": stored, "verdict": None}), out)
        assert said in out.getvalue().splitlines()
    view = StudyView.model_validate(client.get("/v1/studies/cli", headers=auth).json())
    assert "vs ar rmse=0.38 NOT BEATEN" in status_line(
        view, ("val_rmse", 0.3, 0), verdict=b.verdict
    )


def test_ui_cells_warn_when_the_baseline_wins(client: TestClient, auth: dict, db: Database) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node to run the page's script")
    html = (Path(__file__).parents[1] / "service/ui/index.html").read_text()
    script = re.search(r"<script>(.*)</script>", html, re.S).group(1)  # type: ignore[union-attr]
    script = script.replace("refresh();\nsetInterval(refresh, 5000);", "")  # no polling
    b = _best_view(client, auth, db, val_rmse=1.26)
    study = client.get("/v1/studies/cli", headers=auth).json()
    best = json.loads(b.model_dump_json())
    beaten = {**best, "verdict": {**best["verdict"], "beats_baseline": True, "val_ratio": 0.5}}
    probe = (
        script + "\nconst [s, bs] = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        "console.log(JSON.stringify(bs.map((b) => baselineCell(s.baselines, b) + "
        "finalCell(b))));"
    )
    r = subprocess.run(
        [node, "-e", probe],
        input=json.dumps([study, [best, beaten]]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    warn, ok = json.loads(r.stdout)
    assert "baseline <b>AR(9)</b>: val rmse=0.38000" in warn
    assert 'class="badge">⚠ not beating baseline' in warn
    assert "does not beat the AR(9) baseline on validation" in warn
    assert "final: #0 won" in warn
    assert "badge" not in ok and "✓ beaten" in ok
