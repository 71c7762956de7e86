"""seqtune's error vocabulary, shared by the service, its client and the CLI.

- ``ErrorCode``: every code an error body can carry. Each member is one row of the one table
  that maps a code to its HTTP status (``service/api/errors.py`` answers with it) and to the
  CLI's exit code (``seqtune/commands.py`` exits with it). The table is the enum itself, as in
  ``http.HTTPStatus``, so no code can lack a row.
- ``Exit``: the CLI's exit codes (``seqtune --help`` explains each).
- The domain errors (``NotFound``, ``Invalid`` ...): what the service raises on purpose; each
  carries its ``ErrorCode``.
- ``CommandFailed`` and ``MissingExtra``: what the CLI reports in one line.

Torch-, SQLAlchemy- and FastAPI-free: the base install imports it.
"""

from __future__ import annotations

import importlib
from enum import IntEnum, StrEnum
from types import ModuleType
from typing import Any, ClassVar


class Exit(IntEnum):
    """The ``seqtune`` command's exit codes."""

    OK = 0
    UNFINISHED = 1  # --watch: the study ended stopped or timed out
    BAD_INPUT = 2
    NOT_FOUND = 3
    AUTH = 4
    CONFLICT = 5
    UNAVAILABLE = 6
    INTERRUPTED = 130


class ErrorCode(StrEnum):
    """The machine-readable ``code`` of an error body, with its HTTP status (``.status``) and
    the CLI's exit code for it (``.exit``). A member compares equal to its string."""

    status: int
    exit: Exit

    def __new__(cls, value: str, status: int, exit_: Exit) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status, member.exit = status, exit_
        return member

    # For one status, the first row is the one `for_status` picks.
    #  name               code                  HTTP  CLI exit
    INVALID = "invalid", 422, Exit.BAD_INPUT
    NOT_FOUND = "not_found", 404, Exit.NOT_FOUND
    CONFLICT = "conflict", 409, Exit.CONFLICT
    ALREADY_EXISTS = "already_exists", 409, Exit.CONFLICT
    UNAUTHORIZED = "unauthorized", 401, Exit.AUTH
    TOO_LARGE = "too_large", 413, Exit.BAD_INPUT
    UNAVAILABLE = "unavailable", 503, Exit.UNAVAILABLE
    # Framework errors: a route that does not exist answers NOT_FOUND, a method it does not
    # take METHOD_NOT_ALLOWED; the dashboard refuses writes with READ_ONLY.
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, Exit.BAD_INPUT
    READ_ONLY = "read_only", 405, Exit.BAD_INPUT
    INTERNAL = "internal", 500, Exit.UNAVAILABLE
    # Unclassified: the base SeqtuneError, or an HTTP error no row above names.
    ERROR = "error", 400, Exit.BAD_INPUT

    @classmethod
    def of(cls, text: str) -> ErrorCode | None:
        """The member spelled ``text``, or None for a code this side does not know (one a
        newer server added)."""
        return next((member for member in cls if member.value == text), None)

    @classmethod
    def for_status(cls, status: int) -> ErrorCode:
        """The code an HTTP ``status`` stands for, for an answer whose own code is unknown or
        unclassified (a newer server, a proxy's error page): the first row with that status;
        else UNAUTHORIZED for 403 (a proxy's refusal is a credentials problem too),
        UNAVAILABLE for any other 5xx (a gateway's error), ERROR for anything else."""
        for member in cls:
            if member.status == status and member is not cls.ERROR:
                return member
        if status == 403:
            return cls.UNAUTHORIZED
        return cls.UNAVAILABLE if status >= 500 else cls.ERROR


class SeqtuneError(Exception):
    """Base of every error seqtune raises on purpose. ``message`` says what to fix; ``code``
    (a class attribute) says what kind of error it is, and so its HTTP status."""

    code: ClassVar[ErrorCode] = ErrorCode.ERROR

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class NotFound(SeqtuneError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(SeqtuneError):
    code = ErrorCode.ALREADY_EXISTS


class Conflict(SeqtuneError):
    """The request is valid but the resource's current state does not allow it."""

    code = ErrorCode.CONFLICT


class Fenced(Conflict):
    """This attempt no longer holds the trial's lease: its writes are refused. Raised by the
    store (``service.store.leases``); the worker's runner classifies it (abandon the attempt)
    without importing the store."""


class Invalid(SeqtuneError):
    """The request's content is wrong; ``details`` name the fields."""

    code = ErrorCode.INVALID


class Unauthorized(SeqtuneError):
    code = ErrorCode.UNAUTHORIZED


class TooLarge(SeqtuneError):
    code = ErrorCode.TOO_LARGE


class Unavailable(SeqtuneError):
    """The database cannot be reached right now; retrying later may work."""

    code = ErrorCode.UNAVAILABLE


class CommandFailed(Exception):
    """A CLI command could not do its job for a reason outside its input (a port in use, a
    service that failed to start, a database that refused): ``message`` is one line that says
    what to do, ``exit`` the command's exit code. Never crosses HTTP."""

    def __init__(self, message: str, exit_: Exit) -> None:
        super().__init__(message)
        self.message, self.exit = message, exit_


class MissingExtra(ImportError):
    """``what`` (a command, a method) needs an extra of seqtune that is not installed. The
    message is the one line the CLI prints: "seqtune serve needs the server extra: pip install
    'seqtune[server]'"."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} needs the {extra} extra: pip install 'seqtune[{extra}]'")
        self.what, self.extra = what, extra


# Our own packages: a module of theirs that is missing is a broken install or a bug, not an
# extra left out (the service and worker packages themselves may be absent).
_OURS = ("seqtune", "service", "worker")


def import_extra(module: str, *, extra: str, what: str) -> ModuleType:
    """``module`` (of the server or the worker), imported by name so that the base install
    never imports it statically. Raises MissingExtra(``what``, ``extra``) when a module it
    needs is not installed: a third-party one (torch, SQLAlchemy ...) or the package
    ``service``/``worker`` itself. Any other ImportError propagates unchanged."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        top = missing.partition(".")[0]
        if top == "seqtune" or (top in _OURS and missing != top):
            raise
        raise MissingExtra(what, extra) from exc
