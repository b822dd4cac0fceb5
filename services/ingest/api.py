"""ingest's HTTP API: `POST /v1/images` takes an image the way the submit topic does.

Three ways to send one, all answered the same way:

- `multipart/form-data`: the image in field `file`, the submission's fields beside it;
- a raw body (`Content-Type: image/*` or `application/octet-stream`), fields as query parameters;
- `application/json`: `{"project": ..., "source_uri": ..., ...}`, a source for ingest to fetch.

The request becomes an `ImageSubmitted` and goes through the same `Intake` as the topic
(examine, then record and emit through the outbox in one short transaction). A refusal
answers with the reason code the emitted `image rejected` carries.

Refused before a submission exists, with a 4xx and no event: malformed fields (422
`invalid_submission`), a body over the cap (413 `too_large`, cut off while streaming), a
request content type that cannot carry an image (415).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from visionloop.contracts import (
    ImageIngested,
    ImageRejected,
    ImageRejectReason,
    ImageSource,
    ImageSubmitted,
)
from visionloop.contracts.common import ProjectName
from visionloop.libs.blob import BlobError
from visionloop.libs.bus import INFRASTRUCTURE_ERRORS, Runtime
from visionloop.libs.db import quote_ident
from visionloop.libs import tokens
from visionloop.libs.refusals import install_refusals
from visionloop.services.ingest import decide as policy
from visionloop.services.ingest import store
from visionloop.services.ingest import tokens as ingest_tokens
from visionloop.services.ingest.inspect import Refusal
from visionloop.services.ingest.intake import Intake, Outcome

log = logging.getLogger(__name__)

JSON_BODY_MAX = 64 * 1024
"""Largest JSON body (a source to fetch, not an image)."""
DENIED_DRAIN_MAX = 1024 * 1024
"""A request refused for its token: this much of its body is read and dropped (so a small one gets its
answer rather than a reset); past it the connection is closed."""
FORM_OVERHEAD = 256 * 1024
"""Room for the form fields and part headers of a multipart upload, besides the image."""

STATUS: dict[ImageRejectReason, int] = {
    ImageRejectReason.TOO_LARGE: 413,
    ImageRejectReason.INLINE_TOO_LARGE: 413,
    ImageRejectReason.UNSUPPORTED_FORMAT: 415,
    ImageRejectReason.NOT_AN_IMAGE: 415,
    ImageRejectReason.CORRUPT: 422,
    ImageRejectReason.DECOMPRESSION_BOMB: 422,
    ImageRejectReason.TOO_MANY_FRAMES: 422,
    ImageRejectReason.INVALID_SUBMISSION: 422,
    ImageRejectReason.FORBIDDEN_SOURCE: 403,
    ImageRejectReason.UNREACHABLE: 502,
}
"""HTTP status of each refusal; `status_for` adds 409 (id conflict) and 504 (source timed out)."""

FIELDS: dict[str, str] = {
    "project": "Project slug (required): lowercase letters, digits, `-`, `_`.",
    "submission_id": (
        "Your id for this submission (optional; one is made up otherwise). Sending the same id "
        "with the same bytes again returns the first answer (header `Idempotent-Replayed: true`); "
        "an id that brought in other bytes answers 409."
    ),
    "domain": "Domain tags: `key=value` (repeat the field) or one JSON object, e.g. `site=plant-3`.",
    "source_system": "Name of the system sending the image.",
    "captured_at": "When the picture was taken, ISO 8601 with a time zone.",
    "upstream_id": "The sender's own id for the image.",
    "metadata": "Free-form string metadata: a JSON object of strings, or `key=value` (repeated).",
    "filename": "Original file name (multipart takes the file part's name).",
}
"""The submission's fields, as form fields, query parameters or JSON keys."""

_SINGLE = ("project", "submission_id", "source_system", "captured_at", "upstream_id", "filename")
_PAIRS = ("domain", "metadata")
_HOW_TO = (
    "send multipart/form-data with the image in field `file`, a raw body with Content-Type "
    "image/* or application/octet-stream, or application/json with a `source_uri`"
)
_PROJECT = TypeAdapter(ProjectName)


# -- request fields -> a submission (pure) ----------------------------------------------------


@dataclass(frozen=True)
class Requested:
    """A request's fields, validated: everything of a submission but its bytes or source."""

    project: str
    submission_id: str
    filename: str | None
    source: ImageSource

    def submission(self, *, data: bytes | None = None, source_uri: str | None = None) -> ImageSubmitted:
        """The submission carrying these fields and the bytes (or the source to fetch)."""
        try:
            return ImageSubmitted(
                submission_id=self.submission_id,
                inline_bytes=data,
                source_uri=source_uri,
                filename=self.filename,
                source=self.source,
            )
        except ValidationError as exc:
            raise _invalid(exc) from None


