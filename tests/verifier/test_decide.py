"""The verifier's auto-accept decision whole (services/verifier/decide.py): box checks, the
project's flag and the calibration, without a broker or a database."""

from __future__ import annotations

from datetime import UTC, datetime

from visionloop.contracts import (
    Box,
    ImageRef,
    Labeller,
    LabelRejectReason,
    LabelSourceKind,
    LabelSubmitted,
    ModelRef,
    TaskKind,
)
from visionloop.services.verifier import decide
from visionloop.services.verifier.calibrate import Calibration
from visionloop.services.verifier.config import Policy
from visionloop.services.verifier.verify import check_boxes

MODEL = ModelRef(model_id="yard-detector", version=2)


def _offer(*boxes: Box) -> LabelSubmitted:
    return LabelSubmitted(
        submission_id="pre-t1", task_id="t1", task_kind=TaskKind.REVIEW,
        image=ImageRef(image_id="a" * 64, blob_uri="file:///b/" + "a" * 64, width=640, height=480, format="JPEG", byte_size=1000),
        boxes=list(boxes), labeller=Labeller(user_id="model:yard-detector@v2", role="model"), source=LabelSourceKind.PRELABEL,
        submitted_at=datetime.now(UTC), prelabel_model=MODEL, prelabel_classes=["car"], prelabels=[],
    )


def _calibrated(threshold: float) -> dict[str, Calibration]:
    return {"car": Calibration("car", 400, threshold, 0.99, 300, "calibrated", correct=396, support_correct=297, lower_bound=0.97,
                               target=0.95, confidence=0.95, model=("yard-detector", 2))}


def _outcome(sub: LabelSubmitted, policy: Policy, calibration: dict[str, Calibration] | None) -> decide.PrelabelOutcome:
    checked = check_boxes(sub.boxes, sub.image.width, sub.image.height, ["car"], policy)
    assert decide.needs_calibration(checked, policy) == (calibration is not None)
    return decide.prelabel_outcome(sub, checked, policy, calibration, ["car"])


def test_confident_prelabels_of_a_calibrated_class_are_auto_accepted_without_scores() -> None:
    sub = _offer(Box(x1=10, y1=10, x2=100, y2=90, class_name="car", score=0.9))
    found = _outcome(sub, Policy(spot_check_rate=0.0), _calibrated(0.5))
    assert found.outcome == "auto_accepted" and found.verdict.accepted and found.actions is not None
    assert [b.score for b in found.verdict.boxes] == [None] and found.actions.prelabels_accepted == 1


def test_below_the_threshold_off_or_broken_boxes_go_to_a_person_with_the_reason() -> None:
    low = _offer(Box(x1=10, y1=10, x2=100, y2=90, class_name="car", score=0.3))
    found = _outcome(low, Policy(spot_check_rate=0.0), _calibrated(0.5))
    assert not found.verdict.accepted and found.outcome == found.verdict.reason.value
    off = _outcome(low, Policy(auto_accept=False), None)
    assert (off.outcome, off.verdict.reason) == ("needs_review", LabelRejectReason.NEEDS_REVIEW)
    broken = _outcome(_offer(Box(x1=10, y1=10, x2=900, y2=90, class_name="car", score=0.9)), Policy(), None)
    assert broken.outcome == "rejected" and not broken.verdict.accepted
    assert decide.label_id_for(["b", "a"]) == decide.label_id_for(["a", "b"]) and decide.label_id_for(["a"]).startswith("label-")


def test_a_class_s_gauges_name_project_model_version_and_class_and_skip_missing_figures() -> None:
    cal = Calibration(class_name="car", samples=60, threshold=0.9, precision=1.0, support=60, status="calibrated", lower_bound=0.951)
    assert decide.gauges_of("yard", ("yard-detector", 2), cal) == {
        "calibration.yard.yard-detector@v2.car.samples": 60.0, "calibration.yard.yard-detector@v2.car.threshold": 0.9,
        "calibration.yard.yard-detector@v2.car.precision": 1.0, "calibration.yard.yard-detector@v2.car.lower_bound": 0.951}
    few = Calibration(class_name="person", samples=2, threshold=None, precision=None, support=0, status="too_few_samples")
    assert decide.gauges_of("yard", ("yard-detector", 2), few) == {"calibration.yard.yard-detector@v2.person.samples": 2.0}
