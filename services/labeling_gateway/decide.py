"""The gateway's decisions, pure (no I/O, no clock, no random ids: they are passed in): which
tasks an image becomes, whether a submission is acceptable (and as which canonical boxes), and
the one builder of the `label submitted` event every path (people, imports, Label Studio, a
model's pre-labels) sends to the verifier.

- An unrecognised image becomes an *annotate* task that starts from whatever the model found.
- A recognised image becomes a *review* task carrying the pre-labels; the task waits
  (`verifying`) while the verifier judges the pre-labels, and joins the queue only if they are
  not auto-accepted (or are drawn for a spot check, or the verifier's `auto_accept` is off).
- A rejected submission comes back as a *re-annotate* task that starts from the rejected boxes
  (from nothing when a reviewer rejected the pre-labels) and shows the verifier's issues.

Priority is the recognizer's uncertainty (most informative first); the queue breaks ties by age.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from visionloop.contracts import (
    TOPICS,
    Box,
    Detection,
    DeviceStatus,
    EdgeRelease,
    ImageRef,
    LabelActions,
    Labeller,
    LabelRejectReason,
    LabelSourceKind,
    LabelSubmitted,
    ModelRef,
    ReviewDecision,
    ServerRelease,
    TaskKind,
)
from visionloop.contracts.release import ReleaseAction
from visionloop.libs.boxes import clip, geometry_problem
from visionloop.services.labeling_gateway.actions import same_boxes
from visionloop.services.labeling_gateway.config import Policy

NewId = Callable[[str], str]
"""A fresh id with the given prefix (`t` for tasks, `g` for groups): the caller's, so that
decisions stay pure."""


@dataclass
class NewTask:
    """A task to create (one slot of a group when several people label it)."""

    task_id: str
    project: str
    image_id: str
    kind: str
    state: str
    priority: float
    uncertainty: float | None = None
    start_boxes: Sequence[Box] = ()
    prelabel_model: ModelRef | None = None
    issues: list[dict[str, Any]] = field(default_factory=list)
    group_id: str | None = None
    group_size: int = 1
    parent_task: str | None = None
    reason: str | None = None
    """Why it is for people (see the migration `0004_task_reason.sql`)."""

MAX_ISSUES_SHOWN = 50
"""Problems listed in one refusal's details (the count is always given)."""


def annotate_tasks(
    project: str,
    image_id: str,
    *,
    uncertainty: float,
    detections: Sequence[Detection],
    model: ModelRef | None,
    policy: Policy,
    new_id: NewId,
    reason: str | None = None,
) -> list[NewTask]:
    """An unrecognised image: draw every box, starting from what the model found; `reason`: the
    recognizer's (why no model recognises it)."""
    return _group(
        NewTask(
            task_id=new_id("t"),
            project=project,
            image_id=image_id,
            kind="annotate",
            state="queued",
            priority=uncertainty,
            uncertainty=uncertainty,
            start_boxes=list(detections),
            prelabel_model=model if detections else None,
            reason=reason,
        ),
        policy.consensus_labellers,
        new_id,
    )


def review_task(
    project: str,
    image_id: str,
    *,
    uncertainty: float,
    prelabels: Sequence[Detection],
    model: ModelRef,
    policy: Policy,
    new_id: NewId,
) -> NewTask:
    """A recognised image: a person accepts, corrects or rejects the pre-labels.

    The task first waits for the verifier (`verifying`), which auto-accepts the pre-labels or
    sends them to people (its `auto_accept` setting decides whether it may). Review tasks are
    always one person's decision; consensus is for drawing boxes.
    """
    return NewTask(
        task_id=new_id("t"),
        project=project,
        image_id=image_id,
        kind="review",
        state="verifying",
        priority=uncertainty,
        uncertainty=uncertainty,
        start_boxes=list(prelabels),
        prelabel_model=model,
        reason="prelabels",
    )


def reannotate_tasks(
    project: str,
    image_id: str,
    *,
    rejected_boxes: Sequence[Box],
    reason: LabelRejectReason,
    message: str,
    issues: Sequence[dict[str, Any]],
    priority: float,
    uncertainty: float | None,
    parent_task: str | None,
    model: ModelRef | None,
    policy: Policy,
    new_id: NewId,
) -> list[NewTask]:
    """A rejected submission: label the image again, starting from the rejected boxes.

    When a reviewer rejected the pre-labels, those boxes are wrong by their word: start empty.
    """
    start = [] if reason is LabelRejectReason.REVIEWER_REJECTED else list(rejected_boxes)
    shown = [{"index": None, "reason": reason.value, "message": message}, *issues][:MAX_ISSUES_SHOWN]
    return _group(
        NewTask(
            task_id=new_id("t"),
            project=project,
            image_id=image_id,
            kind="reannotate",
            state="queued",
            priority=priority,
            uncertainty=uncertainty,
            start_boxes=start,
            prelabel_model=model if start else None,
            issues=shown,
            parent_task=parent_task,
            reason=reason.value,
        ),
        policy.consensus_labellers,
        new_id,
    )


