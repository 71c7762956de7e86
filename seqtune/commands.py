"""The ``seqtune`` commands that talk to a running service through :class:`seqtune.client.Client`.

Each command prints a table for people, or JSON with ``--json``, and returns an exit code
(see ``EXIT_CODES``). Errors are raised as ApiError/ServiceUnreachable and turned into one
line by ``seqtune.cli.main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import BaseModel

from seqtune.client import CLI_AGENT, ApiError, Client
from seqtune.errors import CommandFailed, ErrorCode, Exit, import_extra
from seqtune.states import FINISHED_STATUSES, SETTABLE_STATUSES, BaselinesStatus, StudyStatus
from seqtune.views import PLOT_KINDS, BestView, StudyView, TrialView, baseline_label

# What each exit code means, for `seqtune --help`. Keyed by Exit, so a new exit code without
# its line fails at import; which error exits with which code is ErrorCode's table.
_EXIT_HELP: dict[Exit, str] = {
    Exit.OK: "success (with --watch: the study completed its budget)",
    Exit.UNFINISHED: "with --watch: the study ended stopped or timed out; delete: you answered no",
    Exit.BAD_INPUT: "bad input: a wrong argument, file or study definition (the message names "
    "the field),\n     or a database URL naming a database that does not exist or a login "
    "Postgres refuses",
    Exit.NOT_FOUND: "not found: no such study, trial or dataset",
    Exit.AUTH: "authentication: missing, unknown or revoked API key (set SEQTUNE_API_KEY)",
    Exit.CONFLICT: "conflict: the study's state does not allow it, e.g. no completed trial or "
    "saved\n     model yet (the message says why)",
    Exit.UNAVAILABLE: "the service cannot be reached, failed, or did not answer within --timeout "
    "(start it\n     with `seqtune up`; set SEQTUNE_URL); `seqtune up`/`serve` could not start "
    "(port in use);\n     the database cannot be reached (db and keys commands)",
    Exit.INTERRUPTED: "interrupted (Ctrl-C); the study keeps running on the service",
}
EXIT_CODES = "exit codes:\n" + "\n".join(f"  {int(e):<2} {_EXIT_HELP[e]}" for e in Exit)


def exit_code_of(exc: ApiError) -> Exit:
    """The exit code for an error the service answered: its code's row in ErrorCode's table
    (ApiError.code already stands for the HTTP status when the answer's code is unknown)."""
    return exc.code.exit


def client_of(args: argparse.Namespace) -> Client:
    """The Client for a command's ``--url``, ``--key`` and ``--timeout`` (each falling back to
    its SEQTUNE_* variable). A bad SEQTUNE_TIMEOUT is bad input (exit 2). It sends the CLI's
    User-Agent, so that the service's hints name commands (`seqtune studies`), not REST calls."""
    try:
        return Client(
            getattr(args, "url", None),
            getattr(args, "key", None),
            timeout_s=getattr(args, "timeout", None),
            user_agent=CLI_AGENT,
        )
    except ValueError as exc:
        raise ApiError(0, ErrorCode.INVALID, str(exc)) from None


def _dump(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2)
    if isinstance(obj, list) and obj and isinstance(obj[0], BaseModel):
        return "[" + ",\n".join(o.model_dump_json(indent=2) for o in obj) + "]"
    return json.dumps(obj, indent=2, default=str)


def table(rows: list[list[Any]], headers: list[str], out: TextIO | None = None) -> None:
    """A plain left-aligned text table."""
    out = out or sys.stdout
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    print(
        "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
        file=out,
    )
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, dict):
        return " ".join(f"{k}={_cell(x)}" for k, x in v.items())
    return str(v)


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# -- studies -------------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        view = c.submit(args.file)
        if args.json and not args.watch:
            print(_dump(view))
            return 0
        print(
            f"submitted study '{view.name}': {view.trials.budget} trials "
            f"({view.optuna_study_name} in Optuna)",
            file=sys.stderr,
        )
        if not args.watch:
            print(view.name)
            return 0
        return _watch(c, view.name, args)


