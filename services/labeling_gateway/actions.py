"""What a person did to the boxes they started from: the labelling-cost counters, pure.

Submitted boxes are matched one-to-one to the starting boxes (the model's pre-labels, or the
boxes of a rejected submission) by IoU, whatever their classes. A matched pair is a box the
person kept (as is), moved (geometry changed) and/or relabelled (class changed); an unmatched
submitted box was drawn; an unmatched starting box was deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

from visionloop.contracts import Box, LabelActions
from visionloop.libs.boxes import match

SAME_OBJECT_IOU = 0.3
"""A submitted box overlapping a starting box this much is taken to be that box, edited."""
UNMOVED_PX = 0.5
"""Corners that moved less than this (pixels) count as unmoved (rounding in UIs)."""


def count_actions(start: Sequence[Box], final: Sequence[Box]) -> LabelActions:
    """The counters of a submission that turned `start` into `final`."""
    pairs = match(start, final, min_iou=SAME_OBJECT_IOU, same_class=False)
    moved = relabelled = kept = 0
    for pair in pairs:
        a, b = start[pair.left], final[pair.right]
        was_moved = max(abs(a.x1 - b.x1), abs(a.y1 - b.y1), abs(a.x2 - b.x2), abs(a.y2 - b.y2)) > UNMOVED_PX
        was_relabelled = a.class_name != b.class_name
        moved += was_moved
        relabelled += was_relabelled
        kept += not (was_moved or was_relabelled)
    return LabelActions(
        boxes_drawn=len(final) - len(pairs),
        boxes_moved=moved,
        boxes_relabelled=relabelled,
        boxes_deleted=len(start) - len(pairs),
        prelabels_accepted=kept,
    )


def same_boxes(a: Sequence[Box], b: Sequence[Box]) -> bool:
    """Whether two box lists are the same boxes (same classes, corners within `UNMOVED_PX`)."""
    if len(a) != len(b):
        return False
    actions = count_actions(a, b)
    return actions.prelabels_accepted == len(a)