def fields_from_pairs(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Form fields or query parameters as the values `requested` takes.

    `domain` and `metadata` may repeat (`key=value` each) or be one JSON object; every other
    field appears at most once; unknown names are refused so a typo is not silently lost.
    """
    values: dict[str, Any] = {}
    for name, value in pairs:
        if name not in FIELDS:
            raise _bad(f"unknown field {name!r}; the fields are {', '.join(FIELDS)}")
        if name in _PAIRS:
            merged = values.setdefault(name, {})
            merged.update(_pairs(name, value))
        elif name in values:
            raise _bad(f"field {name!r} was given twice")
        else:
            values[name] = value
    return values


def requested(values: Mapping[str, Any]) -> Requested:
    """Validate a submission's fields (from a form, a query or a JSON body)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(sorted(unknown))}; the fields are {', '.join(FIELDS)}")
    project = values.get("project")
    if not project:
        raise _bad("field 'project' is required")
    try:
        project = _PROJECT.validate_python(project)
    except ValidationError:
        raise _bad(
            f"project {project!r} is not a project slug: lowercase letters, digits, '-' and '_', "
            "at most 63 characters"
        ) from None
    if (problem := policy.project_problem(project)) is not None:
        raise problem
    submission_id = values.get("submission_id") or f"http-{uuid.uuid4().hex}"
    if not isinstance(submission_id, str) or len(submission_id) > 128:
        raise _bad("submission_id must be a string of 1 to 128 characters")
    source_values = {k: v for k, v in values.items() if k in ImageSource.model_fields}
    try:
        source = ImageSource.model_validate(source_values)
    except ValidationError as exc:
        raise _invalid(exc) from None
    filename = values.get("filename")
    if filename is not None and not isinstance(filename, str):
        raise _bad("filename must be a string")
    return Requested(project=project, submission_id=submission_id, filename=filename, source=source)


def status_for(reason: ImageRejectReason, details: Mapping[str, Any]) -> int:
    """The HTTP status of a refusal: `STATUS`, with 409 for a reused submission id and 504 for
    a source that timed out."""
    if details.get("conflict"):
        return 409
    if reason is ImageRejectReason.UNREACHABLE and details.get("timed_out"):
        return 504
    return STATUS.get(reason, 422)


def _pairs(name: str, value: str) -> dict[str, str]:
    text = value.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise _bad(f"field {name!r} is not a JSON object: {exc}") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise _bad(f"field {name!r} must be a JSON object of strings")
        return parsed
    key, sep, val = text.partition("=")
    if not sep or not key:
        raise _bad(f"field {name!r} must be key=value or a JSON object, not {value[:40]!r}")
    return {key.strip(): val.strip()}


def _bad(message: str) -> Refusal:
    return Refusal(ImageRejectReason.INVALID_SUBMISSION, message)


def _invalid(exc: ValidationError) -> Refusal:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors()[:5]
    )
    return _bad(f"the submission's fields are invalid: {problems}")


# -- answers ------------------------------------------------------------------------------------


class ImageAnswer(BaseModel):
    """201: the image is stored (or was already: `already_stored`)."""

    submission_id: str
    project: str
    image_id: str = Field(description="SHA-256 of the bytes: the image's id in every event and API.")
    width: int = Field(description="Pixels, after EXIF orientation.")
    height: int = Field(description="Pixels, after EXIF orientation.")
    format: str
    byte_size: int
    already_stored: bool = Field(description="The same bytes were stored before (an exact duplicate).")


class RefusalAnswer(BaseModel):
    """4xx/5xx: why the image was not taken, with the reason code of `image rejected`."""

    reason: str = Field(description="An `image rejected` reason code, or `service_unavailable` (503).")
    message: str = Field(description="What went wrong and what to do about it.")
    submission_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


def _answer(outcome: Outcome, project: str) -> JSONResponse:
    answer = outcome.answer
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    if isinstance(answer, ImageIngested):
        body: BaseModel = ImageAnswer(
            submission_id=answer.submission_id,
            project=project,
            already_stored=answer.already_stored,
            **answer.image.model_dump(exclude={"blob_uri"}),  # where the server keeps it is not the client's
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=201, headers=headers)
    assert isinstance(answer, ImageRejected)
    body = RefusalAnswer(
        reason=answer.reason.value,
        message=answer.message,
        submission_id=answer.submission_id,
        details=dict(answer.details),
    )
    status = status_for(answer.reason, answer.details)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


async def _submitter(runtime: Runtime, request: Request) -> ingest_tokens.Submitter | None:
    token = tokens.credentials(request.headers.get("authorization"))
    if token is None or runtime.pool is None:
        return None
    async with runtime.pool.acquire() as conn:
        return await store.submitter_for(conn, quote_ident(runtime.schema), token)


