"""Label Studio ML-backend compatibility: a Label Studio instance can use the gateway as its
ML backend (Settings → Model → Connect model, URL of the gateway, Basic auth with any user
name and a reviewer token of the project as the password).

| Label Studio calls | the gateway |
|---|---|
| `GET /health` (adding the backend) | `{"status": "UP"}` |
| `POST /setup` `{project, schema, hostname, access_token, ...}` | binds the Label Studio project to the token's project, keeps the address and token for fetching task images; answers the current model version |
| `POST /predict` `{tasks, project, label_config, params}` | one prediction per task sent (Label Studio stores nothing otherwise): the recognizer's boxes for the task's image as `rectanglelabels` in percent, with `score` and `model_version`; an image the gateway does not know gets an empty prediction |
| `POST /webhook` `{action, ...}` | stored in the same request and acknowledged (Label Studio waits one second and never retries); a worker turns `ANNOTATION_CREATED` / `ANNOTATION_UPDATED` into `label submitted` and `START_TRAINING` into `training requested` |
| `GET /versions` | the model versions whose pre-labels the gateway has seen |

The gateway runs no model: predictions are the pre-labels the recognizer already made, found by
the task's image (a URL of this gateway or `data.visionloop_image_id` from an export, else the
SHA-256 of the image fetched from Label Studio with its token).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from visionloop.contracts import (
    LabelSourceKind,
    LabelSubmitted,
    ModelRef,
    TaskKind,
    TrainingRequested,
    TrainingTrigger,
)
from visionloop.contracts.envelope import utcnow
from visionloop.libs import formats
from visionloop.libs.formats import FormatError
from visionloop.services.labeling_gateway import ls_store, sealed, store
from visionloop.services.labeling_gateway.actions import count_actions
from visionloop.services.labeling_gateway.auth import Principal, Role
from visionloop.services.labeling_gateway.decide import Refusal, label_submitted
from visionloop.services.labeling_gateway.fetch import Fetcher, FetchError, Origin
from visionloop.services.labeling_gateway.http import (
    Gateway,
    body_doc,
    guard,
    parse_json,
    read_body,
    role_extra,
    validate,
)

log = logging.getLogger(__name__)

ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
TRAINING_ACTIONS = ("START_TRAINING",)
NO_MODEL = "visionloop-no-model"
"""`model_version` when no model has pre-labelled anything in the project yet."""

_OUR_IMAGE = re.compile(r"/v1/projects/([a-z0-9][a-z0-9_-]{0,62})/images/([0-9a-f]{64})")


class SetupIn(BaseModel):
    """What Label Studio sends to `/setup` when the backend is added (and on project changes)."""

    model_config = ConfigDict(extra="allow")

    project: str = Field(description="`<Label Studio project id>.<its creation time>`.", max_length=128)
    schema_: str | None = Field(default=None, alias="schema", description="The labeling config (XML).", max_length=1_000_000)
    hostname: str | None = Field(default=None, description="Label Studio's address, for task image URLs.", max_length=2048)
    access_token: str | None = Field(default=None, description="Label Studio API token for fetching task images.", max_length=4096)
    extra_params: Any = None


class PredictIn(BaseModel):
    """What Label Studio sends to `/predict`."""

    model_config = ConfigDict(extra="allow")

    tasks: list[dict[str, Any]] = Field(description="Label Studio tasks (`id`, `data.image`, ...).")
    project: str | None = Field(default=None, max_length=128)
    label_config: str | None = Field(default=None, max_length=1_000_000)
    params: dict[str, Any] | None = None


def ls_project_id(value: Any) -> str:
    """The Label Studio project id in `"7.1700000000"`, `7` or `{"id": 7, ...}`."""
    if isinstance(value, dict):
        value = value.get("id")
    text = str(value if value is not None else "").split(".", 1)[0].strip()
    if not text or len(text) > 64:
        raise Refusal(422, "invalid_request", "the request names no Label Studio project")
    return text


def rectangle_names(label_config: str | None) -> tuple[str, str]:
    """`from_name` and `toName` of the config's `RectangleLabels` (defaults `label`, `image`)."""
    if not label_config:
        return formats.LS_FROM_NAME, formats.LS_TO_NAME
    try:
        root = ElementTree.fromstring(label_config)
    except ElementTree.ParseError:
        return formats.LS_FROM_NAME, formats.LS_TO_NAME
    for tag in root.iter():
        if tag.tag in ("RectangleLabels", "Rectangle"):
            return tag.get("name") or formats.LS_FROM_NAME, (tag.get("toName") or formats.LS_TO_NAME).split(",")[0]
    return formats.LS_FROM_NAME, formats.LS_TO_NAME


