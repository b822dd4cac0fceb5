"""The gateway's own HTTP API (`/v1`): projects and taxonomy, tokens, the task queue (next,
renew, release, skip, submit), images, import and export.

Every endpoint but the liveness probes needs a token of the path's project with a role high
enough (`x-required-role` in the OpenAPI document says which); every refusal is a
`RefusalAnswer` with a reason code.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from visionloop.contracts import (
    ImageRef,
    LabelActions,
    LabelSourceKind,
    LabelSubmitted,
    ModelRef,
    ReviewDecision,
    TaskKind,
)
from visionloop.contracts.envelope import utcnow
from visionloop.libs.blob import BlobMissing
from visionloop.services.labeling_gateway import datasets, store
from visionloop.services.labeling_gateway.actions import count_actions
from visionloop.services.labeling_gateway.api_models import (
    EXPORT_DOC,
    IMPORT_DOC,
    ClassesIn,
    ImageOut,
    ImportOut,
    LeaseIn,
    LeaseOut,
    ProjectIn,
    ProjectOut,
    ProjectPath,
    RenewOut,
    SubmitOut,
    TaskList,
    TaskOut,
    TaskPath,
    TaskRow,
    TokenIn,
    TokenOut,
)
from visionloop.services.labeling_gateway.auth import Principal, Role, signature_valid
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.decide import (
    Refusal,
    SubmitIn,
    label_submitted,
    prepare_submission,
    training_arguments,
)
from visionloop.services.labeling_gateway.http import (
    Gateway,
    RefusalAnswer,
    body_doc,
    guard,
    read_json,
    role_extra,
)

log = logging.getLogger(__name__)

MEDIA = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff", "GIF": "image/gif", "MPO": "image/jpeg"}

def _refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        401: "unauthenticated: no valid token", 403: "wrong_project / insufficient_role", 404: "unknown_project / unknown_task / unknown_image",
        409: "lease_lost / project_exists", 413: "body_too_large", 415: "unsupported_media_type",
        422: "invalid_json / invalid_request / invalid_submission / out_of_bounds / degenerate_box / unknown_class / too_many_boxes / missing_decision",
        503: "service_unavailable / over_capacity",
    }
    return {code: {"model": RefusalAnswer, "description": text[code]} for code in (401, 403, *codes)}


def image_path(project: str, image_id: str) -> str:
    """The gateway URL path of an image (never its blob URI)."""
    return f"/v1/projects/{project}/images/{image_id}"


def task_out(row: Any, classes: list[str], *, resumed: bool, lease_s: float) -> TaskOut:
    """A task row as the labeller sees it."""
    return TaskOut(
        task_id=row["task_id"],
        project=row["project"],
        kind=TaskKind(row["kind"]),
        image=ImageOut(image_id=row["image_id"], url=image_path(row["project"], row["image_id"]), width=row["width"], height=row["height"], format=row["format"]),
        start_boxes=[b.model_dump(mode="json") for b in store.boxes_from(row["start_boxes"])],
        prelabel_model=ModelRef.model_validate_json(row["prelabel_model"]) if row["prelabel_model"] else None,
        decision_required=row["kind"] == "review",
        issues=json.loads(row["issues"] or "[]"),
        classes=classes,
        priority=row["priority"],
        uncertainty=row["uncertainty"],
        group_size=row["group_size"],
        lease=LeaseOut(lease_id=row["lease_id"], expires_at=row["held_until"], lease_s=lease_s),
        resumed=resumed,
    )


def image_ref(row: Any) -> ImageRef:
    """The ImageRef of a task row (joined with its image)."""
    return ImageRef(
        image_id=row["image_id"], blob_uri=row["blob_uri"], width=row["width"], height=row["height"],
        format=row["format"], byte_size=row["byte_size"],
    )


@dataclass
class _Shared:
    """What every group of endpoints uses: settings, schema, role guards, the project check."""

    config: GatewaySettings
    s: str
    annotator: Any
    reviewer: Any
    admin: Any
    review_role: Role
    existing: Callable[[Any, str], Awaitable[None]]


def register(app: FastAPI, gw: Gateway) -> None:
    """Add the `/v1` endpoints to `app` (in this order in the OpenAPI document)."""
    known_projects: set[str] = set()

    async def existing(conn: Any, project: str) -> None:
        if project in known_projects:
            return
        if not await store.project_exists(conn, gw.s, project):
            raise Refusal(404, "unknown_project", f"project {project!r} does not exist; an admin creates it with POST /v1/projects")
        known_projects.add(project)

    shared = _Shared(config=gw.config, s=gw.s, annotator=Depends(guard(gw, Role.ANNOTATOR)), reviewer=Depends(guard(gw, Role.REVIEWER)),
                     admin=Depends(guard(gw, Role.ADMIN)), review_role=Role.parse(gw.config.review_role), existing=existing)
    for group in (_projects, _tokens, _leases, _task_list, _tasks, _submit, _images, _datasets):
        group(app, gw, shared)


def _projects(app: FastAPI, gw: Gateway, r: _Shared) -> None:
    """Projects and their taxonomy."""
    config, s, annotator, admin, existing = r.config, r.s, r.annotator, r.admin, r.existing

    @app.post("/v1/projects", status_code=201, summary="Create a project with its taxonomy", tags=["projects"],
              response_model=ProjectOut, responses=_refusals(409, 415, 422),
              openapi_extra={**body_doc(ProjectIn, gw), **role_extra(Role.ADMIN)})
    async def create_project(request: Request, principal: Principal = admin) -> ProjectOut:
        body = await read_json(request, config.body_max_bytes, ProjectIn)
        if principal.project is not None and principal.project != body.project:
            raise Refusal(403, "wrong_project", f"this token belongs to project {principal.project!r}; an all-projects admin token creates projects")
        async with gw.pool.acquire() as conn, conn.transaction():
            await store.create_project(conn, s, body.project, body.classes, created_by=principal.user_id)
        return ProjectOut(project=body.project, classes=list(dict.fromkeys(body.classes)), queue={}, policy=config.policy(body.project).model_dump())

    @app.get("/v1/projects", summary="The projects this token may see", tags=["projects"],
             responses=_refusals(), openapi_extra=role_extra(Role.ANNOTATOR))
    async def list_projects(principal: Principal = annotator) -> dict[str, list[str]]:
        if principal.project is not None:
            return {"projects": [principal.project]}
        async with gw.pool.acquire() as conn:
            return {"projects": await store.projects(conn, s)}

    @app.get("/v1/projects/{project}", summary="A project: taxonomy, policy, queue", tags=["projects"],
             response_model=ProjectOut, responses=_refusals(404), openapi_extra=role_extra(Role.ANNOTATOR))
    async def get_project(project: ProjectPath, principal: Principal = annotator) -> ProjectOut:
        async with gw.pool.acquire() as conn:
            await existing(conn, project)
            classes = await store.classes(conn, s, project)
            counts = await store.queue_counts(conn, s, project)
        return ProjectOut(project=project, classes=classes, queue=counts, policy=config.policy(project).model_dump())

    @app.get("/v1/projects/{project}/classes", summary="The project's taxonomy", tags=["projects"],
             responses=_refusals(404), openapi_extra=role_extra(Role.ANNOTATOR))
    async def get_classes(project: ProjectPath, principal: Principal = annotator) -> dict[str, list[str]]:
        async with gw.pool.acquire() as conn:
            await existing(conn, project)
            return {"classes": await store.classes(conn, s, project)}

    @app.post("/v1/projects/{project}/classes", summary="Append classes to the taxonomy", tags=["projects"],
              description="Classes are only ever appended: positions (YOLO indices) never change. Renaming a class is a migration.",
              responses=_refusals(404, 415, 422), openapi_extra={**body_doc(ClassesIn, gw), **role_extra(Role.ADMIN)})
    async def add_classes(project: ProjectPath, request: Request, principal: Principal = admin) -> dict[str, list[str]]:
        body = await read_json(request, config.body_max_bytes, ClassesIn)
        async with gw.pool.acquire() as conn, conn.transaction():
            await existing(conn, project)
            return {"classes": await store.add_classes(conn, s, project, body.classes)}


def _tokens(app: FastAPI, gw: Gateway, r: _Shared) -> None:
    """The project's API tokens."""
    config, s, admin, existing = r.config, r.s, r.admin, r.existing

    @app.post("/v1/projects/{project}/tokens", status_code=201, summary="Create a token", tags=["tokens"],
              response_model=TokenOut, responses=_refusals(404, 415, 422),
              openapi_extra={**body_doc(TokenIn, gw), **role_extra(Role.ADMIN)})
    async def create_token(project: ProjectPath, request: Request, principal: Principal = admin) -> TokenOut:
        body = await read_json(request, config.body_max_bytes, TokenIn)
        async with gw.pool.acquire() as conn, conn.transaction():
            await existing(conn, project)
            token_id, token = await store.create_token(
                conn, s, project=project, role=Role.parse(body.role), user_id=body.user_id, created_by=principal.user_id
            )
        return TokenOut(token_id=token_id, token=token, project=project, role=body.role, user_id=body.user_id)

    @app.get("/v1/projects/{project}/tokens", summary="The project's tokens (never their secrets)", tags=["tokens"],
             responses=_refusals(404), openapi_extra=role_extra(Role.ADMIN))
    async def list_tokens(project: ProjectPath, principal: Principal = admin) -> dict[str, list[dict[str, Any]]]:
        async with gw.pool.acquire() as conn:
            await existing(conn, project)
            rows = await store.tokens(conn, s, project)
        return {"tokens": [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()} for r in rows]}

    @app.delete("/v1/projects/{project}/tokens/{token_id}", status_code=204, summary="Revoke a token", tags=["tokens"],
                responses=_refusals(404), openapi_extra=role_extra(Role.ADMIN))
    async def revoke_token(project: ProjectPath, token_id: Annotated[str, Path(max_length=32)], principal: Principal = admin) -> Response:
        async with gw.pool.acquire() as conn:
            if not await store.revoke_token(conn, s, token_id, project):
                raise Refusal(404, "unknown_token", f"project {project!r} has no active token {token_id!r}")
        gw.tokens.clear()
        return Response(status_code=204)


