"""The edge agent's decision alone (services/edge_agent/decide.py): whether a verified package fits
this device (the model the release names, the target, the fleet, the input size); no broker, no
network, no model run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from visionloop.contracts import DeviceFailureReason, EdgeRelease, ModelRef, RolloutStage, Target
from visionloop.libs import package, signing
from visionloop.services.edge_agent.decide import check_fit

KEY = signing.load_private(signing.generate()[0])


def _spec(**changes: Any) -> package.Manifest:
    values: dict[str, Any] = dict(
        model=ModelRef(model_id="yard-detector", version=3), project="yard", target="edge", precision="int8", classes=["car"],
        input_shape=[1, 3, 128, 128], created_at=datetime(2026, 12, 5, tzinfo=UTC), dataset_version="ds-1", fleets=["lab"],
    ) | changes
    built = package.build(package.make_manifest(**values), {package.MODEL_FILE: b"onnx"}, KEY)
    return package.Manifest.model_validate_json(built.manifest_bytes)


def _release(version: int = 3) -> EdgeRelease:
    return EdgeRelease(release_id="r", fleet="lab", target=Target.EDGE, model=ModelRef(model_id="yard-detector", version=version),
                       package_uri="file:///p", package_url="http://x/p", package_sha256="0" * 64, signature="s", key_id="k",
                       stage=RolloutStage(index=0, percent=100))


def test_a_package_fits_or_says_which_of_model_target_fleet_and_size_it_misses() -> None:
    spec = _spec()
    assert check_fit(spec, _release(), fleet="lab", target="edge", max_input_size=128) is None
    misses = {
        DeviceFailureReason.MANIFEST_INVALID: (spec, _release(4), "lab", "edge", 640),
        DeviceFailureReason.WRONG_TARGET: (spec, _release(), "lab", "server", 640),
        DeviceFailureReason.WRONG_FLEET: (spec, _release(), "dock", "edge", 640),
        DeviceFailureReason.INPUT_SIZE_MISMATCH: (spec, _release(), "lab", "edge", 96),
    }
    for reason, (s, release, fleet, target, size) in misses.items():
        found = check_fit(s, release, fleet=fleet, target=target, max_input_size=size)
        assert found is not None and found[0] is reason and found[1], reason
    assert "yard-detector v4" in check_fit(spec, _release(4), fleet="lab", target="edge", max_input_size=640)[1]  # type: ignore[index]
    assert "at most 96x96" in check_fit(spec, _release(), fleet="lab", target="edge", max_input_size=96)[1]  # type: ignore[index]
    assert check_fit(_spec(fleets=[]), _release(), fleet="dock", target="edge", max_input_size=640) is None  # no fleets: any
