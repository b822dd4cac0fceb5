"""The packager on the in-memory bus (libs/bus/fake.py: its own wiring, its SQL on PostgreSQL, no
Kafka): one signed package per artifact, byte-identical when the same event is packaged again; no
key or a damaged artifact dead-letters with the reason."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from detector import onnx_bytes
from pydantic import SecretStr

from visionloop.contracts import (
    Artifact,
    Envelope,
    Lineage,
    Metrics,
    ModelConverted,
    ModelPackaged,
    ModelRef,
    Parity,
    Precision,
    Target,
)
from visionloop.libs import package, signing
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus, FakeRuntime, of_type
from visionloop.libs.db import quote_ident
from visionloop.libs.service import Adapters
from visionloop.services.packager.config import PackagerSettings
from visionloop.services.packager.decide import package_artifact
from visionloop.services.packager.service import SPEC

CLASSES = ["circle", "square", "triangle"]


async def converted(blobs, version: int = 1, *, corrupt: bool = False) -> ModelConverted:  # noqa: ANN001
    """A converted model whose artifacts are the test detector's ONNX files, stored as blobs."""
    artifacts = []
    for target, dynamic in ((Target.EDGE, False), (Target.SERVER, True)):
        data = onnx_bytes(128, dynamic=dynamic)
        ref = await blobs.put(data)
        artifacts.append(Artifact(
            target=target, precision=Precision.FP32, input_shape=["batch" if dynamic else 1, 3, 128, 128],
            uri=ref.uri, sha256=hashlib.sha256(b"other" if corrupt else data).hexdigest(), size_bytes=len(data),
            parity=Parity(max_abs_diff_px=0.0, passed=True),
        ))
    return ModelConverted(
        lineage=Lineage(
            model=ModelRef(model_id="demo-detector", version=version),
            parent=ModelRef(model_id="demo-detector", version=version - 1) if version > 1 else None,
            dataset_version="ds-abc", class_names=CLASSES, imgsz=128,
        ),
        metrics=Metrics(map50_95=0.61, map50=0.9, per_class_ap={"circle": 0.7}),
        artifacts=artifacts,
    )


async def packager(bus: FakeBus, blobs: LocalBlobStore, config: PackagerSettings) -> FakeRuntime:
    runtime = bus.runtime("packager", pool=bus.pool)  # type: ignore[attr-defined]
    SPEC.wire(runtime, Adapters(blobs=blobs), config)  # type: ignore[arg-type]
    await runtime.migrate(SPEC.migrations)
    await runtime.start()  # the signing key is loaded here, not by the wiring
    return runtime


async def test_packages_are_signed_stored_and_deterministic(fake_bus: FakeBus, tmp_path: Path) -> None:
    private_pem, public_pem = signing.generate()
    config = PackagerSettings(
        signing_key=SecretStr(private_pem.decode()), projects={"demo": {"fleets": {"edge": ["lab"]}, "conf": 0.3}}
    )
    trust = signing.TrustStore.load([public_pem])
    blobs = LocalBlobStore(tmp_path / "blobs")
    runtime = await packager(fake_bus, blobs, config)
    event = await converted(blobs)
    envelope = Envelope.of(event, producer="converter/test", project="demo")
    first = of_type(await fake_bus.deliver(envelope), ModelPackaged)
    assert {(p.target, p.precision) for p in first} == {(Target.EDGE, Precision.FP32), (Target.SERVER, Precision.FP32)}
    for p in first:
        archive = await blobs.get(p.package_uri)
        assert hashlib.sha256(archive).hexdigest() == p.package_sha256 and len(archive) == p.size_bytes
        opened = package.open_package(archive, trust)
        spec = opened.spec
        assert opened.key_id == p.key_id == signing.key_id(signing.load_public(public_pem))
        assert opened.signature == p.signature and hashlib.sha256(opened.manifest_bytes).hexdigest() == p.manifest_sha256
        assert spec.classes == CLASSES and spec.target == p.target and spec.project == "demo"
        assert spec.created_at == package.created_at_text(envelope.occurred_at)
        assert spec.decoding.conf == 0.3 and spec.metrics["map50_95"] == 0.61 and spec.dataset_version == "ds-abc"
        artifact = next(a for a in event.artifacts if a.target == p.target)
        assert opened.model == await blobs.get(artifact.uri)
        if p.target is Target.EDGE:
            assert spec.fleets == ["lab"] and spec.input.shape == [1, 3, 128, 128]
        else:
            assert spec.fleets == [] and spec.input.shape == ["batch", 3, 128, 128]
        # Packaging the same event again gives the same bytes.
        again = package_artifact(
            event, artifact, opened.model, signing.load_private(private_pem),
            project="demo", created_at=envelope.occurred_at, policy=config.policy("demo"),
        )
        assert again.archive == archive

    # The same conversion published again (a new event id): the same packages are announced.
    replay = envelope.model_copy(update={"event_id": uuid.uuid4()})
    announced = of_type(await fake_bus.deliver(replay), ModelPackaged)
    assert sorted(a.package_sha256 for a in announced) == sorted(p.package_sha256 for p in first)
    rows = await fake_bus.pool.fetch(f"SELECT target, package_sha256, key_id FROM {quote_ident(runtime.schema)}.packages")  # type: ignore[attr-defined]
    assert sorted((r["target"], r["package_sha256"]) for r in rows) == sorted((p.target.value, p.package_sha256) for p in first)

    # An artifact whose bytes are not the ones the event names is never signed.
    seen = await fake_bus.publish(await converted(blobs, version=2, corrupt=True), project="demo")
    assert not of_type(seen, ModelPackaged)
    ((_, error),) = runtime.dead_letters
    assert "artifact_checksum_mismatch" in str(error)


async def test_without_a_key_events_are_dead_lettered(fake_bus: FakeBus, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    runtime = await packager(fake_bus, blobs, PackagerSettings(auto_create_key=False))
    await fake_bus.publish(await converted(blobs), project="demo")
    ((_, error),) = runtime.dead_letters
    assert str(error).startswith("signing_key_missing")
    assert not (runtime.settings.state_dir / "keys").exists()


def test_key_is_created_only_where_allowed(tmp_path) -> None:
    key, source = PackagerSettings().load_key(tmp_path / "state", embedded=True)
    assert key is not None and source.endswith(signing.PRIVATE_KEY_FILE)
    private = tmp_path / "state" / "keys" / signing.PRIVATE_KEY_FILE
    assert os.stat(private).st_mode & 0o777 == 0o600
    assert signing.TrustStore.load([tmp_path / "state" / "keys"]).key_ids == [signing.key_id(key)]
    again, _ = PackagerSettings().load_key(tmp_path / "state", embedded=True)
    assert again is not None and signing.key_id(again) == signing.key_id(key)  # the same key on every start
    assert PackagerSettings().load_key(tmp_path / "other", embedded=False) == (None, "none")
    forced, _ = PackagerSettings(auto_create_key=True, key_dir=tmp_path / "k").load_key(tmp_path / "x", embedded=False)
    assert forced is not None and (tmp_path / "k" / signing.PUBLIC_KEY_FILE).exists()
    from_file, source = PackagerSettings(signing_key_file=str(private)).load_key(tmp_path / "y", embedded=True)
    assert from_file is not None and signing.key_id(from_file) == signing.key_id(key) and source == str(private)


