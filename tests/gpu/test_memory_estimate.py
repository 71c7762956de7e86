"""The memory-aware policy's estimate against the peak the engine measures on the GPU,
trial after trial in one process as in a slot: within 25% for every shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def test_the_estimate_is_within_a_quarter_of_the_measured_peak() -> None:
    # A process of its own: the peak counts everything allocated in the process, and the
    # other tests' tensors and library workspaces are not a slot's.
    done = subprocess.run(
        [sys.executable, "-m", "tests.gpu.peaks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 12
    table = "\n".join(
        f"{r['name']:>13} {r['precision']} estimate {r['estimate'] / 2**20:9.1f} MiB, "
        f"peak {r['peak'] / 2**20:9.1f} MiB, ratio {r['estimate'] / r['peak']:.2f}"
        for r in rows
    )
    print(table)
    assert all(r["reason"] == "max_epochs" for r in rows), rows
    off = [r for r in rows if abs(r["estimate"] / r["peak"] - 1) > 0.25]
    assert not off, "estimate off by more than 25%:\n" + table
