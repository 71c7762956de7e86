"""seqtune: hyperparameter search for LSTM sequence models, as a service.

What each install gives:

- ``pip install seqtune`` (the base install: httpx, pydantic, pyyaml) is the client side: the
  HTTP client (:class:`Client`, also ``seqtune.client``), the CLI's client verbs (``seqtune
  studies``, ``submit``, ``best``, ``trials``, ...), and the shared vocabulary (the study
  definition in ``seqtune.spec``, the API's value models in ``seqtune.views``). It never
  imports torch, SQLAlchemy, FastAPI or Optuna.
- ``seqtune[server]`` adds the service (``service/``: ``seqtune serve``, ``db``, ``keys``):
  FastAPI, SQLAlchemy and Postgres' driver, Alembic, Optuna and its dashboard, the plots.
- ``seqtune[worker]`` adds the trial workers (``worker/``: ``seqtune worker``, ``predict``):
  torch, Optuna, numpy/pandas/scipy/statsmodels, and the database stack they share with the
  service's store.
- ``seqtune[all]`` is both (``seqtune up``); ``seqtune[tensorboard]`` adds TensorBoard logs.

This package exports ``Client``, its errors ``ApiError``, ``ServiceUnreachable`` and
``ServiceTimeout``, and ``__version__`` (the installed distribution's version, or
``"0+unknown"`` when run from a tree that was never installed).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seqtune.client import ApiError, Client, ServiceTimeout, ServiceUnreachable

__all__ = ["ApiError", "Client", "ServiceTimeout", "ServiceUnreachable", "__version__"]

try:
    __version__ = version("seqtune")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

_CLIENT_NAMES = frozenset({"ApiError", "Client", "ServiceTimeout", "ServiceUnreachable"})


def __getattr__(name: str) -> Any:
    """Load the client's names on first use (PEP 562).

    Why lazily: the service and the workers import ``seqtune.spec`` and friends, and that
    runs this file; they need no HTTP client, and httpx costs a fifth of a second per process.
    Raises AttributeError for any other name, as a module does.
    """
    if name in _CLIENT_NAMES:
        from seqtune import client

        return getattr(client, name)
    raise AttributeError(f"module 'seqtune' has no attribute {name!r}")
