"""The one place that maps domain errors to HTTP statuses and shapes every error body:

    {"error": {"code": "invalid", "message": "what went wrong and how to fix it",
               "details": [{"field": "budget.n_trials", "reason": "..."}]}}
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import errors
from service.spec import errors_from_validation

log = logging.getLogger(__name__)

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
            loc = [p for p in loc if p not in ("int", "float", "categorical", "builtin",
                                               "synthetic", "uploaded")]
            reason = err.get("msg", "invalid")
            if err.get("type") == "json_invalid":
                reason = "the body is not valid JSON"
            details.append({"field": ".".join(loc) or "(body)", "reason": reason})
        msg = f"the request has {len(details)} problem(s): " + "; ".join(
            f"{d['field']}: {d['reason']}" for d in details[:3])
        return JSONResponse(error_body("invalid", msg, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see /docs for the API"
        return JSONResponse(error_body(code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", req.method, req.url.path)
        return JSONResponse(error_body("internal", "internal error; the server log has the "
                                       "trace"), status_code=500)


__all__ = ["install", "error_body", "errors_from_validation"]
