"""The evaluator's decisions, pure (the gate itself is `gate.py`): what a candidate without a
test set gets, the classes its metrics are averaged over, which measurements are stored, the
`model evaluated` event, and the gate settings a project has once its run-time changes
(`visionloop evaluator set`) are applied."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from visionloop.contracts import (
    GateFailure,
    GateFailureReason,
    Metrics,
    ModelEvaluated,
    ModelRef,
    ModelTrained,
)
from visionloop.services.evaluator.config import Policy

SETTABLE = tuple(name for name in Policy.model_fields if name not in ("device", "batch"))
"""What `visionloop evaluator set` may change per project: the gate and how candidates are
measured (not where: `device` and `batch` are the process's)."""


class SettingRefused(ValueError):
    """A run-time gate setting that cannot be applied; `reason` is its code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def with_overrides(policy: Policy, overrides: Mapping[str, Any]) -> Policy:
    """`policy` (from the environment and the config file) with a project's run-time changes."""
    return Policy.model_validate({**policy.model_dump(), **overrides})


def changed_overrides(policy: Policy, stored: Mapping[str, Any], pairs: Mapping[str, str], unset: Sequence[str] = ()) -> dict[str, Any]:
    """The project's run-time settings after setting `pairs` (name -> text) and removing `unset`;
    refused with a reason for an unknown name (with the close matches) or a value out of range."""
    for name in [*pairs, *unset]:
        if name not in SETTABLE:
            close = difflib.get_close_matches(name, SETTABLE, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"settable: {', '.join(SETTABLE)}"
            raise SettingRefused("unknown_setting", f"{name!r} is not a gate setting; {hint}")
    merged = {k: v for k, v in stored.items() if k not in unset} | dict(pairs)
    try:
        checked = with_overrides(policy, merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SettingRefused("invalid_value", problems) from None
    return {name: getattr(checked, name) for name in merged}


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
