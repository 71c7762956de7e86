"""The table ``seqtune predict`` writes: one row per full input window, with the input's
time carried through to each forecast and, for classification, every class's probability.

The columns (``COLUMNS_HELP`` says the same to people, in ``seqtune predict --help``):

- ``last_input_row``: the 0-based data row (the header is not counted) of the window's last
  input; the model saw that row and the ``seq_len - 1`` rows before it.
- ``<time>``: the input's time column at that row, as read, when the input has one (found by
  ``find_time_column``, or named by ``--time-column``).
- Forecast, for each step h of the horizon: ``<time>_t+h``, the time the forecast is for:
  the last input's time plus h steps of the input's frequency, when the time column has a
  regular frequency (pandas' ``infer_freq`` for dates, a constant difference for numbers);
  otherwise ``row_t+h``, the row number the forecast stands for (``last_input_row + h``).
  Then ``<target>_t+h`` for each target, in the data's units.
- Classify: ``label``, the most probable class of the window's last step, and ``p_<class>``
  for each class the model knows: the softmax of its outputs (they sum to 1).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from worker.engine import Predictor

COLUMNS_HELP = """\
output: one row per full window of seq_len input rows, columns:
  last_input_row   the 0-based data row (header not counted) of the window's last input
  <time>           the input's time column at that row, when it has one (a text column of
                   dates, or a numeric one named like date/time/year...; or --time-column)
  forecast, for each step h = 1..horizon:
    <time>_t+h     when the forecast is for: <time> + h x the input's frequency, when the
                   time column is regular; else row_t+h = last_input_row + h
    <target>_t+h   the forecast of each target, in the data's units
  classify:
    label          the most probable class of the window's last row
    p_<class>      each class's probability (softmax of the model's outputs; they sum to 1)
"""

# Names of a numeric column that holds time rather than a measurement (a text column of
# dates is recognised by its values).
_TIME_NAMES = re.compile(
    r"(date|datetime|time|timestamp|ds|period|year|month|week|day)", re.IGNORECASE
)


def find_time_column(frame: pd.DataFrame, used: Sequence[str]) -> str | None:
    """The input's time column, or None: the first column the model does not read (not in
    ``used``) that is text parsing as dates throughout, else the first such numeric column
    whose name says time (date, time, timestamp, ds, period, year, month, week, day)."""
    free = [c for c in frame.columns if c not in set(used)]
    for c in free:
        if not pd.api.types.is_numeric_dtype(frame[c]) and _as_dates(frame[c]) is not None:
            return str(c)
    for c in free:
        if pd.api.types.is_numeric_dtype(frame[c]) and _TIME_NAMES.fullmatch(str(c).strip()):
            return str(c)
    return None


def _as_dates(col: pd.Series) -> pd.Series | None:
    """``col`` parsed as datetimes, or None when a value is missing or does not parse."""
    if col.isna().any() or len(col) == 0:
        return None
    for fmt in ("ISO8601", "mixed"):
        try:
            return pd.to_datetime(col, format=fmt)
        except (ValueError, TypeError, OverflowError):
            continue
    return None


@dataclass(frozen=True)
class Timeline:
    """The input's time: ``column`` (None: none); ``show(row)``, row ``row``'s time as the
    table shows it (text as read; whole numbers as integers); and, when the column is
    regular, ``at(row, h)``, the time h steps after row ``row``'s."""

    column: str | None
    show: Callable[[int], Any]
    at: Callable[[int, int], Any] | None


def timeline(frame: pd.DataFrame, column: str | None) -> Timeline:
    """How forecasts get their times from ``frame``'s ``column`` (see the module's words)."""
    if column is None:
        return Timeline(None, lambda row: None, None)
    col = frame[column]
    if pd.api.types.is_numeric_dtype(col):
        v = col.to_numpy(dtype=np.float64)
        whole = bool(np.isfinite(v).all() and np.all(v == np.round(v)))

        def number(t: float) -> Any:
            return int(t) if whole else float(t)

        d = np.diff(v)
        if len(d) and np.isfinite(d).all() and d[0] != 0 and np.allclose(d, d[0], rtol=1e-9):
            step = float(d[0])
            return Timeline(
                column, lambda row: number(v[row]), lambda row, h: number(v[row] + h * step)
            )
        return Timeline(column, lambda row: _plain(col.iloc[row]), None)

    def as_read(row: int) -> Any:
        return _plain(col.iloc[row])

    dates = _as_dates(col)
    if dates is None or len(dates) < 3:
        return Timeline(column, as_read, None)
    try:
        with warnings.catch_warnings():  # pandas 3 warns that it will return an offset: fine
            warnings.filterwarnings("ignore", message=".*infer_freq.*")
            freq = pd.infer_freq(pd.DatetimeIndex(dates))
    except (TypeError, ValueError):
        freq = None
    if freq is None:
        return Timeline(column, as_read, None)
    offset = pd.tseries.frequencies.to_offset(freq)
    days_only = dates.dt.tz is None and bool((dates == dates.dt.normalize()).all())

    def at_date(row: int, h: int) -> Any:
        t = dates.iloc[row] + h * offset
        return t.strftime("%Y-%m-%d") if days_only else t.isoformat()

    return Timeline(column, as_read, at_date)


def _plain(v: Any) -> Any:
    """A value as JSON and CSV show it: numpy scalars as Python ones, whole floats of a time
    column kept as they were read."""
    if isinstance(v, np.generic):
        return v.item()
    return v


def prediction_table(
    predictor: Predictor, frame: pd.DataFrame, *, time_column: str | None = None
) -> pd.DataFrame:
    """The predictions of every full window of ``frame`` (the columns of the module's
    docstring). ``time_column``: the input's time column (KeyError when ``frame`` lacks it);
    None finds one (``find_time_column``). ValueError from the model for bad input."""
    c = predictor.ckpt
    if time_column is not None and time_column not in frame.columns:
        raise KeyError(time_column)
    used = [*c["features"], *c["targets"]]
    column = time_column if time_column is not None else find_time_column(frame, used)
    line = timeline(frame, column)
    L = c["seq_len"]
    if c["task"] == "classify":
        proba = predictor.predict_proba(frame)
        classes = list(c["classes"])
        n = len(proba)
    else:
        pred = predictor.predict(frame)
        n = len(pred)
    rows: list[dict[str, Any]] = []
    for k in range(n):
        end = L - 1 + k  # the row of the window's last input
        row: dict[str, Any] = {"last_input_row": end}
        if column is not None:
            row[column] = line.show(end)
        if c["task"] == "classify":
            p = proba[k]
            row["label"] = _plain(classes[int(np.argmax(p))])
            for cls, pk in zip(classes, p, strict=True):
                row[f"p_{cls}"] = float(pk)
        else:
            for h in range(1, c["horizon"] + 1):
                if line.at is not None:
                    row[f"{column}_t+{h}"] = line.at(end, h)
                else:
                    row[f"row_t+{h}"] = end + h
                for j, tgt in enumerate(c["targets"]):
                    row[f"{tgt}_t+{h}"] = float(pred[k, h - 1, j])
        rows.append(row)
    return pd.DataFrame(rows)


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The table's rows as JSON-ready dicts (NaN as None)."""
    out = []
    for rec in table.to_dict(orient="records"):
        out.append(
            {
                str(k): None if isinstance(v, float) and math.isnan(v) else _plain(v)
                for k, v in rec.items()
            }
        )
    return out
