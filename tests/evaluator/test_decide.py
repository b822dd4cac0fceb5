"""The evaluator's gate: pure, no broker, no database."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from visionloop.contracts import GateFailureReason as R
from visionloop.contracts import Metrics
from visionloop.services.evaluator.gate import GatePolicy, gate

POLICY = GatePolicy(map50_95_floor=0.3, champion_tolerance=0.01, class_tolerance=0.05, agreement_floor=0.5)


def metrics(map50_95: float = 0.6, agreement: float | None = 0.8, images: int | None = 50, **ap: float) -> Metrics:
    return Metrics(
        map50_95=map50_95, map50=min(1.0, map50_95 + 0.2), per_class_ap=ap or {"car": map50_95},
        image_agreement=agreement, images=images,
    )


def reasons(failures) -> list[R]:
    return [f.reason for f in failures]


def test_first_model_on_floors_alone() -> None:
    assert gate(metrics(0.31, 0.51), None, POLICY) == []
    failures = gate(metrics(0.2, 0.9), None, POLICY)
    assert reasons(failures) == [R.BELOW_FLOOR]
    f = failures[0]
    assert (f.metric, f.value, f.threshold) == ("map50_95", 0.2, 0.3)
    assert "0.2000" in f.message and "0.3000" in f.message


def test_no_test_set_skips_the_rest() -> None:
    for images in (None, 0):
        failures = gate(metrics(0.0, 0.0, images=images), metrics(0.9), POLICY)
        assert reasons(failures) == [R.NO_TEST_SET]
        assert failures[0].value == 0 and failures[0].threshold == 1 and "0 test image" in failures[0].message
    strict = GatePolicy(min_test_images=100)
    assert reasons(gate(metrics(images=99), None, strict)) == [R.NO_TEST_SET]
    assert gate(metrics(images=100), None, strict) == []


def test_agreement_below_floor_and_unmeasured() -> None:
    failures = gate(metrics(agreement=0.4), None, POLICY)
    assert reasons(failures) == [R.AGREEMENT_BELOW_FLOOR]
    assert failures[0].metric == "image_agreement" and failures[0].value == 0.4
    unmeasured = gate(metrics(agreement=None), None, POLICY)
    assert reasons(unmeasured) == [R.AGREEMENT_BELOW_FLOOR] and unmeasured[0].value == 0.0
    assert "not measured" in unmeasured[0].message


def test_worse_than_champion() -> None:
    assert gate(metrics(0.595), metrics(0.6), POLICY) == []  # within the tolerance
    failures = gate(metrics(0.55), metrics(0.6), POLICY)
    assert R.WORSE_THAN_CHAMPION in reasons(failures)
    f = next(f for f in failures if f.reason == R.WORSE_THAN_CHAMPION)
    assert f.value == 0.55 and f.threshold == pytest.approx(0.59)
    assert "0.5500" in f.message and "0.6000" in f.message


def test_class_regression_one_per_class() -> None:
    champion = metrics(0.6, car=0.7, bus=0.6, bike=0.5, person=0.4)
    candidate = metrics(0.6, car=0.7, bus=0.5, bike=0.4, truck=0.1)  # no person: not compared
    failures = gate(candidate, champion, POLICY)
    assert reasons(failures) == [R.CLASS_REGRESSION, R.CLASS_REGRESSION]
    assert [f.class_name for f in failures] == ["bike", "bus"]
    bus = failures[1]
    assert bus.metric == "ap50_95" and bus.value == 0.5 and bus.threshold == pytest.approx(0.55)
    assert "'bus'" in bus.message and "0.6000" in bus.message


def test_every_reason_at_once() -> None:
    champion = metrics(0.8, car=0.8, bus=0.8)
    candidate = metrics(0.2, agreement=0.1, car=0.1, bus=0.79)
    assert reasons(gate(candidate, champion, POLICY)) == [
        R.BELOW_FLOOR, R.AGREEMENT_BELOW_FLOOR, R.WORSE_THAN_CHAMPION, R.CLASS_REGRESSION,
    ]


def test_values_on_a_threshold_pass() -> None:
    assert gate(metrics(0.3, 0.5), None, POLICY) == []
    # 0.7 - 0.01 and 0.7 - 0.05 are not exact in binary; they still pass
    assert gate(metrics(0.69, car=0.65), metrics(0.7, car=0.7), POLICY) == []
    assert gate(metrics(0.1 + 0.2, 0.5), None, GatePolicy(map50_95_floor=0.3)) == []
    assert reasons(gate(metrics(0.2999), None, POLICY)) == [R.BELOW_FLOOR]
    assert reasons(gate(metrics(0.6889), metrics(0.7), POLICY)) == [R.WORSE_THAN_CHAMPION]


def test_policy_is_checked() -> None:
    with pytest.raises(ValidationError):
        GatePolicy(map50_95_floor=1.5)
    with pytest.raises(ValidationError):
        GatePolicy(min_test_images=0)
    with pytest.raises(ValidationError):
        GatePolicy(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        POLICY.map50_95_floor = 0.1  # type: ignore[misc]


def test_a_candidate_without_a_test_set_fails_and_only_measured_figures_are_stored() -> None:
    """services/evaluator/decide.py alone."""
    from visionloop.contracts import DatasetRef, GateFailureReason, Lineage, Metrics, ModelRef, ModelTrained, TrainMetrics
    from visionloop.services.evaluator import decide

    trained = ModelTrained(
        lineage=Lineage(model=ModelRef(model_id="p-detector", version=2), dataset_version="ds-1", class_names=["a"], imgsz=320),
        run_id="run-1", weights_uri="file:///w.pt", weights_sha256="0" * 64, metrics=TrainMetrics(epochs=1, train_images=1, val_images=0),
        hyperparameters={}, device="cpu", duration_s=1.0, dataset=DatasetRef(version="ds-1", uri="file:///m.json", images=1),
    )
    none = decide.without_test_set(trained, "p")
    assert none is not None and [f.reason for f in none.failures] == [GateFailureReason.NO_TEST_SET]
    assert decide.measurements_to_store(trained, none) == [] and not decide.evaluated(trained, none).passed
    assert decide.metric_classes(["b", "a"], ["a", "c"]) == ["b", "a", "c"]
    found = decide.Assessment(candidate=Metrics(map50_95=0.5, map50=0.7, images=10), failures=[], test_set_version="ts-1",
                              champion=Metrics(map50_95=0.4, map50=0.6, images=10), champion_ref=ModelRef(model_id="p-detector", version=1),
                              champion_measured=True, report_uri="file:///r.json")
    assert [m.version for m, _, _ in decide.measurements_to_store(trained, found)] == [2, 1]
    assert decide.evaluated(trained, found).passed
