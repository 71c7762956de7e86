"""Plots of a study drawn by Optuna's own visualisation: PNG (matplotlib) or HTML (plotly).

Plots read the study's trials from Optuna's storage: meant for people, not for hot paths.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from seqtune.errors import Conflict, Invalid, NotFound
from seqtune.views import PLOT_KINDS, StudyView
from service.store.db import Database
from service.store.studies import seqtune_study

_PYPLOT = threading.Lock()  # pyplot keeps global state: one figure at a time per process


@dataclass(frozen=True)
class _Plot:
    """How to draw one kind: Optuna's function (the same name in ``optuna.visualization`` and
    ``optuna.visualization.matplotlib``) and what the study needs first."""

    function: str
    min_complete: int  # completed trials
    min_params: int  # searched hyperparameters


# One row per kind of seqtune.views.PLOT_KINDS, in its order.
_PLOTS: dict[str, _Plot] = {
    "history": _Plot("plot_optimization_history", 1, 0),
    "importance": _Plot("plot_param_importances", 4, 1),
    "intermediate": _Plot("plot_intermediate_values", 1, 0),
    "parallel": _Plot("plot_parallel_coordinate", 1, 1),
    "contour": _Plot("plot_contour", 2, 2),
}
if tuple(_PLOTS) != PLOT_KINDS:  # a kind named in seqtune.views needs its row here, at import
    raise ImportError(f"service.plots draws {tuple(_PLOTS)}, the API names {PLOT_KINDS}")


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


def render(
    storage: optuna.storages.BaseStorage,
    view: StudyView,
    kind: str,
    *,
    db: Database,
    fmt: str = "png",
    objective: int = 0,
) -> tuple[bytes, str]:
    """``(body, media type)`` of plot ``kind`` of the study, drawn from seqtune's trials (those
    ``/trials`` lists; see ``service.store.studies.seqtune_study``). Raises Invalid, NotFound (no
    such objective) or Conflict (not enough trials or hyperparameters yet)."""
    if fmt not in ("png", "html"):
        raise Invalid("format must be 'png' or 'html'")
    _check(view, kind, objective)
    study = seqtune_study(db, storage, view)  # seqtune's trials, as /trials and /best
    kw: dict[str, Any] = {}
    if kind != "intermediate" and len(view.directions) > 1:
        metric = view.spec["objectives"][objective]["metric"]
        kw = {"target": lambda t: t.values[objective], "target_name": metric}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks the matplotlib backend experimental
        if fmt == "html":
            import optuna.visualization as pv

            fig = _function(pv, kind)(study, **kw)
            return fig.to_html(include_plotlyjs=True, full_html=True).encode(), "text/html"
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as pm

        with _PYPLOT:
            ax = _function(pm, kind)(study, **kw)
            fig = _figure_of(ax)
            buf = io.BytesIO()
            try:
                fig.set_size_inches(10, 6)
                fig.tight_layout()
                fig.savefig(buf, format="png", dpi=100)
            finally:
                plt.close(fig)
    return buf.getvalue(), "image/png"


def _figure_of(ax: Any) -> Any:
    """Optuna returns an Axes, or an array of Axes (contour with several params)."""
    import numpy as np

    if isinstance(ax, np.ndarray):
        return ax.flat[0].figure
    return ax.figure
