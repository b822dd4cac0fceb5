"""How the simulated people err, and what they do with one task: pure, no I/O, no HTTP.

A person's judgement is the world's ground truth at IoU 0.5 (`RIGHT_IOU`), filtered through
their error rates (`PersonErrors`), every chance drawn from the person's seeded generator:

- **Drawing** (the annotator's model, used for every box drawn anew, in any task): a true
  object no box covers is not drawn at all with probability `miss_rate` (`review_miss_rate` in a
  review: see below); each edge of a drawn box is off by gaussian noise of standard deviation
  `jitter_frac` x the box's width (left, right) or height (top, bottom), combined with an absolute
  `jitter_px` (sd = sqrt((jitter_frac * side)^2 + jitter_px^2)); the box is clipped to the image
  and kept at least `MIN_SIDE_PX` a side; with probability `confusion_rate` it gets a wrong class,
  uniformly among the project's other classes.
- **Checking shown boxes** (the reviewer's model, used for the starting boxes of any task: a
  review's pre-labels, an annotate task's model guesses, a rejected answer's boxes): when the set
  has a wrong box (over no true object at IoU 0.5, of the wrong class, or too loose to be over
  its object at IoU 0.5), the person leaves the set as it is with probability
  `rubber_stamp_rate` (in a review: accepts it). Otherwise each shown box is judged by the truth:
  kept when right, drawn again ("moved") when right but looser than `tight_iou` (only when the
  set is being corrected anyway: a loose box never stops an accept), relabelled when over an
  object of another class, deleted when over nothing.
- **Noticing what the shown boxes missed**: in a review, each true object no pre-label covers is
  noticed with probability 1 - `review_miss_rate`; an unnoticed one stays unlabelled (the set may
  then be accepted). In an annotate or re-annotate task the person is drawing anyway, so the
  annotator's `miss_rate` applies instead.

A review ends in one decision: `accept` when stamped, or when no shown box is wrong and no
missing object was noticed; `reject` when no pre-label is over any true object (of any class);
`correct` otherwise, with the boxes fixed as above and the noticed objects drawn.

Default rates and where they come from (verified against the sources' abstracts or pages unless
marked; every default is a parameter, and docs/benchmarks.md carries the full references):

- `miss_rate` = 0.05 [assumption, within published figures]: about 5 % of COCO images have a
  missing box (ObjectLab estimate, read from a secondary summary, unverified); Penquitt, Klees,
  Cakaj, Kondermann, Rottmann & Schmarje ("From label error detection to correction", arXiv
  2508.06556, 2025) found 18 % missing or inaccurate labels among KITTI pedestrians, a hard class
  (an upper end).
- `jitter_frac` = 0.04 [assumption, calibrated]: per-edge sd of 4 % of the side gives a mean IoU
  of 0.88 with the true box (computed), the agreement reported between PASCAL VOC 2007 boxes and
  an independent reference, 88 % mean IoU (Papadopoulos, Uijlings, Keller & Ferrari, ICCV 2017;
  the figure is read from a secondary summary of the paper).
- `confusion_rate` = 0.03: Northcutt, Athalye & Mueller ("Pervasive label errors in test sets
  destabilize machine learning benchmarks", NeurIPS 2021 Datasets and Benchmarks) estimate at
  least 3.3 % label errors on average over ten test sets (at least 6 % of ImageNet's validation set);
  those are classification labels, so for a box's class this is a conservative upper figure.
- `rubber_stamp_rate` = 0.10 [assumption, between published figures]: Rosbach et al. ("Stuck on
  suggestions", arXiv 2603.11821, 2026) measured a 7 % automation-bias rate of pathology experts
  accepting wrong AI advice; Wolfe, Horowitz & Kenner ("Rare items often missed in visual
  searches", Nature 435:439, 2005) found that misses grow as targets get rarer (7 % at 50 %
  prevalence, 16 % at 10 %, 30 % at 1 %: figures read from a secondary summary of the paper), and
  errors in a mostly right pre-label queue are rare targets; Rädsch et al. ("Quality assured",
  ECCV 2024) found that annotation companies' internal QA improves quality marginally at best.
- `review_miss_rate` = 0.10 [assumption, same sources as the rubber stamp]: a reviewer looking
  for objects the pre-labels missed is searching for rare targets (Wolfe et al., 2005).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from visionloop.contracts import Box, ReviewDecision
from visionloop.demo.effort import Actions
from visionloop.libs.boxes import Pair, match

__all__ = ["MIN_SIDE_PX", "PERFECT", "RIGHT_IOU", "TIGHT_IOU", "Edit", "PersonErrors", "decide", "draw_box"]

RIGHT_IOU = 0.5
"""A box over a true object at this IoU or more is that object."""
TIGHT_IOU = 0.75
"""A right box looser than this is drawn again when its set is being corrected anyway."""
MIN_SIDE_PX = 4.0
"""A drawn box is kept at least this wide and high (a jittered small box must stay a box)."""


@dataclass(frozen=True)
class PersonErrors:
    """The error rates of one simulated person (probabilities in [0, 1]; see the module docstring)."""

    miss_rate: float = 0.05
    """Annotator: a true object no box covers is not drawn (annotate and re-annotate tasks)."""
    jitter_frac: float = 0.04
    """Annotator: each edge of a drawn box is off by gaussian noise of this sd x the box's width/height."""
    confusion_rate: float = 0.03
    """Annotator: a drawn box gets a wrong class, uniformly among the project's other classes."""
    rubber_stamp_rate: float = 0.10
    """Reviewer: a shown set with a wrong box is left (in a review: accepted) as it is."""
    review_miss_rate: float = 0.10
    """Reviewer: a true object no pre-label covers goes unnoticed (and stays unlabelled)."""
    jitter_px: float = 0.0
    """Annotator: absolute per-edge noise (pixels, sd) combined with `jitter_frac` (the old `noise_px`)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"PersonErrors.{f.name} must be a number, got {value!r}")
            if f.name == "jitter_px":
                if value < 0:
                    raise ValueError(f"PersonErrors.jitter_px must be >= 0 pixels, got {value!r}")
            elif not 0.0 <= value <= 1.0:
                raise ValueError(f"PersonErrors.{f.name} must be in [0, 1], got {value!r}")

    @classmethod
    def perfect(cls) -> PersonErrors:
        """A person who never errs (every rate 0): the truth exactly."""
        return cls(**{f.name: 0.0 for f in fields(cls)})


PERFECT = PersonErrors.perfect()


@dataclass(frozen=True)
class Edit:
    """What one person did with one task: the boxes to submit, the decision (reviews), the counts."""

    boxes: tuple[Box, ...]
    """The boxes submitted (for `accept`: the starting boxes as they are; for `reject`: none)."""
    decision: ReviewDecision | None
    actions: Actions
    """The counted actions, for the effort model (`effort.seconds`)."""
    right: int = 0
    """Starting boxes over a true object of their class (IoU >= `RIGHT_IOU`)."""
    wrong: int = 0
    """Starting boxes that are not (over nothing, wrong class, or too loose)."""
    drawn: int = 0
    """Boxes drawn anew."""
    missed: int = 0
    """True objects no box covered that the person did not draw (missed, or unnoticed in a review)."""
    kept: int = 0
    moved: int = 0
    relabelled: int = 0
    deleted: int = 0
    confused: int = 0
    """Drawn boxes given a wrong class."""
    stamped: bool = False
    """A set with a wrong box was left (accepted) as it was."""


@dataclass(frozen=True)
class _Judged:
    """The starting boxes against the truth, before any error."""

    same: list[Pair]
    """Starting box -> true object of its class, IoU >= `RIGHT_IOU`."""
    relabel: list[Pair]
    """Starting box -> true object of another class (no same-class pair for either)."""
    deleted: list[int]
    """Starting boxes over no true object."""
    uncovered: list[int]
    """True objects no starting box is over."""
    all_wrong: bool
    """There are starting boxes and none is over any true object, of any class."""


def _judge(start: Sequence[Box], truth: Sequence[Box]) -> _Judged:
    # Same-class pairs first: a right box must not be "relabelled" onto a neighbour.
    same = match(start, truth, min_iou=RIGHT_IOU, same_class=True)
    used_start = {p.left for p in same}
    used_truth = {p.right for p in same}
    relabel: list[Pair] = []
    for p in match(start, truth, min_iou=RIGHT_IOU, same_class=False):
        if p.left in used_start or p.right in used_truth:
            continue
        used_start.add(p.left)
        used_truth.add(p.right)
        relabel.append(p)
    all_wrong = bool(start) and not match(start, truth, min_iou=RIGHT_IOU, same_class=False)
    return _Judged(
        same=same, relabel=relabel, deleted=[i for i in range(len(start)) if i not in used_start],
        uncovered=[j for j in range(len(truth)) if j not in used_truth], all_wrong=all_wrong,
    )


def _chance(rng: np.random.Generator, rate: float) -> bool:
    """True with probability `rate` (no draw at all when the rate is 0: a perfect person is deterministic)."""
    return rate > 0.0 and bool(rng.random() < rate)


def draw_box(true: Box, errors: PersonErrors, rng: np.random.Generator, *, width: int, height: int,
             classes: Sequence[str] = (), confuse: bool = True) -> tuple[Box, bool]:
    """A person's box around a true object, and whether its class is wrong: each edge off by
    noise relative to the box's size, clipped to the image; the class confused among `classes`."""
    sd_x = math.hypot(errors.jitter_frac * true.width, errors.jitter_px)
    sd_y = math.hypot(errors.jitter_frac * true.height, errors.jitter_px)
    x1, x2 = (v + float(rng.normal(0.0, sd_x)) if sd_x > 0 else v for v in (true.x1, true.x2))
    y1, y2 = (v + float(rng.normal(0.0, sd_y)) if sd_y > 0 else v for v in (true.y1, true.y2))
    x1, x2 = _widen(*sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width))), width)
    y1, y2 = _widen(*sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height))), height)
    class_name = true.class_name
    others = [c for c in classes if c != true.class_name] if confuse else []
    confused = bool(others) and _chance(rng, errors.confusion_rate)
    if confused:
        class_name = others[int(rng.integers(len(others)))]
    return Box(x1=x1, y1=y1, x2=x2, y2=y2, class_name=class_name), confused


