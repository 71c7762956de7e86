"""The memory-aware policy for several trials per GPU: the estimate's parts and the shared
ledger. (The estimate against measured peaks needs a GPU: see BENCHMARKS.md.)"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker import datasets
from worker.engine import Hyper
from worker.gpu_memory import Ledger, Shape, estimate_bytes, param_count, shape_of
from worker.preprocessing import prepare


@pytest.mark.parametrize(
    "hidden,layers,n_in,n_out,bi", [(8, 1, 1, 1, False), (64, 2, 3, 2, False), (32, 3, 2, 4, True)]
)
def test_param_count_matches_torch(
    hidden: int, layers: int, n_in: int, n_out: int, bi: bool
) -> None:
    lstm = torch.nn.LSTM(n_in, hidden, layers, bidirectional=bi, batch_first=True)
    head = torch.nn.Linear(hidden * (2 if bi else 1), n_out)
    real = sum(p.numel() for p in [*lstm.parameters(), *head.parameters()])
    assert (
        param_count(
            Shape(
                hidden=hidden,
                layers=layers,
                seq_len=10,
                batch=4,
                n_in=n_in,
                n_out=n_out,
                bidirectional=bi,
            )
        )
        == real
    )


def test_estimate_grows_with_every_dimension_and_shrinks_in_half_precision() -> None:
    base = Shape(hidden=64, layers=1, seq_len=50, batch=64, n_windows=10_000)
    e = estimate_bytes(base)
    for field, bigger in (
        ("hidden", 128),
        ("layers", 2),
        ("seq_len", 100),
        ("batch", 128),
        ("n_windows", 40_000),
        ("bidirectional", True),
    ):
        assert estimate_bytes(dataclasses.replace(base, **{field: bigger})) > e, field
    assert estimate_bytes(dataclasses.replace(base, half=True)) < e
    # a large model dominated by its saved activations: about B*L*layers*6H*4 bytes of them
    big = Shape(hidden=512, layers=2, seq_len=200, batch=256)
    assert estimate_bytes(big) > 256 * 200 * 2 * 6 * 512 * 4


def test_shape_of_a_prepared_trial() -> None:
    data = prepare(
        datasets.builtin("sunspots"),
        task="forecast",
        seq_len=12,
        horizon=2,
        fractions=(0.7, 0.15, 0.15),
    )
    s = shape_of(Hyper(hidden_size=32, num_layers=2, batch_size=16), data, "cpu")
    assert (s.hidden, s.layers, s.seq_len, s.batch, s.n_in, s.n_out) == (32, 2, 12, 16, 1, 2)
    assert s.n_windows == len(data.train.x) + len(data.val.x) + len(data.test.x)
    assert not s.half and shape_of(Hyper(), data, "cuda").half  # auto precision on a GPU


def test_ledger_admits_only_what_fits_and_forgets_dead_slots(tmp_path: Path) -> None:
    me = os.getpid()
    a = Ledger(tmp_path / "0.json", capacity=1000)
    b = Ledger(tmp_path / "0.json", capacity=1000)  # another slot on the same GPU
    assert a.reserve(f"{me}:0", 600)
    assert not b.reserve(f"{me}:1", 500)  # 600 + 500 > 1000: wait
    assert b.reserve(f"{me}:1", 400)
    assert a.reserved() == 1000
    a.release(f"{me}:0")
    assert b.reserve(f"{me}:2", 600)
    assert not a.fits_at_all(1001) and a.fits_at_all(1000)
    # a slot process that died holding a reservation does not hold it any more
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    c = Ledger(tmp_path / "1.json", capacity=1000)
    assert c.reserve(f"{dead}:0", 900)
    assert c.reserve(f"{me}:0", 900)
    assert c.reserved() == 900
