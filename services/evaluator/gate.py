"""Does the candidate pass the gate? The evaluator's decision, pure.

A candidate is measured on the project's frozen test set and, when there is one, compared
with the production champion measured on the same test set. It fails for every rule it
breaks, not only the first, so a person sees the whole picture at once:

1. `no_test_set`: fewer test images than `min_test_images` (nothing else is judged then);
2. `below_floor`: mAP50-95 under `map50_95_floor`;
3. `agreement_below_floor`: per-image agreement under `agreement_floor` (none measured counts as 0);
4. `worse_than_champion`: mAP50-95 more than `champion_tolerance` under the champion's;
5. `class_regression`: one per class whose AP50-95 is more than `class_tolerance` under the
   champion's. Only classes both have an AP for are compared: a class missing from the
   candidate's `per_class_ap` had no labels in what the candidate was measured on, so there is
   nothing to compare (the evaluator measures both on the same test set, so this does not hide
   a class the candidate cannot detect: that one has AP 0 and fails here).

The first model of a project (no champion) is gated on the floors alone. A value exactly at a
threshold passes.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from visionloop.contracts import GateFailure, GateFailureReason, Metrics

_SLACK = 1e-9  # float noise must not fail a value that sits on its threshold


class GatePolicy(BaseModel):
    """How good a candidate must be to replace the production model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    map50_95_floor: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Lowest mAP50-95 a candidate may have on the frozen test set.",
    )
    champion_tolerance: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="How far below the champion's mAP50-95 (same test set) a candidate may be.",
    )
    class_tolerance: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="How far any one class's AP50-95 may drop below the champion's.",
    )
    agreement_floor: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Lowest per-image agreement on the test set: the fraction of images whose detections at "
            "the operating threshold find every label with the right class and nothing extra."
        ),
    )
    min_test_images: int = Field(
        default=1,
        ge=1,
        description="Fewest test-set images a candidate must be measured on to be judged.",
    )


def gate(candidate: Metrics, champion: Metrics | None, policy: GatePolicy) -> list[GateFailure]:
    """Every reason `candidate` may not replace `champion` (None: first model); [] passes."""
    images = candidate.images or 0
    if images < policy.min_test_images:
        return [
            GateFailure(
                reason=GateFailureReason.NO_TEST_SET,
                metric="images",
                value=images,
                threshold=policy.min_test_images,
                message=(
                    f"the candidate was measured on {images} test image(s), fewer than the "
                    f"{policy.min_test_images} the gate needs; freeze a test set for the project "
                    "(or a larger one) and evaluate again"
                ),
            )
        ]
    failures = _below_floors(candidate, policy)
    if champion is not None:
        failures += _behind_champion(candidate, champion, policy)
    return failures


def _below_floors(candidate: Metrics, policy: GatePolicy) -> list[GateFailure]:
    """The floors every candidate must reach, the first model of a project included."""
    failures = []
    if candidate.map50_95 < policy.map50_95_floor - _SLACK:
        failures.append(
            GateFailure(
                reason=GateFailureReason.BELOW_FLOOR,
                metric="map50_95",
                value=candidate.map50_95,
                threshold=policy.map50_95_floor,
                message=(
                    f"mAP50-95 {candidate.map50_95:.4f} is below the floor {policy.map50_95_floor:.4f}; "
                    "train on more or better labels, or lower `map50_95_floor` (`visionloop evaluator set`, "
                    "then `visionloop evaluator rejudge` judges this model again)"
                ),
            )
        )
    agreement = candidate.image_agreement or 0.0
    if agreement < policy.agreement_floor - _SLACK:
        measured = "not measured" if candidate.image_agreement is None else f"{agreement:.4f}"
        failures.append(
            GateFailure(
                reason=GateFailureReason.AGREEMENT_BELOW_FLOOR,
                metric="image_agreement",
                value=agreement,
                threshold=policy.agreement_floor,
                message=(
                    f"per-image agreement {measured} is below the floor {policy.agreement_floor:.4f}; "
                    "too few test images get every label right and nothing extra, so look at the "
                    "report's failing classes or lower `agreement_floor`"
                ),
            )
        )
    return failures


def _behind_champion(candidate: Metrics, champion: Metrics, policy: GatePolicy) -> list[GateFailure]:
    """How far the candidate falls behind the production model, overall and class by class."""
    failures = []
    allowed = champion.map50_95 - policy.champion_tolerance
    if candidate.map50_95 < allowed - _SLACK:
        failures.append(
            GateFailure(
                reason=GateFailureReason.WORSE_THAN_CHAMPION,
                metric="map50_95",
                value=candidate.map50_95,
                threshold=allowed,
                message=(
                    f"mAP50-95 {candidate.map50_95:.4f} is more than {policy.champion_tolerance:.4f} below "
                    f"the champion's {champion.map50_95:.4f} on the same test set; the production model "
                    "stays, retrain with more data or raise `champion_tolerance`"
                ),
            )
        )
    for name in sorted(champion.per_class_ap):
        if name not in candidate.per_class_ap:
            continue  # no labels of it where the candidate was measured: nothing to compare
        ours, theirs = candidate.per_class_ap[name], champion.per_class_ap[name]
        allowed = theirs - policy.class_tolerance
        if ours < allowed - _SLACK:
            failures.append(
                GateFailure(
                    reason=GateFailureReason.CLASS_REGRESSION,
                    metric="ap50_95",
                    class_name=name,
                    value=ours,
                    threshold=allowed,
                    message=(
                        f"class {name!r} AP50-95 {ours:.4f} is more than {policy.class_tolerance:.4f} "
                        f"below the champion's {theirs:.4f}; add labelled images of {name!r} "
                        "or raise `class_tolerance`"
                    ),
                )
            )
    return failures
