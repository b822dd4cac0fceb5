"""What the loop's small HTTP apps share: every refusal is `{"reason": ..., "message": ...}`.

Endpoints answer their own refusals; this covers what the framework answers before an endpoint
runs (an unknown path, a method the path does not take, a parameter that does not validate),
`HTTPException`s raised with a `{"reason", "message"}` detail (which FastAPI would otherwise nest
under `detail`), and database errors: a value PostgreSQL cannot store is the request's fault
(422), an unreachable database is not (503). The labelling gateway has a richer version of its
own (`details`).
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from visionloop.libs.bus import INFRASTRUCTURE_ERRORS

log = logging.getLogger(__name__)

_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def refusal(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A refusal as every app of the loop answers it."""
    return JSONResponse({"reason": reason, "message": message}, status_code=status, headers=headers)


def install_refusals(app: FastAPI) -> None:
    """Make the framework's own 4xx answers, and database errors, refusals with a reason code."""

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        detail: Any = exc.detail
        if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
            return refusal(exc.status_code, detail["reason"], str(detail.get("message") or detail["reason"]), exc.headers)
        return refusal(exc.status_code, _REASONS.get(exc.status_code, "http_error"), str(detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return refusal(422, "invalid_request", f"the request is invalid: {problems}")

    @app.exception_handler(asyncpg.DataError)
    async def _unstorable(request: Request, exc: asyncpg.DataError) -> JSONResponse:
        return refusal(422, "invalid_request", f"the request holds a value that cannot be stored: {exc}")

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s could not be served: %r", request.method, request.url.path, exc)
        return refusal(503, "service_unavailable", f"the database cannot be reached ({type(exc).__name__}); retry later",
                       {"Retry-After": "5"})

    for error in (asyncpg.PostgresError, *INFRASTRUCTURE_ERRORS):
        app.add_exception_handler(error, _unavailable)
