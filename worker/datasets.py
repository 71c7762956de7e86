"""The datasets a study can name: built-in series, seeded synthetic generators, uploads.

Every loader returns a ``pandas.DataFrame`` in time order: numeric columns, plus a ``label``
column for classification sets. Names match ``seqtune.catalog`` (a test keeps them in step).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seqtune import catalog
from seqtune.spec import BuiltinData, SyntheticData, UploadedData


def sunspots() -> pd.DataFrame:
    """Yearly sunspot numbers 1700-2008, shipped with statsmodels (no download)."""
    import statsmodels.api as sm

    data = sm.datasets.sunspots.load_pandas().data
    return data[["SUNACTIVITY"]].reset_index(drop=True).astype("float64")


def co2() -> pd.DataFrame:
    """Weekly Mauna Loa CO2 1958-2001 (statsmodels), with its 59 missing weeks as NaN."""
    import statsmodels.api as sm

    return sm.datasets.co2.load_pandas().data[["co2"]].reset_index(drop=True).astype("float64")


def elnino() -> pd.DataFrame:
    """Monthly El Nino sea surface temperatures 1950-2010 (statsmodels), one row per month."""
    import statsmodels.api as sm

    wide = sm.datasets.elnino.load_pandas().data.drop(columns="YEAR")
    return pd.DataFrame({"sst": wide.to_numpy(dtype=np.float64).ravel()})


def realgdp() -> pd.DataFrame:
    """Quarterly US real GDP 1959-2009 (statsmodels macrodata): a trending series."""
    import statsmodels.api as sm

    data = sm.datasets.macrodata.load_pandas().data
    return data[["realgdp"]].reset_index(drop=True).astype("float64")


def sine(n: int, rng: np.random.Generator, n_components: float = 3, noise: float = 0.1
         ) -> pd.DataFrame:
    t = np.arange(n, dtype=np.float64)
    y = np.zeros(n)
    for _ in range(int(n_components)):
        period = rng.uniform(8, 200)
        y += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    return pd.DataFrame({"y": y + noise * rng.standard_normal(n)})


def mackey_glass(n: int, rng: np.random.Generator, tau: float = 17, noise: float = 0.0
                 ) -> pd.DataFrame:
    """dx/dt = 0.2 x(t-tau) / (1 + x(t-tau)^10) - 0.1 x(t), Euler steps of 0.1, sampled at 1."""
    tau_i, sub = int(tau), 10
    hist = tau_i * sub
    x = np.empty(n * sub + hist)
    x[:hist] = 1.2 + 0.1 * rng.standard_normal(hist)
    for i in range(hist, len(x)):
        lag = x[i - hist]
        x[i] = x[i - 1] + 0.1 * (0.2 * lag / (1 + lag**10) - 0.1 * x[i - 1])
    series = x[hist::sub][:n]
    return pd.DataFrame({"x": series + noise * rng.standard_normal(n)})


def ar(n: int, rng: np.random.Generator, n_series: float = 3, order: float = 3,
       noise: float = 0.5) -> pd.DataFrame:
    """A stable VAR(order) process: coefficients rescaled until the companion matrix's spectral
    radius is below 0.95."""
    k, p = int(n_series), int(order)
    coefs = rng.standard_normal((p, k, k)) / (k * p)
    companion = np.zeros((k * p, k * p))
    companion[:k] = np.concatenate(list(coefs), axis=1)
    companion[k:, :-k] = np.eye(k * (p - 1))
    radius = max(abs(np.linalg.eigvals(companion)))
    if radius >= 0.95:
        coefs *= 0.9 / radius
    x = np.zeros((n + 100, k))
    for t in range(p, n + 100):
        x[t] = sum(coefs[j] @ x[t - 1 - j] for j in range(p)) + noise * rng.standard_normal(k)
    return pd.DataFrame(x[100:], columns=[f"x{i}" for i in range(k)])


def parity(n: int, rng: np.random.Generator, k: float = 4) -> pd.DataFrame:
    """Random bits; the label at t is the parity of bits t-k+1..t (harder as k grows)."""
    bits = rng.integers(0, 2, size=n)
    csum = np.concatenate([[0], np.cumsum(bits)])
    kk = int(k)
    label = np.array([(csum[t + 1] - csum[max(0, t + 1 - kk)]) % 2 for t in range(n)])
    return pd.DataFrame({"bit": bits.astype(np.float64), "label": label})


def waveforms(n: int, rng: np.random.Generator, n_classes: float = 4, noise: float = 0.3,
              segment: float = 64) -> pd.DataFrame:
    """Segments of sine/square/sawtooth/triangle waves with random period and noise; the label
    of each step is the wave it belongs to."""
    all_shapes: list[Callable[[Any], Any]] = [
        lambda p: np.sin(p),
        lambda p: np.sign(np.sin(p)),
        lambda p: 2 * ((p / (2 * np.pi)) % 1.0) - 1,
        lambda p: 2 * np.abs(2 * ((p / (2 * np.pi)) % 1.0) - 1) - 1,
    ]
    shapes = all_shapes[: int(n_classes)]
    signal, label = np.empty(n), np.empty(n, dtype=np.int64)
    t, seg = 0, int(segment)
    while t < n:
        c = int(rng.integers(len(shapes)))
        m = min(seg, n - t)
        phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(m) / rng.uniform(6, 30)
        signal[t:t + m] = shapes[c](phase) + noise * rng.standard_normal(m)
        label[t:t + m] = c
        t += m
    return pd.DataFrame({"signal": signal, "label": label})


BUILTIN: dict[str, Callable[[], pd.DataFrame]] = {
    "sunspots": sunspots, "co2": co2, "elnino": elnino, "realgdp": realgdp,
}
GENERATORS: dict[str, Callable[..., pd.DataFrame]] = {
    "sine": sine, "mackey_glass": mackey_glass, "ar": ar, "parity": parity,
    "waveforms": waveforms,
}


def generate(ref: SyntheticData) -> pd.DataFrame:
    info = catalog.SYNTHETIC[ref.generator]
    opts = {k: v[2] for k, v in info.options.items()} | dict(ref.options)
    return GENERATORS[ref.generator](ref.n_points, np.random.default_rng(ref.seed), **opts)


def cached_upload(dataset_id: str, cache_dir: Path,
                  fetch: Callable[[str], tuple[str, bytes]]) -> pd.DataFrame:
    """An uploaded CSV, fetched once per machine and cached under its content hash.

    ``fetch(dataset_id)`` returns ``(sha256, content)``; an index file maps ids to hashes so a
    cached dataset is read without asking the database again.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = cache_dir / f"{dataset_id}.sha256"
    if index.exists():
        path = cache_dir / f"{index.read_text().strip()}.csv"
        if path.exists():
            return pd.read_csv(path)
    sha, content = fetch(dataset_id)
    path = cache_dir / f"{sha}.csv"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)  # atomic: concurrent slots on one machine never read half a file
    index.write_text(sha)
    return pd.read_csv(io.BytesIO(content))


def load(ref: BuiltinData | SyntheticData | UploadedData, *, cache_dir: Path | None = None,
         fetch: Callable[[str], tuple[str, bytes]] | None = None) -> pd.DataFrame:
    """The frame a dataset reference names."""
    if isinstance(ref, BuiltinData):
        return BUILTIN[ref.name]()
    if isinstance(ref, SyntheticData):
        return generate(ref)
    if fetch is None or cache_dir is None:
        raise ValueError("uploaded datasets need a fetch function and a cache folder")
    return cached_upload(ref.id, cache_dir, fetch)