def model_version(model: ModelRef | None) -> str:
    """How Label Studio shows a model version."""
    return f"{model.model_id}@v{model.version}" if model else NO_MODEL


class ImageIds:
    """Which gateway image a Label Studio task shows, remembered by URL (bounded)."""

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._ids: OrderedDict[str, str] = OrderedDict()

    def get(self, url: str) -> str | None:
        found = self._ids.get(url)
        if found is not None:
            self._ids.move_to_end(url)
        return found

    def put(self, url: str, image_id: str) -> None:
        self._ids[url] = image_id
        self._ids.move_to_end(url)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)


class LabelStudio:
    """The ML-backend endpoints and the webhook worker."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._key: bytes | None = None
        self.fetcher = Fetcher(gw.config)
        self.gate = asyncio.Semaphore(gw.config.predict_max_concurrent)
        self.ids = ImageIds()
        self.wake = asyncio.Event()

    # -- resolving task images -----------------------------------------------------------------------------

    async def image_id(self, project: str, task: dict[str, Any], origin: Origin | None) -> str | None:
        """The gateway image a task shows, or None (fetching from Label Studio when needed)."""
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        named = data.get("visionloop_image_id")
        if isinstance(named, str) and re.fullmatch(r"[0-9a-f]{64}", named):
            return named
        url = data.get("image")
        if not isinstance(url, str) or not url:
            return None
        ours = _OUR_IMAGE.search(url)
        if ours and ours.group(1) == project:
            return ours.group(2)
        cached = self.ids.get(url)
        if cached:
            return cached
        content = await self.fetcher.fetch(url, origin)
        image_id = hashlib.sha256(content).hexdigest()
        self.ids.put(url, image_id)
        return image_id

    @property
    def key(self) -> bytes:
        """The key that seals Label Studio's access tokens in the database (`sealed.py`)."""
        if self._key is None:
            path = self.gw.config.ls_token_key_file or self.gw.runtime.settings.state_dir / "keys" / "gateway-ls-token.key"
            self._key = sealed.load_key(Path(path))
        return self._key

    async def origin(self, ls_project: str) -> Origin | None:
        async with self.gw.pool.acquire() as conn:
            row = await ls_store.ls_project(conn, self.gw.s, ls_project)
        if row is None or not row["hostname"]:
            return None
        try:
            token = sealed.unseal(self.key, row["access_token"])
        except sealed.SealError as exc:
            raise Refusal(503, "ls_token_unreadable", str(exc)) from None
        return Origin(base=row["hostname"], token=token)

    async def bound(self, principal: Principal, ls_project: str, **fields: Any) -> str:
        """The visionloop project a Label Studio project is bound to (binding it on first use)."""
        project = principal.project
        if project is None:
            raise Refusal(403, "project_required", "Label Studio connects with a token of one project, not an all-projects token")
        async with self.gw.pool.acquire() as conn:
            bound = await ls_store.bind_ls_project(conn, self.gw.s, ls_project, project, **fields)
        if bound != project:
            raise Refusal(403, "wrong_project", f"Label Studio project {ls_project} is bound to project {bound!r}, not {project!r}")
        return project

    # -- /predict -------------------------------------------------------------------------------------------

    async def predict(self, principal: Principal, body: PredictIn) -> dict[str, Any]:
        config = self.gw.config
        if len(body.tasks) > config.predict_max_tasks:
            raise Refusal(413, "too_many_tasks", f"{len(body.tasks)} tasks in one call; the limit is {config.predict_max_tasks}")
        ls_project = ls_project_id(body.project) if body.project else None
        project = await self.bound(principal, ls_project) if ls_project else principal.project
        if project is None:
            raise Refusal(403, "project_required", "Label Studio connects with a token of one project")
        origin = await self.origin(ls_project) if ls_project else None
        row = await self._names(ls_project)
        from_name, to_name = rectangle_names(body.label_config) if body.label_config else row
        async with self.gw.pool.acquire() as conn:
            versions = await store.model_versions(conn, self.gw.s, project)
        current = model_version(versions[0] if versions else None)
        fetches = asyncio.Semaphore(config.predict_fetch_concurrency)

        async def one(task: dict[str, Any]) -> dict[str, Any]:
            empty = {"result": [], "score": 0.0, "model_version": current}
            try:
                async with fetches:
                    image_id = await self.image_id(project, task, origin)
            except FetchError as exc:
                log.info("labeling-gateway: /predict task %s: image not fetched: %s", task.get("id"), exc.message)
                return empty
            if image_id is None:
                return empty
            async with self.gw.pool.acquire() as conn:
                ref = await store.image(conn, self.gw.s, project, image_id)
                detections, model = await store.prelabels_for(conn, self.gw.s, project, image_id)
            if ref is None or not detections:
                return empty
            return {
                "result": [
                    formats.ls_result(d, ref.width, ref.height, from_name=from_name, to_name=to_name, result_id=f"vl{n}")
                    for n, d in enumerate(detections)
                ],
                "score": min(d.score for d in detections),
                "model_version": model_version(model),
            }

        jobs = [asyncio.ensure_future(one(task if isinstance(task, dict) else {})) for task in body.tasks]
        done, pending = await asyncio.wait(jobs, timeout=config.predict_deadline_s) if jobs else (set(), set())
        for job in pending:
            job.cancel()
        results = []
        for job in jobs:
            if job in done and not job.cancelled() and job.exception() is None:
                results.append(job.result())
            else:
                if job in done and not job.cancelled() and job.exception() is not None:
                    log.warning("labeling-gateway: /predict task failed: %r", job.exception())
                results.append({"result": [], "score": 0.0, "model_version": current})
        self.gw.runtime.counters["ls_predictions"] += len(results)
        # Exactly one prediction per task, in the order sent: Label Studio stores nothing otherwise.
        return {"results": results, "model_version": current}

    async def _names(self, ls_project: str | None) -> tuple[str, str]:
        if ls_project is None:
            return formats.LS_FROM_NAME, formats.LS_TO_NAME
        async with self.gw.pool.acquire() as conn:
            row = await ls_store.ls_project(conn, self.gw.s, ls_project)
        if row is None:
            return formats.LS_FROM_NAME, formats.LS_TO_NAME
        return row["from_name"] or formats.LS_FROM_NAME, row["to_name"] or formats.LS_TO_NAME

    # -- /webhook and its worker ----------------------------------------------------------------------------

    async def store_webhook(self, principal: Principal, raw: bytes) -> dict[str, Any]:
        data = parse_json(raw)
        if not isinstance(data, dict) or not isinstance(data.get("action"), str):
            raise Refusal(422, "invalid_request", "a webhook is a JSON object with an `action`")
        action = data["action"][:64]
        project = principal.project
        if project is None:
            raise Refusal(403, "project_required", "Label Studio connects with a token of one project")
        if "project" in data and data["project"] is not None:
            await self.bound(principal, ls_project_id(data["project"]))
        wanted = action in ANNOTATION_ACTIONS or action in TRAINING_ACTIONS
        async with self.gw.pool.acquire() as conn:
            webhook_id = await ls_store.store_webhook(
                conn, self.gw.s, project, action, raw.decode("utf-8", "replace"), state="pending" if wanted else "ignored"
            )
        self.gw.runtime.counters["ls_webhooks"] += 1
        if wanted:
            self.wake.set()
        return {"status": "ok", "id": webhook_id, "queued": wanted}

    async def work(self) -> None:
        """Process stored webhooks for as long as the service runs."""
        try:
            while True:
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=1.0)
                except TimeoutError:
                    pass
                self.wake.clear()
                if self.gw.runtime.pool is None:
                    continue
                while await self.process_some():
                    pass
        except asyncio.CancelledError:
            await self.fetcher.close()  # the service is stopping
            raise

    async def process_some(self, limit: int = 16) -> int:
        """Claim and process up to `limit` webhooks; return how many were claimed."""
        async with self.gw.pool.acquire() as conn:
            rows = await ls_store.claim_webhooks(conn, self.gw.s, limit, claim_s=120.0)
        for row in rows:
            await self._process(row)
        return len(rows)

    async def _process(self, row: Any) -> None:
        gw = self.gw
        body = json.loads(row["body"])
        try:
            if row["action"] in TRAINING_ACTIONS:
                async with gw.runtime.transaction() as unit:
                    if await ls_store.finish_webhook(unit.conn, gw.s, row["id"], "done"):
                        ls_project = ls_project_id(body.get("project")) if body.get("project") is not None else "?"
                        unit.emit(
                            TrainingRequested(trigger=TrainingTrigger.LABEL_STUDIO, requested_by=f"label-studio:{ls_project}"),
                            project=row["project"],
                        )
                return
            submission = await self._submission(row["project"], body, row["id"])
            async with gw.runtime.transaction() as unit:
                if not await ls_store.finish_webhook(unit.conn, gw.s, row["id"], "done"):
                    return  # another worker finished it meanwhile
                await store.insert_submission(unit.conn, gw.s, store.SubmissionRow(
                    submission_id=submission.submission_id, task_id=submission.task_id, project=row["project"],
                    image_id=submission.image.image_id, user_id=submission.labeller.user_id, role=submission.labeller.role,
                    source=LabelSourceKind.LABEL_STUDIO.value, kind=submission.task_kind.value, decision=None,
                    boxes=submission.boxes, actions=submission.actions.model_dump(), opened_at=None,
                    submitted_at=submission.submitted_at, duration_s=submission.duration_s,
                ))
                # The image is labelled in Label Studio: nobody here needs to label it too.
                await store.supersede_queued(unit.conn, gw.s, row["project"], submission.image.image_id)
                unit.emit(submission, project=row["project"], correlation_id=submission.image.image_id)
            gw.runtime.counters["ls_annotations"] += 1
        except (Refusal, FetchError, FormatError) as exc:
            reason = getattr(exc, "reason", "invalid")
            message = getattr(exc, "message", str(exc))
            permanent = reason not in ("unreachable", "timed_out")
            async with gw.pool.acquire() as conn:
                if permanent or row["attempts"] >= gw.config.webhook_max_attempts:
                    await ls_store.finish_webhook(conn, gw.s, row["id"], "failed", f"{reason}: {message}"[:1000])
                    gw.runtime.counters["ls_webhooks_failed"] += 1
                    log.warning("labeling-gateway: webhook %s (%s) failed: %s: %s", row["id"], row["action"], reason, message)
                else:
                    await ls_store.retry_webhook(conn, gw.s, row["id"], f"{reason}: {message}"[:1000], delay_s=2.0 ** row["attempts"])

    async def _submission(self, project: str, body: dict[str, Any], webhook_id: int) -> LabelSubmitted:
        """The `label submitted` an annotation webhook stands for."""
        annotation = body.get("annotation")
        task = body.get("task")
        if not isinstance(annotation, dict) or not isinstance(task, dict):
            raise Refusal(422, "invalid_request", "an annotation webhook carries `annotation` and `task` (turn on 'send payload')")
        ls_project = ls_project_id(body.get("project") if body.get("project") is not None else task.get("project"))
        origin = await self.origin(ls_project)
        image_id = await self.image_id(project, task, origin)
        async with self.gw.pool.acquire() as conn:
            ref = await store.image(conn, self.gw.s, project, image_id) if image_id else None
            prelabels, model = await store.prelabels_for(conn, self.gw.s, project, image_id) if image_id else ([], None)
            classes = await store.classes(conn, self.gw.s, project)
        if ref is None:
            raise Refusal(422, "unknown_image", f"the task's image is not an image of project {project!r} (import it, or export tasks from the gateway)")
        # Percent values are relative: convert against the image the loop knows.
        results = [
            {**item, "original_width": ref.width, "original_height": ref.height}
            for item in annotation.get("result") or [] if isinstance(item, dict)
        ]
        boxes = [b.model_copy(update={"score": None}) for b in formats.boxes_from_ls_results(results)]
        lead = annotation.get("lead_time")
        completed_by = annotation.get("completed_by")
        if isinstance(completed_by, dict):
            completed_by = completed_by.get("email") or completed_by.get("id")
        return label_submitted(
            source=LabelSourceKind.LABEL_STUDIO, submission_id=f"ls-{ls_project}-{annotation.get('id', 'x')}-{webhook_id}",
            task_id=f"ls-{ls_project}-{task.get('id', 'x')}", kind=TaskKind.ANNOTATE, image=ref, boxes=boxes,
            labeller=f"label-studio:{completed_by if completed_by is not None else 'unknown'}", role="annotator",
            submitted_at=utcnow(), class_names=classes, prelabels=prelabels, prelabel_model=model,
            actions=count_actions(prelabels, boxes) if prelabels else None,
            duration_s=float(lead) if isinstance(lead, int | float) and lead >= 0 else None,
        )


