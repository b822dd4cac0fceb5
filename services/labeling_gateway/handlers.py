"""The gateway's handlers, one per consumed topic: `image unrecognized` (people draw the boxes),
`image recognized` (the pre-labels go to the verifier, or to a reviewer), `label rejected` (a
reviewer, or the work redone) and `label verified` (kept for export; its tasks are done). The
gateway (`http.Gateway`) is the context; the wiring binds it.

And the dashboard's read model (dashboard.py serves it): `pipeline status`, `release edge`,
`release server`, `device status` and `model evaluated`, kept in tables of the gateway's own
(`dashboard_store`), not in memory: gateway replicas share one consumer group per topic, so each
sees only part of them."""

from __future__ import annotations

import uuid
from typing import Any

from visionloop.contracts import (
    DeviceStatus,
    Envelope,
    ImageRecognized,
    ImageUnrecognized,
    LabelRejected,
    LabelRejectReason,
    LabelSourceKind,
    LabelVerified,
    ModelEvaluated,
    ModelRef,
    PipelineStatus,
    TaskKind,
)
from visionloop.contracts.envelope import utcnow
from visionloop.contracts.release import DeviceState, Release
from visionloop.contracts.status import StatusKind
from visionloop.libs.bus import Unit
from visionloop.services.labeling_gateway import dashboard_store, economy_store, store
from visionloop.services.labeling_gateway.decide import (
    annotate_tasks,
    device_row,
    label_submitted,
    reannotate_tasks,
    release_row,
    review_task,
    status_rate,
    usable,
)
from visionloop.services.labeling_gateway.http import Gateway

SERVICE = "labeling-gateway"


def new_id(prefix: str) -> str:
    """A fresh task (`t`) or group (`g`) id."""
    return f"{prefix}-{uuid.uuid4().hex}"


async def on_unrecognized(ctx: Gateway, event: Envelope[ImageUnrecognized], unit: Unit[Any]) -> None:
    """No model recognises the image: people draw its boxes, starting from what the model found."""
    payload, project, s = event.payload, event.project, unit.schema
    await store.ensure_project(unit.conn, s, project, created_by=SERVICE, class_names=usable(payload.class_names))
    await store.upsert_image(unit.conn, s, project, payload.image)
    if payload.recognition is not None:
        await store.add_model_version(unit.conn, s, project, payload.recognition.model)
    if await store.has_active_task(unit.conn, s, project, payload.image.image_id):
        ctx.runtime.counters["tasks_already_open"] += 1
        return
    tasks = annotate_tasks(
        project, payload.image.image_id, uncertainty=payload.uncertainty, detections=payload.detections,
        model=payload.recognition.model if payload.recognition else None, policy=ctx.config.policy(project), new_id=new_id,
        reason=payload.reason.value,
    )
    await store.insert_tasks(unit.conn, s, tasks)
    ctx.runtime.counters["tasks_created"] += len(tasks)

async def on_recognized(ctx: Gateway, event: Envelope[ImageRecognized], unit: Unit[Any]) -> None:
    """A model recognises the image: its pre-labels go to the verifier, or to a reviewer."""
    payload, project, s = event.payload, event.project, unit.schema
    await store.ensure_project(unit.conn, s, project, created_by=SERVICE, class_names=usable(payload.class_names))
    await store.upsert_image(unit.conn, s, project, payload.image)
    await store.add_model_version(unit.conn, s, project, payload.recognition.model)
    if await store.has_active_task(unit.conn, s, project, payload.image.image_id):
        ctx.runtime.counters["tasks_already_open"] += 1
        return
    policy = ctx.config.policy(project)
    task = review_task(
        project, payload.image.image_id, uncertainty=payload.recognition.uncertainty,
        prelabels=payload.prelabels, model=payload.recognition.model, policy=policy, new_id=new_id,
    )
    await store.insert_tasks(unit.conn, s, [task])
    ctx.runtime.counters["tasks_created"] += 1
    await _offer_to_verifier(unit, payload, project, task)

