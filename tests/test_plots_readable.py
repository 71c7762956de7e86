"""Plots a person can read: titles that name the study and the metric, contour and parallel
plots of the hyperparameters asked for (or the most important ones), parallel coordinates
whose labels do not run into each other, and a plot drawn once until the study changes."""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import matplotlib
import optuna
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from seqtune.client import ApiError, Client
from service import plots
from service.store import studies
from service.store.db import Database
from tests.conftest import run_trial, study_body

matplotlib.use("Agg")

SPACE: dict[str, Any] = {
    "hidden_size": {"type": "int", "low": 8, "high": 256, "log": True},
    "lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "optimizer": {"type": "categorical", "choices": ["adam", "adamw", "rmsprop", "sgd"]},
    "scheduler": {
        "type": "categorical",
        "choices": ["none", "plateau", "exponential", "step", "cosine"],
    },
    "batch_size": {"type": "int", "low": 16, "high": 512, "log": True},
    "scheduler_step_size": {"type": "int", "low": 1, "high": 100},
}
N_TRIALS = 12


def _value(p: dict[str, Any]) -> float:
    """The metric: mostly the learning rate's distance from 1e-3, a little the hidden size."""
    return abs(math.log10(p["lr"]) + 3) + 0.05 * math.log2(p["hidden_size"])


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    plots.CACHE.clear()
    yield
    plots.CACHE.clear()


@pytest.fixture
def storage(client: TestClient) -> optuna.storages.BaseStorage:
    return client.app.state.seqtune.storage  # type: ignore[attr-defined]


@pytest.fixture
def eight(client: TestClient, db: Database, storage: Any, auth: dict[str, str]) -> str:
    """A study searching 8 hyperparameters, with N_TRIALS completed trials."""
    body = study_body(
        "eight", search_space=SPACE, budget={"n_trials": 40}, sampler={"name": "random", "seed": 3}
    )
    r = client.post("/v1/studies", json=body, headers=auth)
    assert r.status_code == 201, r.text
    for _ in range(N_TRIALS):
        run_trial(db, storage, client, auth, "eight", _value)
    return "eight"


def _png_title(body: bytes) -> str:
    img = Image.open(io.BytesIO(body))
    assert img.format == "PNG" and img.size[0] >= 800
    return str(img.info["Title"])


def _html_title(body: bytes) -> str:
    """The figure's title: the one title of plotly's figure JSON (axes and colorbars have
    theirs) that names the study."""
    found = re.findall(rb'"title":\{"text":"((?:[^"\\]|\\.)*)"', body)
    titles = [str(json.loads(b'"' + t + b'"')) for t in found]
    main = [t for t in titles if "eight" in t]
    assert len(main) == 1, titles
    return main[0]


def _axes_of(html: bytes) -> list[str]:
    """The axes of a plotly parallel-coordinates plot (Optuna draws them as x ticks)."""
    m = re.search(rb'"ticktext":(\[[^\]]*\]),"tickvals"', html)
    assert m, "no axes"
    return list(json.loads(m.group(1)))


def test_every_plot_is_titled_with_the_study_and_its_metric(
    client: TestClient, auth: dict[str, str], eight: str
) -> None:
    for kind in ("history", "importance", "intermediate", "parallel", "contour"):
        png = client.get(f"/v1/studies/{eight}/plots/{kind}", headers=auth)
        html = client.get(f"/v1/studies/{eight}/plots/{kind}?format=html", headers=auth)
        assert png.status_code == html.status_code == 200, (kind, png.text, html.text)
        for title in (_png_title(png.content), _html_title(html.content)):
            assert title.startswith("eight · val_rmse · "), (kind, title)
        if kind == "intermediate":  # its axes were "Step" and "Intermediate Value"
            assert b'"text":"val_rmse"' in html.content and b'"text":"epoch"' in html.content


def test_contour_and_parallel_default_to_the_most_important_parameters(
    client: TestClient, db: Database, storage: Any, auth: dict[str, str], eight: str
) -> None:
    ranked = list(client.get(f"/v1/studies/{eight}/importance", headers=auth).json()["importances"])
    top2 = " × ".join(sorted(ranked[:2]))
    r = client.get(f"/v1/studies/{eight}/plots/contour", headers=auth)
    title = _png_title(r.content)
    assert f"contour of {top2}\n(the 2 most important of 8 hyperparameters" in title, title
    assert title.endswith("; pick others with --params)")
    # one panel, not an 8 x 8 grid: the plotly figure has one pair of axes
    html = client.get(f"/v1/studies/{eight}/plots/contour?format=html", headers=auth).content
    assert b'"xaxis":{' in html and b'"xaxis2":{' not in html
    html = client.get(f"/v1/studies/{eight}/plots/parallel?format=html", headers=auth).content
    assert _axes_of(html) == ["val_rmse", *sorted(ranked[:5])]
    # Before importances can be computed (4 completed trials): the first by name, and said so.
    body = study_body("few", search_space=SPACE, sampler={"name": "random", "seed": 1})
    assert client.post("/v1/studies", json=body, headers=auth).status_code == 201
    for _ in range(3):
        run_trial(db, storage, client, auth, "few", _value)
    title = _png_title(client.get("/v1/studies/few/plots/contour", headers=auth).content)
    assert "contour of batch_size × dropout\n(the first 2 of 8 hyperparameters by name" in title


