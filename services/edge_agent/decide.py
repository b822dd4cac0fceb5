"""The edge agent's decisions, pure: whether a verified package fits this device."""

from __future__ import annotations

from visionloop.contracts import DeviceFailureReason, Release
from visionloop.libs.package import Manifest


def check_fit(
    spec: Manifest, release: Release, *, fleet: str, target: str, max_input_size: int
) -> tuple[DeviceFailureReason, str] | None:
    """Why a verified package does not fit this device (or None when it fits)."""
    if spec.ref != release.model:
        return DeviceFailureReason.MANIFEST_INVALID, (
            f"the package holds {spec.model.model_id} v{spec.model.version}, the release names "
            f"{release.model.model_id} v{release.model.version}"
        )
    if spec.target.value != target:
        return DeviceFailureReason.WRONG_TARGET, f"the package is built for target {spec.target.value}, this device runs {target} models"
    if spec.fleets and fleet not in spec.fleets:
        return DeviceFailureReason.WRONG_FLEET, f"the package may run on fleets {', '.join(spec.fleets)}, not on {fleet}"
    if max(spec.input.height, spec.input.width) > max_input_size:
        return DeviceFailureReason.INPUT_SIZE_MISMATCH, (
            f"the model takes {spec.input.height}x{spec.input.width} inputs; this device runs at most "
            f"{max_input_size}x{max_input_size}: export it at a smaller imgsz"
        )
    return None
