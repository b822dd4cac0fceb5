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


# -- datasets ------------------------------------------------------------------------------------------

EXPORT_DOC = """The project's verified labels (the newest per image), as:

- `coco`: a zip with `annotations/instances_<split>.json` and `images/<split>/<image id>.<ext>`;
  with `images=false`, one COCO JSON document of every image (each image entry names its split in
  `visionloop_split`). Loads with `pycocotools.coco.COCO`.
- `yolo`: a zip with `data.yaml`, `images/<split>/` and `labels/<split>/*.txt` (Ultralytics' layout;
  `ultralytics.data.utils.check_det_dataset` accepts it).
- `labelstudio`: Label Studio tasks: the image as a signed URL of this gateway (valid for
  `signed_url_ttl_s`), the verified boxes as an annotation, the model's pre-labels as a
  prediction. By default the JSON task list, which Label Studio's import takes as it is;
  `images=true` gives a zip with `tasks.json` and the images (a backup; this gateway's import
  reads it, Label Studio's does not).

Splits: `test` is the frozen test set (imported with `test_set`); the rest is `train` and `val`,
the split fixed per image by its id (`export_val_fraction`), so an image never changes split.
"""

IMPORT_DOC = """Labelled images in, as verified labels (bootstrapping a project) or as the frozen test set.

The body is a zip (`application/zip`) holding the images and the labels in the layout `export`
writes — COCO `annotations/*.json` (a file named `*test*.json` is the test set) with the images
anywhere in the archive by file name; YOLO `data.yaml` with `images/<split>/` and `labels/<split>/`;
Label Studio tasks in a `.json` file with `data.image` naming an image in the archive — or a JSON
document alone (COCO or Label Studio) whose images the gateway already has (by `visionloop_image_id`,
a file name `<image id>.<ext>`, or a URL of this gateway).

Everything is checked before anything is stored: classes (unknown ones are refused unless
`add_classes=true`), box geometry, image files. Then each image is stored in the blob store and
emitted as `label submitted` (source `import`); the verifier makes it a verified label (method
`import`). Importing the same files again changes nothing.
"""


class ImportOut(BaseModel):
    """202: the import is checked and on its way to the verifier."""

    import_id: str
    images: int = Field(description="Images submitted.")
    boxes: int
    test_set: int = Field(description="Images that define the frozen test set.")
    classes_added: list[str]
    already_imported: int = Field(description="Images whose same labels were imported before (skipped).")
    training: str = Field(description="What the import asked of the trainer: one run after its labels, with which arguments, or none.")