def _leases(app: FastAPI, gw: Gateway, r: _Shared) -> None:
    """Leasing the next task."""
    config, s, annotator, review_role, existing = r.config, r.s, r.annotator, r.review_role, r.existing

    @app.post("/v1/projects/{project}/tasks/next", summary="Lease the next task", tags=["tasks"],
              description=(
                  "Hands out the most informative task (highest recognizer uncertainty, then the oldest) and holds it "
                  "for this labeller for `lease_s` seconds. A labeller who already holds a task gets it again "
                  "(`resumed`). 204 when nothing is left. Two labellers never hold the same task; a hold that expires "
                  "returns the task to the queue. Review tasks go to the review role and above."
              ),
              response_model=TaskOut, responses={204: {"description": "No task is available."}, **_refusals(404, 422)},
              openapi_extra=role_extra(Role.ANNOTATOR))
    async def next_task(
        project: ProjectPath,
        principal: Principal = annotator,
        kind: Annotated[list[TaskKind] | None, Query(description="Only these kinds (repeat the parameter).")] = None,
    ) -> Any:
        allowed = [k for k in TaskKind if k is not TaskKind.REVIEW or principal.role >= review_role]
        wanted = [k.value for k in allowed if kind is None or k in kind]
        lease_s = config.policy(project).lease_s
        async with gw.pool.acquire() as conn:
            await existing(conn, project)
            async with conn.transaction():
                await store.hold_labeller(conn, project, principal.user_id)
                row = await store.held_task(conn, s, project, principal.user_id)
                resumed = row is not None and row["kind"] in wanted
                if not resumed:
                    row = await store.lease_next(conn, s, project, principal.user_id, wanted, lease_s) if wanted else None
            if row is None:
                return Response(status_code=204)
            classes = await store.classes(conn, s, project)
        gw.runtime.counters["tasks_leased"] += not resumed
        return task_out(row, classes, resumed=resumed, lease_s=lease_s)


