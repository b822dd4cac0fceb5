"""Calibrated auto-accept of pre-labels, pure.

A model's pre-label box of class *c* scoring *s* is right when a person's verified boxes hold a
box of class *c* overlapping it at IoU >= `match_iou` (one-to-one). From the pre-labels people
have verified, each class gets the lowest score threshold at which the boxes scoring at least
that much are right often enough (`target_precision`), measured on at least `min_support` of
them; a class with fewer than `min_samples` verified pre-labels has no threshold yet.

A pre-label set is auto-accepted only when it has boxes and every box scores at or above its
class's threshold; even then a fixed share of images (`spot_check_rate`, chosen by image id, so
the same image is always chosen the same way) still goes to people, whose verdicts keep feeding
the calibration where auto-accept would otherwise stop it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from visionloop.contracts import Box, LabelRejectReason
from visionloop.libs.boxes import match


@dataclass(frozen=True)
class Sample:
    """One verified pre-label box: its score, and whether people kept it."""

    score: float
    correct: bool


@dataclass(frozen=True)
class Calibration:
    """A class's auto-accept threshold, or why it has none."""

    class_name: str
    samples: int
    """Verified pre-label boxes of the class (within the window)."""
    threshold: float | None
    """Lowest score auto-accepted; None: nothing of this class is auto-accepted."""
    precision: float | None
    """Share of right boxes among those scoring at or above the threshold (at the best cut, if none)."""
    support: int
    """Verified boxes scoring at or above the threshold."""
    status: str
    """`calibrated`, `too_few_samples` or `target_unreachable`."""


def score_samples(prelabels: Sequence[Box], verified: Sequence[Box], *, match_iou: float) -> list[tuple[str, Sample]]:
    """(class, sample) for each scored pre-label against the boxes people verified."""
    pairs = match(prelabels, verified, min_iou=match_iou, same_class=True)
    right = {p.left for p in pairs}
    return [
        (box.class_name, Sample(score=float(box.score), correct=i in right))
        for i, box in enumerate(prelabels)
        if box.score is not None
    ]


def calibrate(class_name: str, samples: Iterable[Sample], *, target: float, min_samples: int, min_support: int) -> Calibration:
    """The class's threshold: the lowest score cut whose boxes reach `target` precision."""
    ordered = sorted(samples, key=lambda s: -s.score)
    n = len(ordered)
    if n < min_samples:
        return Calibration(class_name, n, None, None, 0, "too_few_samples")
    best: tuple[float, float, int] | None = None
    top_precision, top_support = None, 0
    right = 0
    for k, sample in enumerate(ordered, start=1):
        right += sample.correct
        # Cut only between distinct scores: a threshold keeps every box of equal score.
        if k < n and ordered[k].score == sample.score:
            continue
        precision = right / k
        if k >= min_support:
            if top_precision is None:
                top_precision, top_support = precision, k
            if precision >= target:
                best = (sample.score, precision, k)
    if best is None:
        return Calibration(class_name, n, None, top_precision, top_support, "target_unreachable")
    threshold, precision, support = best
    return Calibration(class_name, n, threshold, precision, support, "calibrated")


def spot_checked(image_id: str, rate: float) -> bool:
    """Whether this image's auto-acceptable pre-labels go to a person anyway (fixed per image)."""
    if rate <= 0:
        return False
    digest = hashlib.sha256(f"visionloop.spot-check.{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


@dataclass(frozen=True)
class AutoDecision:
    """Accept without a person, or send to one (with the reason and a sentence)."""

    accepted: bool
    reason: LabelRejectReason | None
    message: str


def decide(prelabels: Sequence[Box], calibration: Mapping[str, Calibration], *, image_id: str, spot_check_rate: float,
           taxonomy: Sequence[str] | None = None, model_classes: Sequence[str] | None = None) -> AutoDecision:
    """Auto-accept a pre-label set, or say why a person looks at it.

    Calibration vouches for the boxes a model draws, not for objects it cannot see: a model that
    predates a class of the project's `taxonomy` misses every object of it, so nothing it
    pre-labels is auto-accepted until a model that knows the class pre-labels.
    """
    if not prelabels:
        return AutoDecision(False, LabelRejectReason.NEEDS_REVIEW, "no pre-labels: box precision cannot vouch for an empty image")
    unknown = [c for c in taxonomy or () if model_classes is not None and c not in model_classes]
    if unknown:
        named = ", ".join(repr(c) for c in unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        return AutoDecision(False, LabelRejectReason.NEEDS_REVIEW,
                            f"the pre-labelling model does not know {named}: a person checks the image for objects of it "
                            "until a model that knows it is released")
    short = []
    for index, box in enumerate(prelabels):
        cal = calibration.get(box.class_name)
        if cal is None or cal.threshold is None:
            why = "not calibrated" if cal is None else cal.status.replace("_", " ")
            have = 0 if cal is None else cal.samples
            short.append(f"{box.class_name!r} has no threshold ({why}, {have} verified samples)")
        elif box.score is None or box.score < cal.threshold:
            score = "no score" if box.score is None else f"score {box.score:.3f}"
            short.append(f"box {index} ({box.class_name!r}) has {score} < threshold {cal.threshold:.3f}")
    if short:
        unique = list(dict.fromkeys(short))
        more = f" (+{len(unique) - 3} more)" if len(unique) > 3 else ""
        return AutoDecision(False, LabelRejectReason.NEEDS_REVIEW, "a person reviews the pre-labels: " + "; ".join(unique[:3]) + more)
    if spot_checked(image_id, spot_check_rate):
        return AutoDecision(False, LabelRejectReason.SPOT_CHECK, f"auto-acceptable, drawn for a human spot check ({spot_check_rate:.0%} of images)")
    return AutoDecision(True, None, "every box clears its class's calibrated threshold")
