"""The converter's decisions alone (services/converter/decide.py and the per-project policy): the
parity judgement, calibration image choice, outcomes; no broker, no database, no export."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from visionloop.contracts import ConversionFailureReason, Precision, Target
from visionloop.services.converter.config import ConverterSettings, Policy
from visionloop.services.converter.decide import (
    ConversionError,
    box_diff,
    calibration_members,
    judge,
    outcome_of,
    shipped_artifact,
    spread,
)

R = ConversionFailureReason


def _judge(precision: Precision = Precision.FP32, *, diff: float | None = 0.001, map50_95: float | None = 0.80,
           reference: float = 0.80, target: Target = Target.SERVER, **policy: Any) -> tuple[Any, Any]:
    return judge(target, precision, Policy(**policy), max_abs_diff_px=diff, map50_95=map50_95,
                 reference_map50_95=reference, parity_images=4)


def test_judge_ships_within_tolerance_and_records_the_figures() -> None:
    parity, refusal = _judge(map50_95=0.7912, reference=0.80)
    assert refusal is None and parity.passed
    assert (parity.max_abs_diff_px, parity.map50_95, parity.map50_95_delta, parity.tolerance) == (0.001, 0.7912, -0.0088, 0.01)
    # a value exactly on a threshold passes; INT8 has its own, looser tolerance
    assert _judge(diff=0.01)[1] is None
    assert _judge(Precision.INT8, map50_95=0.78, target=Target.EDGE)[1] is None
    assert _judge(Precision.INT8, diff=7.5, map50_95=0.79, target=Target.EDGE)[1] is None, "INT8 is judged on accuracy, not raw outputs"


def test_judge_refuses_with_reason_and_numbers() -> None:
    parity, refusal = _judge(diff=0.25)
    assert refusal.reason is R.PARITY_FAILED and not parity.passed
    assert "0.25 px" in refusal.message and "fp32_max_abs_diff_px 0.01" in refusal.message
    _, refusal = _judge(Precision.INT8, map50_95=0.75, target=Target.EDGE)
    assert refusal.reason is R.ACCURACY_DROP and refusal.target is Target.EDGE and refusal.precision is Precision.INT8
    assert "0.7500" in refusal.message and "0.0500 below" in refusal.message and "int8_map_tolerance 0.0200" in refusal.message
    _, refusal = _judge(Precision.FP16, map50_95=0.83, target=Target.EDGE)
    assert refusal.reason is R.PARITY_FAILED and "0.0300 above" in refusal.message, "scoring higher than PyTorch is not parity either"
    _, refusal = _judge(map50_95=0.75, fp32_map_tolerance=0.1)
    assert refusal is None


def test_without_a_test_set_fp32_ships_on_raw_parity_and_reduced_precision_is_refused() -> None:
    parity, refusal = _judge(map50_95=None)
    assert refusal is None and parity.passed and parity.map50_95 is None and parity.map50_95_delta is None
    assert _judge(diff=0.5, map50_95=None)[1].reason is R.PARITY_FAILED
    parity, refusal = _judge(Precision.INT8, diff=None, map50_95=None, target=Target.EDGE)
    assert refusal.reason is R.PARITY_FAILED and "no test set" in refusal.message and not parity.passed


def test_calibration_takes_training_images_evenly_then_validation_ones() -> None:
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 5) == [1, 2] and spread([1], 0) == []
    members = [{"id": i, "split": "train" if i % 3 else "val"} for i in range(30)] + [{"id": 99, "split": "test"}]
    picked = calibration_members(members, 8)
    assert len(picked) == 8 and {m["split"] for m in picked} == {"train"}
    picked = calibration_members(members, 25)
    assert [m["split"] for m in picked].count("train") == 20 and len(picked) == 25 and 99 not in [m["id"] for m in picked]
    with pytest.raises(ConversionError) as caught:
        box_diff(np.zeros((1, 7, 10)), np.zeros((1, 8, 10)))
    assert caught.value.reason is R.PARITY_FAILED


def test_per_project_overrides_are_checked_when_the_settings_load() -> None:
    config = ConverterSettings(projects={"cams": {"edge_precision": "fp16", "edge_imgsz": 96}})
    assert config.policy("cams").edge_precision == "fp16" and config.policy("other").edge_precision == "int8"
    assert config.policy("cams").map_tolerance(Precision.FP16) == 0.01
    for bad in ({"edge_imgsz": 100}, {"edge_precision": "int4"}, {"calibration_images": 0}, {"no_such": 1}):
        with pytest.raises(ValidationError):
            ConverterSettings(projects={"cams": bad})


def test_a_conversions_outcome_and_the_artifact_each_target_ships() -> None:
    server, edge = SimpleNamespace(target=Target.SERVER), SimpleNamespace(target=Target.EDGE)
    assert outcome_of([server, edge], []) == "converted" and outcome_of([server], ["edge refused"]) == "partial"
    assert outcome_of([], ["both refused"]) == "refused"
    assert shipped_artifact([server, edge], Target.EDGE, refused=False) is edge
    assert shipped_artifact([server], Target.EDGE, refused=False) is None and shipped_artifact([server], Target.SERVER, refused=True) is None