def cmd_studies(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        page = c.studies(status=args.status, limit=args.limit)
    if args.json:
        print(_dump(page))
        return 0
    table(
        [
            [
                s.name,
                s.status,
                s.task,
                f"{s.trials.finished}/{s.trials.budget}",
                s.trials.running,
                s.trials.pruned,
                s.trials.failed,
                s.created_at,
            ]
            for s in page.items
        ],
        ["name", "status", "task", "done", "running", "pruned", "failed", "created"],
    )
    return 0


def status_line(
    view: StudyView,
    best: tuple[str, float, int] | None,
    now: datetime | None = None,
    *,
    verdict: dict[str, Any] | None = None,
) -> str:
    """One line of progress: bar, counts, best so far (against the best baseline when
    ``verdict``, BestView.verdict, is given), elapsed and remaining time."""
    t = view.trials
    width = 24
    filled = int(width * t.finished / t.budget) if t.budget else width
    bar = "#" * filled + "-" * (width - filled)
    end = view.finished_at or now or datetime.now(UTC)  # the API's times are aware (UTC)
    elapsed = max((end - view.created_at).total_seconds(), 0.0)
    if view.status in FINISHED_STATUSES:
        left = "done"
    elif t.finished:
        left = "~" + _duration(elapsed / t.finished * max(t.budget - t.finished, 0)) + " left"
    else:
        left = "? left"
    best_s = f"best {best[0]}={best[1]:.6g} (#{best[2]})" if best else "best -"
    if best and verdict:
        best_s += f" vs {verdict['baseline']} {verdict['metric']}={verdict['baseline_val']:.6g}" + (
            "" if verdict["beats_baseline"] else " NOT BEATEN"
        )
    line = (
        f"{view.name} {view.status} [{bar}] {t.finished}/{t.budget} | complete {t.complete} "
        f"pruned {t.pruned} failed {t.failed} running {t.running} | {best_s} | "
        f"{_duration(elapsed)} elapsed, {left}"
    )
    return line + (f" | stopped early: {view.stop_reason}" if view.stop_reason else "")


def _best_of(c: Client, name: str) -> tuple[tuple[str, float, int] | None, dict[str, Any] | None]:
    """(metric, value, trial number) of the best so far, or None; and BestView.verdict."""
    try:
        b = c.best(name)
    except ApiError as exc:
        if exc.code is ErrorCode.CONFLICT:  # no completed trial yet
            return None, None
        raise
    trial = b.best or (b.pareto_front[0] if b.pareto_front else None)
    if trial is None or trial.value is None and not trial.values:
        return None, None
    value = trial.value if trial.value is not None else (trial.values or [float("nan")])[0]
    return (b.metrics[0], value, trial.number), b.verdict


def _watch(c: Client, name: str, args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    last = ""
    final: StudyView | None = None
    try:
        while True:
            view = c.study(name)
            best, verdict = _best_of(c, name)
            if args.json:
                line = json.dumps(
                    {
                        "name": view.name,
                        "status": view.status,
                        "trials": view.trials.model_dump(),
                        "best": None
                        if best is None
                        else {"metric": best[0], "value": best[1], "trial": best[2]},
                        "beats_baseline": None if verdict is None else verdict["beats_baseline"],
                    }
                )
            else:
                line = status_line(view, best, verdict=verdict)
            if tty and not args.json:
                sys.stdout.write("\r\x1b[2K" + line)
                sys.stdout.flush()
            elif line != last:
                print(line, flush=True)
            last = line
            if view.status in FINISHED_STATUSES:
                final = view
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print(
            f"\nstopped watching; '{name}' keeps running (seqtune status {name} --watch)",
            file=sys.stderr,
        )
        return Exit.INTERRUPTED
    if tty and not args.json:
        print()
    return Exit.OK if final.status == StudyStatus.COMPLETED else Exit.UNFINISHED


def cmd_status(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        if args.watch:
            return _watch(c, args.name, args)
        view = c.study(args.name)
        if args.json:
            print(_dump(view))
        else:
            best, verdict = _best_of(c, args.name)
            print(status_line(view, best, verdict=verdict))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        b = c.best(args.name)
    if args.json:
        print(_dump(b))  # everything: best/front, baselines, verdict, final
        return 0
    print_best(b)
    return 0


def print_best(b: BestView, out: TextIO | None = None) -> None:
    """``seqtune best`` for people: the best trial (or the front) with its params and test
    metrics, the baselines table and the verdict, then the final phase's summary."""
    out = out or sys.stdout
    trials = [b.best] if b.best else list(b.pareto_front or [])
    if b.pareto_front:
        print(
            f"{b.study}: Pareto front of {len(trials)} trial(s) over {', '.join(b.metrics)}",
            file=out,
        )
    for t in trials:
        _print_trial(t, b.metrics, out)
    _print_baselines(b, out)
    _print_final(b, out)


# The baselines table's row order, simplest first (Postgres' JSONB does not keep key order).
_BASELINE_ORDER = (
    "persistence",
    "seasonal_naive",
    "mean",
    "ets",
    "ar",
    "arima",
    "majority",
    "logistic",
)


def _print_baselines(b: BestView, out: TextIO) -> None:
    bl = b.baselines
    if bl is None:
        print(
            "baselines: not computed yet (the first worker to claim a trial computes them)",
            file=out,
        )
        return
    status = bl.get("status")
    if status == BaselinesStatus.COMPUTING:
        print(
            f"baselines: still computing (by {bl.get('owner', '?')} since {bl.get('since', '?')})",
            file=out,
        )
        return
    if status != BaselinesStatus.DONE:
        print(f"baselines: failed: {bl.get('error') or status}", file=out)
        return
    models: dict[str, Any] = bl.get("models") or {}
    best_name = bl.get("best")
    classify = bl.get("task") == "classify"
    # (column title, split, metric): the baseline's models[name][split][metric], the trial's
    # info['val']['val_' + metric] or test_metrics['test_' + metric].
    cols = (
        [
            ("val accuracy", "val", "accuracy"),
            ("test accuracy", "test", "accuracy"),
            ("test F1", "test", "f1"),
        ]
        if classify
        else [
            ("val RMSE", "val", "rmse"),
            ("test RMSE", "test", "rmse"),
            ("test MASE", "test", "mase"),
        ]
    )
    rows: list[list[Any]] = []
    order = {n: i for i, n in enumerate(_BASELINE_ORDER)}
    for name, m in sorted(models.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        mark = " *" if name == best_name else ""
        rows.append(
            [
                baseline_label(name, bl) + mark,
                *((m.get(split) or {}).get(k) for _, split, k in cols),
            ]
        )
    t = b.best
    if t is not None:  # the trial's own row, for the comparison at a glance
        val, tm = (t.info.get("val") or {}), (t.test_metrics or {})
        scale = bl.get("mase_scale")
        cells: list[Any] = [
            val.get(f"val_{k}") if split == "val" else tm.get(f"test_{k}") for _, split, k in cols
        ]
        if not classify:
            mae = tm.get("test_mae")
            cells[2] = (
                mae / scale
                if isinstance(mae, int | float) and isinstance(scale, int | float) and scale > 0
                else None
            )
        rows.append([f"trial {t.number}", *cells])
    what = [f"{bl.get('n_val_targets', '?')} val / {bl.get('n_test_targets', '?')} test targets"]
    if not classify:
        what.append(f"horizon {bl.get('horizon', '?')}")
        if bl.get("season"):
            what.append(f"season {bl['season']}")
    print(f"baselines ({', '.join(what)}; * = best on validation):", file=out)
    table(rows, ["model", *(c[0] for c in cols)], out)
    for name, why in (bl.get("skipped") or {}).items():
        print(f"  skipped {name}: {why}", file=out)
    if b.verdict:
        print(b.verdict["message"], file=out)
    print(file=out)


def _pm(stat: dict[str, Any] | None) -> str:
    """'mean ± sd' of a {"mean", "sd"} summary."""
    if not stat or stat.get("mean") is None:
        return "-"
    sd = stat.get("sd")
    return f"{stat['mean']:.6g}" + (f" ± {sd:.3g}" if sd is not None else "")


def _print_final(b: BestView, out: TextIO) -> None:
    f = b.final
    if not f:
        return
    groups = f.get("groups") or []
    if not groups:
        print("final phase: no re-train has completed yet", file=out)
        return
    metric = b.metrics[0] if b.metrics else "value"
    winner = f.get("winner")
    print(
        f"final phase: {len(groups)} configuration(s) re-trained with "
        f"seeds; mean ± sd of {metric} over the re-trains",
        file=out,
    )
    table(
        [
            [
                f"{g['trial']}{' *' if g['trial'] == winner else ''}",
                g["n"],
                _pm({"mean": g.get("value_mean"), "sd": g.get("value_sd")}),
            ]
            for g in groups
        ],
        ["trial", "seeds", metric],
        out,
    )
    won = next((g for g in groups if g["trial"] == winner), None)
    if won is not None:
        tests = "  ".join(f"{k}={_pm(v)}" for k, v in (won.get("test") or {}).items())
        print(
            f"winner: trial {winner} ({won['n']} re-trains); test metrics: {tests or '-'}", file=out
        )
    print(file=out)


def _print_trial(t: TrialView, metrics: list[str], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    values = t.values if t.values else [t.value]
    shown = ", ".join(f"{m}={_cell(v)}" for m, v in zip(metrics, values, strict=False))
    flags = "" if t.feasible is not False else ", INFEASIBLE"
    print(f"trial {t.number}: {shown}  ({t.epochs} epochs, {t.reason or t.state}{flags})", file=out)
    rows = [[k, v] for k, v in sorted(t.params.items())]
    table(rows + [[k, "(inactive)"] for k in t.inactive], ["param", "value"], out)
    if t.test_metrics:
        tm = t.test_metrics
        flat = {k: v for k, v in tm.items() if not isinstance(v, dict)}
        print("test metrics: " + _cell(flat), file=out)
        for k, v in tm.items():
            if isinstance(v, dict):
                print(f"  {k}: {_cell(v)}", file=out)
    print(file=out)


def cmd_trials(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        page = c.trials(args.name, state=args.state, sort=args.sort, limit=args.limit)
    if args.json:
        print(_dump(page))
        return 0
    table(
        [
            [
                t.number,
                t.state,
                t.value if t.values is None or len(t.values) < 2 else t.values,
                t.epochs,
                t.reason,
                _duration(t.duration_s) if t.duration_s is not None else None,
                t.attempts,
                t.params,
            ]
            for t in page.items
        ],
        ["#", "state", "value", "epochs", "reason", "time", "tries", "params"],
    )
    return 0


# pause, resume, stop: the commands named by the user's actions of seqtune.states' table, each
# asking PATCH for the status its action moves the study to.
_STEER: dict[str, StudyStatus] = {action: to for to, action in SETTABLE_STATUSES.items()}


def cmd_steer(args: argparse.Namespace) -> int:
    status = _STEER[args.command]
    with client_of(args) as c:
        view = c.update(args.name, status=status)
    print(_dump(view) if args.json else f"{view.name}: {view.status}")
    return 0


# -- models --------------------------------------------------------------------------------------
def cmd_model(args: argparse.Namespace) -> int:
    out = args.output or f"{args.name}-{'best' if args.trial is None else args.trial}.pt"
    with client_of(args) as c:
        path = c.download_model(args.name, out, trial=args.trial)
    print(str(path))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    out = args.output or f"{args.name}-{args.kind}.{args.format}"
    with client_of(args) as c:
        params = [p.strip() for p in (args.params or "").split(",") if p.strip()]
        data = c.plot(
            args.name, args.kind, fmt=args.format, objective=args.objective, params=params
        )
    with open(out, "wb") as fh:
        fh.write(data)
    print(out)
    return 0


# -- datasets and fleet --------------------------------------------------------------------------
def cmd_datasets_upload(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        try:
            d = c.upload_dataset(args.file, name=args.name)
        except OSError as exc:
            raise ApiError(0, ErrorCode.INVALID, f"cannot read {args.file}: {exc}") from None
    if args.json:
        print(_dump(d))
    else:
        print(
            f"uploaded '{d.name}': {d.n_rows} rows, columns "
            f"{', '.join(col['name'] for col in d.columns)}",
            file=sys.stderr,
        )
        print(d.id)
    return 0


def cmd_datasets_list(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        page = c.datasets(limit=args.limit)
    if args.json:
        print(_dump(page))
        return 0
    table(
        [[d.id, d.name, d.n_rows, len(d.columns), d.size_bytes, d.created_at] for d in page.items],
        ["id", "name", "rows", "columns", "bytes", "created"],
    )
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        ws = c.workers(include_stopped=args.all)
    if args.json:
        print(_dump(ws))
        return 0
    table(
        [
            [
                w.id,
                w.host,
                w.slot,
                w.device,
                w.status,
                w.trials_done,
                f"{w.study}#{w.trial}" if w.study else None,
                w.heartbeat_at,
            ]
            for w in ws
        ],
        ["id", "host", "slot", "device", "status", "done", "running", "heartbeat"],
    )
    return 0


def add_client_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the client commands on ``sub``; ``common`` carries --url/--key/--json."""

    def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_, parents=[common])
        p.set_defaults(fn=fn)
        return p

    p = add("submit", cmd_submit, "submit a study file (YAML or JSON)")
    p.add_argument("file")
    p.add_argument("--watch", action="store_true", help="show live progress until it ends")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")

    p = add("studies", cmd_studies, "list your studies")
    p.add_argument(
        "--status", type=str.lower, help="only studies in this state (running, paused, completed…)"
    )
    p.add_argument("--limit", type=int, default=50)

    p = add("status", cmd_status, "a study's progress: trials, best so far, time left")
    p.add_argument("name")
    p.add_argument("--watch", action="store_true", help="refresh until the study ends")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")

    p = add("best", cmd_best, "the best trial (or Pareto front): params and test metrics")
    p.add_argument("name")

    p = add("trials", cmd_trials, "a study's trials")
    p.add_argument("name")
    p.add_argument("--state", type=str.upper, help="WAITING, RUNNING, COMPLETE, PRUNED or FAIL")
    p.add_argument(
        "--sort",
        default="number",
        help="number, value, started_at, finished_at; '-' prefix for descending",
    )
    p.add_argument("--limit", type=int, default=100)

    for verb, what in (
        ("pause", "hold new trials (running ones finish)"),
        ("resume", "hand out trials again"),
        ("stop", "end the study (running trials finish)"),
    ):
        add(verb, cmd_steer, what).add_argument("name")

    p = add("model", cmd_model, "download a trained model (the best trial's by default)")
    p.add_argument("name")
    p.add_argument("--trial", type=int, help="this trial's model instead of the best")
    p.add_argument("-o", "--output", help="file to write (default NAME-best.pt)")

    p = add("plot", cmd_plot, "save a plot of a study (PNG or HTML)")
    p.add_argument("name")
    p.add_argument("kind", choices=PLOT_KINDS)
    p.add_argument("--format", choices=("png", "html"), default="png")
    p.add_argument("--objective", type=int, default=0, help="which objective (0, 1 ...)")
    p.add_argument(
        "--params",
        metavar="A,B,...",
        help="contour and parallel: the hyperparameters to draw (default: the 2 most important "
        "for contour, the 5 most important for parallel)",
    )
    p.add_argument("-o", "--output", help="file to write (default NAME-KIND.FORMAT)")

    d = sub.add_parser("datasets", help="uploaded CSV datasets").add_subparsers(
        dest="datasets_cmd", required=True
    )
    p = d.add_parser("upload", help="upload a CSV; prints its id", parents=[common])
    p.add_argument("file")
    p.add_argument(
        "--name",
        help="unique among your datasets (default: the file's name); a study names the data "
        "by it: dataset: {kind: uploaded, name: NAME}",
    )
    p.set_defaults(fn=cmd_datasets_upload)
    p = d.add_parser("list", help="your datasets", parents=[common])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=cmd_datasets_list)
    p = d.add_parser(
        "delete",
        help="delete an uploaded dataset (refused while a study uses it)",
        parents=[common],
    )
    p.add_argument("dataset", metavar="ID|NAME", help="the dataset's id or name")
    p.add_argument(
        "--force",
        action="store_true",
        help="delete it although finished studies use it (running or paused ones still refuse)",
    )
    p.set_defaults(fn=cmd_datasets_delete)

    p = add("workers", cmd_workers, "the worker fleet: live, lost and (with --all) stopped")
    p.add_argument("--all", action="store_true")
    _add_models_commands(sub, common)
    _add_everyday_commands(sub, common)
    _add_export_commands(sub, common)


# -- uploaded models (init_from: {model: ID}) ------------------------------------------------------
def cmd_models_upload(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        try:
            m = c.upload_model(args.file, name=args.name)
        except OSError as exc:
            raise ApiError(0, ErrorCode.INVALID, f"cannot read {args.file}: {exc}") from None
    if args.json:
        print(_dump(m))
    else:
        shape = m.meta.get("model", {})
        print(
            f"uploaded '{m.name}': a {m.meta.get('task')} LSTM of {shape.get('num_layers')} "
            f"layer(s) x {shape.get('hidden_size')} units on {shape.get('n_features')} input(s)",
            file=sys.stderr,
        )
        print(m.id)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        page = c.models(limit=args.limit)
    if args.json:
        print(_dump(page))
        return 0
    rows = []
    for m in page.items:
        shape, origin = m.meta.get("model", {}), m.meta.get("lineage") or {}
        rows.append(
            [
                m.id,
                m.name,
                m.meta.get("task"),
                f"{shape.get('num_layers')}x{shape.get('hidden_size')}",
                shape.get("n_features"),
                f"{origin['study']}#{origin['trial']}" if "study" in origin else origin.get("name"),
                m.size_bytes,
                m.created_at,
            ]
        )
    table(rows, ["id", "name", "task", "layers", "inputs", "fine-tuned from", "bytes", "created"])
    return 0


def _add_models_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``seqtune models upload FILE [--name N]`` and ``seqtune models list``."""
    m = sub.add_parser("models", help="uploaded models that studies start from").add_subparsers(
        dest="models_cmd", required=True
    )
    p = m.add_parser("upload", help="upload a model file (.pt); prints its id", parents=[common])
    p.add_argument("file")
    p.add_argument("--name")
    p.set_defaults(fn=cmd_models_upload)
    p = m.add_parser("list", help="your uploaded models", parents=[common])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=cmd_models_list)


# -- everyday verbs: delete, datasets delete, trial -----------------------------------------------
def cmd_delete(args: argparse.Namespace) -> int:
    """Delete a study after a yes on the terminal, or at once with --yes. --force also
    overrides the service's checks (trials still running, studies fine-tuning from this one)
    and implies --yes. Without a terminal and without either: refused, exit 2."""
    with client_of(args) as c:
        view = c.study(args.name)  # not found: said before anything is asked
        if not (args.yes or args.force):
            if not sys.stdin.isatty():
                raise CommandFailed(
                    f"not deleting '{args.name}' without a terminal to confirm on; "
                    "pass --yes to delete it",
                    Exit.BAD_INPUT,
                )
            t = view.trials
            question = (
                f"delete study '{view.name}' ({view.status}, {t.finished}/{t.budget} trials "
                "finished), its trials and their models? [y/N] "
            )
            try:
                answer = input(question)
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print(f"kept '{view.name}'", file=sys.stderr)
                return Exit.UNFINISHED
        c.delete(args.name, force=args.force)
    if args.json:
        print(json.dumps({"deleted": args.name}))
    else:
        print(f"deleted study '{args.name}'", file=sys.stderr)
    return 0


def cmd_datasets_delete(args: argparse.Namespace) -> int:
    with client_of(args) as c:
        c.delete_dataset(args.dataset, force=args.force)
    if args.json:
        print(json.dumps({"deleted": args.dataset}))
    else:
        print(f"deleted dataset '{args.dataset}'", file=sys.stderr)
    return 0


def _monitored(view: StudyView, curve: list[dict[str, Any]]) -> str:
    """The validation metric of the learning curve: the study's first objective where the
    curve has it, else val_loss."""
    objectives = view.spec.get("objectives") or []
    metric = objectives[0].get("metric") if objectives else None
    if metric and any(metric in rec for rec in curve):
        return str(metric)
    return "val_loss"


def _floats(curve: list[dict[str, Any]], key: str) -> list[float | None]:
    return [v if isinstance(v, int | float) else None for v in (rec.get(key) for rec in curve)]


def cmd_trial(args: argparse.Namespace) -> int:
    """One trial: state, reason, attempts, where it ran, its params and test metrics, and its
    learning curve as a terminal chart (``--png FILE``: as an image, with matplotlib)."""
    with client_of(args) as c:
        view = c.study(args.name)
        t = c.trial(args.name, args.number)
    curve = t.curve or []
    metric = _monitored(view, curve)
    if args.png:
        _curve_png(args.png, view, t, metric)
    if args.json:
        print(_dump(t))
        return 0
    print_trial_detail(view, t, metric)
    if args.png:
        print(args.png, file=sys.stderr)
    return 0


def print_trial_detail(
    view: StudyView, t: TrialView, metric: str, out: TextIO | None = None
) -> None:
    """``seqtune trial`` for people (see cmd_trial)."""
    out = out or sys.stdout
    metrics = [o.get("metric", "value") for o in view.spec.get("objectives") or []] or ["value"]
    values = t.values if t.values else [t.value]
    shown = ", ".join(
        f"{m}={_cell(v)}" for m, v in zip(metrics, values, strict=False) if v is not None
    )
    head = f"trial {t.number} of {view.name}: {t.state}"
    if t.reason:
        head += f" ({t.reason})"
    print(head + (f"  {shown}" if shown else ""), file=out)
    info = t.info or {}
    facts = [f"{t.attempts} attempt(s)"]
    if t.worker:
        facts.append(f"on {t.worker}" + (f" ({info['device']})" if info.get("device") else ""))
    epochs = f"{t.epochs} epoch(s)"
    if info.get("best_epoch") is not None:
        epochs += f", best {info['best_epoch']}"
    facts.append(epochs)
    if t.duration_s is not None:
        facts.append(_duration(t.duration_s))
    if info.get("param_count"):
        facts.append(f"{info['param_count']:,} weights")
    print("  " + ", ".join(facts), file=out)
    if t.final_of is not None:
        print(f"  a final-phase re-train of trial {t.final_of}'s params", file=out)
    lineage = info.get("lineage")
    if isinstance(lineage, dict) and lineage:
        print("  started from: " + _cell(lineage), file=out)
    if t.error:
        print(f"  error: {t.error}", file=out)
    table([[k, v] for k, v in sorted(t.params.items())], ["param", "value"], out)
    inactive = getattr(t, "inactive", None)
    if inactive:
        print("inactive (condition not met): " + ", ".join(inactive), file=out)
    if t.test_metrics:
        flat = {k: v for k, v in t.test_metrics.items() if not isinstance(v, dict)}
        print("test metrics: " + _cell(flat), file=out)
    curve = t.curve or []
    if not curve:
        print("learning curve: no epoch recorded", file=out)
        return
    from seqtune.charts import line_chart  # here: only this command draws

    best = info.get("best_epoch")
    # The chart's x is the record's position; a walk-forward curve numbers its epochs
    # fold * max_epochs + epoch, with gaps where a fold stopped early: mark by position.
    mark = next((i for i, rec in enumerate(curve) if rec.get("epoch") == best), None)
    folds = any("fold" in rec for rec in curve)
    print(f"\nlearning curve ({len(curve)} epochs):", file=out)
    for line in line_chart(
        [("train_loss", _floats(curve, "train_loss")), (metric, _floats(curve, metric))],
        x_label="epoch (all folds)" if folds else "epoch",
        mark=mark if isinstance(best, int) else None,
    ):
        print(line, file=out)


def _curve_png(path: str, view: StudyView, t: TrialView, metric: str) -> None:
    """Save the trial's learning curve as a PNG: train_loss on the left axis, the validation
    metric on the right. Needs matplotlib (the server extra): MissingExtra without it."""
    figure = import_extra("matplotlib.figure", extra="server", what="seqtune trial --png")
    curve = t.curve or []
    epochs = [rec.get("epoch", i) for i, rec in enumerate(curve)]
    fig = figure.Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(epochs, _floats(curve, "train_loss"), color="tab:blue", label="train_loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train_loss", color="tab:blue")
    right = ax.twinx()
    right.plot(epochs, _floats(curve, metric), color="tab:orange", label=metric)
    right.set_ylabel(metric, color="tab:orange")
    best = (t.info or {}).get("best_epoch")
    if isinstance(best, int):
        ax.axvline(best, color="grey", linestyle=":", label=f"best epoch {best}")
    ax.set_title(f"{view.name}: trial {t.number}, {t.state} ({t.reason or '-'})")
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise ApiError(0, ErrorCode.INVALID, f"cannot write {path}: {exc}") from None


def _add_everyday_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``seqtune delete STUDY [--force]`` and ``seqtune trial STUDY N [--png FILE]``
    (``datasets delete`` sits with the other ``datasets`` verbs)."""
    p = sub.add_parser(
        "delete",
        help="delete a study, its trials and models (asks first; --yes does not)",
        parents=[common],
    )
    p.add_argument("name")
    p.add_argument(
        "-y", "--yes", action="store_true", help="do not ask (needed without a terminal)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="delete it even while trials run or other studies fine-tune from it (implies --yes)",
    )
    p.set_defaults(fn=cmd_delete)
    p = sub.add_parser(
        "trial",
        help="one trial: params, state, reason, attempts and its learning curve",
        parents=[common],
    )
    p.add_argument("name")
    p.add_argument("number", type=int)
    p.add_argument(
        "--png",
        metavar="FILE",
        help="also save the learning curve as a PNG (needs matplotlib: seqtune[server])",
    )
    p.set_defaults(fn=cmd_trial)


# -- export --------------------------------------------------------------------------------------
def _add_export_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``seqtune export mlflow STUDY --tracking-uri URI [--experiment NAME]``."""
    e = sub.add_parser("export", help="copy a study into another tool").add_subparsers(
        dest="export_cmd", required=True
    )
    p = e.add_parser(
        "mlflow",
        help="one MLflow run per finished trial (params, metrics, learning curve, tags) and "
        "the best model as an artifact; needs seqtune[mlflow]",
        parents=[common],
    )
    p.add_argument("name", metavar="STUDY", help="the study to export")
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="the MLflow tracking store: sqlite:///mlflow.db, http://host:5000 ... "
        "(default $MLFLOW_TRACKING_URI)",
    )
    p.add_argument(
        "--experiment", metavar="NAME", help="the MLflow experiment (default: the study's name)"
    )
    p.add_argument(
        "--artifact-location",
        metavar="PATH",
        help="where a new experiment keeps its artifacts (default: beside an sqlite database, "
        "else the tracking server's choice)",
    )
    p.set_defaults(fn=cmd_export)


# MLflow's error codes for a request that cannot work as given (exit 2); any other is 6.
_MLFLOW_BAD_INPUT = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST")


def cmd_export(args: argparse.Namespace) -> int:
    """Export a study to MLflow (``seqtune.export_mlflow``). MissingExtra (exit 2) without
    mlflow; an MLflow store that refuses is one line: 2 for a bad argument, else 6."""
    from seqtune import export_mlflow

    export_mlflow.mlflow_module()  # before anything else: without it, say so and stop
    if not args.tracking_uri:
        raise ApiError(
            0,
            ErrorCode.INVALID,
            "name the MLflow store with --tracking-uri (or MLFLOW_TRACKING_URI)",
        )
    import logging

    from mlflow.exceptions import MlflowException

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store's set-up chatter
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        with client_of(args) as c:
            report = export_mlflow.export_study(
                c,
                args.name,
                tracking_uri=args.tracking_uri,
                experiment=args.experiment,
                artifact_location=args.artifact_location,
            )
    except MlflowException as exc:
        bad = exc.error_code in _MLFLOW_BAD_INPUT
        first = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
        raise CommandFailed(
            f"MLflow at {export_mlflow.masked(args.tracking_uri)} refused the export: {first}",
            Exit.BAD_INPUT if bad else Exit.UNAVAILABLE,
        ) from None
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(report.summary())
    return Exit.OK
