"""The frame a dataset reference names: a built-in series, a seeded synthetic one, an upload.

Every frame is a ``pandas.DataFrame`` in time order: numeric columns, plus a ``label`` column
for classification sets. Built-ins and generators are loaded through their entries in
``seqtune.catalog`` (entry and loader sit together there); uploads are fetched and cached here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from seqtune import catalog
from seqtune.spec import BuiltinData, SyntheticData, UploadedData


def builtin(name: str) -> pd.DataFrame:
    """The built-in series ``name`` (a key of ``seqtune.catalog.BUILTIN``)."""
    frame: pd.DataFrame = catalog.BUILTIN[name].load()
    return frame


def generate(ref: SyntheticData) -> pd.DataFrame:
    """The series a synthetic reference names: its generator's defaults overridden by the
    reference's options, drawn from a Generator seeded with ``ref.seed`` (same ref, same frame)."""
    info = catalog.SYNTHETIC[ref.generator]
    opts = {k: v[2] for k, v in info.options.items()} | dict(ref.options)
    frame: pd.DataFrame = info.load(ref.n_points, np.random.default_rng(ref.seed), **opts)
    return frame


def cached_upload(
    dataset_id: str, cache_dir: Path, fetch: Callable[[str], tuple[str, bytes]]
) -> pd.DataFrame:
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


def load(
    ref: BuiltinData | SyntheticData | UploadedData,
    *,
    cache_dir: Path | None = None,
    fetch: Callable[[str], tuple[str, bytes]] | None = None,
) -> pd.DataFrame:
    """The frame a dataset reference names."""
    if isinstance(ref, BuiltinData):
        return builtin(ref.name)
    if isinstance(ref, SyntheticData):
        return generate(ref)
    if fetch is None or cache_dir is None:
        raise ValueError("uploaded datasets need a fetch function and a cache folder")
    if ref.id is None:  # a stored study always has it: the service resolves a name at submit
        raise ValueError(f"uploaded dataset '{ref.name}' has no id: submit the study first")
    return cached_upload(ref.id, cache_dir, fetch)
