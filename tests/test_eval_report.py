"""The evaluation report: JSON plus two plots, deterministic, no I/O."""

from __future__ import annotations

import json

from visionloop.contracts import Box, GateFailure, GateFailureReason
from visionloop.libs.detmetrics import evaluate
from visionloop.services.evaluator.report import render

CLASSES = ["car", "bus", "person"]


def b(x: float, cls: str, score: float | None = None) -> Box:
    return Box(x1=x, y1=0, x2=x + 20, y2=20, class_name=cls, score=score)


TRUTH = {"a": [b(0, "car"), b(40, "bus")], "b": [b(0, "person")], "c": []}
PREDS = {"a": [b(1, "car", 0.9), b(45, "bus", 0.6)], "b": [b(80, "person", 0.7)], "c": [b(0, "car", 0.3)]}
CANDIDATE = {"model_id": "demo-detector", "version": 2, "weights_sha256": "ab" * 32}
FAILURE = GateFailure(
    reason=GateFailureReason.CLASS_REGRESSION, message="class 'person' dropped", metric="ap50_95",
    class_name="person", value=0.0, threshold=0.45,
)


def test_report_with_champion() -> None:
    ev = evaluate(TRUTH, PREDS, CLASSES)
    champion = {"model_id": "demo-detector", "version": 1, "metrics": {"map50_95": 0.6, "map50": 0.8,
                "per_class_ap": {"car": 0.6, "bus": 0.5, "person": 0.5}}}
    files = render(ev, candidate=CANDIDATE, champion=champion, failures=[FAILURE], test_set_version="ts-1", passed=False)
    assert set(files) == {"report.json", "pr_curves.png", "per_class_ap.png"}
    assert files["pr_curves.png"].startswith(b"\x89PNG") and files["per_class_ap.png"].startswith(b"\x89PNG")
    report = json.loads(files["report.json"])
    assert report["passed"] is False and report["test_set_version"] == "ts-1"
    assert report["candidate"]["model_id"] == "demo-detector"
    assert report["candidate"]["metrics"] == json.loads(json.dumps(ev.to_json()))
    assert report["champion"]["metrics"]["per_class_ap"]["car"] == 0.6
    assert report["failures"][0]["reason"] == "class_regression" and report["failures"][0]["class_name"] == "person"
    again = render(ev, candidate=CANDIDATE, champion=champion, failures=[FAILURE], test_set_version="ts-1", passed=False)
    assert again["report.json"] == files["report.json"]


def test_report_first_model_and_empty_test_set() -> None:
    ev = evaluate(TRUTH, PREDS, CLASSES)
    files = render(ev, candidate=CANDIDATE, champion=None, failures=[], test_set_version="ts-1", passed=True)
    report = json.loads(files["report.json"])
    assert report["champion"] is None and report["failures"] == [] and report["passed"] is True
    empty = render(evaluate({}, {}, CLASSES), candidate={}, champion=None, failures=[], test_set_version="ts-0", passed=False)
    assert empty["pr_curves.png"].startswith(b"\x89PNG") and empty["per_class_ap.png"].startswith(b"\x89PNG")
    assert json.loads(empty["report.json"])["candidate"]["metrics"]["images"] == 0


def test_many_classes_still_render() -> None:
    names = [f"class-{i}" for i in range(40)]
    truth = {str(i): [b(0, names[i % 40])] for i in range(80)}
    preds = {str(i): [b(2, names[i % 40], 0.8)] for i in range(80)}
    ev = evaluate(truth, preds, names)
    champion = {"per_class_ap": {n: 0.5 for n in names}}  # a bare Metrics dump works too
    files = render(ev, candidate=CANDIDATE, champion=champion, failures=[], test_set_version="ts", passed=True)
    assert files["per_class_ap.png"].startswith(b"\x89PNG")
