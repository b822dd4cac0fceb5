"""Does a submitted label set pass? The verifier's checks, pure.

In order: the number of boxes; each box's geometry (inside the image within a tolerance, not
degenerate, not too small) and class (in the project's taxonomy); boxes drawn twice (same class,
IoU above a threshold); then the review decision (a review task needs one; `reject` says the
pre-labels are wrong). Boxes within the tolerance of the border are clipped to the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from visionloop.contracts import (
    Box,
    BoxIssue,
    LabelRejectReason,
    LabelSourceKind,
    LabelSubmitted,
    ReviewDecision,
    TaskKind,
    VerificationMethod,
)
from visionloop.libs.boxes import (
    Problem,
    clip,
    duplicate_problems,
    geometry_problems,
    taxonomy_problems,
)
from visionloop.services.verifier.config import Policy

MAX_ISSUES = 200
"""Issues carried by one rejection (the message gives the count)."""


@dataclass(frozen=True)
class Verdict:
    """Pass (with the boxes to keep and how they were verified) or fail (reason, sentence, issues)."""

    accepted: bool
    boxes: list[Box] = field(default_factory=list)
    method: VerificationMethod | None = None
    reason: LabelRejectReason | None = None
    message: str = ""
    issues: list[BoxIssue] = field(default_factory=list)


def reject(reason: LabelRejectReason, message: str, issues: Sequence[Problem] = ()) -> Verdict:
    """A failing verdict."""
    shown = [BoxIssue(index=p.index, reason=p.reason, message=p.message[:512]) for p in issues[:MAX_ISSUES]]
    return Verdict(False, reason=reason, message=message[:1024], issues=shown)


def box_problems(boxes: Sequence[Box], width: int, height: int, class_names: Sequence[str] | None, policy: Policy) -> list[Problem]:
    """Every problem of every box (geometry, class, duplicates), by box index."""
    problems = geometry_problems(boxes, width, height, tolerance_px=policy.box_tolerance_px, min_size_px=policy.min_box_px)
    if class_names is not None:
        problems += taxonomy_problems(boxes, class_names)
    problems += duplicate_problems(boxes, min_iou=policy.duplicate_iou)
    return sorted(problems, key=lambda p: p.index)


def check_boxes(boxes: Sequence[Box], width: int, height: int, class_names: Sequence[str] | None, policy: Policy) -> Verdict:
    """The box checks alone: pass with the boxes clipped to the image, or the first problem."""
    if len(boxes) > policy.max_boxes:
        return reject(LabelRejectReason.TOO_MANY_BOXES, f"{len(boxes)} boxes; a label set may have at most {policy.max_boxes}")
    problems = box_problems(boxes, width, height, class_names, policy)
    if problems:
        first = problems[0]
        more = f" ({len(problems)} problems in all)" if len(problems) > 1 else ""
        return reject(first.reason, f"box {first.index}: {first.message}{more}", problems)
    return Verdict(True, boxes=[clip(b, width, height) for b in boxes])


def method_of(source: LabelSourceKind) -> VerificationMethod:
    """How a passing label set of this source counts as verified."""
    if source is LabelSourceKind.IMPORT:
        return VerificationMethod.IMPORT
    if source is LabelSourceKind.PRELABEL:
        return VerificationMethod.AUTO
    return VerificationMethod.HUMAN


def verify(submission: LabelSubmitted, class_names: Sequence[str] | None, policy: Policy) -> Verdict:
    """The verdict on one person's (or one import's) label set."""
    boxes = list(submission.boxes)
    if submission.task_kind is TaskKind.REVIEW and submission.source is not LabelSourceKind.PRELABEL:
        if submission.decision is None:
            return reject(LabelRejectReason.MISSING_DECISION, "a review needs a decision: accept, correct or reject")
        if submission.decision is ReviewDecision.REJECT:
            return reject(
                LabelRejectReason.REVIEWER_REJECTED,
                f"{submission.labeller.user_id} rejected the pre-labels; the image is labelled again from scratch",
            )
        if submission.decision is ReviewDecision.ACCEPT and not boxes and submission.prelabels:
            # A client that sends only the decision accepts the pre-labels as they are.
            boxes = [Box.model_validate(p.model_dump() | {"score": None}) for p in submission.prelabels]
    image = submission.image
    checked = check_boxes(boxes, image.width, image.height, class_names, policy)
    if not checked.accepted:
        return checked
    return Verdict(True, boxes=[b.model_copy(update={"score": None}) for b in checked.boxes], method=method_of(submission.source))