LS_PREFIX = "/ls/{ls_token}"
"""Label Studio's address for the backend: `<gateway>/ls/<token>` (a reviewer token of the project)."""
LS_PATHS = ("/health", "/setup", "/predict", "/webhook", "/versions")


def register(app: FastAPI, gw: Gateway) -> LabelStudio:
    """Add the Label Studio ML-backend endpoints to `app`; return the worker to run."""
    ls = LabelStudio(gw)
    reviewer = Depends(guard(gw, Role.REVIEWER))
    tag = ["label-studio"]

    @app.get("/health", summary="Label Studio: is the backend up", tags=tag, openapi_extra=role_extra(None))
    async def health() -> dict[str, str]:
        return {"status": "UP", "model_class": "visionloop-labeling-gateway"}

    @app.post("/setup", summary="Label Studio: the backend was added to a project", tags=tag,
              description="Binds the Label Studio project to the token's project; keeps Label Studio's address and token to fetch task images.",
              openapi_extra={**body_doc(SetupIn, gw), **role_extra(Role.REVIEWER)})
    async def setup(request: Request, principal: Principal = reviewer) -> dict[str, str]:
        body = validate(SetupIn, parse_json(await read_body(request, gw.config.body_max_bytes)))
        from_name, to_name = rectangle_names(body.schema_)
        project = await ls.bound(
            principal, ls_project_id(body.project), hostname=body.hostname or None, access_token=sealed.seal(ls.key, body.access_token or None),
            from_name=from_name, to_name=to_name,
        )
        async with gw.pool.acquire() as conn:
            versions = await store.model_versions(conn, gw.s, project)
        return {"model_version": model_version(versions[0] if versions else None)}

    @app.post("/predict", summary="Label Studio: predictions for tasks", tags=tag,
              description=(
                  "One prediction per task sent, in order: the recognizer's boxes for the task's image as `rectanglelabels` "
                  "(percent of the image), with `score` and `model_version`. At most `predict_max_concurrent` calls are "
                  "worked on at once; more are refused at once with 503 `over_capacity` (Label Studio retries later)."
              ),
              openapi_extra={**body_doc(PredictIn, gw), **role_extra(Role.REVIEWER)})
    async def predict(request: Request, principal: Principal = reviewer) -> Any:
        if ls.gate.locked():
            gw.runtime.counters["ls_predict_over_capacity"] += 1
            raise Refusal(503, "over_capacity", f"{gw.config.predict_max_concurrent} /predict calls are in progress; retry shortly",
                          {"headers": {"Retry-After": "2"}})
        async with ls.gate:
            body = validate(PredictIn, parse_json(await read_body(request, gw.config.body_max_bytes * 8)))
            return JSONResponse(await ls.predict(principal, body))

    _webhook_and_versions(app, gw, ls, reviewer, tag)
    # The same endpoints under `/ls/<token>`: the URL to give Label Studio as the model's address,
    # so that every call it makes, the webhook it creates itself included, is authenticated.
    for route in [r for r in list(app.routes) if isinstance(r, APIRoute) and r.path in LS_PATHS]:
        app.add_api_route(f"{LS_PREFIX}{route.path}", route.endpoint, methods=sorted(route.methods), status_code=route.status_code,
                          include_in_schema=False)
    return ls


