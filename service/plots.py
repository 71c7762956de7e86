"""Plots of a study drawn by Optuna's own visualisation: PNG (matplotlib) or HTML (plotly).

Each plot is titled with the study and the metric it shows. ``contour`` and ``parallel`` draw
the hyperparameters asked for, or by default the most important ones (``DEFAULT_PARAMS``), so
that a study of many hyperparameters still gives one readable picture; the PNG's axes are
thinned and labelled to stay legible.

Plots read the study's trials from Optuna's storage, which can take seconds: a plot is drawn
once and kept (``PlotCache``, one per process) until the study changes.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from seqtune.errors import Conflict, Invalid, NotFound
from seqtune.views import PLOT_KINDS, StudyView
from service.store import studies
from service.store.db import Database

_PYPLOT = threading.Lock()  # pyplot keeps global state: one figure at a time per process


@dataclass(frozen=True)
class _Plot:
    """How to draw one kind: Optuna's function (the same name in ``optuna.visualization`` and
    ``optuna.visualization.matplotlib``), what the study needs first, and the title's words."""

    function: str
    min_complete: int  # completed trials
    min_params: int  # searched hyperparameters
    what: str


# One row per kind of seqtune.views.PLOT_KINDS, in its order.
_PLOTS: dict[str, _Plot] = {
    "history": _Plot("plot_optimization_history", 1, 0, "optimization history"),
    "importance": _Plot("plot_param_importances", 4, 1, "hyperparameter importance"),
    "intermediate": _Plot("plot_intermediate_values", 1, 0, "per epoch"),
    "parallel": _Plot("plot_parallel_coordinate", 1, 1, "parallel coordinates"),
    "contour": _Plot("plot_contour", 2, 2, "contour"),
}
if tuple(_PLOTS) != PLOT_KINDS:  # a kind named in seqtune.views needs its row here, at import
    raise ImportError(f"service.plots draws {tuple(_PLOTS)}, the API names {PLOT_KINDS}")

# The kinds that take ``params``, and how many they draw without it: the most important
# hyperparameters first. Two make one contour panel (n of them make an n x n grid); five axes
# keep a parallel-coordinates plot readable.
DEFAULT_PARAMS: dict[str, int] = {"contour": 2, "parallel": 5}


def _function(module: Any, kind: str) -> Callable[..., Any]:
    """The function drawing ``kind`` in ``module`` (one of Optuna's visualization modules)."""
    fn: Callable[..., Any] = getattr(module, _PLOTS[kind].function)
    return fn


def _check(view: StudyView, kind: str, objective: int) -> None:
    if kind not in _PLOTS:
        raise Invalid(f"unknown plot '{kind}'; choose one of {', '.join(PLOT_KINDS)}")
    if not 0 <= objective < len(view.directions):
        raise NotFound(
            f"study '{view.name}' has no objective {objective}: its objectives are "
            f"0 to {len(view.directions) - 1}"
        )
    n_params = len(view.spec.get("search_space") or {})
    plot = _PLOTS[kind]
    if view.trials.complete < plot.min_complete:
        raise Conflict(
            f"the {kind} plot needs {plot.min_complete} completed trial(s); "
            f"'{view.name}' has {view.trials.complete} so far"
        )
    if n_params < plot.min_params:
        raise Conflict(
            f"the {kind} plot needs {plot.min_params} searched hyperparameter(s); "
            f"'{view.name}' searches {n_params}"
        )


def _checked_params(view: StudyView, kind: str, params: Sequence[str] | None) -> list[str] | None:
    """``params`` without repeats, checked against the study's search space; None for none.
    Invalid (naming the field ``query.params``) for a name the study does not search, for a
    kind that takes none, or for a contour of fewer than two."""
    if not params:
        return None
    chosen = list(dict.fromkeys(params))

    def invalid(reason: str) -> Invalid:
        return Invalid(reason, details=[{"field": "query.params", "reason": reason}])

    if kind not in DEFAULT_PARAMS:
        raise invalid(f"only the {' and '.join(DEFAULT_PARAMS)} plots take params")
    space = sorted(view.spec.get("search_space") or {})
    unknown = [p for p in chosen if p not in space]
    if unknown:
        raise invalid(
            f"'{view.name}' searches no {', '.join(repr(p) for p in unknown)}; "
            f"its hyperparameters are {', '.join(space)}"
        )
    if kind == "contour" and len(chosen) < 2:
        raise invalid("a contour plot needs two hyperparameters or more")
    return chosen


