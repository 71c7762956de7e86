"""The worker's ``seqtune`` verbs: ``worker`` (run trials) and ``predict`` (run a trained model
on a CSV), and what ``Client.predict`` runs.

``seqtune.cli`` loads this module by name, only when one of these verbs runs; importing it
needs the worker extra (torch, numpy, pandas), and failing to is how a base install finds out
that it lacks it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from seqtune.client import ApiError
from seqtune.commands import client_of
from seqtune.errors import ErrorCode, Exit
from worker.engine import Predictor
from worker.predictions import COLUMNS_HELP, prediction_table, records

if TYPE_CHECKING:
    from service.settings import Settings


def add_arguments(verb: str, parser: argparse.ArgumentParser) -> None:
    """Give ``seqtune.cli``'s verb ``verb`` (``worker`` or ``predict``) its options and its
    function (``parser``'s default ``fn``). KeyError for any other verb."""
    {"worker": _worker_arguments, "predict": _predict_arguments}[verb](parser)


# -- seqtune worker ------------------------------------------------------------------------------
def _worker_arguments(w: argparse.ArgumentParser) -> None:
    w.add_argument("--gpus", default="all", help="'all', 'none' or indices like 0,2")
    w.add_argument("--slots-per-gpu", type=int, default=1, help="trials at once per GPU")
    w.add_argument("--studies", help="only these studies (comma-separated names)")
    w.add_argument("--max-trials", type=int, help="each slot exits after this many trials")
    w.add_argument("--burst", action="store_true", help="exit once no running study has work left")
    w.add_argument("--max-idle", type=float, help="exit after this many idle seconds")
    w.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per CPU slot (default: the cores split among this "
        "worker's slots; set it when several workers share one machine)",
    )
    w.add_argument(
        "--exit-with-pid",
        type=int,
        metavar="PID",
        help="stop the slots and exit once process PID is gone (`seqtune up` passes its own)",
    )
    w.add_argument(
        "--database-url", default=argparse.SUPPRESS, help="overrides SEQTUNE_DATABASE_URL"
    )
    w.set_defaults(fn=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the slots until they end (``fleet.run``'s exit code); bad --gpus is bad input."""
    # Here, not at the top: the slots bring Optuna and the store, which `predict` never needs.
    from service.logs import setup_logging
    from service.settings import Settings
    from worker import fleet
    from worker.slot import SlotConfig

    url = getattr(args, "database_url", None)
    settings = worker_settings(Settings.load(**({"database_url": url} if url else {})))
    setup_logging(settings)
    studies = tuple(x.strip() for x in (args.studies or "").split(",") if x.strip())
    base = SlotConfig(
        studies=studies,
        max_trials=args.max_trials,
        burst=args.burst,
        max_idle_s=args.max_idle,
        threads=args.threads,
    )
    try:
        return fleet.run(
            base,
            gpus=args.gpus,
            slots_per_gpu=args.slots_per_gpu,
            exit_with=args.exit_with_pid,
            settings=settings,
        )
    except ValueError as exc:
        print(f"seqtune: {exc}", file=sys.stderr)
        return Exit.BAD_INPUT


def worker_settings(loaded: Settings) -> Settings:
    """The settings every slot of ``seqtune worker`` gets, decided here, once, from the
    environment's: more database retries than the service (workers ride out restarts), and
    the worker's small pools (``worker_pool_size`` / ``worker_max_overflow``) for both of a
    slot's engines, seqtune's and Optuna's, instead of the service's ``pool_size`` /
    ``max_overflow``: a slot's threads (trial loop, heartbeat) use at most one
    connection each, and hundreds of slots must fit a Postgres (or PgBouncer) pool."""
    return loaded.model_copy(
        update={
            "db_retries": max(loaded.db_retries, 12),
            "pool_size": loaded.worker_pool_size,
            "max_overflow": loaded.worker_max_overflow,
        }
    )


# -- seqtune predict -----------------------------------------------------------------------------
def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Forecast or classify every full window of a CSV with a trained model; prints CSV "
        "(or JSON with --json)."
    )
    p.epilog = COLUMNS_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("model", nargs="?", help="a model file from `seqtune model`")
    p.add_argument("--study", help="download this study's model instead of a file")
    p.add_argument("--trial", type=int, help="with --study: this trial's model")
    p.add_argument("--csv", required=True, help="input rows with the model's feature columns")
    p.add_argument(
        "--time-column",
        metavar="NAME",
        help="the input's time column, carried to the forecasts' times (default: found)",
    )
    p.add_argument("-o", "--output", help="write predictions here (CSV) instead of stdout")
    p.set_defaults(fn=cmd_predict)


def read_frame(data: Any) -> pd.DataFrame:
    """A DataFrame from a DataFrame or a CSV path (OSError/ValueError for an unreadable one)."""
    if isinstance(data, pd.DataFrame):
        return data
    return pd.read_csv(data)


def load_predictor(path: str) -> Predictor:
    """The model saved at ``path`` (a checkpoint from `seqtune model`), on the CPU."""
    return Predictor.load(path)


def cmd_predict(args: argparse.Namespace) -> int:
    """Print (or write to ``--output``) one row of predictions per full input window of
    ``--csv``, from a model file or a study's model. Bad input raises ApiError (status 0)."""
    if bool(args.model) == bool(args.study):
        raise ApiError(0, ErrorCode.INVALID, "give a model file or --study NAME (one of them)")
    try:
        frame = read_frame(args.csv)
    except (OSError, ValueError) as exc:
        raise ApiError(0, ErrorCode.INVALID, f"cannot read {args.csv}: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.study:
            with client_of(args) as c:
                model = str(c.download_model(args.study, Path(tmp) / "m.pt", trial=args.trial))
        try:
            predictor = load_predictor(model)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise ApiError(0, ErrorCode.INVALID, f"{model} is not a seqtune model: {exc}") from None
    ck = predictor.ckpt
    missing = [c for c in ck["features"] if c not in frame.columns]
    if missing:
        raise ApiError(
            0,
            ErrorCode.INVALID,
            f"{args.csv} lacks the model's input column(s) {', '.join(map(str, missing))}",
        )
    time_column = getattr(args, "time_column", None)
    if time_column is not None and time_column not in frame.columns:
        raise ApiError(0, ErrorCode.INVALID, f"{args.csv} has no column '{time_column}'")
    try:
        out = prediction_table(predictor, frame, time_column=time_column)
    except ValueError as exc:
        raise ApiError(0, ErrorCode.INVALID, str(exc)) from None
    if args.json:
        print(json.dumps(records(out)))
        return Exit.OK
    if args.output:
        out.to_csv(args.output, index=False)
        print(f"{len(out)} prediction(s) written to {args.output}", file=sys.stderr)
    else:
        out.to_csv(sys.stdout, index=False)
    return Exit.OK
