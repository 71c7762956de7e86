"""The one place that maps domain errors to HTTP statuses and shapes every error body:

    {"error": {"code": "invalid", "message": "what went wrong and how to fix it",
               "details": [{"field": "budget.n_trials", "reason": "..."}]}}
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from seqtune import errors
from seqtune.spec import errors_from_validation

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """One problem of a request: the field it is in (dotted path) and what is wrong with it.
    Some errors add context, such as ``line`` for a CSV upload."""

    model_config = ConfigDict(extra="allow")
    field: str = Field(description="dotted path of the field, '(body)' for the whole body")
    reason: str


class ErrorInfo(BaseModel):
    code: str = Field(description="machine-readable: invalid, not_found, already_exists, "
                      "conflict, unauthorized, too_large, unavailable, method_not_allowed, "
                      "internal")
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
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
}


def responses(*statuses: int, **words: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for error statuses, each with the shared error body.
    ``words`` override a description: ``responses(404, 409, s409="...")``."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorBody,
                       "description": words.get(f"s{status}", ERROR_DESCRIPTIONS[status])}
        if status in _HEADERS:
            out[status]["headers"] = _HEADERS[status]
    return out

STATUS: dict[type[errors.SeqtuneError], int] = {
    errors.Invalid: 422,
    errors.NotFound: 404,
    errors.AlreadyExists: 409,
    errors.Conflict: 409,
    errors.Unauthorized: 401,
    errors.TooLarge: 413,
    errors.Unavailable: 503,
}


def error_body(code: str, message: str, details: list | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or []}}


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _allowed_methods(req: Request) -> list[str]:
    """Every method some route of the app answers on the request's path (asked of the routes
    themselves: included routers hide their routes' methods)."""
    return [m for m in _METHODS
            if any(route.matches({**req.scope, "method": m})[0] == Match.FULL
                   for route in req.app.router.routes)]


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.SeqtuneError)
    async def _domain(_req: Request, exc: errors.SeqtuneError) -> JSONResponse:
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if status == 503:
            headers = {"Retry-After": "5"}
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            # Drop the tags pydantic adds for the member of a union (a discriminator value,
            # 'literal[...]', 'none'): the field is what the caller needs.
            loc = [p for p in loc if p not in ("int", "float", "categorical", "builtin",
                                               "synthetic", "uploaded", "none")
                   and not p.startswith(("literal[", "function-"))]
            reason = err.get("msg", "invalid")
            if err.get("type") == "json_invalid":  # loc is ("body", character position)
                where = f" (character {loc[0]})" if loc else ""
                loc, reason = [], f"the body is not valid JSON{where}"
            if err.get("type") == "none_required":  # the other member of `X | None` said it
                continue
            details.append({"field": ".".join(loc) or "(body)", "reason": reason})
        msg = f"the request has {len(details)} problem(s): " + "; ".join(
            f"{d['field']}: {d['reason']}" for d in details[:3])
        return JSONResponse(error_body("invalid", msg, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI and Starlette answer 400 for a body they cannot parse (JSON that is not
            # UTF-8, broken multipart). The API answers every unparseable body like invalid
            # JSON: 422, code 'invalid', as the OpenAPI document says.
            jsonish = "json" in req.headers.get("content-type", "")
            reason = "the body is not valid JSON" if jsonish else (
                exc.detail if isinstance(exc.detail, str) else "the body cannot be parsed")
            return JSONResponse(error_body("invalid", f"the request has 1 problem(s): (body): "
                                           f"{reason}", [{"field": "(body)", "reason": reason}]),
                                status_code=422)
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see /docs for the API"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route on the path only.
            headers["Allow"] = ", ".join(_allowed_methods(req))
            message = f"{req.method} is not allowed here; use {headers['Allow']}"
        return JSONResponse(error_body(code, message), status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", req.method, req.url.path)
        return JSONResponse(error_body("internal", "internal error; the server log has the "
                                       "trace"), status_code=500)


__all__ = ["install", "error_body", "errors_from_validation", "ErrorBody", "responses"]
