"""The verifier's decisions, pure: the auto-accept of a pre-label set, whole (its box checks, the
project's flag, then the calibration of the model version that drew it, `calibrate.decide`), a
label set's id, and the heartbeat gauges of a class's calibration. The checks of a person's label
set are in `verify.py`, the consensus vote in `consensus.py`, the calibration itself in
`calibrate.py`."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from visionloop.contracts import LabelActions, LabelRejectReason, LabelSubmitted, VerificationMethod
from visionloop.services.verifier import calibrate
from visionloop.services.verifier.calibrate import Calibration, model_label
from visionloop.services.verifier.config import Policy
from visionloop.services.verifier.verify import Verdict


def label_id_for(submission_ids: Sequence[str]) -> str:
    """A label set's id, fixed by the submissions behind it."""
    return "label-" + hashlib.sha256("\n".join(sorted(submission_ids)).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class PrelabelOutcome:
    """What becomes of a pre-label set: `outcome` (recorded with the offer), the verdict, and the
    labelling actions an accepted set counts."""

    outcome: str
    verdict: Verdict
    actions: LabelActions | None = None


def needs_calibration(checked: Verdict, policy: Policy) -> bool:
    """Whether the calibration must be read: the boxes pass their checks and auto-accept is on."""
    return checked.accepted and policy.auto_accept


def prelabel_outcome(sub: LabelSubmitted, checked: Verdict, policy: Policy, calibration: Mapping[str, Calibration] | None,
                     class_names: Sequence[str] | None) -> PrelabelOutcome:
    """Auto-accept, or hand to a person with the reason (`checked`: `verify.check_boxes` of its boxes)."""
    if not checked.accepted:
        return PrelabelOutcome("rejected", checked)
    if not policy.auto_accept:
        return PrelabelOutcome("needs_review", Verdict(False, reason=LabelRejectReason.NEEDS_REVIEW,
                                                       message="auto-accept is off for this project"))
    assert calibration is not None
    model = calibrate.model_key(sub.prelabel_model)
    decision = calibrate.decide(sub.boxes, calibration, image_id=sub.image.image_id, spot_check_rate=policy.spot_check_rate,
                                taxonomy=class_names, model_classes=sub.prelabel_classes, model=model)
    if decision.accepted:
        boxes = [b.model_copy(update={"score": None}) for b in checked.boxes]
        return PrelabelOutcome("auto_accepted", Verdict(True, boxes=boxes, method=VerificationMethod.AUTO),
                               LabelActions(prelabels_accepted=len(boxes)))
    assert decision.reason is not None
    return PrelabelOutcome(decision.reason.value, Verdict(False, reason=decision.reason, message=decision.message))


def gauges_of(project: str, model: tuple[str, int], cal: Calibration) -> dict[str, float]:
    """Heartbeat gauges of one class's calibration: `calibration.<project>.<model>@v<n>.<class>.<figure>`."""
    key = f"calibration.{project}.{model_label(model)}.{cal.class_name}"
    figures = {"samples": cal.samples, "threshold": cal.threshold, "precision": cal.precision, "lower_bound": cal.lower_bound}
    return {f"{key}.{name}": float(value) for name, value in figures.items() if value is not None}


def gauges(report: list[dict[str, Any]]) -> dict[str, float]:
    """The gauges of every row of `store.calibration_report`."""
    found: dict[str, float] = {}
    for row in report:
        cal = Calibration(row["class_name"], row["samples"], row["threshold"], row["precision"], row["support"], row["status"],
                          lower_bound=row["lower_bound"])
        found.update(gauges_of(row["project"], (row["model_id"], row["model_version"]), cal))
    return found
