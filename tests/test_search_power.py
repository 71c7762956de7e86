"""Search power (issue 16): conditional spaces, constraints and automatic stopping, through the
REST API, the store as a worker drives it, and a real worker slot training real LSTMs."""

from __future__ import annotations

import signal
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient

from seqtune.commands import status_line
from seqtune.spec import StudySpec
from seqtune.views import StudyView
from service.settings import Settings
from service.store import leases
from service.store.db import Database
from service.store.optuna import optuna_study
from tests.conftest import run_trial, study_body


def _storage(client: TestClient):  # type: ignore[no-untyped-def]
    return client.app.state.seqtune.storage  # type: ignore[attr-defined]


def _run_slot(settings: Settings) -> int:
    """A real worker slot, in this process, until no trial is left (``--burst``)."""
    from worker.slot import Slot, SlotConfig

    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return Slot(SlotConfig(burst=True, threads=1), settings).run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


# Small, fast trials on sunspots (a few seconds each on one core).
_FAST = {"max_epochs": 3, "seq_len": 8, "batch_size": 64}

CONDITIONAL = {
    "hidden_size": {"type": "int", "low": 4, "high": 16},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd", "rmsprop"]},
    "momentum": {
        "type": "float",
        "low": 0.5,
        "high": 0.99,
        "when": {"optimizer": ["sgd", "rmsprop"]},
    },
    "nesterov": {"type": "categorical", "choices": [False, True], "when": {"optimizer": ["sgd"]}},
    "scheduler": {"type": "categorical", "choices": ["none", "exponential"]},
    "scheduler_gamma": {
        "type": "float",
        "low": 0.8,
        "high": 0.99,
        "when": {"scheduler": ["exponential"]},
    },
}


def _post(client: TestClient, auth: dict, body: dict[str, Any]) -> Any:
    return client.post("/v1/studies", json=body, headers=auth)


def _fields(r: Any) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {d["field"]: d["reason"] for d in r.json()["error"]["details"]}


# -- conditional spaces ---------------------------------------------------------------------


def test_conditions_are_checked_at_submit(client: TestClient, auth: dict) -> None:
    def space(**over: Any) -> dict[str, Any]:
        return {**CONDITIONAL, **over}

    cases = [
        (  # the parent is not searched
            space(momentum={"type": "float", "low": 0.5, "high": 0.9, "when": {"loss": ["mse"]}}),
            "search_space.momentum.when.loss",
            "not searched",
        ),
        (  # the parent is a range
            space(
                momentum={"type": "float", "low": 0.5, "high": 0.9, "when": {"hidden_size": [8]}}
            ),
            "search_space.momentum.when.hidden_size",
            "must be categorical",
        ),
        (  # a value the parent never takes
            space(
                momentum={
                    "type": "float",
                    "low": 0.5,
                    "high": 0.9,
                    "when": {"optimizer": ["lbfgs"]},
                }
            ),
            "search_space.momentum.when.optimizer[0]",
            "not one of optimizer's choices",
        ),
        (  # a cycle through two parameters
            space(
                optimizer={
                    "type": "categorical",
                    "choices": ["adam", "sgd"],
                    "when": {"scheduler": ["none"]},
                },
                scheduler={
                    "type": "categorical",
                    "choices": ["none", "step"],
                    "when": {"optimizer": ["adam"]},
                },
            ),
            "search_space.optimizer.when",
            "cycle",
        ),
    ]
    for s, field, words in cases:
        got = _fields(_post(client, auth, study_body("c", search_space=s)))
        assert field in got and words in got[field], got
    # the parent fixed: the condition would be constant
    body = study_body(
        "c", search_space={"momentum": CONDITIONAL["momentum"]}, fixed={"optimizer": "sgd"}
    )
    assert "is fixed" in _fields(_post(client, auth, body))["search_space.momentum.when.optimizer"]