def _task_list(app: FastAPI, gw: Gateway, r: _Shared) -> None:
    """The project's tasks, by state and reason."""
    s, reviewer, existing = r.s, r.reviewer, r.existing

    @app.get("/v1/projects/{project}/tasks", summary="The project's tasks, by state and reason", tags=["tasks"],
             description="Newest first. `reason` says why a task is for people (see `TaskRow.reason`); page with `offset`.",
             response_model=TaskList, responses=_refusals(404, 422), openapi_extra=role_extra(Role.REVIEWER))
    async def list_tasks(
        project: ProjectPath,
        state: Annotated[str | None, Query(max_length=32, description="Only tasks in this state.")] = None,
        reason: Annotated[str | None, Query(max_length=64, description="Only tasks with this reason.")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0, le=1_000_000, description="Tasks to skip (`next_offset` of the previous page).")] = 0,
        principal: Principal = reviewer,
    ) -> TaskList:
        async with gw.pool.acquire() as conn:
            await existing(conn, project)
            rows = await store.task_list(conn, s, project, state=state, reason=reason, limit=limit + 1, offset=offset)
        page = [TaskRow.model_validate(row) for row in rows[:limit]]
        return TaskList(tasks=page, next_offset=offset + limit if len(rows) > limit else None)


def _tasks(app: FastAPI, gw: Gateway, r: _Shared) -> None:
    """A held task: read, renew, release, skip."""
    config, s, annotator = r.config, r.s, r.annotator

    @app.get("/v1/projects/{project}/tasks/{task_id}", summary="A task", tags=["tasks"],
             description="The labeller holding it, or a reviewer or admin of the project.",
             response_model=TaskOut, responses=_refusals(404), openapi_extra=role_extra(Role.ANNOTATOR))
    async def get_task(project: ProjectPath, task_id: TaskPath, principal: Principal = annotator) -> TaskOut:
        async with gw.pool.acquire() as conn:
            row = await store.task(conn, s, project, task_id)
            if row is None or (principal.role < Role.REVIEWER and row["leased_by"] != principal.user_id):
                raise Refusal(404, "unknown_task", f"project {project!r} has no task {task_id!r} held by you")
            classes = await store.classes(conn, s, project)
        if row["lease_id"] is None:
            raise Refusal(404, "unknown_task", f"task {task_id!r} is not held; lease it with `next`")
        return task_out(row, classes, resumed=True, lease_s=config.policy(project).lease_s)

    @app.post("/v1/projects/{project}/tasks/{task_id}/renew", summary="Extend a lease", tags=["tasks"],
              response_model=RenewOut, responses=_refusals(409, 415, 422),
              openapi_extra={**body_doc(LeaseIn, gw), **role_extra(Role.ANNOTATOR)})
    async def renew(project: ProjectPath, task_id: TaskPath, request: Request, principal: Principal = annotator) -> RenewOut:
        body = await read_json(request, config.body_max_bytes, LeaseIn)
        async with gw.pool.acquire() as conn:
            expires = await store.renew(conn, s, task_id, body.lease_id, config.policy(project).lease_s)
        if expires is None:
            raise _lease_lost(task_id)
        return RenewOut(task_id=task_id, lease_id=body.lease_id, expires_at=expires)

    @app.post("/v1/projects/{project}/tasks/{task_id}/release", status_code=204, summary="Give a task back", tags=["tasks"],
              responses=_refusals(409, 415, 422), openapi_extra={**body_doc(LeaseIn, gw), **role_extra(Role.ANNOTATOR)})
    async def release(project: ProjectPath, task_id: TaskPath, request: Request, principal: Principal = annotator) -> Response:
        body = await read_json(request, config.body_max_bytes, LeaseIn)
        async with gw.pool.acquire() as conn:
            if not await store.release(conn, s, task_id, body.lease_id):
                raise _lease_lost(task_id)
        return Response(status_code=204)

    @app.post("/v1/projects/{project}/tasks/{task_id}/skip", status_code=204, summary="Skip a task", tags=["tasks"],
              description="Gives the task back and never hands it to this labeller again.",
              responses=_refusals(409, 415, 422), openapi_extra={**body_doc(LeaseIn, gw), **role_extra(Role.ANNOTATOR)})
    async def skip(project: ProjectPath, task_id: TaskPath, request: Request, principal: Principal = annotator) -> Response:
        body = await read_json(request, config.body_max_bytes, LeaseIn)
        async with gw.pool.acquire() as conn, conn.transaction():
            if not await store.skip(conn, s, task_id, body.lease_id, principal.user_id):
                raise _lease_lost(task_id)
        return Response(status_code=204)