async def _drained(request: Request, limit: int) -> bool:
    """Read and drop the body up to `limit` bytes; whether it all came (then the connection may
    stay open, and the client reads the answer instead of a reset)."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            return False
    return True


def _denied(denial: ingest_tokens.Denial, *, close: bool) -> JSONResponse:
    body = RefusalAnswer(reason=denial.reason, message=denial.message)
    # Closing tells a client still sending a large body to stop; a 401 names the scheme.
    headers = ({"Connection": "close"} if close else {}) | ({"WWW-Authenticate": "Bearer"} if denial.status == 401 else {})
    return JSONResponse(body.model_dump(mode="json"), status_code=denial.status, headers=headers)


def _refused(refusal: Refusal, *, close: bool = False) -> JSONResponse:
    body = RefusalAnswer(reason=refusal.reason.value, message=refusal.message, details=dict(refusal.details))
    # Closing tells a client still sending an oversized body to stop.
    headers = {"Connection": "close"} if close else None
    status = status_for(refusal.reason, refusal.details)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


# -- reading requests ---------------------------------------------------------------------------


class _BodyTooLarge(Exception):
    """The request body passed its cap while streaming in."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.refusal = policy.too_large(None, limit)


def _capped(receive: Receive, limit: int) -> Receive:
    """`receive` that raises `_BodyTooLarge` once the body passes `limit` bytes."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(limit)
        return message

    return capped


def _declared_over(request: Request, limit: int) -> None:
    refusal = policy.declared_size_problem(request.headers.get("content-length"), limit)
    if refusal is not None:
        raise _BodyTooLarge(limit)


async def _read_raw(request: Request, limit: int) -> tuple[Requested, ImageSubmitted]:
    fields = requested(fields_from_pairs(list(request.query_params.multi_items())))
    _declared_over(request, limit)
    body = bytearray()
    async for chunk in Request(request.scope, _capped(request.receive, limit)).stream():
        body += chunk
    return fields, fields.submission(data=bytes(body))


async def _read_multipart(request: Request, limit: int) -> tuple[Requested, ImageSubmitted]:
    _declared_over(request, limit + FORM_OVERHEAD)
    capped = Request(request.scope, _capped(request.receive, limit + FORM_OVERHEAD))
    try:
        form = await capped.form(max_files=1, max_fields=64, max_part_size=FORM_OVERHEAD)
    except HTTPException as exc:
        raise _bad(f"the multipart body does not parse: {exc.detail}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise _bad("the image goes in a file field named 'file'")
        pairs: list[tuple[str, str]] = list(request.query_params.multi_items())
        for name, value in form.multi_items():
            if name == "file":
                continue
            if not isinstance(value, str):
                raise _bad(f"field {name!r} must be text, not a file")
            pairs.append((name, value))
        values = fields_from_pairs(pairs)
        values.setdefault("filename", upload.filename)
        fields = requested(values)
        if upload.size is not None and upload.size > limit:
            raise _BodyTooLarge(limit)
        data = await upload.read()
        if len(data) > limit:
            raise _BodyTooLarge(limit)
        return fields, fields.submission(data=data)
    finally:
        await form.close()


async def _read_json(request: Request) -> tuple[Requested, ImageSubmitted]:
    if request.query_params:
        raise _bad("a JSON submission carries its fields in the body, not as query parameters")
    _declared_over(request, JSON_BODY_MAX)
    raw = bytearray()
    async for chunk in Request(request.scope, _capped(request.receive, JSON_BODY_MAX)).stream():
        raw += chunk
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _bad(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the JSON body must be an object")
    source_uri = body.pop("source_uri", None)
    if not isinstance(source_uri, str) or not source_uri:
        raise _bad(
            "a JSON submission names the image to fetch in 'source_uri'; upload bytes as "
            "multipart or a raw body"
        )
    fields = requested(body)
    return fields, fields.submission(source_uri=source_uri)


async def read_request(request: Request, max_bytes: int) -> tuple[Requested, ImageSubmitted]:
    """The submission a request carries, or `Refusal` / `_BodyTooLarge` (no event for either)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return await _read_multipart(request, max_bytes)
    if media == "application/json":
        return await _read_json(request)
    problem = policy.content_type_problem(media)
    if problem is not None:
        raise Refusal(problem.reason, f"{problem.message}; {_HOW_TO}", problem.details)
    return await _read_raw(request, max_bytes)


# -- the app ------------------------------------------------------------------------------------

