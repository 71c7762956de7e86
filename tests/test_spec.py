"""The study schema: examples accepted; every kind of mistake answered with field and reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from seqtune import catalog
from seqtune.errors import Invalid
from seqtune.hparams import HPARAMS
from seqtune.spec import IntRange, check_spec, load_spec_file, parse_spec
from tests.conftest import study_body

EXAMPLES = sorted(Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted(path: Path) -> None:
    spec = load_spec_file(path)
    assert spec.budget.n_trials >= 1


def test_sunspots_example_ships() -> None:
    assert any(p.name == "sunspots.yaml" for p in EXAMPLES)


def problems(body: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(Invalid) as info:
        check_spec(parse_spec(body))
    return {d["field"]: d["reason"] for d in info.value.details}


def test_every_unsearched_hyperparameter_is_fixed_to_a_default() -> None:
    spec = parse_spec(study_body(fixed={"max_epochs": 7}))
    config = spec.fixed_config()
    assert set(config) | set(spec.search_space) == set(HPARAMS)
    assert config["max_epochs"] == 7 and config["num_layers"] == HPARAMS["num_layers"].default


@pytest.mark.parametrize(
    "space, field, words",
    [
        ({"units": {"type": "int", "low": 1, "high": 4}}, "search_space.units", "unknown"),
        (
            {"hidden_size": {"type": "int", "low": 64, "high": 8}},
            "search_space.hidden_size",
            "low (64) must be <= high",
        ),
        (
            {"lr": {"type": "float", "low": 0, "high": 1, "log": True}},
            "search_space.lr",
            "log=true needs low > 0",
        ),
        (
            {"optimizer": {"type": "categorical", "choices": []}},
            "search_space.optimizer.choices",
            "at least 1",
        ),
        (
            {"optimizer": {"type": "categorical", "choices": ["adam", "lbfgs"]}},
            "search_space.optimizer.choices[1]",
            "must be one of",
        ),
        (
            {"hidden_size": {"type": "int", "low": 8, "high": 10**8}},
            "search_space.hidden_size.high",
            "between",
        ),
        (
            {"hidden_size": {"type": "float", "low": 8, "high": 9}},
            "search_space.hidden_size.type",
            "integer",
        ),
        (
            {"bidirectional": {"type": "int", "low": 0, "high": 1}},
            "search_space.bidirectional.type",
            "categorical",
        ),
        (
            {"hidden_size": {"type": "int", "low": "big", "high": 9}},
            "search_space.hidden_size.low",
            "integer",
        ),
        ({"lr": {"type": "gaussian", "low": 1, "high": 2}}, "search_space.lr", "tag"),
    ],
)
def test_search_space_errors_name_the_field(space: dict, field: str, words: str) -> None:
    found = problems(study_body(search_space=space))
    assert field in found, found
    assert words in found[field]


@pytest.mark.parametrize(
    "over, field, words",
    [
        ({"fixed": {"lr": 0.1}}, "fixed.lr", "searched and fixed"),
        ({"fixed": {"dropout": 5}}, "fixed.dropout", "between"),
        ({"fixed": {"nonsense": 1}}, "fixed.nonsense", "unknown hyperparameter"),
        ({"objectives": [{"metric": "val_accuracy"}]}, "objectives[0].metric", "does not apply"),
        ({"objectives": [{"metric": "bleu"}]}, "objectives[0].metric", "unknown metric"),
        (
            {
                "objectives": [{"metric": "val_rmse"}, {"metric": "param_count"}],
                "pruner": {"name": "median"},
            },
            "pruner.name",
            "single objective",
        ),
        (
            {"sampler": {"name": "tpe", "options": {"n_startup": 3}}},
            "sampler.options.n_startup",
            "takes no option",
        ),
        (
            {"sampler": {"name": "tpe", "options": {"n_startup_trials": -1}}},
            "sampler.options.n_startup_trials",
            "between",
        ),
        ({"sampler": {"name": "annealing"}}, "sampler.name", "Input should be"),
        ({"pruner": {"name": "percentile"}}, "pruner.options.percentile", "needs option"),
        ({"pruner": {"name": "threshold"}}, "pruner.options", "lower"),
        (
            {"pruner": {"name": "median", "wrapped": {"name": "median"}}},
            "pruner.wrapped",
            "patient",
        ),
        ({"sampler": {"name": "grid"}}, "search_space.lr", "step or choices"),
        ({"splits": {"train": 0.5, "val": 0.1, "test": 0.1}}, "splits", "must be 1"),
        ({"budget": {"n_trials": 0}}, "budget.n_trials", "greater than or equal to 1"),
        ({"budget": {"n_trials": 10**30}}, "budget.n_trials", "less than or equal"),
        ({"budget": {"n_trials": "ten"}}, "budget.n_trials", "integer"),
        ({"dataset": {"kind": "builtin", "name": "mnist"}}, "dataset.name", "unknown built-in"),
        (
            {"dataset": {"kind": "synthetic", "generator": "sine", "options": {"freq": 2}}},
            "dataset.options.freq",
            "takes",
        ),
        ({"dataset": {"kind": "synthetic", "generator": "parity"}}, "task", "supports"),
        ({"target": ["nope"]}, "target[0]", "no column"),
        ({"name": "bad name!"}, "name", "pattern"),
        ({"name": "é" * 5}, "name", "pattern"),
        ({"name": "x" * 200}, "name", "pattern"),
        ({"extra_field": 1}, "extra_field", "not permitted"),
        (
            {
                "task": "classify",
                "dataset": {"kind": "synthetic", "generator": "parity"},
                "objectives": [{"metric": "val_accuracy"}],
                "horizon": 3,
            },
            "horizon",
            "horizon 1",
        ),
    ],
)
def test_definition_errors_name_the_field(over: dict, field: str, words: str) -> None:
    found = problems(study_body(**over))
    assert field in found, found
    assert words in found[field], found[field]


def test_several_problems_are_reported_together() -> None:
    found = problems(study_body(fixed={"nonsense": 1}, objectives=[{"metric": "bleu"}]))
    assert {"fixed.nonsense", "objectives[0].metric"} <= set(found)


def test_multi_objective_without_pruner_is_accepted() -> None:
    spec = parse_spec(
        study_body(
            objectives=[{"metric": "val_rmse"}, {"metric": "param_count"}],
            pruner={"name": "none"},
            sampler={"name": "nsga2"},
        )
    )
    check_spec(spec)
    assert spec.directions == ["minimize", "minimize"]


def test_default_pruner_is_hyperband_sized_from_max_epochs() -> None:
    spec = parse_spec(study_body(fixed={"max_epochs": 60}))
    assert spec.pruner.name == "hyperband"
    assert spec.pruner.options == {"min_resource": 3, "max_resource": 60, "reduction_factor": 3}
    searched = parse_spec(
        study_body(search_space={"max_epochs": {"type": "int", "low": 10, "high": 400}})
    )
    assert searched.pruner.options["max_resource"] == 400
    assert searched.pruner.options["min_resource"] == 20
    short = parse_spec(study_body(fixed={"max_epochs": 20}))
    assert short.pruner.options["min_resource"] == 3  # never rank after fewer than 3 epochs
    tiny = parse_spec(study_body(fixed={"max_epochs": 2}))
    assert tiny.pruner.options["min_resource"] == 2  # nor more than a trial can run
    unset = parse_spec(study_body())
    assert unset.pruner.options["max_resource"] == HPARAMS["max_epochs"].default
    # the resolved pruner is stored: re-reading the dump changes nothing
    again = parse_spec(unset.model_dump(mode="json"))
    assert again.pruner == unset.pruner


def test_default_pruner_with_several_objectives_is_none() -> None:
    spec = parse_spec(study_body(objectives=[{"metric": "val_rmse"}, {"metric": "param_count"}]))
    check_spec(spec)
    assert spec.pruner.name == "none"


def test_explicit_pruner_is_kept_and_hyperband_gets_max_resource() -> None:
    median = parse_spec(study_body(pruner={"name": "median"}, fixed={"max_epochs": 30}))
    assert median.pruner.name == "median" and median.pruner.options == {}
    hb = parse_spec(
        study_body(
            pruner={"name": "hyperband", "options": {"min_resource": 2}}, fixed={"max_epochs": 30}
        )
    )
    assert hb.pruner.options == {"min_resource": 2, "max_resource": 30}
    auto = parse_spec(study_body(pruner={"name": "hyperband", "options": {"max_resource": "auto"}}))
    assert auto.pruner.options == {"max_resource": "auto"}


def test_catalog_metrics_have_valid_directions() -> None:
    assert all(d in ("minimize", "maximize") for d, _ in catalog.METRICS.values())


def test_a_study_naming_no_space_gets_the_default_space_sized_from_the_data() -> None:
    co2 = parse_spec({"name": "c", "dataset": {"kind": "builtin", "name": "co2"}})
    check_spec(co2)
    assert co2.space_defaulted and co2.objectives[0].metric == "val_rmse"
    space = co2.search_space
    assert {
        "hidden_size",
        "num_layers",
        "dropout",
        "lr",
        "batch_size",
        "seq_len",
        "target_transform",
    } <= set(space)
    seq = space["seq_len"]
    assert isinstance(seq, IntRange) and seq.high == 128  # min(128, 1599 // 5)
    sun = parse_spec({"name": "s", "dataset": {"kind": "builtin", "name": "sunspots"}})
    assert sun.search_space["seq_len"].high == (216 - 1) // 5  # type: ignore[union-attr]
    # Stored, so the study view shows it; a re-read spec keeps it as given.
    again = parse_spec(json.loads(co2.model_dump_json()))
    assert again.search_space == co2.search_space and not again.space_defaulted
    # Fixed hyperparameters are left out; an explicit empty space searches nothing.
    fixed = parse_spec(
        {"name": "f", "dataset": {"kind": "builtin", "name": "co2"}, "fixed": {"seq_len": 52}}
    )
    assert "seq_len" not in fixed.search_space
    none = parse_spec(
        {"name": "n", "dataset": {"kind": "builtin", "name": "co2"}, "search_space": {}}
    )
    assert none.search_space == {}
    clf = parse_spec(
        {"name": "k", "task": "classify", "dataset": {"kind": "synthetic", "generator": "parity"}}
    )
    assert "target_transform" not in clf.search_space
    assert clf.objectives[0].metric == "val_loss"


def test_walk_forward_sizes_the_pruner_over_every_fold_and_checks_are_named() -> None:
    wf = parse_spec(
        {
            "name": "w",
            "dataset": {"kind": "builtin", "name": "sunspots"},
            "fixed": {"max_epochs": 40},
            "validation": {"scheme": "walk_forward", "folds": 4},
        }
    )
    assert wf.n_folds == 4 and wf.pruner.options["max_resource"] == 160
    with pytest.raises(Invalid) as exc:
        check_spec(
            parse_spec(
                {
                    "name": "k",
                    "task": "classify",
                    "dataset": {"kind": "synthetic", "generator": "parity"},
                    "fixed": {"target_transform": "diff"},
                }
            )
        )
    assert exc.value.details[0]["field"] == "fixed.target_transform"
    with pytest.raises(Invalid) as exc:
        check_spec(
            parse_spec(
                {
                    "name": "m",
                    "dataset": {"kind": "builtin", "name": "sunspots"},
                    "objectives": [{"metric": "val_rmse"}, {"metric": "param_count"}],
                    "final": {"top_k": 2, "seeds": 3},
                }
            )
        )
    assert exc.value.details[0]["field"] == "final"
