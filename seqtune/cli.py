"""The ``seqtune`` command line.

The client verbs (``studies``, ``submit``, ``best`` ...; ``seqtune.commands``) are the base
install's. The server's verbs (``serve``, ``up``, ``db``, ``keys``; ``service/cli.py``) and the
worker's (``worker``, ``predict``; ``worker/cli.py``) are listed in ``EXTRA_VERBS`` and loaded by
module name, only when one of them runs, so that this package never imports ``service`` or
``worker`` and a client verb starts without their stack. Without its extra, such a verb is still
listed by ``--help``, and running it prints one line naming the extra to install (exit 2).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from types import ModuleType

from seqtune.errors import (
    CommandFailed,
    ErrorCode,
    Exit,
    MissingExtra,
    SeqtuneError,
    import_extra,
)


@dataclass(frozen=True)
class Verb:
    """A verb outside the base install: its name and help (shown by ``--help`` whether or not
    its extra is installed), the module whose ``add_arguments(name, parser)`` gives it its
    options and function, and the extra that module needs. ``client``: it also takes the
    client verbs' --url/--key/--json/--timeout."""

    name: str
    help: str
    module: str
    extra: str
    client: bool = False


EXTRA_VERBS: tuple[Verb, ...] = (
    Verb(
        "predict",
        "forecast or classify a CSV with a trained model",
        "worker.cli",
        "worker",
        client=True,
    ),
    Verb("serve", "run the REST service", "service.cli", "server"),
    Verb(
        "up",
        "service + local workers in one command (auth off unless --auth)",
        "service.cli",
        "all",
    ),
    Verb("worker", "run trials: one process per GPU slot (CPU if none)", "worker.cli", "worker"),
    Verb("db", "database schema", "service.cli", "server"),
    Verb("keys", "API keys", "service.cli", "server"),
)
_BY_NAME = {v.name: v for v in EXTRA_VERBS}
# The options of `seqtune` itself that take a value (before the verb): _verb_of skips them.
_GLOBAL_VALUED = ("--database-url", "--timeout")


def _seconds(text: str) -> float:
    """argparse type of ``--timeout``: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _load(verb: Verb) -> ModuleType:
    """The module of ``verb``; MissingExtra without its extra."""
    return import_extra(verb.module, extra=verb.extra, what=f"seqtune {verb.name}")


def build_parser(load: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. Every verb is listed; a verb of ``EXTRA_VERBS`` gets its
    options from its module only when it is in ``load`` (default: all of them, as far as their
    extras are installed), so that parsing one verb imports only that verb's module."""
    from seqtune.commands import EXIT_CODES, add_client_commands

    p = argparse.ArgumentParser(
        prog="seqtune",
        description="Hyperparameter search for LSTMs.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--database-url", help="overrides SEQTUNE_DATABASE_URL")
    timeout_help = (
        "client commands: seconds to wait for each answer of the service (default "
        "$SEQTUNE_TIMEOUT or 60); a slower answer is reported as a timeout"
    )
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS", help=timeout_help)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service (default $SEQTUNE_URL or http://127.0.0.1:8000)")
    common.add_argument("--key", help="API key (default $SEQTUNE_API_KEY)")
    common.add_argument("--json", action="store_true", help="JSON for scripts")
    # Also after the command name; SUPPRESS keeps a value given before it.
    common.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS", default=argparse.SUPPRESS, help=timeout_help
    )
    add_client_commands(sub, common)

    for verb in EXTRA_VERBS:
        vp = sub.add_parser(verb.name, help=verb.help, parents=[common] if verb.client else [])
        if load is not None and verb.name not in load:
            continue  # listed only: `main` loads the module of the verb it runs
        try:
            module = _load(verb)
        except MissingExtra as exc:
            vp.description = str(exc)
            vp.set_defaults(fn=_missing(exc))
            continue
        module.add_arguments(verb.name, vp)
    return p


def _missing(exc: MissingExtra) -> Callable[[argparse.Namespace], int]:
    """The function of a verb whose extra is missing: it raises ``exc``."""

    def fn(_args: argparse.Namespace) -> int:
        raise exc

    return fn


def _verb_of(argv: Sequence[str]) -> str | None:
    """The verb ``argv`` names: its first word that is neither an option of ``seqtune`` nor
    such an option's value (abbreviated options included, as argparse takes them)."""
    words = iter(argv)
    for word in words:
        if (
            word.startswith("--")
            and "=" not in word
            and len(word) > 2
            and any(opt.startswith(word) for opt in _GLOBAL_VALUED)
        ):
            next(words, None)  # its value
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from seqtune.client import ApiError, ServiceTimeout, ServiceUnreachable
    from seqtune.commands import exit_code_of

    argv = list(sys.argv[1:] if argv is None else argv)
    verb = _BY_NAME.get(_verb_of(argv) or "")
    try:
        if verb is not None:
            _load(verb)  # before parsing: without its extra, its options are unknown
        args = build_parser(load={verb.name} if verb else ()).parse_args(argv)
        return int(args.fn(args))
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return Exit.BAD_INPUT
    except CommandFailed as exc:
        print(f"seqtune: {exc.message}", file=sys.stderr)
        return exc.exit
    except SeqtuneError as exc:
        # Raised in this process by a server verb (db, keys, up), not answered by a service:
        # what it names is the command's own argument or configuration, so it is bad input
        # (a key to revoke that matches none is a wrong argument, not a missing study), unless
        # the database cannot be reached.
        print(f"seqtune: {exc.message}", file=sys.stderr)
        for d in exc.details:
            print(f"  {d.get('field')}: {d.get('reason')}", file=sys.stderr)
        return exc.code.exit if exc.code is ErrorCode.UNAVAILABLE else Exit.BAD_INPUT
    except ApiError as exc:
        print(f"seqtune: {exc}", file=sys.stderr)
        return exit_code_of(exc)
    except (ServiceUnreachable, ServiceTimeout) as exc:
        print(f"seqtune: {exc}", file=sys.stderr)
        return Exit.UNAVAILABLE
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:  # `seqtune … | head`: the reader left; not an error
        sys.stderr.close()
        return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