def decide(
    start: Sequence[Box],
    truth: Sequence[Box],
    *,
    kind: str,
    errors: PersonErrors,
    rng: np.random.Generator,
    width: int,
    height: int,
    classes: Sequence[str] = (),
    decision_required: bool | None = None,
    tight_iou: float = TIGHT_IOU,
) -> Edit:
    """What a person with `errors` does with a task of `kind` (`annotate`, `review`,
    `reannotate`) that starts from `start` on an image whose true objects are `truth`.

    `decision_required` (default: `kind == "review"`) makes it a review, ending in a decision.
    `classes` are the project's classes (the wrong class of a confused box is drawn from them).
    """
    review = kind == "review" if decision_required is None else decision_required
    judged = _judge(start, truth)
    wrong = len(judged.relabel) + len(judged.deleted)
    stamped = wrong > 0 and _chance(rng, errors.rubber_stamp_rate)
    shown = Actions(tasks=1, boxes_shown=len(start), images_reviewed=int(bool(start) or review))
    base = {"right": len(judged.same), "wrong": wrong, "stamped": stamped}
    if review and stamped:
        return Edit(boxes=tuple(start), decision=ReviewDecision.ACCEPT, actions=shown, kept=len(start),
                    missed=len(judged.uncovered), **base)
    if review and judged.all_wrong:
        return Edit(boxes=(), decision=ReviewDecision.REJECT, actions=shown, **base)
    miss_rate = errors.review_miss_rate if review else errors.miss_rate
    found = [j for j in judged.uncovered if not _chance(rng, miss_rate)]
    missed = len(judged.uncovered) - len(found)
    if review and wrong == 0 and not found:
        return Edit(boxes=tuple(start), decision=ReviewDecision.ACCEPT, actions=shown, kept=len(start), missed=missed, **base)

    if stamped:  # annotate / re-annotate: the shown boxes are left as they are
        final, kept, moved, relabelled, deleted = list(start), len(start), 0, 0, 0
    else:
        final, kept, moved, relabelled, deleted = _fix(start, truth, judged, errors, rng, width=width, height=height, tight_iou=tight_iou)
    confused = 0
    for j in found:
        box, wrong_class = draw_box(truth[j], errors, rng, width=width, height=height, classes=classes)
        final.append(box)
        confused += wrong_class
    actions = shown + Actions(boxes_drawn=len(found), boxes_corrected=moved + relabelled + deleted)
    return Edit(
        boxes=tuple(final), decision=ReviewDecision.CORRECT if review else None, actions=actions, drawn=len(found), missed=missed,
        kept=kept, moved=moved, relabelled=relabelled, deleted=deleted, confused=confused, **base,
    )


