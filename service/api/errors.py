"""The one place that turns errors into HTTP answers, and shapes every error body:

    {"error": {"code": "invalid", "message": "what went wrong and how to fix it",
               "details": [{"field": "budget.n_trials", "reason": "..."}]}}

The status of each code is its row of ``seqtune.errors.ErrorCode`` (the table the CLI's exit
codes come from too); this module adds the headers a status asks for and the OpenAPI words.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from seqtune import errors
from seqtune.errors import ErrorCode
from seqtune.spec import errors_from_validation

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """One problem of a request: the field it is in (dotted path) and what is wrong with it.
    Some errors add context, such as ``line`` for a CSV upload."""

    model_config = ConfigDict(extra="allow")
    field: str = Field(description="dotted path of the field, '(body)' for the whole body")
    reason: str


class ErrorInfo(BaseModel):
    code: ErrorCode = Field(
        description="machine-readable; the HTTP status of each code: "
        + ", ".join(f"{c.value} {c.status}" for c in ErrorCode)
        + " (or the status of an HTTP error that no other code names)"
    )
    message: str = Field(description="what went wrong and how to fix it")
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """The body of every error the API answers (4xx and 5xx)."""

    error: ErrorInfo


# What each error status means for any route; routes add their own words where they know more.
ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "no API key, or an unknown or revoked one (`Authorization: Bearer <key>`)",
    404: "no such resource for this tenant",
    409: "the resource exists but its state does not allow this (the message says why)",
    413: "the request body is over the size cap (SEQTUNE_MAX_BODY_BYTES, "
    "SEQTUNE_MAX_UPLOAD_BYTES for uploads)",
    422: "the request is invalid: a body that is not valid JSON (or multipart), a missing or "
    "wrong field or parameter; `details` name the fields. Code 'invalid'",
    503: "the database cannot be reached right now; retry after `Retry-After` seconds",
}
# The headers an answer of these codes carries, and how the OpenAPI document declares them.
_HEADERS: dict[ErrorCode, dict[str, str]] = {
    ErrorCode.UNAUTHORIZED: {"WWW-Authenticate": "Bearer"},
    ErrorCode.UNAVAILABLE: {"Retry-After": "5"},
}
_HEADER_DOCS: dict[str, dict[str, Any]] = {
    "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}},
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
}
_STATUSES = frozenset(c.status for c in ErrorCode)


def responses(*statuses: int, **words: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for error statuses, each with the shared error body and the
    headers its codes send (ErrorCode's table). ``words`` override a description:
    ``responses(404, 409, s409="...")``. ValueError for a status no code answers with."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        if status not in _STATUSES:
            raise ValueError(f"no error code answers with HTTP {status}")
        out[status] = {
            "model": ErrorBody,
            "description": words.get(f"s{status}", ERROR_DESCRIPTIONS[status]),
        }
        headers = {
            name: _HEADER_DOCS[name]
            for code, sent in _HEADERS.items()
            if code.status == status
            for name in sent
        }
        if headers:
            out[status]["headers"] = headers
    return out


def error_body(
    code: ErrorCode, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The JSON body of an error answer (the module docstring shows it)."""
    return {"error": {"code": code, "message": message, "details": details or []}}


def error_response(
    code: ErrorCode,
    message: str,
    details: list[dict[str, Any]] | None = None,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The answer for an error of ``code``: its body, its status from ErrorCode's table
    (``status`` overrides it only for a framework error that already has one, such as a
    Starlette HTTPException), and the headers the code sends (``WWW-Authenticate`` for
    unauthorized, ``Retry-After`` for unavailable) plus ``headers``."""
    sent = {**_HEADERS.get(code, {}), **(headers or {})}
    return JSONResponse(
        error_body(code, message, details),
        status_code=code.status if status is None else status,
        headers=sent or None,
    )


def domain_response(exc: errors.SeqtuneError) -> JSONResponse:
    """The answer for a domain error: its code's status, message and details. Middleware
    outside the routers (where ``install``'s handlers do not run) answers with it too."""
    return error_response(exc.code, exc.message, exc.details)


# Starlette's own HTTP errors that have a code of their own; any other status keeps its
# status with the code 'error'.
_FRAMEWORK_CODES: dict[int, ErrorCode] = {
    c.status: c for c in (ErrorCode.NOT_FOUND, ErrorCode.METHOD_NOT_ALLOWED, ErrorCode.TOO_LARGE)
}


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _allowed_methods(req: Request) -> list[str]:
    """Every method some route of the app answers on the request's path (asked of the routes
    themselves: included routers hide their routes' methods)."""
    return [
        m
        for m in _METHODS
        if any(
            route.matches({**req.scope, "method": m})[0] == Match.FULL
            for route in req.app.router.routes
        )
    ]


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.SeqtuneError)
    async def _domain(_req: Request, exc: errors.SeqtuneError) -> JSONResponse:
        return domain_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            # Drop the tags pydantic adds for the member of a union (a discriminator value,
            # 'literal[...]', 'none'): the field is what the caller needs.
            loc = [
                p
                for p in loc
                if p
                not in ("int", "float", "categorical", "builtin", "synthetic", "uploaded", "none")
                and not p.startswith(("literal[", "function-"))
            ]
            reason = err.get("msg", "invalid")
            if err.get("type") == "json_invalid":  # loc is ("body", character position)
                where = f" (character {loc[0]})" if loc else ""
                loc, reason = [], f"the body is not valid JSON{where}"
            if err.get("type") == "none_required":  # the other member of `X | None` said it
                continue
            details.append({"field": ".".join(loc) or "(body)", "reason": reason})
        msg = f"the request has {len(details)} problem(s): " + "; ".join(
            f"{d['field']}: {d['reason']}" for d in details[:3]
        )
        return error_response(ErrorCode.INVALID, msg, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI and Starlette answer 400 for a body they cannot parse (JSON that is not
            # UTF-8, broken multipart). The API answers every unparseable body like invalid
            # JSON: 422, code 'invalid', as the OpenAPI document says.
            jsonish = "json" in req.headers.get("content-type", "")
            reason = (
                "the body is not valid JSON"
                if jsonish
                else (exc.detail if isinstance(exc.detail, str) else "the body cannot be parsed")
            )
            return error_response(
                ErrorCode.INVALID,
                f"the request has 1 problem(s): (body): {reason}",
                [{"field": "(body)", "reason": reason}],
            )
        code = _FRAMEWORK_CODES.get(exc.status_code, ErrorCode.ERROR)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see /docs for the API"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route on the path only.
            headers["Allow"] = ", ".join(_allowed_methods(req))
            message = f"{req.method} is not allowed here; use {headers['Allow']}"
        return error_response(code, message, status=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", req.method, req.url.path)
        return error_response(ErrorCode.INTERNAL, "internal error; the server log has the trace")


__all__ = [
    "install",
    "error_body",
    "error_response",
    "domain_response",
    "errors_from_validation",
    "ErrorBody",
    "responses",
]
