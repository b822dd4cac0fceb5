"""The distributor's rollout on the in-memory bus (libs/bus/fake.py): its own wiring, its SQL on
PostgreSQL, no Kafka. Packages, agents and the recognizer over the real broker: test_release.py."""

from __future__ import annotations

from pathlib import Path

from visionloop.contracts import (
    DeviceState,
    DeviceStatus,
    EdgeRelease,
    Envelope,
    Lineage,
    Metrics,
    ModelPackaged,
    ModelRef,
    Precision,
    Target,
)
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus, FakeRuntime, of_type
from visionloop.libs.db import quote_ident
from visionloop.libs.service import Adapters
from visionloop.services.distributor import store
from visionloop.services.distributor.config import DistributorSettings
from visionloop.services.distributor.decide import NO_DEVICES
from visionloop.services.distributor.service import SPEC

REF = ModelRef(model_id="yard-detector", version=1)
PACKAGED = ModelPackaged(
    lineage=Lineage(model=REF, dataset_version="ds-1", class_names=["car"], imgsz=256), target=Target.EDGE, precision=Precision.INT8,
    package_uri="file:///p.tar", package_sha256="1" * 64, size_bytes=100, manifest_sha256="2" * 64, signature="c2lnbmF0dXJl",
    key_id="k1", metrics=Metrics(map50_95=0.4, map50=0.6, images=100),
)


async def distributor(bus: FakeBus, tmp_path: Path) -> FakeRuntime:
    runtime = bus.runtime("distributor", pool=bus.pool)  # type: ignore[attr-defined]
    config = DistributorSettings(public_url="http://127.0.0.1:1")
    SPEC.wire(runtime, Adapters(blobs=LocalBlobStore(tmp_path / "blobs")), config)  # type: ignore[arg-type]
    await runtime.migrate(SPEC.migrations)
    return runtime


def heartbeat(device: str) -> Envelope[DeviceStatus]:
    return Envelope.of(DeviceStatus(fleet="yard-edge", device_id=device, state=DeviceState.HEARTBEAT), producer=f"edge/{device}", project="yard")


async def test_a_release_to_a_fleet_without_devices_waits_and_says_so(fake_bus: FakeBus, tmp_path: Path) -> None:
    """Issue 18, item 7: no "completed 3/3 (100%)" on nobody; the first device moves it on."""
    runtime = await distributor(fake_bus, tmp_path)
    releases = runtime.consumers[0].handler.args[0]
    s = quote_ident(runtime.schema)
    async with runtime.transaction() as unit:
        await store.record_package(unit.conn, s, PACKAGED, "yard", {"files": []})  # what on_packaged keeps of a checked package
        await releases.start(unit, Envelope.of(PACKAGED, producer="packager/test", project="yard"), "yard-edge", [10.0, 50.0, 100.0], [])
    release_id = "yard-detector-v1-edge-yard-edge"
    row = await store.release(fake_bus.pool, s, release_id)  # type: ignore[attr-defined]
    assert (row["status"], row["stage_index"], row["reason"]) == ("rolling", 0, NO_DEVICES)
    seen = await fake_bus.deliver(heartbeat("cam-1"))  # a device appears: the stages that do not address it pass
    row = await store.release(fake_bus.pool, s, release_id)  # type: ignore[attr-defined]
    stages = [r.stage.percent for r in of_type(seen, EdgeRelease)]
    assert (row["status"], row["reason"]) == ("rolling", None)  # waits for cam-1 to activate now, not for a device
    assert row["stage_index"] == len(stages) and stages == [50.0, 100.0][: len(stages)]  # the stages that do not address it pass
