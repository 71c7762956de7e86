"""Classical baselines per study: the store side (claim, store, fail) and the verdict.

A worker computes a study's baselines (persistence, seasonal naive, mean, ETS, AR, ARIMA; for
classification majority and logistic) once, and this module keeps them on the study row in
``seqtune_studies.baselines``. The column moves through::

    NULL --claim--> {"status": "computing", "owner", "since"}
         --store--> {**result, "status": "done"}
      or --fail---> {"status": "failed", "error"}

A "computing" marker older than ``stale_after_s`` (its worker died) can be claimed again; a
failed one is not retried automatically (set the column back to NULL to retry). Every write is
one compare-and-set UPDATE, so any number of workers may race on it, on Postgres and SQLite.

``verdict`` compares the best trial with the best baseline on validation (the baselines' "best"
is chosen on validation too, so the comparison never peeks at the test split).
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, and_, or_, update

from seqtune.states import BaselinesStatus
from seqtune.views import TrialView, baseline_label
from service.store.db import Database
from service.store.tables import Study

log = logging.getLogger(__name__)

_STUDIES: Table = Study.__table__  # type: ignore[assignment]  # Core table: one-statement CAS
_B = _STUDIES.c.baselines
_b_status = _B["status"].as_string()
_b_owner = _B["owner"].as_string()
_b_since = _B["since"].as_string()

# Per task: the validation metric compared, whether higher is better, and the trial's keys.
_METRIC = {
    "forecast": ("rmse", False),
    "classify": ("accuracy", True),
}
_ADVICE = {
    "forecast": "widen the search (target_transform, seq_len)",
    "classify": "widen the search (seq_len, hidden_size, epochs)",
}


def _iso(ts: datetime) -> str:
    """A fixed-width UTC ISO time, so that string order is time order (the stale test in
    ``claim`` compares them in SQL, where JSON gives strings on both databases)."""
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None: Postgres' JSONB rejects them, and a
    MAPE over a series that touches zero is infinite."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def claim(db: Database, *, study_id: int, owner: str, stale_after_s: float = 900) -> bool:
    """Take the job of computing the study's baselines. True when this caller got it.

    Succeeds when the column is NULL, or holds a "computing" marker older than
    ``stale_after_s`` (its owner is presumed dead); never over "done" or "failed". Exactly one
    of any number of concurrent callers wins: a single UPDATE ... WHERE (on Postgres the loser
    re-checks the WHERE against the winner's committed row; SQLite serialises writers).
    False for an unknown study too.
    """
    now = datetime.now(UTC)
    cutoff = _iso(now - timedelta(seconds=stale_after_s))
    marker = {"status": BaselinesStatus.COMPUTING, "owner": owner, "since": _iso(now)}
    stmt = (
        update(_STUDIES)
        .where(
            _STUDIES.c.id == study_id,
            or_(
                _B.is_(None),
                and_(
                    _b_status == BaselinesStatus.COMPUTING,
                    or_(_b_since.is_(None), _b_since < cutoff),
                ),
            ),
        )
        .values(baselines=marker)
    )

    def write(conn: Connection) -> bool:
        return conn.execute(stmt).rowcount == 1

    return db.write(write)


def store(db: Database, *, study_id: int, owner: str, result: dict[str, Any]) -> None:
    """Save the computed baselines as ``{**result, "status": "done"}``.

    Written only while ``owner`` still holds the "computing" marker, or the column is NULL or
    "failed"; otherwise (another worker re-claimed a stale marker, or stored first) nothing
    changes. Non-finite floats are stored as null.
    """
    value = _finite({**result, "status": BaselinesStatus.DONE})
    stmt = (
        update(_STUDIES)
        .where(
            _STUDIES.c.id == study_id,
            or_(
                _B.is_(None),
                _b_status == BaselinesStatus.FAILED,
                and_(_b_status == BaselinesStatus.COMPUTING, _b_owner == owner),
            ),
        )
        .values(baselines=value)
    )

    def write(conn: Connection) -> None:
        if conn.execute(stmt).rowcount != 1:
            log.info(
                "baselines of study %s not stored by %s: no longer its marker", study_id, owner
            )

    db.write(write)


def fail(db: Database, *, study_id: int, owner: str, error: str) -> None:
    """Record that computing the baselines failed: ``{"status": "failed", "error": ...}``
    (the first 2,000 characters), so the study view says why. Not retried automatically.

    Written only while ``owner`` holds the "computing" marker (or the column is NULL): never
    over finished baselines or another worker's claim.
    """
    value = {"status": BaselinesStatus.FAILED, "error": error[:2000]}
    stmt = (
        update(_STUDIES)
        .where(
            _STUDIES.c.id == study_id,
            or_(
                _B.is_(None),
                and_(_b_status == BaselinesStatus.COMPUTING, _b_owner == owner),
            ),
        )
        .values(baselines=value)
    )

    def write(conn: Connection) -> None:
        if conn.execute(stmt).rowcount != 1:
            log.info(
                "baselines failure of study %s not recorded by %s: no longer its marker",
                study_id,
                owner,
            )

    db.write(write)


def _num(v: Any) -> float | None:
    """``v`` as a finite float, or None (missing, null, NaN, not a number)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b != 0 else None


def verdict(baselines: dict[str, Any] | None, trial: TrialView, task: str) -> dict[str, Any] | None:
    """The best trial against the best baseline, on validation.

    Forecast compares the trial's ``info["val"]["val_rmse"]`` with the best baseline's
    ``val.rmse`` (lower is better); classify compares ``val_accuracy`` with ``val.accuracy``
    (higher is better). Returns::

        {"baseline": "ar", "baseline_label": "AR(9)", "metric": "rmse",
         "higher_is_better": false, "beats_baseline": bool,
         "trial_val": x, "baseline_val": y, "val_ratio": x / y | null,
         "trial_test": trial test_rmse | null, "baseline_test": baseline test rmse | null,
         "test_ratio": trial_test / baseline_test | null,
         "trial_test_mase": test_mae / mase_scale | null,      # forecast only, else null
         "baseline_test_mase": baseline test mase | null,      # forecast only, else null
         "beats_on_test": bool | null, "message": str}

    "beats" means strictly better. None when the baselines are missing or not "done", name no
    usable best model, or either side lacks the validation metric.
    """
    if not baselines or baselines.get("status") != BaselinesStatus.DONE or task not in _METRIC:
        return None
    metric, higher = _METRIC[task]
    name = baselines.get("best")
    if not isinstance(name, str):
        return None
    model = (baselines.get("models") or {}).get(name)
    if not model:
        return None
    trial_val = _num((trial.info.get("val") or {}).get(f"val_{metric}"))
    base_val = _num((model.get("val") or {}).get(metric))
    if trial_val is None or base_val is None:
        return None
    tm = trial.test_metrics or {}
    trial_test = _num(tm.get(f"test_{metric}"))
    base_test = _num((model.get("test") or {}).get(metric))

    def better(a: float, b: float) -> bool:
        return a > b if higher else a < b

    beats = better(trial_val, base_val)
    beats_test = (
        better(trial_test, base_test) if trial_test is not None and base_test is not None else None
    )
    trial_mase = base_mase = None
    if task == "forecast":
        scale = _num(baselines.get("mase_scale"))
        trial_mase = _ratio(_num(tm.get("test_mae")), scale if scale and scale > 0 else None)
        base_mase = _num((model.get("test") or {}).get("mase"))
    val_ratio, test_ratio = _ratio(trial_val, base_val), _ratio(trial_test, base_test)
    shown = metric.upper() if metric == "rmse" else metric
    name_s = baseline_label(name, baselines)
    if beats:
        msg = (
            f"Beats the best classical baseline ({name}) on validation: {shown} "
            f"{trial_val:.3g} vs {base_val:.3g}"
            + (f" (ratio {val_ratio:.2f})" if val_ratio is not None else "")
        )
        if test_ratio is not None:
            msg += f"; on test {test_ratio:.2f}"
            if beats_test is False:
                msg += " (not better than the baseline on test)"
        msg += "."
    else:
        msg = (
            f"The best trial does not beat the {name_s} baseline on validation ({shown} "
            f"{trial_val:.3g} vs {base_val:.3g}): prefer the baseline, or "
            f"{_ADVICE[task]}."
        )
    return {
        "baseline": name,
        "baseline_label": name_s,
        "metric": metric,
        "higher_is_better": higher,
        "beats_baseline": beats,
        "trial_val": trial_val,
        "baseline_val": base_val,
        "val_ratio": val_ratio,
        "trial_test": trial_test,
        "baseline_test": base_test,
        "test_ratio": test_ratio,
        "trial_test_mase": trial_mase,
        "baseline_test_mase": base_mase,
        "beats_on_test": beats_test,
        "message": msg,
    }