def test_a_conditional_space_runs_define_by_run_on_a_real_worker(
    client: TestClient, auth: dict, settings: Settings
) -> None:
    body = study_body(
        "cond", search_space=CONDITIONAL, fixed=_FAST, budget={"n_trials": 8}, sampler={"seed": 3}
    )
    r = _post(client, auth, body)
    assert r.status_code == 201, r.text
    # Grouped, multivariate TPE models the conditional space: the stored spec says so.
    assert r.json()["spec"]["sampler"]["options"] == {"multivariate": True, "group": True}
    assert _run_slot(settings) == 8
    trials = client.get("/v1/studies/cond/trials?limit=100", headers=auth).json()["items"]
    assert len(trials) == 8 and all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    seen_optimizers = set()
    for t in trials:
        p = t["params"]
        seen_optimizers.add(p["optimizer"])
        assert ("momentum" in p) == (p["optimizer"] in ("sgd", "rmsprop")), p
        assert ("nesterov" in p) == (p["optimizer"] == "sgd"), p
        assert ("scheduler_gamma" in p) == (p["scheduler"] == "exponential"), p
        searched = set(CONDITIONAL)
        assert set(t["inactive"]) == searched - set(p), (t["inactive"], p)
    assert len(seen_optimizers) >= 2  # both branches of the condition were searched
    # Optuna holds the same params: inactive parameters are absent there too.
    spec = StudySpec.model_validate(r.json()["spec"])
    ostudy = optuna_study(_storage(client), r.json()["optuna_study_name"], spec)
    by_number = {t["number"]: t["params"] for t in trials}
    for ft in ostudy.get_trials(deepcopy=False):
        assert ft.params == by_number[ft.number]


def test_enqueue_and_grid_respect_conditions(client: TestClient, auth: dict, db: Database) -> None:
    space = {
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "momentum": {
            "type": "float",
            "low": 0.5,
            "high": 0.9,
            "step": 0.4,
            "when": {"optimizer": ["sgd"]},
        },
    }
    assert _post(client, auth, study_body("q", search_space=space)).status_code == 201
    bad = client.post(
        "/v1/studies/q/trials",
        json={"params": {"optimizer": "adam", "momentum": 0.9}},
        headers=auth,
    )
    got = _fields(bad)
    assert "inactive" in got["params.momentum"] and "optimizer in ['sgd']" in got["params.momentum"]
    ok = client.post(
        "/v1/studies/q/trials", json={"params": {"optimizer": "sgd", "momentum": 0.9}}, headers=auth
    )
    assert ok.status_code == 201, ok.text

    # A grid over a conditional space holds each configuration once: adam (momentum inactive)
    # and sgd with each momentum, 3 points, not the 4 of the full product.
    body = study_body("g", search_space=space, sampler={"name": "grid"}, budget={"n_trials": 3})
    assert _post(client, auth, body).status_code == 201, body
    st = _storage(client)
    params = []
    for _ in range(3):
        n = run_trial(db, st, client, auth, "g", 1.0)
        params.append(client.get(f"/v1/studies/g/trials/{n}", headers=auth).json()["params"])
    got_points = sorted((p["optimizer"], p.get("momentum")) for p in params)
    assert got_points == [("adam", None), ("sgd", 0.5), ("sgd", 0.9)], got_points
    # The grid itself holds 3 points: Optuna's product would hold 4 (adam twice).
    from seqtune.search import make_sampler
    from seqtune.spec import parse_spec

    assert len(make_sampler(parse_spec(body))._all_grids) == 3  # type: ignore[attr-defined]


# -- constraints ----------------------------------------------------------------------------


def test_constraints_are_checked_at_submit(client: TestClient, auth: dict) -> None:
    limit = [{"metric": "param_count", "max": 1000}]
    got = _fields(
        _post(client, auth, study_body("k", constraints=limit, sampler={"name": "random"}))
    )
    assert "cannot take constraints" in got["sampler.name"] and "'tpe'" in got["sampler.name"]
    got = _fields(
        _post(client, auth, study_body("k", constraints=[{"metric": "val_accuracy", "min": 0.5}]))
    )
    assert "does not apply" in got["constraints[0].metric"]
    r = _post(client, auth, study_body("k", constraints=[{"metric": "param_count"}]))
    assert r.status_code == 422 and "max, min or both" in r.text
    for sampler in ("tpe", "nsga2", "gp"):
        ok = _post(
            client, auth, study_body(f"k-{sampler}", constraints=limit, sampler={"name": sampler})
        )
        assert ok.status_code == 201, ok.text


def _finish(db: Database, st: Any, name: str, value: float, violations: list[float]) -> int:
    """A trial claimed and finished as a worker does, with measured constraint violations."""
    c = leases.claim(db, st, owner="w", studies=[name])
    assert c is not None
    spec = StudySpec.model_validate(c.spec)
    ostudy = optuna_study(st, c.optuna_study_name, spec)
    leases.finish(
        db,
        ostudy=ostudy,
        claim=c,
        state="COMPLETE",
        values=[value] * len(spec.objectives),
        reason="max_epochs",
        constraints=violations,
    )
    return c.number


