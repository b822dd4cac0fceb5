"""Calibrated auto-accept of pre-labels, pure: a threshold per class and per model version, with a guarantee.

A model's pre-label box of class *c* scoring *s* is right when a person's verified boxes hold a
box of class *c* overlapping it at IoU >= `match_iou` (one-to-one). The evidence is kept per
model version — the model line and version that drew the pre-labels — so a new version starts
with none: nothing it pre-labels is auto-accepted until people have verified enough of its own
boxes.

For each class and version, a cut at score *t* keeps the verified boxes scoring at least *t*; of
those *n*, *k* were right. The cut vouches for its boxes when the one-sided Clopper–Pearson lower
bound of their precision, at `confidence` (0.95), reaches `target_precision`: the bound is the
`1 - confidence` quantile of Beta(k, n - k + 1) (0 when k is 0; 0.05 ** (1 / n) when every box
was right, so 8 of 8 right gives 0.688 and 59 of 59 gives 0.9505). The class's threshold is the
lowest such cut (the most auto-accept the evidence allows). A class with fewer than
`min_samples` verified pre-labels, or a cut resting on fewer than `min_support` boxes, gets no
threshold whatever the bound says.

A pre-label set is auto-accepted only when it has boxes and every box scores at or above its
class's threshold measured on the set's own model version; even then a fixed share of images
(`spot_check_rate`, chosen by image id, so the same image is always chosen the same way) still
goes to people, whose verdicts keep feeding the evidence where auto-accept would otherwise stop it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from visionloop.contracts import Box, LabelRejectReason, ModelRef
from visionloop.libs.boxes import match

NO_MODEL = "-"
"""Model line of pre-labels that name no model (their version is 0)."""

CALIBRATED, TOO_FEW_SAMPLES, BOUND_BELOW_TARGET = "calibrated", "too_few_samples", "bound_below_target"
"""A class's calibration status: a threshold stands; too little evidence; no cut's bound reaches the target."""


def model_key(model: ModelRef | None) -> tuple[str, int]:
    """The model version whose evidence vouches for its pre-labels: (model line, version); ('-', 0) for none."""
    return (model.model_id, model.version) if model is not None else (NO_MODEL, 0)


def model_label(key: tuple[str, int]) -> str:
    """`<model line>@v<version>`, as people read it (and as gauges name it)."""
    return key[0] if key == (NO_MODEL, 0) else f"{key[0]}@v{key[1]}"


@dataclass(frozen=True)
class Sample:
    """One verified pre-label box: its score, and whether people kept it."""

    score: float
    correct: bool


@dataclass(frozen=True)
class Calibration:
    """A class's auto-accept threshold on one model version, or why it has none, with the evidence."""

    class_name: str
    samples: int
    """Verified pre-label boxes of the class (within the window)."""
    threshold: float | None
    """Lowest score auto-accepted; None: nothing of this class is auto-accepted."""
    precision: float | None
    """Share of right boxes among those scoring at or above the threshold (at the best cut, if none)."""
    support: int
    """Verified boxes scoring at or above the threshold (at the best cut, if none)."""
    status: str
    """`calibrated`, `too_few_samples` or `bound_below_target`."""
    correct: int = 0
    """Right boxes among all the samples."""
    support_correct: int = 0
    """Right boxes among the `support` (the k of the bound)."""
    lower_bound: float | None = None
    """One-sided Clopper–Pearson lower bound of the precision at the threshold (at the best cut, if none)."""
    target: float | None = None
    """The precision the bound had to reach."""
    confidence: float | None = None
    """The confidence of the bound."""
    model: tuple[str, int] | None = None
    """The model version (line, version) the evidence was measured on; None: not recorded."""