def _submit(app: FastAPI, gw: Gateway, r: _Shared) -> None:
    """Answering a task."""
    config, s, annotator, review_role = r.config, r.s, r.annotator, r.review_role

    @app.post("/v1/projects/{project}/tasks/{task_id}/submit", status_code=201, summary="Answer a task", tags=["tasks"],
              description=(
                  "Boxes in pixels (`x1, y1, x2, y2`) or percent (`units: percent`, `x, y, width, height`), classes from "
                  "the taxonomy; review tasks also carry a decision. Boxes within `box_tolerance_px` of the image are "
                  "clipped to it; anything else wrong is refused with the reason code of the first problem and every "
                  "problem in `details.issues`. The answer is recorded with who, when, how long the task was open and "
                  "what the labeller did to the boxes they started from, and goes to the verifier as `label submitted`. "
                  "A retried submit under the same lease returns the first answer (`Idempotent-Replayed: true`)."
              ),
              response_model=SubmitOut, responses=_refusals(404, 409, 413, 415, 422),
              openapi_extra={**body_doc(SubmitIn, gw), **role_extra(Role.ANNOTATOR)})
    async def submit(project: ProjectPath, task_id: TaskPath, request: Request, principal: Principal = annotator) -> Any:
        body = await read_json(request, config.body_max_bytes, SubmitIn, reason="invalid_submission")
        policy = config.policy(project)
        async with gw.runtime.transaction() as unit:
            conn = unit.conn
            row = await store.task_for_update(conn, s, project, task_id)
            if row is None:
                raise Refusal(404, "unknown_task", f"project {project!r} has no task {task_id!r}")
            prior = await store.submission_for_lease(conn, s, task_id, body.lease_id)
            if prior is not None and prior["user_id"] == principal.user_id:
                return _replayed(prior)
            if row["state"] != "queued" or row["lease_id"] != body.lease_id or row["leased_by"] != principal.user_id:
                raise _lease_lost(task_id)
            if row["kind"] == "review" and principal.role < review_role:
                raise Refusal(403, "insufficient_role", f"review tasks need role {review_role.label}")
            classes = await store.classes(conn, s, project)
            start = store.boxes_from(row["start_boxes"])
            boxes, decision = prepare_submission(
                body, kind=row["kind"], start_boxes=start, width=row["width"], height=row["height"], class_names=classes, policy=policy
            )
            now = utcnow()
            duration = max((now - row["leased_at"]).total_seconds(), 0.0)
            actions = count_actions(start, boxes)
            submission_id = f"s-{uuid.uuid4().hex}"
            await store.insert_submission(conn, s, store.SubmissionRow(
                submission_id=submission_id, task_id=task_id, project=project, image_id=row["image_id"],
                user_id=principal.user_id, role=principal.role.label, source=LabelSourceKind.GATEWAY.value,
                kind=row["kind"], decision=decision.value if decision else None, boxes=boxes,
                actions=actions.model_dump(), opened_at=row["leased_at"], submitted_at=now, duration_s=duration,
                lease_id=body.lease_id,
            ))
            await store.mark_submitted(conn, s, task_id, principal.user_id)
            unit.emit(_label_submitted(row, submission_id, task_id, boxes, decision, principal, now=now, duration=duration, actions=actions,
                                       classes=classes), project=project, correlation_id=row["image_id"])
        gw.runtime.counters["submissions"] += 1
        return SubmitOut(submission_id=submission_id, task_id=task_id, boxes=len(boxes), decision=decision, actions=actions, duration_s=duration)


