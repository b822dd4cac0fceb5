"""What every gateway endpoint shares: the context it runs in, the auth guard, refusals as
`{reason, message, details}`, and JSON bodies read under a size cap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from visionloop.libs.blob import BlobError, BlobStore
from visionloop.libs.bus import INFRASTRUCTURE_ERRORS, Runtime
from visionloop.libs.db import quote_ident
from visionloop.services.labeling_gateway import store
from visionloop.services.labeling_gateway.auth import (
    Principal,
    Role,
    TokenCache,
    authorize,
    credentials,
)
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.decide import Refusal

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

class RefusalAnswer(BaseModel):
    """Every 4xx/5xx answer: a reason code, a sentence that says what to do, and details."""

    reason: str = Field(description="A stable reason code, e.g. `unauthenticated`, `out_of_bounds`.")
    message: str = Field(description="What went wrong and what to do about it.")
    details: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Gateway:
    """The running gateway as endpoints see it."""

    runtime: Runtime
    blobs: BlobStore
    config: GatewaySettings
    tokens: TokenCache
    body_models: list[type[BaseModel]] = field(default_factory=list)
    _signing_key: bytes | None = None

    @property
    def s(self) -> str:
        """The gateway's schema, quoted for SQL."""
        return quote_ident(self.runtime.schema)

    @property
    def pool(self) -> asyncpg.Pool:
        """The database pool (endpoints need one)."""
        if self.runtime.pool is None:
            raise Refusal(503, "service_unavailable", "the gateway runs without a database")
        return self.runtime.pool

    async def principal(self, token: str) -> Principal | None:
        """Who a token speaks for (cached for `token_cache_s`)."""
        found, principal = self.tokens.get(token)
        if found:
            return principal
        async with self.pool.acquire() as conn:
            principal = await store.principal_for(conn, self.s, token)
        self.tokens.put(token, principal)
        return principal

    async def signing_key(self) -> bytes:
        """The key of signed image URLs."""
        if self._signing_key is None:
            async with self.pool.acquire() as conn:
                self._signing_key = await store.signing_key(conn, self.s)
        return self._signing_key


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>` (or `Token <token>`).")
_basic = HTTPBasic(auto_error=False, description="HTTP Basic with the token as the password (Label Studio's ML backend connection).")


def guard(gateway: Gateway, need: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets a request through only with a valid token of the path's project
    (if it names one) and at least role `need`."""

    async def check(request: Request, _b: Any = Depends(_bearer), _a: Any = Depends(_basic)) -> Principal:
        # Label Studio's own calls carry the token in the backend's URL (`/ls/<token>/...`):
        # the webhook it makes itself has no header (docs/labelling.md).
        token = credentials(request.headers.get("authorization")) or request.path_params.get("ls_token")
        principal = await gateway.principal(token) if token else None
        denial = authorize(principal, request.path_params.get("project"), need)
        if denial is not None:
            headers = {"WWW-Authenticate": 'Bearer realm="visionloop"'} if denial.status == 401 else None
            raise Refusal(denial.status, denial.reason, denial.message, {"headers": headers} if headers else {})
        assert principal is not None
        return principal

    return check


def role_extra(need: Role | None) -> dict[str, Any]:
    """OpenAPI extension naming the role an endpoint needs (`none`: public)."""
    return {"x-required-role": need.label if need else "none"}


def body_doc(model: type[BaseModel], gateway: Gateway, *, required: bool = True) -> dict[str, Any]:
    """OpenAPI `requestBody` of a JSON body read by `read_json` (not by FastAPI)."""
    if model not in gateway.body_models:
        gateway.body_models.append(model)
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def refusal_response(refusal: Refusal) -> JSONResponse:
    """A refusal as the JSON answer every endpoint gives."""
    details = dict(refusal.details)
    headers = details.pop("headers", None)
    body = RefusalAnswer(reason=refusal.reason, message=refusal.message, details=details)
    return JSONResponse(body.model_dump(mode="json"), status_code=refusal.status, headers=headers)


def install_errors(app: FastAPI) -> None:
    """Every error becomes a `RefusalAnswer` with a reason code."""

    @app.exception_handler(Refusal)
    async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
        return refusal_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return refusal_response(Refusal(422, "invalid_request", f"the request is invalid: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return refusal_response(Refusal(exc.status_code, reason, str(exc.detail)))

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("labeling-gateway: %s %s could not be served: %r", request.method, request.url.path, exc)
        return refusal_response(
            Refusal(503, "service_unavailable", f"the gateway cannot reach its database or blob store ({type(exc).__name__}); retry later",
                    {"headers": {"Retry-After": "5"}})
        )

    for error in (asyncpg.PostgresError, BlobError, *INFRASTRUCTURE_ERRORS):
        app.add_exception_handler(error, _unavailable)

    @app.exception_handler(asyncpg.DataError)
    async def _unstorable(request: Request, exc: asyncpg.DataError) -> JSONResponse:
        # The request's fault, not the database's (a NUL character, a number out of range): no retry helps.
        return refusal_response(Refusal(422, "invalid_request", f"the request holds a value that cannot be stored: {exc}"))


def install_openapi(app: FastAPI, gateway: Gateway) -> None:
    """The OpenAPI document, with the JSON body models the endpoints read themselves."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in [*gateway.body_models, RefusalAnswer]:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


JSON_TYPES = ("application/json",)


async def read_body(request: Request, limit: int, *, media_types: tuple[str, ...] = JSON_TYPES) -> bytes:
    """The request body, refused with 415 for another media type and 413 past `limit` bytes
    (counted while it streams in, whatever Content-Length says)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in media_types:
        raise Refusal(
            415, "unsupported_media_type",
            f"send {' or '.join(media_types)}, not {media or 'a body without Content-Type'}",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refusal(413, "body_too_large", f"the body is {declared} bytes; the limit is {limit}", {"limit": limit, "headers": {"Connection": "close"}})
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refusal(413, "body_too_large", f"the body is over the limit of {limit} bytes", {"limit": limit, "headers": {"Connection": "close"}})
    return bytes(body)


def parse_json(raw: bytes) -> Any:
    """JSON text (NaN and Infinity are accepted here and refused by the checks that follow)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refusal(422, "invalid_json", f"the body is not JSON: {exc}") from None


async def read_json(request: Request, limit: int, model: type[M], *, reason: str = "invalid_request") -> M:
    """A JSON body validated as `model`."""
    data = parse_json(await read_body(request, limit))
    return validate(model, data, reason=reason)


def validate(model: type[M], data: Any, *, reason: str = "invalid_request") -> M:
    """`data` as `model`, or a 422 with `reason` naming the first problems."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise Refusal(422, reason, f"the body is invalid: {problems}{more}") from None