def _most_important(
    db: Database, storage: optuna.storages.BaseStorage, view: StudyView, objective: int, n: int
) -> tuple[list[str] | None, str]:
    """The ``n`` hyperparameters that matter most for ``objective`` (the importances of
    ``GET .../importance``) and how they were chosen, for the title; None (draw them all)
    when the study searches no more than ``n``. Before importances can be computed (too few
    completed trials), the first ``n`` by name."""
    space = sorted(view.spec.get("search_space") or {})
    if len(space) <= n:
        return None, ""
    try:
        ranked = list(
            studies.importance(
                db, storage, tenant=view.tenant, name=view.name, objective=objective
            ).importances
        )
    except Conflict:  # too few completed trials, or none that varies
        return space[:n], f"the first {n} of {len(space)} hyperparameters by name"
    chosen = (ranked + [p for p in space if p not in ranked])[:n]
    return chosen, f"the {n} most important of {len(space)} hyperparameters"


# -- the cache -----------------------------------------------------------------------------------
class PlotCache:
    """Drawn plots by (study, kind, format, objective, params), each kept with the state of
    the study it was drawn from (``state_of``) and served while the study is in that state.
    Bounded: the least recently used plots go first beyond ``max_entries`` or ``max_bytes``
    (an interactive HTML plot carries plotly.js, about 5 MB). One drawing per plot at a time:
    a request for a plot being drawn waits for it instead of drawing it again."""

    def __init__(self, max_entries: int = 64, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._lock = threading.Lock()  # guards the fields below
        self._entries: OrderedDict[Hashable, tuple[Hashable, bytes, str]] = OrderedDict()
        self._drawing: dict[Hashable, threading.Lock] = {}
        self._bytes = 0
        self.hits = self.misses = 0

    def get(
        self, key: Hashable, state: Hashable | None, draw: Callable[[], tuple[bytes, str]]
    ) -> tuple[bytes, str]:
        """The plot cached under ``key`` for ``state``, else ``draw()``'s, cached. With
        ``state`` None, always ``draw()`` (a plot that may change while the study's state
        does not), cached not at all."""
        if state is None:
            return draw()
        with self._lock:
            drawing = self._drawing.setdefault(key, threading.Lock())
        with drawing:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0] == state:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[1], entry[2]
                self.misses += 1
            try:
                body, media = draw()
                # Stored before the lock goes: a request arriving in between finds it.
                self._put(key, (state, body, media))
            finally:
                with self._lock:
                    self._drawing.pop(key, None)
        return body, media

    def _put(self, key: Hashable, entry: tuple[Hashable, bytes, str]) -> None:
        with self._lock:
            old = self._entries.pop(key, None)  # an older state's plot: it can never be served
            self._bytes -= len(old[1]) if old else 0
            if len(entry[1]) > self.max_bytes:
                return
            self._entries[key] = entry
            self._bytes += len(entry[1])
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped[1])

    def clear(self) -> None:
        """Forget every plot, and the counts of hits and misses."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = self.misses = 0


CACHE = PlotCache()


def state_of(view: StudyView, kind: str) -> Hashable | None:
    """What a plot of ``view`` was drawn from, as far as the study's record tells: its
    last change (``updated_at``: every claim, finished trial, status change and edit moves
    it) and its trial counts. None for a plot that changes without them: the intermediate
    values of a study with running trials grow at every epoch they report."""
    if kind == "intermediate" and view.trials.running:
        return None
    t = view.trials
    return (view.updated_at, t.complete, t.pruned, t.failed, t.running, t.waiting)


# -- drawing -------------------------------------------------------------------------------------
def render(
    storage: optuna.storages.BaseStorage,
    view: StudyView,
    kind: str,
    *,
    db: Database,
    fmt: str = "png",
    objective: int = 0,
    params: Sequence[str] | None = None,
    cache: PlotCache | None = CACHE,
) -> tuple[bytes, str]:
    """``(body, media type)`` of plot ``kind`` of the study, drawn from seqtune's trials (those
    ``/trials`` lists; see ``service.store.studies.seqtune_study``), from ``cache`` while the
    study has not changed since it was drawn (``state_of``; None: no cache).

    ``params``: the hyperparameters a ``contour`` or ``parallel`` plot draws (default: the
    ``DEFAULT_PARAMS[kind]`` most important). Raises Invalid (a bad format or ``params``),
    NotFound (no such objective) or Conflict (not enough trials or hyperparameters yet)."""
    if fmt not in ("png", "html"):
        raise Invalid("format must be 'png' or 'html'")
    _check(view, kind, objective)
    chosen = _checked_params(view, kind, params)

    def draw() -> tuple[bytes, str]:
        return _draw(storage, view, kind, db=db, fmt=fmt, objective=objective, params=chosen)

    if cache is None:
        return draw()
    params_key = tuple(chosen) if chosen else None
    key = (view.tenant, view.name, view.optuna_study_id, kind, fmt, objective, params_key)
    return cache.get(key, state_of(view, kind), draw)


def _intermediate_metric(view: StudyView) -> str:
    # What the worker reports each epoch (worker.objective.monitor_of): the first objective
    # when it is a validation metric, else the validation loss.
    first = str(view.spec["objectives"][0]["metric"])
    return first if first.startswith("val_") else "val_loss"


def _title(view: StudyView, kind: str, metric: str, params: list[str] | None, how: str) -> str:
    """'study · metric · what', and on a second line how the parameters were chosen when
    they were not asked for."""
    head = f"{view.name} · {metric} · {_PLOTS[kind].what}"
    if kind == "contour" and params is not None:
        head += " of " + " × ".join(sorted(params))  # as Optuna lays them out: x, then y
    return f"{head}\n({how}; pick others with --params)" if how else head


def _draw(
    storage: optuna.storages.BaseStorage,
    view: StudyView,
    kind: str,
    *,
    db: Database,
    fmt: str,
    objective: int,
    params: list[str] | None,
) -> tuple[bytes, str]:
    how = ""
    if params is None and kind in DEFAULT_PARAMS:
        params, how = _most_important(db, storage, view, objective, DEFAULT_PARAMS[kind])
    study = studies.seqtune_study(db, storage, view)  # seqtune's trials, as /trials and /best
    kw: dict[str, Any] = {}
    if kind == "intermediate":
        metric = _intermediate_metric(view)
    else:
        metric = str(view.spec["objectives"][objective]["metric"])
        kw["target_name"] = metric
        if len(view.directions) > 1:
            kw["target"] = lambda t: t.values[objective]
    if params is not None:
        kw["params"] = params
    title = _title(view, kind, metric, params, how)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks the matplotlib backend experimental
        try:
            if fmt == "html":
                return _html(study, kind, kw, title, metric), "text/html"
            return _png(study, kind, kw, title, metric), "image/png"
        except ValueError as exc:  # Optuna's: e.g. a parameter no completed trial has yet
            raise Conflict(f"the {kind} plot cannot be drawn yet: {exc}") from None


def _html(study: optuna.Study, kind: str, kw: dict[str, Any], title: str, metric: str) -> bytes:
    import optuna.visualization as pv

    fig = _function(pv, kind)(study, **kw)
    head, _, sub = title.partition("\n")
    fig.update_layout(title={"text": f"{head}<br><sup>{sub}</sup>" if sub else head})
    if kind == "intermediate":
        fig.update_layout(xaxis_title="epoch", yaxis_title=metric)
    return bytes(fig.to_html(include_plotlyjs=True, full_html=True).encode())


def _png(study: optuna.Study, kind: str, kw: dict[str, Any], title: str, metric: str) -> bytes:
    """The plot as a PNG image; its ``Title`` text chunk holds the title too."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # One style for every kind: Optuna's contour sets ggplot for the whole process, so the
    # other kinds would look one way or another depending on what was drawn before them.
    with _PYPLOT, plt.style.context("ggplot"):
        try:
            fig = _figure(study, kind, kw, title, metric)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, metadata={"Title": title})
        finally:
            plt.close("all")  # this figure, or what a failed drawing left behind
    return buf.getvalue()