def _images(app: FastAPI, gw: Gateway, r: _Shared) -> None:
    """The project's images (tokens or signed URLs)."""
    s = r.s

    async def image_access(request: Request, project: ProjectPath, image_id: str) -> None:
        """A signed URL (Label Studio exports) or a token of the project."""
        expires, signature = request.query_params.get("expires"), request.query_params.get("signature")
        if expires and signature and expires.isdigit():
            if signature_valid(await gw.signing_key(), project, image_id, int(expires), signature):
                return
            raise Refusal(403, "bad_signature", "the signed image URL is invalid or expired; export the tasks again")
        await guard(gw, Role.ANNOTATOR)(request)

    @app.get("/v1/projects/{project}/images/{image_id}", summary="An image of the project", tags=["images"],
             description="The image's bytes from the blob store, for a token of the project or a signed URL from a Label Studio export.",
             responses={200: {"content": {"image/*": {}}, "description": "The image."}, **_refusals(404)},
             openapi_extra=role_extra(Role.ANNOTATOR))
    async def get_image(
        request: Request,
        project: ProjectPath,
        image_id: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
        expires: Annotated[int | None, Query(description="Signed URLs: expiry, Unix seconds.")] = None,
        signature: Annotated[str | None, Query(description="Signed URLs: the signature.")] = None,
    ) -> Response:
        await image_access(request, project, image_id)
        async with gw.pool.acquire() as conn:
            ref = await store.image(conn, s, project, image_id)
        if ref is None:
            raise Refusal(404, "unknown_image", f"project {project!r} has no image {image_id[:16]}…")
        if request.headers.get("if-none-match") == f'"{image_id}"':
            return Response(status_code=304)
        try:
            data = await gw.blobs.get(ref.image_id)
        except BlobMissing:
            raise Refusal(404, "blob_missing", "the image's bytes are missing from the blob store") from None
        return Response(
            data, media_type=MEDIA.get(ref.format.upper(), "application/octet-stream"),
            headers={"ETag": f'"{image_id}"', "Cache-Control": "private, max-age=86400, immutable"},
        )