def _fix(start: Sequence[Box], truth: Sequence[Box], judged: _Judged, errors: PersonErrors, rng: np.random.Generator, *,
         width: int, height: int, tight_iou: float) -> tuple[list[Box], int, int, int, int]:
    """The shown boxes fixed by the truth: (boxes, kept, moved, relabelled, deleted)."""
    final: list[Box] = []
    kept = moved = 0
    for p in judged.same:
        if p.iou >= tight_iou:
            final.append(start[p.left])
            kept += 1
        else:  # right object, sloppy box: drawn again over it (its class is known)
            final.append(draw_box(truth[p.right], errors, rng, width=width, height=height, confuse=False)[0])
            moved += 1
    for p in judged.relabel:
        final.append(start[p.left].model_copy(update={"class_name": truth[p.right].class_name}))
    return final, kept, moved, len(judged.relabel), len(judged.deleted)


def _widen(a: float, b: float, limit: float) -> tuple[float, float]:
    """Grow [a, b] to `MIN_SIDE_PX` (or the whole image if smaller), staying inside [0, limit]."""
    side = min(MIN_SIDE_PX, limit)
    if b - a >= side:
        return a, b
    centre = (a + b) / 2
    a = min(max(centre - side / 2, 0.0), limit - side)
    return a, a + side
