"""labeling-gateway: step 4 of the loop. People label what no model recognises and review what
models pre-labelled; Label Studio can do the same through the ML-backend endpoints.

Consumes:
- `image unrecognized` → an *annotate* task (starting from whatever the model found);
- `image recognized` → a *review* task carrying the pre-labels; with auto-accept on, the
  pre-labels first go to the verifier as `label submitted` (source `prelabel`) and the task
  joins the queue only if the verifier answers `label rejected` (`needs_review`, `spot_check`,
  or a check the model's boxes failed);
- `label rejected` of a person's submission → a *re-annotate* task;
- `label verified` → the label set kept for export; the task is done.

Emits `label submitted` (every answer, through the outbox) and `training requested` (Label
Studio's "Start Training"). Serves the HTTP API on `port` (api.py, labelstudio.py) and the
dashboard (dashboard.py), which follows `pipeline status`, `release edge`, `release server`,
`device status` and `model evaluated` into read-model tables of its own.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from visionloop.contracts import (
    Envelope,
    ImageRecognized,
    ImageUnrecognized,
    Labeller,
    LabelRejected,
    LabelRejectReason,
    LabelSourceKind,
    LabelSubmitted,
    LabelVerified,
    ModelRef,
    TaskKind,
    TrainingRequested,
)
from visionloop.contracts.envelope import utcnow
from visionloop.libs.bus import Runtime, Unit
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.services.labeling_gateway import api, dashboard, economy_store, labelstudio, store
from visionloop.services.labeling_gateway.auth import TokenCache
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.http import Gateway, install_errors, install_openapi
from visionloop.services.labeling_gateway.tasks import annotate_tasks, reannotate_tasks, review_task

log = logging.getLogger(__name__)

SERVICE = "labeling-gateway"

DESCRIPTION = """Step 4 of the visionloop loop: the labelling queue and everything around it.

- **Tasks**: `POST /v1/projects/{project}/tasks/next` leases the most informative task; renew,
  release, skip; `submit` answers it (pixels or percent, classes of the project's taxonomy,
  review decisions). Two labellers never hold the same task; an expired lease returns it.
- **Auth**: `Authorization: Bearer <token>` (tokens per project, roles annotator < reviewer <
  admin; `visionloop gateway token create`). `x-required-role` on each operation names its role.
- **Label Studio**: `/health`, `/setup`, `/predict`, `/webhook`, `/versions` make the gateway a
  Label Studio ML backend.
- **Datasets**: export and import in COCO, YOLO and Label Studio JSON.