def test_an_infeasible_trial_is_never_best_nor_on_the_front(
    client: TestClient, auth: dict, db: Database
) -> None:
    body = study_body("f", constraints=[{"metric": "param_count", "max": 5000}])
    assert _post(client, auth, body).status_code == 201
    st = _storage(client)
    assert client.get("/v1/studies/f/best", headers=auth).status_code == 409
    n_bad = _finish(db, st, "f", 0.5, [100.0])  # the lowest value, but too big
    r = client.get("/v1/studies/f/best", headers=auth)
    assert r.status_code == 409 and "meets its constraints" in r.text
    n_ok = _finish(db, st, "f", 0.9, [-10.0])
    best = client.get("/v1/studies/f/best", headers=auth).json()["best"]
    assert best["number"] == n_ok and best["feasible"] is True
    bad = client.get(f"/v1/studies/f/trials/{n_bad}", headers=auth).json()
    assert bad["feasible"] is False
    # The sampler saw the violations: Optuna's constraints system attribute, set by its
    # constraints_func at the tell.
    view = client.get("/v1/studies/f", headers=auth).json()
    trials = optuna.load_study(study_name=view["optuna_study_name"], storage=st).trials
    assert {t.number: t.system_attrs.get("constraints") for t in trials} == {
        n_bad: (100.0,),
        n_ok: (-10.0,),
    } or {t.number: list(t.system_attrs.get("constraints")) for t in trials} == {
        n_bad: [100.0],
        n_ok: [-10.0],
    }

    # Two objectives: an infeasible trial that dominates everything stays off the front.
    body = study_body(
        "pf",
        objectives=[{"metric": "val_rmse"}, {"metric": "param_count"}],
        constraints=[{"metric": "train_seconds", "max": 60}],
        sampler={"name": "nsga2"},
    )
    assert _post(client, auth, body).status_code == 201, body
    n_bad = _finish(db, st, "pf", 0.1, [5.0])
    n_ok = _finish(db, st, "pf", 0.9, [0.0])  # exactly at the bound: met
    front = client.get("/v1/studies/pf/best", headers=auth).json()["pareto_front"]
    assert [t["number"] for t in front] == [n_ok] and n_bad != n_ok


def test_constraints_on_a_real_worker(client: TestClient, auth: dict, settings: Settings) -> None:
    """param_count of an LSTM grows with hidden_size: a bound between the range's ends makes
    some trials infeasible; the worker measures it, the best is a feasible one."""
    body = study_body(
        "fw",
        search_space={"hidden_size": {"type": "int", "low": 2, "high": 40}},
        fixed=_FAST,
        budget={"n_trials": 3},
        sampler={"name": "tpe", "seed": 1},
        constraints=[{"metric": "param_count", "max": 1000}],
    )
    assert _post(client, auth, body).status_code == 201
    for h in (4, 40):  # one that fits (about 300 weights), one that does not (about 7,000)
        r = client.post("/v1/studies/fw/trials", json={"params": {"hidden_size": h}}, headers=auth)
        assert r.status_code == 201, r.text
    assert _run_slot(settings) == 3
    trials = client.get("/v1/studies/fw/trials", headers=auth).json()["items"]
    done = [t for t in trials if t["state"] == "COMPLETE"]
    assert done
    for t in done:
        count = t["info"]["param_count"]
        assert t["feasible"] is (count <= 1000), t
        assert t["info"]["constraints"] == [count - 1000.0]
    by_size = {t["params"]["hidden_size"]: t for t in done}
    assert by_size[4]["feasible"] is True and by_size[40]["feasible"] is False
    feasible = [t for t in done if t["feasible"]]
    best = client.get("/v1/studies/fw/best", headers=auth).json()["best"]
    assert best["feasible"] is True
    assert best["value"] == min(t["value"] for t in feasible)


# -- automatic stopping ---------------------------------------------------------------------


