"""Can the library's model recognise this image? The recognizer's decision, pure.

The model's boxes fall into three bands by score (thresholds per project, `Thresholds`):

    0 ........ uncertain_low ........ conf_threshold ........ 1
      noise       |   uncertain band      |      confident

- boxes at or below `uncertain_low` are background noise and are ignored (inference drops them);
- boxes scoring at least `conf_threshold` are confident: they become the pre-labels;
- boxes in between are the uncertainty band: the model saw something it is unsure of.

The image is **recognized** when there is at least one confident box and nothing in the band.
Otherwise it is **unrecognized**, for the first reason that applies:

1. `no_model`: the library has no production model for the image's project, domain and target;
2. `no_confident_detection`: the model ran and no box reached `conf_threshold` (including an
   image where it found nothing at all);
3. `uncertain`: confident boxes, but also boxes in the band.

The image's uncertainty is the largest *least confidence* (1 - score) over its boxes above the
noise floor, i.e. one minus its least confident box's score; 1.0 when no model ran or it found
nothing. Recognized images therefore have uncertainty at most `1 - conf_threshold`, uncertain
ones more; the labelling queue sorts on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from visionloop.contracts import UnrecognizedReason
from visionloop.services.recognizer.config import Thresholds


@dataclass(frozen=True)
class Found:
    """One box a model found, in original-image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float
    class_name: str
    score: float


@dataclass(frozen=True)
class Verdict:
    """Recognized (with pre-labels) or unrecognized (with a reason), and how uncertain."""

    recognized: bool
    reason: UnrecognizedReason | None
    message: str
    uncertainty: float
    prelabels: tuple[Found, ...] = ()
    """Confident boxes: the pre-labels of a recognized image."""
    found: tuple[Found, ...] = ()
    """Every box above the noise floor, confident or not: what labelling starts from."""


NO_MODEL = Verdict(
    recognized=False,
    reason=UnrecognizedReason.NO_MODEL,
    message=(
        "no production model in the library serves this project, domain and target; the image "
        "goes to people, and their labels will train the first one"
    ),
    uncertainty=1.0,
)


def image_uncertainty(scores: Sequence[float]) -> float:
    """Largest least confidence (1 - score) over the boxes; 1.0 when there are none."""
    return round(1.0 - min(scores), 6) if scores else 1.0


def recognize(found: Sequence[Found] | None, thresholds: Thresholds) -> Verdict:
    """The decision for one image: `found` is the production model's boxes, None when there is no model."""
    if found is None:
        return NO_MODEL
    kept = tuple(sorted((f for f in found if f.score > thresholds.uncertain_low), key=lambda f: -f.score))
    confident = tuple(f for f in kept if f.score >= thresholds.conf_threshold)
    band = tuple(f for f in kept if f.score < thresholds.conf_threshold)
    uncertainty = image_uncertainty([f.score for f in kept])
    if not confident:
        best = f"; its best box scored {kept[0].score:.2f} ({kept[0].class_name})" if kept else ""
        return Verdict(
            recognized=False,
            reason=UnrecognizedReason.NO_CONFIDENT_DETECTION,
            message=f"the model found no object scoring at least {thresholds.conf_threshold:.2f}{best}",
            uncertainty=uncertainty,
            found=kept,
        )
    if band:
        weakest = band[-1]
        return Verdict(
            recognized=False,
            reason=UnrecognizedReason.UNCERTAIN,
            message=(
                f"{len(band)} of {len(kept)} boxes score between {thresholds.uncertain_low:.2f} and "
                f"{thresholds.conf_threshold:.2f} (least sure: {weakest.class_name} at {weakest.score:.2f}); "
                "a person should check them"
            ),
            uncertainty=uncertainty,
            found=kept,
        )
    return Verdict(
        recognized=True,
        reason=None,
        message=f"{len(confident)} confident box(es)",
        uncertainty=uncertainty,
        prelabels=confident,
        found=kept,
    )


def agreement(a: Sequence[Found], b: Sequence[Found], iou: float = 0.5) -> float:
    """How far two models agree on one image: boxes matched (same class, IoU >= `iou`) over the larger count.

    1.0 when both found nothing. Greedy matching, highest scores first.
    """
    if not a and not b:
        return 1.0
    unmatched = list(b)
    matched = 0
    for box in sorted(a, key=lambda f: -f.score):
        best, best_iou = None, iou
        for other in unmatched:
            if other.class_name != box.class_name:
                continue
            overlap = _iou(box, other)
            if overlap >= best_iou:
                best, best_iou = other, overlap
        if best is not None:
            unmatched.remove(best)
            matched += 1
    return matched / max(len(a), len(b))


def _iou(a: Found, b: Found) -> float:
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = w * h
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0