def _datasets(app: FastAPI, gw: Gateway, r: _Shared) -> None:
    """Export and import; liveness."""
    reviewer, admin, existing = r.reviewer, r.admin, r.existing

    @app.get("/v1/projects/{project}/export", summary="Export the verified labels", tags=["datasets"],
             description=EXPORT_DOC, responses={200: {"content": {"application/zip": {}, "application/json": {}}}, **_refusals(404, 422)},
             openapi_extra=role_extra(Role.REVIEWER))
    async def export(
        request: Request,
        project: ProjectPath,
        format: Annotated[Literal["coco", "yolo", "labelstudio"], Query(description="coco, yolo or labelstudio.")] = "coco",
        images: Annotated[bool | None, Query(description=(
            "Include the images (zip); false: labels only. Default: true for coco and yolo; false for labelstudio, "
            "whose import takes the JSON task list (images as signed URLs), not a zip."))] = None,
        principal: Principal = reviewer,
    ) -> Response:
        async with gw.pool.acquire() as conn:
            await existing(conn, project)
        base = str(request.base_url).rstrip("/")
        include = images if images is not None else format != "labelstudio"
        return await datasets.export(gw, project, format, include_images=include, base_url=base)

    @app.post("/v1/projects/{project}/import", status_code=202, summary="Import labelled images", tags=["datasets"],
              description=IMPORT_DOC, response_model=ImportOut,
              responses=_refusals(404, 413, 415, 422),
              openapi_extra={
                  "requestBody": {"required": True, "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}},
                                                                 "application/json": {"schema": {"type": "object"}}}},
                  **role_extra(Role.ADMIN),
              })
    async def import_(
        request: Request,
        project: ProjectPath,
        format: Annotated[Literal["coco", "yolo", "labelstudio"], Query(description="coco, yolo or labelstudio.")],
        test_set: Annotated[bool | None, Query(description="true: everything becomes the frozen test set; false: nothing does; unset: as the files say.")] = None,
        add_classes: Annotated[bool, Query(description="Append classes the files name that the taxonomy lacks (else they are refused).")] = False,
        train: Annotated[bool, Query(description=(
            "Ask for one training run once the import's labels are verified (its labels never fire the count trigger); "
            "false: no run for this import."))] = True,
        set_: Annotated[list[str] | None, Query(alias="set", max_length=64, description=(
            "Training arguments for that run, NAME=VALUE (repeatable), e.g. epochs=25; the trainer refuses unknown names."))] = None,
        principal: Principal = admin,
    ) -> ImportOut:
        async with gw.pool.acquire() as conn:
            await existing(conn, project)
        training = training_arguments(set_ or []) if train else None
        return await datasets.import_(gw, project, format, request, principal=principal, test_set=test_set, add_classes=add_classes,
                                      training=training)

    @app.get("/healthz", summary="Liveness", tags=["health"], openapi_extra=role_extra(None))
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": gw.runtime.service}