def _group(task: NewTask, size: int, new_id: NewId) -> list[NewTask]:
    """`size` slots of one task, one per labeller, sharing a group id (one slot when 1)."""
    if size <= 1:
        return [task]
    group_id = new_id("g")
    return [
        NewTask(**{**task.__dict__, "task_id": task.task_id if n == 0 else new_id("t"), "group_id": group_id, "group_size": size})
        for n in range(size)
    ]


# -- submissions -------------------------------------------------------------------------------------


class BoxIn(BaseModel):
    """A submitted box: corners `x1, y1, x2, y2` in pixels, or `x, y, width, height` in percent
    of the image (top-left corner and size, as Label Studio draws them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)

    class_name: str = Field(min_length=1, max_length=64, description="A class of the project's taxonomy.")
    x1: float | None = Field(default=None, description="Pixels (units `pixel`).")
    y1: float | None = Field(default=None, description="Pixels (units `pixel`).")
    x2: float | None = Field(default=None, description="Pixels (units `pixel`).")
    y2: float | None = Field(default=None, description="Pixels (units `pixel`).")
    x: float | None = Field(default=None, description="Percent of the image width (units `percent`).")
    y: float | None = Field(default=None, description="Percent of the image height (units `percent`).")
    width: float | None = Field(default=None, description="Percent of the image width (units `percent`).")
    height: float | None = Field(default=None, description="Percent of the image height (units `percent`).")


class SubmitIn(BaseModel):
    """The answer to a leased task."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)

    lease_id: uuid.UUID = Field(description="The lease the task was handed out under (from `next`).")
    units: Literal["pixel", "percent"] = Field(default="pixel", description="How the boxes are given.")
    decision: ReviewDecision | None = Field(
        default=None,
        description=(
            "Review tasks only: `accept` keeps the pre-labels (send no boxes), `correct` replaces "
            "them with `boxes`, `reject` says they are wrong (the image is labelled again)."
        ),
    )
    boxes: list[BoxIn] | None = Field(
        default=None, description="Every object in the image; an empty list says there is none."
    )


@dataclass
class Refusal(Exception):
    """A request the gateway refuses: HTTP status, reason code, sentence, details."""

    status: int
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)


def _issue(index: int, reason: LabelRejectReason | str, message: str) -> dict[str, Any]:
    return {"index": index, "reason": str(reason), "message": message}


def _to_box(box: BoxIn, index: int, units: str, width: int, height: int) -> tuple[Box | None, dict[str, Any] | None]:
    pixel = (box.x1, box.y1, box.x2, box.y2)
    percent = (box.x, box.y, box.width, box.height)
    given, other = (pixel, percent) if units == "pixel" else (percent, pixel)
    names = "x1, y1, x2, y2" if units == "pixel" else "x, y, width, height"
    if any(v is None for v in given) or any(v is not None for v in other):
        return None, _issue(index, "invalid_submission", f"a box in units {units!r} has exactly {names}")
    values = [float(v) for v in given]  # type: ignore[arg-type]
    if not all(math.isfinite(v) for v in values):
        return None, _issue(index, LabelRejectReason.DEGENERATE_BOX, "a box coordinate is not a finite number (NaN or infinity)")
    if units == "percent":
        x, y, w, h = values
        if w < 0 or h < 0:
            return None, _issue(index, LabelRejectReason.DEGENERATE_BOX, f"the box has a negative size ({w:g}% x {h:g}%)")
        x1, y1, x2, y2 = x / 100 * width, y / 100 * height, (x + w) / 100 * width, (y + h) / 100 * height
    else:
        x1, y1, x2, y2 = values
        if x2 < x1 or y2 < y1:
            return None, _issue(index, LabelRejectReason.DEGENERATE_BOX, f"the box has a negative size ({x2 - x1:g} x {y2 - y1:g} px)")
    return Box(x1=x1, y1=y1, x2=x2, y2=y2, class_name=box.class_name), None