def test_no_improvement_stops_the_study_with_its_reason(
    client: TestClient, auth: dict, db: Database
) -> None:
    rule = {"no_improvement_trials": 3, "min_delta": 0.05, "min_trials": 2}
    body = study_body("stop", budget={"n_trials": 20, "stop_when": rule})
    assert _post(client, auth, body).status_code == 201
    st = _storage(client)
    # 5.0 best; 4.0 improves; 3.98 improves by less than min_delta (no reset); 4.5 no;
    # a pruned trial counts as one without improvement: the third in a row stops the study.
    for v in (5.0, 4.0, 3.98, 4.5):
        run_trial(db, st, client, auth, "stop", v)
    view = client.get("/v1/studies/stop", headers=auth).json()
    assert view["status"] == "running" and view["stop_reason"] is None
    run_trial(db, st, client, auth, "stop", 1.0, state="PRUNED")
    view = client.get("/v1/studies/stop", headers=auth).json()
    assert view["status"] == "completed", view
    assert "no improvement larger than 0.05 in the last 3" in view["stop_reason"]
    assert "stopped after 5 of 20 trials" in view["stop_reason"]
    line = status_line(StudyView.model_validate(view), None)  # the CLI's status shows why
    assert "stopped early: no improvement larger than 0.05" in line, line
    assert leases.claim(db, st, owner="w", studies=["stop"]) is None  # nothing more starts
    # More budget: the search goes on, the count starts again.
    r = client.patch("/v1/studies/stop", json={"n_trials": 8}, headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "running"
    assert r.json()["stop_reason"] is None
    run_trial(db, st, client, auth, "stop", 9.0)
    assert client.get("/v1/studies/stop", headers=auth).json()["status"] == "running"


def test_stop_when_needs_one_objective(client: TestClient, auth: dict) -> None:
    body = study_body(
        "st2",
        objectives=[{"metric": "val_rmse"}, {"metric": "param_count"}],
        budget={"stop_when": {"no_improvement_trials": 3}},
    )
    assert "single objective" in _fields(_post(client, auth, body))["budget.stop_when"]
    r = _post(client, auth, study_body("st3", budget={"stop_when": {}}))
    assert r.status_code == 422 and "no_improvement_trials" in r.text


def test_a_real_worker_stops_a_study_whose_improvements_dried_up(
    client: TestClient, auth: dict, settings: Settings
) -> None:
    """min_delta larger than any possible gain: after the first trial, none improves."""
    rule = {"no_improvement_trials": 2, "min_delta": 1e9, "min_trials": 1}
    body = study_body(
        "dry",
        search_space={"hidden_size": {"type": "int", "low": 4, "high": 16}},
        fixed=_FAST,
        budget={"n_trials": 10, "stop_when": rule},
    )
    assert _post(client, auth, body).status_code == 201
    assert _run_slot(settings) == 3
    view = client.get("/v1/studies/dry", headers=auth).json()
    assert view["status"] == "completed" and view["trials"]["finished"] == 3
    assert view["stop_reason"].startswith("no improvement larger than 1e+09 in the last 2")


@pytest.mark.timeout(180)
def test_the_regret_bound_stops_a_converged_study() -> None:
    """Optuna's Terminator through worker.stopping, on a study that converges (TPE on a
    quadratic bowl): it says nothing before min_trials, goes on while the best value still
    moves, and says stop once the regret bound has shrunk below the estimated error."""
    from seqtune.spec import StopWhen
    from worker import stopping

    rule = StopWhen(regret_bound=True, min_trials=10)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))

    def bowl(t: optuna.Trial) -> float:
        return t.suggest_float("x", -5, 5) ** 2 + t.suggest_float("y", -5, 5) ** 2

    study.optimize(bowl, n_trials=9)
    assert not stopping.judge(study, rule, seed=0).stop  # below min_trials
    study.optimize(bowl, n_trials=11)
    assert not stopping.judge(study, rule, seed=0).stop  # 20 trials: still improving
    for _ in range(10):
        study.optimize(bowl, n_trials=10)
        verdict = stopping.judge(study, rule, seed=0)
        if verdict.stop:
            break
    assert verdict.stop, len(study.trials)
    assert "regret bound" in verdict.reason and verdict.seconds > 0


def test_every_slot_shuffles_a_seeded_grid_alike() -> None:
    """A trial's grid_id indexes the sampler's shuffled grid: slots seeded apart (per-slot
    seed offsets) must still shuffle it alike, or two slots would suggest one point under two
    grid ids and the grid would never be covered."""
    from seqtune.search import make_sampler
    from seqtune.spec import parse_spec
    from service.store.optuna import _seeded

    spec = parse_spec(
        study_body(
            "gs",
            sampler={"name": "grid", "seed": 5},
            search_space={"hidden_size": {"type": "int", "low": 8, "high": 64, "step": 8}},
        )
    )
    grids = [make_sampler(_seeded(spec, offset))._all_grids for offset in range(3)]  # type: ignore[attr-defined]
    assert grids[0] == grids[1] == grids[2]