def _label_submitted(row: Any, submission_id: str, task_id: str, boxes: list[Any], decision: Any, principal: Principal, *, now: datetime,
                     duration: float, actions: Any, classes: list[str]) -> LabelSubmitted:
    """A person's answer to a held task, as the verifier receives it."""
    prelabels = store.detections_from(row["start_boxes"])
    model = ModelRef.model_validate_json(row["prelabel_model"]) if row["prelabel_model"] else None
    return label_submitted(
        source=LabelSourceKind.GATEWAY, submission_id=submission_id, task_id=task_id, kind=TaskKind(row["kind"]),
        image=image_ref(row), boxes=boxes, labeller=principal.user_id, role=principal.role.label, submitted_at=now,
        class_names=classes, prelabels=prelabels, prelabel_model=model, actions=actions,
        decision=decision, opened_at=row["leased_at"], duration_s=duration, uncertainty=row["uncertainty"],
        consensus_group=row["group_id"] if row["group_size"] > 1 else None,
        consensus_size=row["group_size"] if row["group_size"] > 1 else None,
    )


def _lease_lost(task_id: str) -> Refusal:
    return Refusal(
        409, "lease_lost",
        f"you do not hold task {task_id!r} under this lease (it expired and went to someone else, was released, or "
        "was answered); ask for the next task",
    )


def _replayed(prior: Any) -> JSONResponse:
    boxes = json.loads(prior["boxes"])
    out = SubmitOut(
        submission_id=prior["submission_id"], task_id=prior["task_id"], boxes=len(boxes),
        decision=ReviewDecision(prior["decision"]) if prior["decision"] else None,
        actions=LabelActions.model_validate_json(prior["actions"]), duration_s=prior["duration_s"],
    )
    return JSONResponse(out.model_dump(mode="json"), status_code=201, headers={"Idempotent-Replayed": "true"})