async def on_rejected(ctx: Gateway, event: Envelope[LabelRejected], unit: Unit[Any]) -> None:
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
            unit.conn, s, sub["task_id"], spot_check=payload.reason is LabelRejectReason.SPOT_CHECK, reason=payload.reason.value,
            issues=[] if payload.reason in (LabelRejectReason.NEEDS_REVIEW, LabelRejectReason.SPOT_CHECK)
            else [{"index": None, "reason": payload.reason.value, "message": payload.message}, *issues],
        )
        ctx.runtime.counters["prelabels_to_review" if opened else "prelabels_already_open"] += 1
        return
    task = await store.task(unit.conn, s, project, sub["task_id"]) if sub["task_id"] else None
    slots = [r["task_id"] for r in await store.group_tasks(unit.conn, s, task["group_id"])] if task else []
    if slots:
        await store.set_state(unit.conn, s, slots, "rejected", only_from=("submitted", "queued"))
        # A consensus group is rejected as one: every member's answer shares the verdict.
        await store.reject_group_submissions(unit.conn, s, slots, payload.reason.value)
    await store.upsert_image(unit.conn, s, project, payload.image)
    if await store.has_active_task(unit.conn, s, project, payload.image.image_id):
        return
    model_row = task["prelabel_model"] if task else None
    tasks = reannotate_tasks(
        project, payload.image.image_id, rejected_boxes=store.boxes_from(sub["boxes"]), reason=payload.reason,
        message=payload.message, issues=issues, priority=task["priority"] if task else 1.0,
        uncertainty=task["uncertainty"] if task else None, parent_task=sub["task_id"],
        model=ModelRef.model_validate_json(model_row) if model_row else None,
        policy=ctx.config.policy(project), new_id=new_id,
    )
    await store.insert_tasks(unit.conn, s, tasks)
    ctx.runtime.counters["tasks_reannotate"] += len(tasks)

async def on_verified(ctx: Gateway, event: Envelope[LabelVerified], unit: Unit[Any]) -> None:
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
        for group_id in await store.groups_of(unit.conn, s, task_ids):
            slots = [r["task_id"] for r in await store.group_tasks(unit.conn, s, group_id)]
            await store.set_state(unit.conn, s, slots, "done", only_from=("submitted", "verifying", "queued"))
    ctx.runtime.counters["labels_verified"] += 1


async def _offer_to_verifier(unit: Unit[Any], payload: ImageRecognized, project: str, task: store.NewTask) -> None:
    """The model's pre-labels, submitted for the verifier's calibrated auto-accept."""
    s = unit.schema
    classes = await store.classes(unit.conn, s, project)
    now = utcnow()
    model = payload.recognition.model
    offered = label_submitted(
        source=LabelSourceKind.PRELABEL, submission_id=f"pre-{task.task_id}", task_id=task.task_id, kind=TaskKind.REVIEW,
        image=payload.image, boxes=payload.prelabels, labeller=f"model:{model.model_id}@v{model.version}", role="model",
        submitted_at=now, class_names=classes, prelabels=payload.prelabels, prelabel_model=model,
        prelabel_classes=usable(payload.class_names), uncertainty=payload.recognition.uncertainty,
    )
    await store.insert_submission(unit.conn, s, store.SubmissionRow(
        submission_id=offered.submission_id, task_id=task.task_id, project=project, image_id=payload.image.image_id,
        user_id=offered.labeller.user_id, role="model", source=LabelSourceKind.PRELABEL.value, kind="review",
        decision=None, boxes=offered.boxes, actions={}, opened_at=None, submitted_at=now, duration_s=None,
    ))
    unit.emit(offered)


# -- the dashboard's read model: `pipeline status`, `release edge|server`, `device status`, `model evaluated` --


async def on_status(event: Envelope[PipelineStatus], unit: Unit[Any]) -> None:
    """Keep each instance's latest status and its throughput since the one before."""
    p, s = event.payload, unit.schema
    if p.kind is StatusKind.PROGRESS:
        return  # progress reports carry counters too, but say nothing new about the instance
    prev = await dashboard_store.last_status(unit.conn, s, p.service, p.instance)
    if prev is not None and prev["occurred_at"] > event.occurred_at:
        return  # an older status, redelivered
    handled = int(p.counters.get("handled", 0))
    rate = status_rate((prev["uptime_s"], prev["handled"], prev["handled_per_s"]) if prev else None, p.uptime_s, handled)
    await dashboard_store.keep_status(
        unit.conn, s, service=p.service, instance=p.instance, kind=p.kind.value, uptime_s=p.uptime_s,
        counters=p.counters, gauges=p.gauges, rate=rate, at=event.occurred_at,
    )


async def on_release(event: Envelope[Release], unit: Unit[Any]) -> None:
    """Keep the latest stage of each release (edge and server alike)."""
    await dashboard_store.keep_release(unit.conn, unit.schema, release_row(event.payload), event.occurred_at)


async def on_device(event: Envelope[DeviceStatus], unit: Unit[Any]) -> None:
    """Keep each device's latest state per release (a heartbeat only says it is alive)."""
    heartbeat = event.payload.state is DeviceState.HEARTBEAT
    await dashboard_store.keep_device(unit.conn, unit.schema, device_row(event.payload), event.occurred_at, heartbeat=heartbeat)


async def on_evaluated(event: Envelope[ModelEvaluated], unit: Unit[Any]) -> None:
    """Keep each model version's latest test-set metrics (the economy's mAP)."""
    await economy_store.record_evaluation(unit.conn, unit.schema, event.project, event.payload, event.occurred_at)