def _figure(study: optuna.Study, kind: str, kw: dict[str, Any], title: str, metric: str) -> Any:
    """Optuna's matplotlib figure of ``kind``, titled, with readable labels, laid out.
    Call it holding ``_PYPLOT``."""
    import numpy as np
    import optuna.visualization.matplotlib as pm

    ax = _function(pm, kind)(study, **kw)
    if isinstance(ax, np.ndarray):  # a contour of n >= 3 parameters: an n x n grid
        fig = ax.flat[0].figure
        fig.suptitle(title)
        n = ax.shape[0]
        fig.set_size_inches(4 * n + 2, 3 * n + 1)  # each panel about 4 x 3 inches
        return fig  # laid out as drawn: tight_layout would put the colorbar over the panels
    fig = ax.figure
    for loc in ("left", "right"):  # Optuna titles some plots on the left
        ax.set_title("", loc=loc)
    ax.set_title(title, pad=14 if kind == "parallel" else 6)
    if kind == "parallel":
        _readable_parallel(ax)
    elif kind == "intermediate":
        _readable_intermediate(ax, metric)
    fig.set_size_inches(10, 6)
    fig.tight_layout()
    return fig


def _short(label: str, width: int = 14) -> str:
    """A label on lines of about ``width`` characters, broken after underscores."""
    lines = [""]
    for part in label.replace("_", "_\x00").split("\x00"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _readable_parallel(ax: Any) -> None:
    """Optuna's parallel coordinates (matplotlib) with labels that do not run into each
    other: the axis names level and wrapped, each vertical axis with at most five ticks in
    short numbers (no minor-tick labels on log axes) on a light background, and long
    category names cut."""
    from matplotlib import ticker

    names = [t.get_text() for t in ax.get_xticklabels()]
    ax.set_xticks(ax.get_xticks(), [_short(n) for n in names], rotation=0, ha="center")
    ax.tick_params(axis="x", labelsize=9)
    box = {"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.75, "linewidth": 0}
    compact = ticker.FuncFormatter(lambda v, _pos: f"{v:.3g}")
    for twin in ax.get_shared_x_axes().get_siblings(ax):
        if twin is ax:
            continue
        y = twin.yaxis
        twin.grid(False)  # each axis's own grid would cross the whole plot
        if isinstance(y.get_major_locator(), ticker.FixedLocator):  # categories, or "None"
            labels = [t.get_text() for t in twin.get_yticklabels()]
            ticks = list(twin.get_yticks())
            step = max(1, -(-len(ticks) // 8))
            twin.set_yticks(
                ticks[::step], [t if len(t) <= 12 else t[:11] + "…" for t in labels[::step]]
            )
        elif twin.get_yscale() == "log":
            low, high = sorted(twin.get_ylim())
            narrow = high < 100 * low  # within two decades: 1-2-5 ticks, else decades only
            y.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0) if narrow else (1.0,)))
            y.set_major_formatter(compact)
            y.set_minor_formatter(ticker.NullFormatter())
        else:
            y.set_major_locator(ticker.MaxNLocator(nbins=4))
            y.set_major_formatter(compact)
        twin.tick_params(axis="y", labelsize=8)
        for label in twin.get_yticklabels():
            label.set_bbox(box)


def _readable_intermediate(ax: Any, metric: str) -> None:
    """Epochs as whole numbers, the metric named, and no legend once it would list more
    trials than it can show."""
    from matplotlib import ticker

    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    legend = ax.get_legend()
    if legend is not None and len(legend.get_texts()) > 15:
        legend.remove()
