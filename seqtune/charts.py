"""Small plain-text line charts for the terminal (``seqtune trial``'s learning curve).

No dependency: characters only, so the chart reads the same in a log file, over ssh and in
CI output. Each series gets its own y scale (a loss and a metric in other units share one
chart): the first series is read on the left axis, the second on the right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MARKS = "*o"  # the first series' mark, the second's; '#' where both fall on one cell


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _scale(values: Sequence[float | None]) -> tuple[float, float, bool] | None:
    """(low, high, log) of the finite values; log when all are positive and span a factor of
    10 or more (a loss falling from 5 to 0.05 would otherwise be a flat line at the bottom).
    None when there is no finite value."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    log = lo > 0 and hi / lo >= 10
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    return lo, hi, log


def _label(v: float, log: bool) -> str:
    return f"{(10**v if log else v):.4g}"


def line_chart(
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    width: int = 60,
    height: int = 12,
    x_label: str = "epoch",
    mark: int | None = None,
) -> list[str]:
    """The lines of a chart of one or two series over the same x (0 .. n-1), ``width`` x
    ``height`` characters of plot area, axes and labels around it. A value that is None or not
    finite leaves a gap. ``mark``: an x to point at under the axis ('^'). Raises ValueError for
    no series or more than two."""
    if not 1 <= len(series) <= 2:
        raise ValueError("line_chart draws one or two series")
    n = max(len(values) for _, values in series)
    grid = [[" "] * width for _ in range(height)]
    scales = [_scale(values) for _, values in series]

    def col_of(x: float) -> int:
        return 0 if n < 2 else round(x * (width - 1) / (n - 1))

    for k, ((_, values), sc) in enumerate(zip(series, scales, strict=True)):
        if sc is None:
            continue
        lo, hi, log = sc

        def row_of(v: float, lo: float = lo, hi: float = hi, log: bool = log) -> int:
            y = math.log10(v) if log else v
            frac = 0.5 if hi == lo else (y - lo) / (hi - lo)
            return height - 1 - round(frac * (height - 1))

        prev: int | None = None
        for c in range(width):
            x = c * (n - 1) / (width - 1) if n > 1 else 0.0
            i = min(int(x), len(values) - 1)
            j = min(i + 1, len(values) - 1)
            a, b = values[i], values[j]
            if n > 1 and c != col_of(i) and not (_finite(a) and _finite(b)):
                prev = None  # between two points, one of them missing: a gap
                continue
            if n == 1 and c != width // 2:
                continue
            if not _finite(a):
                prev = None
                continue
            assert a is not None
            v = a if not _finite(b) or j == i else a + (x - i) * (b - a)  # type: ignore[operator]
            r = row_of(v)
            rows = range(min(prev, r), max(prev, r) + 1) if prev is not None else [r]
            for rr in rows:  # join a steep step to the column before it
                cell = grid[rr][c]
                grid[rr][c] = MARKS[k] if cell in (" ", MARKS[k]) else "#"
            prev = r

    def labels(k: int) -> list[str]:
        out = [""] * height
        if k < len(scales) and scales[k] is not None:
            lo, hi, log = scales[k]  # type: ignore[misc]
            if hi == lo:  # a constant: drawn on the middle row
                out[height // 2] = _label(lo, log)
                return out
            out[0], out[-1] = _label(hi, log), _label(lo, log)
            if height >= 5:
                out[height // 2] = _label(lo + (hi - lo) * (1 - (height // 2) / (height - 1)), log)
        return out

    left, right = labels(0), labels(1)
    lw = max(len(s) for s in left)
    lines = [
        f"{left[r].rjust(lw)} |{''.join(grid[r])}|" + (f" {right[r]}" if right[r] else "")
        for r in range(height)
    ]
    lines.append(" " * lw + " +" + "-" * width + "+")
    last = str(max(n - 1, 0))
    lines.append(" " * (lw + 2) + "0" + x_label.center(width - 1 - len(last)) + last)
    if mark is not None and 0 <= mark < n:
        lines.append(" " * (lw + 2 + col_of(mark)) + f"^ {x_label} {mark}")
    legend = "   ".join(
        f"{MARKS[k]} {name}"
        + (" (left" if k == 0 else " (right")
        + (", log)" if scales[k] is not None and scales[k][2] else ")")  # type: ignore[index]
        for k, (name, _) in enumerate(series)
    )
    if len(series) == 2:
        legend += "   # both"
    lines.append(" " * (lw + 2) + legend)
    return lines