_DESCRIPTION = """Submit an image to the loop, as the submit topic does.

| status | reason | when |
|---|---|---|
| 201 | | stored; `already_stored` says the same bytes were stored before |
| 403 | `forbidden_source` | the source's scheme, host, address, bucket or path is not allowed |
| 409 | `invalid_submission` | the `submission_id` already brought in other bytes |
| 413 | `too_large`, `inline_too_large` | over `VL_INGEST_MAX_BYTES` (uploads are cut off while streaming) |
| 415 | `not_an_image`, `unsupported_format` | not an image, or a format this ingest does not accept |
| 422 | `invalid_submission`, `corrupt`, `decompression_bomb`, `too_many_frames` | bad fields, or bytes that must not be decoded |
| 502 | `unreachable` | the source could not be read (refused, HTTP error, no such object) |
| 504 | `unreachable` | the source was too slow (`details.timed_out`: the fetch deadline or a timeout) |
| 503 | `service_unavailable` | the database or blob store is down; retry later |

Every refusal after the request is understood is also emitted as `image rejected` with the
same reason. Requests refused before that (malformed fields, an oversized body, a content type
that cannot be an image) are answered only here.
"""

_FORMS: dict[str, dict[str, str]] = {
    "project": {"pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
    "captured_at": {"format": "date-time"},
}
"""What a field's text must look like, where the schema can say it (generated clients, fuzzing)."""
_FIELD_SCHEMA = {name: {"type": "string", "description": text, **_FORMS.get(name, {})} for name, text in FIELDS.items()}
_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "project"],
                "properties": {"file": {"type": "string", "format": "binary"}, **_FIELD_SCHEMA},
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["project", "source_uri"],
                "properties": {
                    "source_uri": {"type": "string", "description": "`http(s)://`, `s3://` or `file://` URI to fetch."},
                    **_FIELD_SCHEMA,
                    "domain": {"type": "object", "additionalProperties": {"type": "string"}},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            }
        },
    },
}
_QUERY = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "string", **_FORMS.get(name, {})},
     "description": f"Raw bodies only. {text}"}
    for name, text in FIELDS.items()
]
_REFUSALS = {
    code: {"model": RefusalAnswer, "description": text}
    for code, text in {
        401: "unauthenticated (no valid ingest token)", 403: "forbidden_source / wrong_project (the token's projects)", 409: "invalid_submission (submission id reused for other bytes)",
        413: "too_large / inline_too_large", 415: "not_an_image / unsupported_format",
        422: "invalid_submission / corrupt / decompression_bomb / too_many_frames",
        502: "unreachable", 503: "service_unavailable", 504: "unreachable (timed out)",
    }.items()
}


async def _store(runtime: Runtime, intake: Intake, submission: Any, project: str) -> JSONResponse:
    """Examine, store and record an admitted submission; its answer (or a refusal, or 503)."""
    try:
        examined = await intake.examine(submission, inline_max=intake.config.max_bytes)
        async with runtime.transaction() as unit:
            outcome = await intake.record(unit, project=project, submission=submission, examined=examined, channel="http")
    except asyncpg.DataError as exc:  # a field PostgreSQL cannot store (a NUL character): the request's fault
        body = RefusalAnswer(
            reason=ImageRejectReason.INVALID_SUBMISSION.value,
            message=f"the submission holds a value that cannot be stored: {exc}",
            submission_id=submission.submission_id,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=422)
    except (BlobError, asyncpg.PostgresError, *INFRASTRUCTURE_ERRORS) as exc:
        log.warning("ingest: POST /v1/images could not be served: %r", exc)
        body = RefusalAnswer(
            reason="service_unavailable",
            message=f"ingest cannot store or record images right now ({type(exc).__name__}); retry later",
            submission_id=submission.submission_id,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=503, headers={"Retry-After": "5"})
    return _answer(outcome, project)


def http_app(runtime: Runtime, intake: Intake) -> FastAPI:
    """ingest's FastAPI app: `POST /v1/images` and `GET /healthz`."""
    config = intake.config
    app = FastAPI(
        title="visionloop ingest",
        description="Step 1 of the loop: images in, stored once, or refused with a reason.",
        version="1",
    )
    install_refusals(app)
    gate = asyncio.Semaphore(config.api_max_concurrent)

    @app.post(
        "/v1/images",
        status_code=201,
        summary="Submit an image",
        description=_DESCRIPTION,
        response_model=ImageAnswer,
        responses=_REFUSALS,
        openapi_extra={"requestBody": _REQUEST_BODY, "parameters": _QUERY},
    )
    async def submit_image(request: Request) -> JSONResponse:
        submitter = await _submitter(runtime, request)
        if (denied := ingest_tokens.denial(submitter, None)) is not None:  # the body is never parsed
            return _denied(denied, close=not await _drained(request, DENIED_DRAIN_MAX))
        async with gate:
            try:
                fields, submission = await read_request(request, config.max_bytes)
            except _BodyTooLarge as exc:
                return _refused(exc.refusal, close=True)
            except Refusal as refusal:
                return _refused(refusal)
            if (denied := ingest_tokens.denial(submitter, fields.project)) is not None:
                return _denied(denied, close=False)
            return await _store(runtime, intake, submission, fields.project)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": runtime.service}

    return app