def prepare_submission(
    body: SubmitIn,
    *,
    kind: str,
    start_boxes: Sequence[Box],
    width: int,
    height: int,
    class_names: Sequence[str],
    policy: Policy,
) -> tuple[list[Box], ReviewDecision | None]:
    """The canonical boxes (pixels, clipped to the image) and decision of a submission, or a
    `Refusal` (422) naming every box that is wrong and why."""
    decision = body.decision
    if kind == "review":
        if decision is None:
            raise Refusal(422, LabelRejectReason.MISSING_DECISION.value, "a review task needs a decision: accept, correct or reject")
        if decision is ReviewDecision.ACCEPT:
            if body.boxes is not None:
                boxes, _ = _convert(body, width=width, height=height, class_names=class_names, policy=policy)
                if not same_boxes(start_boxes, boxes):
                    raise Refusal(
                        422, "invalid_submission",
                        "`accept` keeps the pre-labels as they are; send decision `correct` with the changed boxes",
                    )
            as_submitted = SubmitIn(
                lease_id=body.lease_id,
                boxes=[BoxIn(class_name=b.class_name, x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2) for b in start_boxes],
            )
            try:
                boxes, _ = _convert(as_submitted, width=width, height=height, class_names=class_names, policy=policy)
            except Refusal as refusal:
                refusal.message = f"the pre-labels cannot be accepted as they are ({refusal.message}); send decision `correct` with fixed boxes"
                raise
            return boxes, decision
        if decision is ReviewDecision.REJECT:
            if body.boxes:
                raise Refusal(422, "invalid_submission", "`reject` sends no boxes; the image is labelled again from scratch")
            return [], decision
        if body.boxes is None:
            raise Refusal(422, "invalid_submission", "`correct` sends the corrected boxes (an empty list if there is no object)")
    elif decision is not None:
        raise Refusal(422, "invalid_submission", f"decisions are for review tasks; this is a {kind} task: send only boxes")
    elif body.boxes is None:
        raise Refusal(422, "invalid_submission", "send `boxes`: every object in the image (an empty list if there is none)")
    boxes, _ = _convert(body, width=width, height=height, class_names=class_names, policy=policy)
    return boxes, decision


def _convert(body: SubmitIn, *, width: int, height: int, class_names: Sequence[str], policy: Policy) -> tuple[list[Box], None]:
    submitted = body.boxes or []
    if len(submitted) > policy.max_boxes:
        raise Refusal(
            422, LabelRejectReason.TOO_MANY_BOXES.value,
            f"{len(submitted)} boxes is more than the {policy.max_boxes} one submission may carry",
            {"boxes": len(submitted), "max_boxes": policy.max_boxes},
        )
    known = set(class_names)
    issues: list[dict[str, Any]] = []
    boxes: list[Box] = []
    for index, raw in enumerate(submitted):
        box, issue = _to_box(raw, index, body.units, width, height)
        if issue is not None:
            issues.append(issue)
            continue
        assert box is not None
        if box.class_name not in known:
            issues.append(_issue(index, LabelRejectReason.UNKNOWN_CLASS, f"class {box.class_name!r} is not in the project's taxonomy"))
            continue
        problem = geometry_problem(box, width, height, tolerance_px=policy.box_tolerance_px)
        if problem is not None:
            issues.append(_issue(index, problem[0], problem[1]))
            continue
        boxes.append(clip(box, width, height))
    if issues:
        first = issues[0]
        more = f" (and {len(issues) - 1} more problem(s))" if len(issues) > 1 else ""
        raise Refusal(
            422, first["reason"], f"box {first['index']}: {first['message']}{more}",
            {"issues": issues[:MAX_ISSUES_SHOWN], "problems": len(issues), "image": {"width": width, "height": height},
             "classes": list(class_names)[:100]},
        )
    return boxes, None


def usable(class_names: list[str]) -> list[str]:
    """A model's class names that can be taxonomy names (a project first seen through a model
    starts with its classes)."""
    return [c for c in class_names if 0 < len(c) <= 64 and c.isprintable()]


# -- the event the verifier receives ------------------------------------------------------------------

def label_submitted(
    *,
    source: LabelSourceKind,
    submission_id: str,
    task_id: str,
    kind: TaskKind,
    image: ImageRef,
    boxes: Sequence[Box],
    labeller: str,
    role: str,
    submitted_at: datetime,
    class_names: list[str] | None,
    prelabels: Sequence[Detection] = (),
    prelabel_model: ModelRef | None = None,
    actions: LabelActions | None = None,
    **extra: Any,
) -> LabelSubmitted:
    """The one builder of `label submitted`, for every source.

    Its rules: the labeller id is cut to the contract's 128 characters; the pre-labels' model
    travels only with pre-labels (or with the model's own offer, which may hold none); a person
    or file that gave no action counts drew every box, a model's offer counts none. `extra`:
    the contract's optional fields (decision, opened_at, duration_s, uncertainty, consensus,
    prelabel_classes, for_test_set).
    """
    offer = source is LabelSourceKind.PRELABEL
    if actions is None:
        actions = LabelActions() if offer else LabelActions(boxes_drawn=len(boxes))
    return LabelSubmitted(
        submission_id=submission_id, task_id=task_id, task_kind=kind, image=image, boxes=list(boxes),
        labeller=Labeller(user_id=labeller[:128], role=role), source=source, submitted_at=submitted_at,
        actions=actions, prelabels=list(prelabels),
        prelabel_model=prelabel_model if (prelabels or offer) else None, class_names=class_names, **extra,
    )