def _webhook_and_versions(app: FastAPI, gw: Gateway, ls: LabelStudio, reviewer: Any, tag: list[str]) -> None:
    """`/webhook` (stored, worked on later) and `/versions`."""

    @app.post("/webhook", status_code=201, summary="Label Studio: webhooks (annotations, start training)", tags=tag,
              description=(
                  "Stored in the request and acknowledged at once (Label Studio waits one second and never retries); "
                  "processed afterwards: ANNOTATION_CREATED / ANNOTATION_UPDATED become `label submitted`, START_TRAINING "
                  "becomes `training requested`; other actions are kept and ignored."
              ),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "required": ["action"]}}}},
                             **role_extra(Role.REVIEWER)})
    async def webhook(request: Request, principal: Principal = reviewer) -> dict[str, Any]:
        raw = await read_body(request, gw.config.webhook_max_bytes)
        return await ls.store_webhook(principal, raw)

    @app.get("/versions", summary="Label Studio: model versions", tags=tag, openapi_extra=role_extra(Role.REVIEWER))
    async def versions(principal: Principal = reviewer) -> dict[str, Any]:
        if principal.project is None:
            raise Refusal(403, "project_required", "Label Studio connects with a token of one project")
        async with gw.pool.acquire() as conn:
            found = await store.model_versions(conn, gw.s, principal.project)
        return {"versions": [model_version(m) for m in found] or [NO_MODEL]}
