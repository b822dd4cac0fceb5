"""Release events: step 10 of the loop (distributor, edge agents)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from visionloop.contracts.common import BlobUri, Frozen, ModelRef, Sha256, Target
from visionloop.contracts.envelope import Payload

FleetName = str


class ReleaseAction(StrEnum):
    """What devices are told to do."""

    ACTIVATE = "activate"
    ROLLBACK = "rollback"


class RolloutStage(Frozen):
    """Which devices a release addresses now."""

    index: int = Field(ge=0, description="0 is the canary stage.")
    percent: float = Field(gt=0.0, le=100.0, description="Share of the fleet in this stage or earlier.")
    devices: list[str] = Field(
        default_factory=list, description="Explicit device ids; empty means choose by `percent`."
    )


class Release(Payload):
    """A model package released to one fleet (common shape of edge and server releases)."""

    event_type = "release"

    release_id: str = Field(min_length=1, max_length=128)
    fleet: FleetName = Field(min_length=1, max_length=128)
    target: Target
    action: ReleaseAction = ReleaseAction.ACTIVATE
    model: ModelRef
    package_uri: BlobUri
    package_url: str | None = Field(
        default=None, max_length=2048, description="HTTP URL devices download the package from."
    )
    package_sha256: Sha256
    signature: str = Field(pattern=r"^[A-Za-z0-9+/]+={0,2}$")
    key_id: str = Field(max_length=128)
    stage: RolloutStage
    rollback_to: ModelRef | None = Field(default=None, description="For rollbacks: the model to go back to.")


class EdgeRelease(Release):
    """A release for edge devices (`vl.release.edge.v1`, keyed by fleet)."""

    event_type = "release.edge"


class ServerRelease(Release):
    """A release for server fleets (`vl.release.server.v1`, keyed by fleet)."""

    event_type = "release.server"


class ReleaseCommandKind(StrEnum):
    """An operator's command on a release."""

    PROMOTE = "promote"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"


class ReleaseCommand(Payload):
    """An operator's command to the distributor."""

    event_type = "release.command"

    command: ReleaseCommandKind
    release_id: str | None = Field(default=None, max_length=128, description="Null: latest for the fleet.")
    fleet: FleetName | None = Field(default=None, max_length=128)
    issued_by: str = Field(default="unknown", max_length=128)
    reason: str | None = Field(default=None, max_length=1024)


class DeviceState(StrEnum):
    """Where a device is with a release."""

    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    ACTIVATED = "activated"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    HEARTBEAT = "heartbeat"


class DeviceFailureReason(StrEnum):
    """Why a device refused or failed a release."""

    DOWNLOAD_FAILED = "download_failed"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    MANIFEST_INVALID = "manifest_invalid"
    WRONG_TARGET = "wrong_target"
    WRONG_FLEET = "wrong_fleet"
    INPUT_SIZE_MISMATCH = "input_size_mismatch"
    SELF_TEST_FAILED = "self_test_failed"


class DeviceStatus(Payload):
    """A device reports on a release (or just that it is alive)."""

    event_type = "device.status"

    fleet: FleetName = Field(min_length=1, max_length=128)
    device_id: str = Field(min_length=1, max_length=128)
    state: DeviceState
    release_id: str | None = Field(default=None, max_length=128)
    model: ModelRef | None = Field(default=None, description="The model the release is about.")
    active_model: ModelRef | None = Field(default=None, description="The model running now.")
    package_sha256: Sha256 | None = None
    reason: DeviceFailureReason | None = None
    message: str | None = Field(default=None, max_length=1024)