def training_arguments(pairs: list[str]) -> dict[str, str | int | float | bool]:
    """`NAME=VALUE` training arguments of an import, typed (numbers and booleans); refused with a reason."""
    found: dict[str, str | int | float | bool] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise Refusal(422, "invalid_training_argument", f"{pair!r} is not NAME=VALUE")
        value: str | int | float | bool = raw.strip()
        if raw.strip().lower() in ("true", "false"):
            value = raw.strip().lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw.strip())
                    break
                except ValueError:
                    continue
        found[name.strip()] = value
    return found


# -- the dashboard ------------------------------------------------------------------------------------


def handled_per_s(previous: tuple[float, int] | None, uptime_s: float, handled: int) -> float | None:
    """Events handled per second between two statuses of one instance, as (uptime, handled).

    None for the first status, or when uptime or the counter went backwards (a restart under
    the same instance name: its counters started again from zero).
    """
    if previous is None:
        return None
    dt, dn = uptime_s - previous[0], handled - previous[1]
    if dt <= 0 or dn < 0:
        return None
    return dn / dt


def status_rate(previous: tuple[float, int, float | None] | None, uptime_s: float, handled: int) -> float | None:
    """The throughput to keep with a new status, given the last kept (uptime, handled, rate):
    `handled_per_s`, or the last rate when the same instant comes twice."""
    rate = handled_per_s(previous[:2] if previous else None, uptime_s, handled)
    if rate is None and previous is not None and uptime_s >= previous[0] and handled >= previous[1]:
        return previous[2]
    return rate


def release_row(release: EdgeRelease | ServerRelease) -> dict[str, Any]:
    """What the dashboard keeps of a release event."""
    return {
        "release_id": release.release_id, "kind": "edge" if isinstance(release, EdgeRelease) else "server",
        "fleet": release.fleet, "target": release.target.value, "action": release.action.value,
        "model_id": release.model.model_id, "model_version": release.model.version,
        "rollback_to": f"{release.rollback_to.model_id} v{release.rollback_to.version}" if release.rollback_to else None,
        "stage_index": release.stage.index, "stage_percent": release.stage.percent,
    }


def device_row(status: DeviceStatus) -> dict[str, Any]:
    """What the dashboard keeps of a device report (a report outside any release under `""`)."""
    return {
        "release_id": status.release_id or "", "device_id": status.device_id, "fleet": status.fleet,
        "state": status.state.value, "reason": status.reason.value if status.reason else None,
        "active_model": f"{status.active_model.model_id} v{status.active_model.version}" if status.active_model else None,
    }


def dead_lettered(counters: dict[str, int]) -> int:
    """Messages an instance sent to the dead-letter topic (every reason)."""
    return sum(v for k, v in counters.items() if k.startswith("dead_lettered"))


def instance_state(kind: str, seen_s_ago: float, heartbeat_s: float) -> str:
    """`running`, `stopped`, `failed`, or `silent` when three heartbeats (at least 15 s) are missing."""
    if kind in ("stopped", "failed"):
        return kind
    return "silent" if seen_s_ago > max(3 * heartbeat_s, 15.0) else "running"


def release_status(action: str, stage_index: int, stage_percent: float) -> str:
    """What the latest event of a release says: `rollback`, `complete` (the whole fleet),
    `canary` (stage 0) or `rolling out`."""
    if action == ReleaseAction.ROLLBACK.value:
        return "rollback"
    if stage_percent >= 100.0:
        return "complete"
    return "canary" if stage_index == 0 else "rolling out"


def group_owner(group: str, topic_prefix: str) -> tuple[str, str] | None:
    """(service, topic) of a consumer group named as the bus names them,
    `<topic prefix><service>.<event type>[.<suffix>]`; None for anyone else's group."""
    if not group.startswith(topic_prefix):
        return None
    service, _, rest = group[len(topic_prefix):].partition(".")
    if not service or not rest:
        return None
    # The longest event type that fits (`release.edge` before `release`).
    for spec in sorted(TOPICS.values(), key=lambda s: -len(s.payload.event_type)):
        event_type = spec.payload.event_type
        if rest == event_type or rest.startswith(event_type + "."):
            return service, topic_prefix + spec.name
    return None