def test_params_choose_what_contour_and_parallel_draw(
    client: TestClient, key: str, eight: str
) -> None:
    api = Client("http://testserver", key=key, http=client)
    title = _png_title(api.plot(eight, "contour", params=["optimizer", "dropout", "lr"]))
    assert "contour of dropout × lr × optimizer" in title and "most important" not in title
    html = api.plot(eight, "contour", fmt="html", params=["optimizer", "dropout", "lr"])
    assert b'"xaxis9":{' in html and b'"xaxis10":{' not in html  # a 3 x 3 grid
    html = api.plot(eight, "parallel", fmt="html", params=["scheduler_step_size", "lr"])
    assert _axes_of(html) == ["val_rmse", "lr", "scheduler_step_size"]
    # Unknown names are named, with the ones the study has; 422 on field query.params.
    with pytest.raises(ApiError) as e:
        api.plot(eight, "parallel", params=["lr", "momentum", "lr_decay"])
    assert e.value.status == 422 and e.value.details[0]["field"] == "query.params"
    assert "searches no 'momentum', 'lr_decay'" in e.value.message
    assert "batch_size, dropout, hidden_size" in e.value.message
    with pytest.raises(ApiError) as e:
        api.plot(eight, "contour", params=["lr"])
    assert e.value.status == 422 and "two hyperparameters" in e.value.message
    with pytest.raises(ApiError) as e:
        api.plot(eight, "history", params=["lr"])
    assert e.value.status == 422 and "only the contour and parallel plots" in e.value.message


def _overlapping(texts: list[Any], renderer: Any) -> list[tuple[str, str]]:
    shown = [t for t in texts if t.get_visible() and t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in shown]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def test_parallel_coordinates_labels_do_not_overlap(
    client: TestClient, db: Database, storage: Any, key: str, eight: str
) -> None:
    """All eight hyperparameters at once, the worst case: no axis name runs into another, and
    no tick label into another on the same axis."""
    import matplotlib.pyplot as plt

    view = studies.get_study(db, tenant="acme", name=eight)
    study = studies.seqtune_study(db, storage, view)
    kw = {"params": sorted(SPACE), "target_name": "val_rmse"}
    fig = plots._figure(study, "parallel", kw, "title", "val_rmse")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        main = fig.axes[0]
        assert [t.get_text().replace("\n", "") for t in main.get_xticklabels()] == [
            "val_rmse",
            *sorted(SPACE),
        ]
        assert _overlapping(list(main.get_xticklabels()), renderer) == []
        twins = [a for a in main.get_shared_x_axes().get_siblings(main) if a is not main]
        assert len(twins) == len(SPACE)
        for twin in twins:
            low, high = sorted(twin.get_ylim())
            labels = [  # those drawn: a locator also gives ticks beyond the axis's ends
                t
                for t in [*twin.get_yticklabels(), *twin.get_yticklabels(minor=True)]
                if low <= t.get_position()[1] <= high
            ]
            assert _overlapping(labels, renderer) == []
            assert 2 <= sum(1 for t in labels if t.get_text()) <= 8
    finally:
        plt.close("all")


def test_a_plot_is_drawn_once_until_a_trial_finishes(
    client: TestClient,
    db: Database,
    storage: Any,
    auth: dict[str, str],
    eight: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drawn: list[str] = []
    real = plots._draw

    def counting(*args: Any, **kw: Any) -> tuple[bytes, str]:
        drawn.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(plots, "_draw", counting)
    url = f"/v1/studies/{eight}/plots/contour"
    first = client.get(url, headers=auth)
    second = client.get(url, headers=auth)
    assert first.status_code == second.status_code == 200
    assert second.content == first.content and drawn == ["contour"]
    assert (plots.CACHE.hits, plots.CACHE.misses) == (1, 1)
    # Another format, or other params, is another plot.
    client.get(url + "?params=lr,dropout", headers=auth)
    client.get(url + "?format=html", headers=auth)
    assert drawn == ["contour"] * 3
    # A finished trial changes the study: the next request draws again, with it.
    run_trial(db, storage, client, auth, eight, 0.01)
    third = client.get(url, headers=auth)
    assert third.status_code == 200 and third.content != first.content
    assert drawn == ["contour"] * 4
    assert client.get(url, headers=auth).content == third.content and len(drawn) == 4


def test_intermediate_values_of_running_trials_are_not_cached(
    client: TestClient, auth: dict[str, str], eight: str, db: Database
) -> None:
    view = studies.get_study(db, tenant="acme", name=eight)
    assert plots.state_of(view, "intermediate") is not None  # nothing running: cached
    running = view.model_copy(update={"trials": view.trials.model_copy(update={"running": 1})})
    assert plots.state_of(running, "intermediate") is None
    assert plots.state_of(running, "contour") != plots.state_of(view, "contour")


def test_the_cache_is_bounded() -> None:
    cache = plots.PlotCache(max_entries=2, max_bytes=10)
    for k in ("a", "b", "c"):
        cache.get(k, 1, lambda k=k: (k.encode() * 3, "x"))
    assert cache.get("a", 1, lambda: (b"new", "x"))[0] == b"new"  # "a" went first
    assert cache.get("c", 1, lambda: (b"no", "x"))[0] == b"ccc"
    assert cache.get("c", 2, lambda: (b"c2", "x"))[0] == b"c2"  # another state: drawn again
    cache.get("big", 1, lambda: (b"x" * 11, "x"))  # over max_bytes: served, not kept
    assert cache.get("big", 1, lambda: (b"again", "x"))[0] == b"again"
