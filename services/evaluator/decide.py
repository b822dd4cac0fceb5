"""The evaluator's decisions, pure (the gate itself is `gate.py`): what a candidate without a
test set gets, the classes its metrics are averaged over, which measurements are stored, and the
`model evaluated` event."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from visionloop.contracts import (
    GateFailure,
    GateFailureReason,
    Metrics,
    ModelEvaluated,
    ModelRef,
    ModelTrained,
)


@dataclass
class Assessment:
    """What measuring one candidate found (the handler records it and emits the verdict)."""

    candidate: Metrics
    failures: list[GateFailure]
    test_set_version: str
    champion: Metrics | None = None
    champion_ref: ModelRef | None = None
    champion_measured: bool = False
    """True when the champion was measured now (a new test set version): store it."""
    report_uri: str | None = None
    images_per_s: float | None = None


def without_test_set(trained: ModelTrained, project: str) -> Assessment | None:
    """The failed assessment of a candidate whose project has no frozen test set (None: it has one)."""
    if trained.test_set is not None and trained.test_set.images > 0:
        return None
    return Assessment(
        candidate=Metrics(map50_95=0.0, map50=0.0, images=0),
        test_set_version=trained.test_set.version if trained.test_set else "none",
        failures=[GateFailure(reason=GateFailureReason.NO_TEST_SET, message=f"{project} has no frozen test set: nothing to gate on")],
    )


def metric_classes(test_set_classes: Sequence[str], lineage_classes: Sequence[str]) -> list[str]:
    """The test set's classes, then the model's that the test set does not name."""
    names = list(test_set_classes)
    return names + [name for name in lineage_classes if name not in names]


def measurements_to_store(trained: ModelTrained, found: Assessment) -> list[tuple[ModelRef, Metrics, str | None]]:
    """(model, metrics, report) to keep: the candidate's, and the champion's when measured now."""
    if found.test_set_version == "none":
        return []
    rows: list[tuple[ModelRef, Metrics, str | None]] = [(trained.lineage.model, found.candidate, found.report_uri)]
    if found.champion_measured and found.champion_ref is not None and found.champion is not None:
        rows.append((found.champion_ref, found.champion, None))
    return rows


def evaluated(trained: ModelTrained, found: Assessment) -> ModelEvaluated:
    """The gate's verdict on a candidate, with both models' metrics."""
    return ModelEvaluated(
        lineage=trained.lineage, weights_uri=trained.weights_uri, weights_sha256=trained.weights_sha256, passed=not found.failures,
        failures=found.failures, test_set_version=found.test_set_version, candidate=found.candidate, champion=found.champion,
        champion_model=found.champion_ref, report_uri=found.report_uri, dataset=trained.dataset, test_set=trained.test_set,
    )
