"""Box geometry shared by the services that judge boxes: IoU, one-to-one matching, and the
geometry checks a label must pass (inside the image, non-degenerate, big enough).

Pure functions on canonical pixel boxes (`Box`: corners x1, y1, x2, y2 of the original image).
The labelling gateway uses them to refuse hostile submissions and to count what a person did;
the verifier uses them to verify, to vote (consensus) and to calibrate auto-accept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from visionloop.contracts import Box, LabelRejectReason


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either has no area)."""
    ix = min(a.x2, b.x2) - max(a.x1, b.x1)
    iy = min(a.y2, b.y2) - max(a.y1, b.y1)
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = a.width * a.height + b.width * b.height - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class Pair:
    """Box `left` of the first list matched with box `right` of the second, at `iou`."""

    left: int
    right: int
    iou: float


def match(
    first: Sequence[Box], second: Sequence[Box], *, min_iou: float, same_class: bool = True
) -> list[Pair]:
    """Greedy one-to-one matching, best IoU first; pairs below `min_iou` are not made.

    Greedy by descending IoU is what COCO evaluation does per class; with boxes of one image
    it is as good as optimal assignment in practice and needs no solver.
    """
    candidates = []
    for i, a in enumerate(first):
        for j, b in enumerate(second):
            if same_class and a.class_name != b.class_name:
                continue
            value = iou(a, b)
            if value >= min_iou and value > 0:
                candidates.append((value, i, j))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_left: set[int] = set()
    used_right: set[int] = set()
    pairs = []
    for value, i, j in candidates:
        if i in used_left or j in used_right:
            continue
        used_left.add(i)
        used_right.add(j)
        pairs.append(Pair(i, j, value))
    return sorted(pairs, key=lambda p: p.left)


@dataclass(frozen=True)
class Problem:
    """One box that fails a check: its index, the reason code and a sentence."""

    index: int
    reason: LabelRejectReason
    message: str


def finite(*values: float) -> bool:
    """All values are finite numbers (no NaN, no infinity)."""
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def geometry_problem(
    box: Box, width: int, height: int, *, tolerance_px: float = 2.0, min_size_px: float = 0.0
) -> tuple[LabelRejectReason, str] | None:
    """Why `box` is not a usable label on a `width` x `height` image, or None.

    A box may stick out of the image by `tolerance_px` (people drag to the border and
    overshoot); beyond that it is `out_of_bounds`. Zero width or height is `degenerate_box`;
    a side under `min_size_px` is `box_too_small`.
    """
    if not finite(box.x1, box.y1, box.x2, box.y2):
        return LabelRejectReason.DEGENERATE_BOX, "the box has a coordinate that is not a finite number"
    if box.x2 < box.x1 or box.y2 < box.y1:
        return LabelRejectReason.DEGENERATE_BOX, "the box has a negative width or height"
    if (
        box.x1 < -tolerance_px
        or box.y1 < -tolerance_px
        or box.x2 > width + tolerance_px
        or box.y2 > height + tolerance_px
    ):
        return LabelRejectReason.OUT_OF_BOUNDS, (
            f"the box ({box.x1:g}, {box.y1:g})-({box.x2:g}, {box.y2:g}) leaves the {width}x{height} "
            f"image by more than {tolerance_px:g} px"
        )
    clipped = clip(box, width, height)
    if clipped.width <= 0 or clipped.height <= 0:
        return LabelRejectReason.DEGENERATE_BOX, "the box has no area inside the image"
    if clipped.width < min_size_px or clipped.height < min_size_px:
        return LabelRejectReason.BOX_TOO_SMALL, (
            f"the box is {clipped.width:.1f}x{clipped.height:.1f} px; the smallest allowed side is "
            f"{min_size_px:g} px"
        )
    return None


def clip(box: Box, width: int, height: int) -> Box:
    """The box clipped to the image (used for boxes within the tolerance of its border)."""
    x1, y1 = min(max(box.x1, 0.0), width), min(max(box.y1, 0.0), height)
    x2, y2 = min(max(box.x2, 0.0), width), min(max(box.y2, 0.0), height)
    if (x1, y1, x2, y2) == (box.x1, box.y1, box.x2, box.y2):
        return box
    return box.model_copy(update={"x1": x1, "y1": y1, "x2": x2, "y2": y2})


def geometry_problems(
    boxes: Sequence[Box], width: int, height: int, *, tolerance_px: float = 2.0, min_size_px: float = 0.0
) -> list[Problem]:
    """Every box that fails `geometry_problem`, in order."""
    found = []
    for index, box in enumerate(boxes):
        problem = geometry_problem(box, width, height, tolerance_px=tolerance_px, min_size_px=min_size_px)
        if problem is not None:
            found.append(Problem(index, *problem))
    return found


def taxonomy_problems(boxes: Sequence[Box], class_names: Sequence[str]) -> list[Problem]:
    """Every box whose class is not in the project's taxonomy."""
    known = set(class_names)
    return [
        Problem(
            index,
            LabelRejectReason.UNKNOWN_CLASS,
            f"class {box.class_name!r} is not in the project's taxonomy ({_names(class_names)})",
        )
        for index, box in enumerate(boxes)
        if box.class_name not in known
    ]


def duplicate_problems(boxes: Sequence[Box], *, min_iou: float) -> list[Problem]:
    """Boxes of the same class overlapping an earlier one above `min_iou` (drawn twice)."""
    found = []
    for j, b in enumerate(boxes):
        for i in range(j):
            a = boxes[i]
            if a.class_name == b.class_name and iou(a, b) > min_iou:
                found.append(
                    Problem(
                        j,
                        LabelRejectReason.DUPLICATE_BOX,
                        f"box {j} repeats box {i} ({b.class_name!r}, IoU {iou(a, b):.2f} > {min_iou:g})",
                    )
                )
                break
    return found


def _names(class_names: Sequence[str]) -> str:
    shown = ", ".join(class_names[:12])
    return shown + (f", ... ({len(class_names)} classes)" if len(class_names) > 12 else "") if shown else "empty"
