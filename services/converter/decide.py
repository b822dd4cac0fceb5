"""The converter's decisions, pure: whether an artifact may ship (`judge`), the figures it is
judged by, and which images calibrate INT8. No I/O; `convert.py` builds and measures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from visionloop.contracts import ConversionFailureReason, Parity, Precision, RefusedArtifact, Target
from visionloop.services.converter.config import Policy

_SLACK = 1e-9  # float noise must not refuse a value that sits on its threshold


class ConversionError(Exception):
    """An artifact cannot be built: `reason` says which step failed, the message what to do."""

    def __init__(self, reason: ConversionFailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def judge(
    target: Target,
    precision: Precision,
    policy: Policy,
    *,
    max_abs_diff_px: float | None,
    map50_95: float | None,
    reference_map50_95: float,
    parity_images: int = 0,
) -> tuple[Parity, RefusedArtifact | None]:
    """Whether an artifact may ship: its parity figures, and the refusal when it may not.

    `map50_95` None means there was no test set to measure it on.
    """
    tolerance = policy.map_tolerance(precision)
    delta = None if map50_95 is None else map50_95 - reference_map50_95
    parity = Parity(
        max_abs_diff_px=None if max_abs_diff_px is None else float(f"{max_abs_diff_px:.6g}"),
        map50_95=None if map50_95 is None else round(min(max(map50_95, 0.0), 1.0), 4),
        map50_95_delta=None if delta is None else round(delta, 4),
        tolerance=None if map50_95 is None else tolerance,
        passed=False,
    )
    what = f"the {target.value} {precision.value.upper()} artifact"

    def refuse(reason: ConversionFailureReason, message: str) -> tuple[Parity, RefusedArtifact]:
        return parity, RefusedArtifact(target=target, precision=precision, reason=reason, message=message[:1024])

    limit = policy.fp32_max_abs_diff_px
    if precision is Precision.FP32 and max_abs_diff_px is not None and max_abs_diff_px > limit + _SLACK:
        return refuse(
            ConversionFailureReason.PARITY_FAILED,
            f"{what}'s raw box outputs differ from PyTorch's by up to {max_abs_diff_px:.3g} px on "
            f"{parity_images} image(s), more than fp32_max_abs_diff_px {limit:.3g} px: the export does not "
            "compute what the model computes; check the torch, onnx and ONNX Runtime versions or set another opset",
        )
    if map50_95 is None or delta is None:
        if precision is not Precision.FP32:
            return refuse(
                ConversionFailureReason.PARITY_FAILED,
                f"the event names no test set, so {what}'s accuracy cannot be checked against PyTorch's; "
                "freeze a test set for the project, or set edge_precision fp32 (FP32 ships on raw parity alone)",
            )
        return parity.model_copy(update={"passed": True}), None
    setting = f"{precision.value}_map_tolerance"
    if delta < -tolerance - _SLACK:
        return refuse(
            ConversionFailureReason.ACCURACY_DROP,
            f"{what} scores mAP50-95 {map50_95:.4f} on the test set, {-delta:.4f} below PyTorch's "
            f"{reference_map50_95:.4f}, more than {setting} {tolerance:.4f}"
            + _drop_hint(target, precision),
        )
    if delta > tolerance + _SLACK:
        return refuse(
            ConversionFailureReason.PARITY_FAILED,
            f"{what} scores mAP50-95 {map50_95:.4f} on the test set, {delta:.4f} above PyTorch's "
            f"{reference_map50_95:.4f}, more than {setting} {tolerance:.4f}: it does not reproduce the "
            "gated model (other preprocessing or a broken export), so the gate's figures would not describe it",
        )
    return parity.model_copy(update={"passed": True}), None


def _drop_hint(target: Target, precision: Precision) -> str:
    if precision is Precision.INT8:
        return "; calibrate on more training images (calibration_images), or set edge_precision fp16"
    if target is Target.EDGE:
        return "; an edge_imgsz below the training size loses detail the model needs"
    return "; the export does not reproduce the model: check the torch, onnx and ONNX Runtime versions"


def box_diff(reference: np.ndarray, output: np.ndarray) -> float:
    """Largest absolute difference of the box rows (channels 0-3, input pixels) of two raw head outputs."""
    if reference.shape != output.shape:
        raise ConversionError(
            ConversionFailureReason.PARITY_FAILED,
            f"the ONNX model's raw output has shape {list(output.shape)}, PyTorch's {list(reference.shape)}",
        )
    return float(np.abs(reference[:, :4].astype(np.float64) - output[:, :4].astype(np.float64)).max())


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most `n` of `items`, evenly spaced and in order (all of them when there are fewer)."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def calibration_members(images: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Which manifest entries calibrate INT8: training-split images first, then validation ones.

    Test images never calibrate (a dataset manifest has none, but a mixed one is filtered).
    """
    picked = spread([m for m in images if m.get("split") == "train"], n)
    return picked + spread([m for m in images if m.get("split") == "val"], n - len(picked))


def outcome_of(artifacts: Sequence[Any], refused: Sequence[Any]) -> str:
    """`converted` (every target ships), `partial` or `refused` (none does)."""
    if not artifacts:
        return "refused"
    return "partial" if refused else "converted"


def shipped_artifact(artifacts: Sequence[Any], target: Target, refused: bool) -> Any | None:
    """The artifact that ships for `target` (None when it was refused)."""
    return None if refused else next((a for a in artifacts if a.target == target), None)
