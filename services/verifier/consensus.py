"""Consensus of several labellers on one image, pure.

Each labeller's boxes are matched to the objects found so far (same class, IoU >= `iou` with
the object's mean box, at most one box per labeller per object); an unmatched box starts a new
object. An object is kept, as the mean of its boxes, when more than `quorum` of the labellers
drew it. When too large a share of the objects lacks a quorum (`max_disputed`), the labellers
disagree and the image is labelled again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from visionloop.contracts import Box, LabelRejectReason
from visionloop.libs.boxes import match


@dataclass
class _Object:
    boxes: list[Box] = field(default_factory=list)

    @property
    def mean(self) -> Box:
        n = len(self.boxes)
        return Box(
            x1=sum(b.x1 for b in self.boxes) / n,
            y1=sum(b.y1 for b in self.boxes) / n,
            x2=sum(b.x2 for b in self.boxes) / n,
            y2=sum(b.y2 for b in self.boxes) / n,
            class_name=self.boxes[0].class_name,
        )


@dataclass(frozen=True)
class Consensus:
    """Agreed boxes, or disagreement."""

    agreed: bool
    boxes: list[Box]
    objects: int
    disputed: int
    reason: LabelRejectReason | None = None
    message: str = ""


def needed(labellers: int, quorum: float) -> int:
    """How many labellers must draw a box for it to be kept: more than `quorum` of them."""
    return int(labellers * quorum) + 1


def vote(submissions: Sequence[Sequence[Box]], *, labellers: int, iou: float, quorum: float, max_disputed: float) -> Consensus:
    """The consensus of `submissions` (each one labeller's valid boxes) out of `labellers` people."""
    need = needed(labellers, quorum)
    if len(submissions) < need:
        return Consensus(False, [], 0, 0, LabelRejectReason.NO_CONSENSUS,
                         f"only {len(submissions)} of {labellers} labellers gave a valid answer; {need} must agree")
    objects: list[_Object] = []
    for boxes in submissions:
        means = [o.mean for o in objects]
        pairs = match(means, list(boxes), min_iou=iou, same_class=True)
        taken = set()
        for pair in pairs:
            objects[pair.left].boxes.append(boxes[pair.right])
            taken.add(pair.right)
        objects += [_Object([box]) for j, box in enumerate(boxes) if j not in taken]
    kept = [o.mean for o in objects if len(o.boxes) >= need]
    disputed = sum(len(o.boxes) < need for o in objects)
    if objects and disputed / len(objects) > max_disputed:
        return Consensus(
            False, kept, len(objects), disputed, LabelRejectReason.NO_CONSENSUS,
            f"{disputed} of {len(objects)} objects were drawn by fewer than {need} of {labellers} labellers",
        )
    return Consensus(True, kept, len(objects), disputed)