def test_a_study_others_fine_tune_from_is_not_deleted_under_them(
    client: TestClient, auth: dict, db: Database
) -> None:
    from seqtune.spec import parse_spec
    from service.store import studies

    assert _post(client, auth, study_body("src")).status_code == 201
    tenant = client.get("/v1/studies/src", headers=auth).json()["tenant"]
    spec = parse_spec(study_body("ft", init_from={"study": "src", "trial": 0}))
    studies.create_study(db, _storage(client), tenant=tenant, spec=spec)
    r = client.delete("/v1/studies/src", headers=auth)
    assert r.status_code == 409 and "['ft']" in r.text, r.text
    client.patch("/v1/studies/ft", json={"status": "stopped"}, headers=auth)
    assert client.delete("/v1/studies/src", headers=auth).status_code == 204


def test_a_regret_bound_stop_through_a_real_worker_spares_the_final_phase(
    client: TestClient, auth: dict, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot asks worker.stopping after each completed search trial and stops the search
    when it says so; a stop never cuts the final phase short (the last search trial starts it
    in the same tell, and the judgement comes after). The judgement itself is stubbed here to
    always say stop (its own test is above): what is tested is what the slot does with it."""
    from worker import stopping

    calls: list[int] = []

    def always(ostudy: optuna.Study, rule: Any, *, seed: int | None = None) -> Any:
        calls.append(len(ostudy.trials))
        return stopping.Judgement(True, 0.0, "the test says stop")

    monkeypatch.setattr(stopping, "judge", always)
    body = study_body(
        "rb",
        search_space={"hidden_size": {"type": "int", "low": 4, "high": 16}},
        fixed=_FAST,
        budget={"n_trials": 2, "stop_when": {"regret_bound": True, "min_trials": 1}},
        final={"top_k": 1, "seeds": 2},
    )
    assert _post(client, auth, body).status_code == 201
    # Trial 0 completes; the judgement stops the search (1 of 2 trials); the final phase
    # then re-trains the best configuration twice. Nothing asks after the re-trains.
    assert _run_slot(settings) == 3
    view = client.get("/v1/studies/rb", headers=auth).json()
    assert view["status"] == "completed" and view["phase"] == "final", view
    assert view["stop_reason"].startswith("the test says stop; stopped after 1 of 2"), view
    assert len(calls) == 1
    best = client.get("/v1/studies/rb/best", headers=auth).json()
    assert best["final"]["winner"] == 0 and best["final"]["groups"][0]["n"] == 2


def test_a_regret_bound_stop_after_the_last_search_trial_leaves_the_final_phase_alone(
    client: TestClient, auth: dict, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One search trial only: its tell starts the final phase, and the judgement that follows
    must leave the re-trains alone (it used to shrink the budget and end the study)."""
    from worker import stopping

    monkeypatch.setattr(
        stopping, "judge", lambda *a, **k: stopping.Judgement(True, 0.0, "the test says stop")
    )
    body = study_body(
        "rb1",
        search_space={"hidden_size": {"type": "int", "low": 4, "high": 16}},
        fixed=_FAST,
        budget={"n_trials": 1, "stop_when": {"regret_bound": True, "min_trials": 1}},
        final={"top_k": 1, "seeds": 2},
    )
    assert _post(client, auth, body).status_code == 201
    assert _run_slot(settings) == 3
    view = client.get("/v1/studies/rb1", headers=auth).json()
    assert view["status"] == "completed" and view["trials"]["complete"] == 3, view
    assert view["stop_reason"] is None


def test_tpe_options_of_a_conditional_space(client: TestClient, auth: dict) -> None:
    """multivariate and group are added only when the study set neither; group without
    multivariate is a 422 (Optuna refuses it when the sampler is built, in every worker)."""
    r = _post(
        client,
        auth,
        study_body(
            "o1",
            search_space=CONDITIONAL,
            sampler={"name": "tpe", "options": {"multivariate": False}},
        ),
    )
    assert r.status_code == 201 and r.json()["spec"]["sampler"]["options"] == {
        "multivariate": False
    }
    got = _fields(
        _post(client, auth, study_body("o2", sampler={"name": "tpe", "options": {"group": True}}))
    )
    assert "needs multivariate" in got["sampler.options.group"]
    body = study_body("o3", search_space={}, budget={"stop_when": {"regret_bound": True}})
    assert "searches none" in _fields(_post(client, auth, body))["budget.stop_when.regret_bound"]
