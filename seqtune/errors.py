"""Domain errors. The API maps each class to one HTTP status in ``service/api/errors.py``."""

from __future__ import annotations

from typing import Any


class SeqtuneError(Exception):
    """Base of every error seqtune raises on purpose. ``message`` says what to fix."""

    code = "error"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class NotFound(SeqtuneError):
    code = "not_found"


class AlreadyExists(SeqtuneError):
    code = "already_exists"


class Conflict(SeqtuneError):
    """The request is valid but the resource's current state does not allow it."""

    code = "conflict"


class Invalid(SeqtuneError):
    """The request's content is wrong; ``details`` name the fields."""

    code = "invalid"


class Unauthorized(SeqtuneError):
    code = "unauthorized"


class TooLarge(SeqtuneError):
    code = "too_large"


class Unavailable(SeqtuneError):
    """The database cannot be reached right now; retrying later may work."""

    code = "unavailable"