def lower_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson lower bound of a proportion of `k` right out of `n` (0 when k is 0)."""
    return float(lower_bounds(np.array([k]), np.array([n]), confidence)[0])


def _check_confidence(confidence: float) -> None:
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence of the precision bound must be in [0.5, 1), got {confidence}")


def lower_bounds(k: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """`lower_bound` of many (k, n) pairs at once: the `1 - confidence` quantile of Beta(k, n - k + 1)."""
    from scipy.stats import beta  # imported here: it takes a second, and only calibration needs it

    _check_confidence(confidence)
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("every count of right boxes must be between 0 and the number of boxes")
    safe = np.maximum(k, 1.0)
    return np.where(k > 0, beta.ppf(1.0 - confidence, safe, n - safe + 1.0), 0.0)


def score_samples(prelabels: Sequence[Box], verified: Sequence[Box], *, match_iou: float) -> list[tuple[str, Sample]]:
    """(class, sample) for each scored pre-label against the boxes people verified."""
    pairs = match(prelabels, verified, min_iou=match_iou, same_class=True)
    right = {p.left for p in pairs}
    return [
        (box.class_name, Sample(score=float(box.score), correct=i in right))
        for i, box in enumerate(prelabels)
        if box.score is not None
    ]


def calibrate(class_name: str, samples: Iterable[Sample], *, target: float, min_samples: int, min_support: int,
              confidence: float = 0.95, model: tuple[str, int] | None = None) -> Calibration:
    """The class's threshold on one model version: the lowest score cut whose precision's lower bound reaches `target`.

    Cuts fall between distinct scores (a threshold keeps every box of its score). Without a
    threshold, the figures are those of the cut with the highest bound among those resting on at
    least `min_support` boxes (the lowest cut when none does).
    """
    if not 0 < target <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target}")
    _check_confidence(confidence)
    ordered = sorted(samples, key=lambda s: -s.score)
    n = len(ordered)
    if n == 0:
        return Calibration(class_name, 0, None, None, 0, TOO_FEW_SAMPLES, target=target, confidence=confidence, model=model)
    scores = np.array([s.score for s in ordered], dtype=float)
    right = np.cumsum([s.correct for s in ordered])
    last = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))  # the last box of each distinct score
    support, kept = last + 1, right[last]
    bounds = lower_bounds(kept, support, confidence)
    eligible = support >= min_support
    passing = np.flatnonzero(eligible & (bounds >= target))
    if n >= min_samples and passing.size:
        cut, status, threshold = int(passing[-1]), CALIBRATED, float(scores[last[passing[-1]]])
    else:
        shown = np.flatnonzero(eligible)
        cut = int(shown[np.argmax(bounds[shown])]) if shown.size else len(last) - 1
        status, threshold = (TOO_FEW_SAMPLES if n < min_samples else BOUND_BELOW_TARGET), None
    return Calibration(
        class_name, n, threshold, float(kept[cut] / support[cut]), int(support[cut]), status,
        correct=int(right[-1]), support_correct=int(kept[cut]), lower_bound=float(bounds[cut]),
        target=target, confidence=confidence, model=model,
    )


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


def _why_not(box: Box, index: int, cal: Calibration | None, model: tuple[str, int] | None) -> str | None:
    """Why this box keeps its set from auto-accept (None: it clears its class's threshold)."""
    if cal is None:
        on = f" on {model_label(model)}" if model is not None else ""
        return f"{box.class_name!r} has no threshold (no verified samples{on} yet)"
    if model is not None and cal.model != model:
        return f"{box.class_name!r} has no threshold on {model_label(model)} (its evidence was not measured on this version)"
    if cal.threshold is None:
        bound = ""
        if cal.lower_bound is not None and cal.target is not None:
            bound = f", lower bound {cal.lower_bound:.3f} vs target {cal.target:.3f}"
        return f"{box.class_name!r} has no threshold ({cal.status.replace('_', ' ')}, {cal.samples} verified samples{bound})"
    if box.score is None or box.score < cal.threshold:
        score = "no score" if box.score is None else f"score {box.score:.3f}"
        return f"box {index} ({box.class_name!r}) has {score} < threshold {cal.threshold:.3f}"
    return None


def decide(prelabels: Sequence[Box], calibration: Mapping[str, Calibration], *, image_id: str, spot_check_rate: float,
           taxonomy: Sequence[str] | None = None, model_classes: Sequence[str] | None = None,
           model: tuple[str, int] | None = None) -> AutoDecision:
    """Auto-accept a pre-label set, or say why a person looks at it.

    `model` is the version that drew the pre-labels (`model_key`): when given, only calibration
    measured on that very version counts, so a new version vouches for nothing until its own
    boxes have been verified. Calibration vouches for the boxes a model draws, not for objects
    it cannot see: a model that predates a class of the project's `taxonomy` misses every object
    of it, so nothing it pre-labels is auto-accepted until a model that knows the class pre-labels.
    """
    if not prelabels:
        return AutoDecision(False, LabelRejectReason.NEEDS_REVIEW, "no pre-labels: box precision cannot vouch for an empty image")
    unknown = [c for c in taxonomy or () if model_classes is not None and c not in model_classes]
    if unknown:
        named = ", ".join(repr(c) for c in unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
        return AutoDecision(False, LabelRejectReason.NEEDS_REVIEW,
                            f"the pre-labelling model does not know {named}: a person checks the image for objects of it "
                            "until a model that knows it is released")
    short = [why for index, box in enumerate(prelabels) if (why := _why_not(box, index, calibration.get(box.class_name), model))]
    if short:
        unique = list(dict.fromkeys(short))
        more = f" (+{len(unique) - 3} more)" if len(unique) > 3 else ""
        return AutoDecision(False, LabelRejectReason.NEEDS_REVIEW, "a person reviews the pre-labels: " + "; ".join(unique[:3]) + more)
    if spot_checked(image_id, spot_check_rate):
        return AutoDecision(False, LabelRejectReason.SPOT_CHECK, f"auto-acceptable, drawn for a human spot check ({spot_check_rate:.0%} of images)")
    return AutoDecision(True, None, "every box clears its class's calibrated threshold")
