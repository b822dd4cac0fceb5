"""The bodies, answers and path parameters of the gateway's HTTP API (`api.py`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, Field

from visionloop.contracts import LabelActions, ModelRef, ReviewDecision, TaskKind
from visionloop.contracts.common import ClassName, ProjectName

ProjectPath = Annotated[str, Path(description="Project slug.", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
TaskPath = Annotated[str, Path(description="Task id, from `next`.", max_length=128)]


# -- bodies and answers ---------------------------------------------------------------------------------


class ProjectIn(BaseModel):
    """A new project and its taxonomy."""

    project: ProjectName
    classes: list[ClassName] = Field(default_factory=list, max_length=1000, description="The class list, in order.")


class ClassesIn(BaseModel):
    """Classes to append to the taxonomy (names already there are ignored)."""

    classes: list[ClassName] = Field(min_length=1, max_length=1000)


class TokenIn(BaseModel):
    """A token to create for the path's project."""

    role: Literal["annotator", "reviewer", "admin"] = "annotator"
    user_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9@._:-]+$", description="Who uses it (recorded on every submission).")


class LeaseIn(BaseModel):
    """The lease a task is held under."""

    lease_id: uuid.UUID


class ProjectOut(BaseModel):
    """A project: its taxonomy, its task policy and its queue."""

    project: str
    classes: list[str] = Field(description="The taxonomy, in order (YOLO class indices follow it).")
    queue: dict[str, int] = Field(description="Tasks by state: queued, leased, verifying, submitted, done, rejected.")
    policy: dict[str, Any]


class TokenOut(BaseModel):
    """A created token: `token` is shown this once and never again."""

    token_id: str
    token: str
    project: str | None
    role: str
    user_id: str


class ImageOut(BaseModel):
    """The image of a task (fetch it from `url` with the same token)."""

    image_id: str
    url: str
    width: int
    height: int
    format: str


class LeaseOut(BaseModel):
    """A hold on a task: answer it with `lease_id` before `expires_at`, or renew."""

    lease_id: uuid.UUID
    expires_at: datetime
    lease_s: float


class TaskOut(BaseModel):
    """A task handed to a labeller."""

    task_id: str
    project: str
    kind: TaskKind
    image: ImageOut
    start_boxes: list[dict[str, Any]] = Field(
        description="Boxes to start from (pixels): the model's pre-labels (with `score`) or a rejected submission's boxes."
    )
    prelabel_model: ModelRef | None
    decision_required: bool = Field(description="Review tasks: answer with accept, correct or reject.")
    issues: list[dict[str, Any]] = Field(description="Why an earlier answer was rejected (re-annotate tasks).")
    classes: list[str] = Field(description="The project's taxonomy.")
    priority: float
    uncertainty: float | None
    group_size: int = Field(description="People labelling this image independently (consensus).")
    lease: LeaseOut
    resumed: bool = Field(description="True when this is a task the labeller already held.")


class SubmitOut(BaseModel):
    """201: the answer is recorded and sent to the verifier."""

    submission_id: str
    task_id: str
    boxes: int
    decision: ReviewDecision | None
    actions: LabelActions
    duration_s: float | None


class RenewOut(BaseModel):
    """The lease's new expiry."""

    task_id: str
    lease_id: uuid.UUID
    expires_at: datetime


class TaskRow(BaseModel):
    """One task of a project's list (`GET /v1/projects/{project}/tasks`)."""

    task_id: str
    image_id: str
    kind: str = Field(description="annotate, review or reannotate.")
    state: str = Field(description="verifying, queued, submitted, done, rejected or superseded.")
    reason: str | None = Field(description=(
        "Why it is for people: the recognizer's (no_model, no_confident_detection, uncertain, out_of_distribution) for an "
        "annotate task; prelabels, then the verifier's (needs_review, spot_check, ...) for a review task; the rejection's "
        "for a re-annotate task. Null for tasks made before reasons were kept."))
    priority: float
    uncertainty: float | None
    group_size: int
    parent_task: str | None
    spot_check: bool
    created_at: datetime
    updated_at: datetime


class TaskList(BaseModel):
    """A page of a project's tasks, newest first; `next_offset` asks for the next page (null: none)."""

    tasks: list[TaskRow]
    next_offset: int | None