Every refusal is `{"reason": "<code>", "message": "...", "details": {...}}`.
"""


def usable(class_names: list[str]) -> list[str]:
    """A model's class names that can be taxonomy names (a project first seen through a model
    starts with its classes)."""
    return [c for c in class_names if 0 < len(c) <= 64 and c.isprintable()]


def wire(runtime: Runtime, adapters: Adapters, config: GatewaySettings) -> FastAPI:
    """Register the gateway's handlers; return its HTTP app."""
    gw = Gateway(runtime=runtime, blobs=adapters.blobs, config=config, tokens=TokenCache(config.token_cache_s))
    app = FastAPI(title="visionloop labeling-gateway", description=DESCRIPTION, version="1")
    install_errors(app)
    api.register(app, gw)
    ls = labelstudio.register(app, gw)
    dashboard.register(app, gw)
    install_openapi(app, gw)
    runtime.background("webhooks", ls.work)

    async def queue_gauges() -> None:
        """Tasks by project and state in every heartbeat (`visionloop status`, dashboards)."""
        while True:
            if runtime.pool is not None:
                rows = await runtime.pool.fetch(
                    f"""SELECT project, CASE WHEN state = 'queued' AND held_until > now() THEN 'leased' ELSE state END AS state,
                               count(*) AS n
                        FROM {gw.s}.tasks WHERE state IN ('verifying', 'queued', 'submitted') GROUP BY 1, 2"""
                )
                for key in [k for k in runtime.gauges if k.startswith("queue.")]:
                    runtime.gauges[key] = 0.0
                runtime.gauges.update({f"queue.{r['project']}.{r['state']}": float(r["n"]) for r in rows})
            await asyncio.sleep(10)

    runtime.background("queue-gauges", queue_gauges)

    async def on_unrecognized(event: Envelope[ImageUnrecognized], unit: Unit[Any]) -> None:
        """No model recognises the image: people draw its boxes, starting from what the model found."""
        payload, project, s = event.payload, event.project, unit.schema
        await store.ensure_project(unit.conn, s, project, created_by=SERVICE, class_names=usable(payload.class_names))
        await store.upsert_image(unit.conn, s, project, payload.image)
        if payload.recognition is not None:
            await store.add_model_version(unit.conn, s, project, payload.recognition.model)
        if await store.has_active_task(unit.conn, s, project, payload.image.image_id):
            runtime.counters["tasks_already_open"] += 1
            return
        tasks = annotate_tasks(
            project, payload.image.image_id, uncertainty=payload.uncertainty, detections=payload.detections,
            model=payload.recognition.model if payload.recognition else None, policy=config.policy(project),
        )
        await store.insert_tasks(unit.conn, s, tasks)
        runtime.counters["tasks_created"] += len(tasks)

    async def on_recognized(event: Envelope[ImageRecognized], unit: Unit[Any]) -> None:
        """A model recognises the image: its pre-labels go to the verifier, or to a reviewer."""
        payload, project, s = event.payload, event.project, unit.schema
        await store.ensure_project(unit.conn, s, project, created_by=SERVICE, class_names=usable(payload.class_names))
        await store.upsert_image(unit.conn, s, project, payload.image)
        await store.add_model_version(unit.conn, s, project, payload.recognition.model)
        if await store.has_active_task(unit.conn, s, project, payload.image.image_id):
            runtime.counters["tasks_already_open"] += 1
            return
        policy = config.policy(project)
        task = review_task(
            project, payload.image.image_id, uncertainty=payload.recognition.uncertainty,
            prelabels=payload.prelabels, model=payload.recognition.model, policy=policy,
        )
        await store.insert_tasks(unit.conn, s, [task])
        runtime.counters["tasks_created"] += 1
        if task.state != "verifying":
            return
        classes = await store.classes(unit.conn, s, project)
        now = utcnow()
        offered = LabelSubmitted(
            submission_id=f"pre-{task.task_id}",
            task_id=task.task_id,
            task_kind=TaskKind.REVIEW,
            image=payload.image,
            boxes=list(payload.prelabels),
            labeller=Labeller(user_id=f"model:{payload.recognition.model.model_id}@v{payload.recognition.model.version}"[:128], role="model"),
            source=LabelSourceKind.PRELABEL,
            submitted_at=now,
            prelabel_model=payload.recognition.model,
            prelabel_classes=usable(payload.class_names),
            prelabels=list(payload.prelabels),
            uncertainty=payload.recognition.uncertainty,
            class_names=classes,
        )
        await store.insert_submission(unit.conn, s, store.SubmissionRow(
            submission_id=offered.submission_id, task_id=task.task_id, project=project, image_id=payload.image.image_id,
            user_id=offered.labeller.user_id, role="model", source=LabelSourceKind.PRELABEL.value, kind="review",
            decision=None, boxes=offered.boxes, actions={}, opened_at=None, submitted_at=now, duration_s=None,
        ))
        unit.emit(offered)

    async def on_rejected(event: Envelope[LabelRejected], unit: Unit[Any]) -> None:
        """The verifier refused a submission: pre-labels go to a reviewer, a person's work is redone."""
        payload, project, s = event.payload, event.project, unit.schema
        marked = await store.mark_outcome(unit.conn, s, [payload.submission_id], "rejected", payload.reason.value)
        sub = await store.submission(unit.conn, s, payload.submission_id)
        if sub is None:
            return  # not submitted through this gateway
        if not marked:
            return  # the verifier's word on it was handled already
        issues = [i.model_dump(mode="json") for i in payload.issues]
        if sub["source"] == LabelSourceKind.PRELABEL.value:
            opened = await store.open_for_review(
                unit.conn, s, sub["task_id"], spot_check=payload.reason is LabelRejectReason.SPOT_CHECK,
                issues=[] if payload.reason in (LabelRejectReason.NEEDS_REVIEW, LabelRejectReason.SPOT_CHECK)
                else [{"index": None, "reason": payload.reason.value, "message": payload.message}, *issues],
            )
            runtime.counters["prelabels_to_review" if opened else "prelabels_already_open"] += 1
            return
        task = await store.task(unit.conn, s, project, sub["task_id"]) if sub["task_id"] else None
        slots = [r["task_id"] for r in await store.group_tasks(unit.conn, s, task["group_id"])] if task else []
        if slots:
            await store.set_state(unit.conn, s, slots, "rejected", only_from=("submitted", "queued"))
            # A consensus group is rejected as one: every member's answer shares the verdict.
            await unit.conn.execute(
                f"""UPDATE {s}.submissions SET outcome = 'rejected', outcome_reason = $2, outcome_at = now()
                    WHERE task_id = ANY($1::text[]) AND outcome IS NULL""",
                slots, payload.reason.value,
            )
        await store.upsert_image(unit.conn, s, project, payload.image)
        if await store.has_active_task(unit.conn, s, project, payload.image.image_id):
            return
        model_row = task["prelabel_model"] if task else None
        tasks = reannotate_tasks(
            project, payload.image.image_id, rejected_boxes=store.boxes_from(sub["boxes"]), reason=payload.reason,
            message=payload.message, issues=issues, priority=task["priority"] if task else 1.0,
            uncertainty=task["uncertainty"] if task else None, parent_task=sub["task_id"],
            model=ModelRef.model_validate_json(model_row) if model_row else None,
            policy=config.policy(project),
        )
        await store.insert_tasks(unit.conn, s, tasks)
        runtime.counters["tasks_reannotate"] += len(tasks)

    async def on_verified(event: Envelope[LabelVerified], unit: Unit[Any]) -> None:
        """A label set passed: keep it for export; its tasks are done."""
        payload, project, s = event.payload, event.project, unit.schema
        await store.ensure_project(unit.conn, s, project, created_by=SERVICE, class_names=payload.class_names or [])
        await store.upsert_image(unit.conn, s, project, payload.image)
        await store.store_label(
            unit.conn, s, project, payload.image.image_id, label_id=payload.label_id, boxes=payload.boxes,
            method=payload.provenance.method.value, for_test_set=payload.for_test_set,
        )
        await economy_store.record_verified(
            unit.conn, s, project, label_id=payload.label_id, image_id=payload.image.image_id, provenance=payload.provenance,
            for_test_set=payload.for_test_set, at=event.occurred_at,
        )
        marked = await store.mark_outcome(unit.conn, s, payload.provenance.submission_ids, "verified", payload.provenance.method.value)
        task_ids = [r["task_id"] for r in marked if r["task_id"]]
        if task_ids:
            groups = await unit.conn.fetch(f"SELECT DISTINCT group_id FROM {s}.tasks WHERE task_id = ANY($1::text[])", task_ids)
            for group in groups:
                slots = [r["task_id"] for r in await store.group_tasks(unit.conn, s, group["group_id"])]
                await store.set_state(unit.conn, s, slots, "done", only_from=("submitted", "verifying", "queued"))
        runtime.counters["labels_verified"] += 1

    runtime.consume(ImageUnrecognized, on_unrecognized)
    runtime.consume(ImageRecognized, on_recognized)
    runtime.consume(LabelRejected, on_rejected)
    runtime.consume(LabelVerified, on_verified)
    runtime.produces(LabelSubmitted, TrainingRequested)
    return app


SPEC = ServiceSpec(
    name=SERVICE,
    description="Labelling tasks for people and Label Studio; answers go to the verifier.",
    wire=wire,
    settings=GatewaySettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
