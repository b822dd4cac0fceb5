"""From a passing candidate to fleets, through the real broker and PostgreSQL: convert, package,
register, promote, staged rollout to 20 in-process edge agents, and the recognizer's switch.

The candidate is the suite's cached synthetic-scene detector (tests/detector.py); its test set
and calibration images are synthetic scenes of the same recipe.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from detector import onnx_bytes, trained
from helpers import Collector, Services, eventually, publish

from visionloop.contracts import (
    Box,
    DatasetRef,
    DeviceState,
    Envelope,
    ImageAccepted,
    ImageHashes,
    ImageRecognized,
    ImageRef,
    ImageSource,
    ImageUnrecognized,
    Lineage,
    Metrics,
    ModelEvaluated,
    ModelPackaged,
    ModelRef,
    Precision,
    Target,
    topic_of,
)
from visionloop.libs import package
from visionloop.libs.detmetrics import evaluate
from visionloop.libs.manifest import Member, manifest
from visionloop.libs.scenes import render_scene
from visionloop.libs.signing import TrustStore, ensure_key_pair, load_private
from visionloop.services.distributor.config import DistributorSettings
from visionloop.services.distributor.store import releases_report
from visionloop.services.edge_agent.agent import EdgeAgent
from visionloop.services.recognizer.config import RecognizerSettings

CLASSES = ["circle", "square", "triangle"]
PUBLIC = "http://distributor"


def _scene(seed: int) -> Any:
    return render_scene(seed=seed, width=160, height=120, classes=tuple(CLASSES), objects=(1, 3), size=(0.25, 0.5))


async def _manifest(blobs: Any, seeds: range, split: str) -> tuple[DatasetRef, dict[str, list[Box]], list[Any]]:
    members, truth, images = [], {}, []
    for seed in seeds:
        scene = _scene(seed)
        data = scene.encode(quality=92)
        ref = await blobs.put(data)
        image = ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=160, height=120, format="JPEG", byte_size=len(data))
        boxes = [Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes]
        members.append(Member(image.model_dump(mode="json"), [b.model_dump(mode="json") for b in boxes], "h", split))
        truth[ref.sha256] = boxes
        images.append(scene.image)
    version = f"{split}-{seeds.start}"
    blob = await blobs.put(manifest("shapes", version, CLASSES, members))
    return DatasetRef(version=version, uri=blob.uri, images=len(members)), truth, images


async def _candidate(blobs: Any, state_dir: Path) -> ModelEvaluated:
    """A passing `model evaluated` for the cached detector, with its PyTorch test-set mAP."""
    from visionloop.services.evaluator.predict import predict

    detector = trained()
    weights = await blobs.put(detector.weights.read_bytes())
    dataset, _, _ = await _manifest(blobs, range(7000, 7032), "train")
    test_set, truth, images = await _manifest(blobs, range(8000, 8016), "test")
    found = await asyncio.to_thread(predict, state_dir, detector.weights, images, imgsz=128, device="cpu")
    metrics = evaluate(truth, dict(zip(truth, found, strict=True)), CLASSES).metrics()
    return ModelEvaluated(
        lineage=Lineage(model=ModelRef(model_id="shapes-detector", version=1), dataset_version=dataset.version, class_names=CLASSES, imgsz=128),
        weights_uri=weights.uri, weights_sha256=weights.sha256, passed=True, test_set_version=test_set.version,
        candidate=metrics, dataset=dataset, test_set=test_set,
    )


@contextlib.asynccontextmanager
async def _fleet(settings: Any, app: Any, count: int, *, fleet: str = "edge", small: tuple[str, ...] = ()) -> Any:
    """`count` edge agents in this process, downloading from the distributor's app (no sockets)."""
    ensure_key_pair(settings.state_dir / "keys")  # the embedded signing key (the packager would make the same)
    trust = TrustStore.load([settings.state_dir / "keys"])
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC)
    agents = []
    try:
        for n in range(count):
            device = f"dev-{n:02d}"
            agent = EdgeAgent(settings, fleet, device, settings.state_dir / "edge" / device, trust, http=client,
                              max_input_size=64 if device in small else 640, heartbeat_s=1.0)
            await agent.start()
            agents.append(agent)
        yield agents
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                await agent.stop()
        await client.aclose()


async def _release_devices(pool: Any, settings: Any) -> dict[str, str]:
    rows = await pool.fetch(f'SELECT device_id, state FROM "{settings.schema_for("distributor")}".release_devices')
    return {r["device_id"]: r["state"] for r in rows}


@pytest.mark.long  # quarantined from CI: it timed out at 300 s once (ci20) where it takes 65-90 s; cause not found
async def test_a_passing_candidate_reaches_twenty_agents_and_the_recognizer(settings, pool) -> None:  # noqa: ANN001
    distributor = DistributorSettings(public_url=PUBLIC, stages=[10.0, 50.0, 100.0])
    async with Services(settings, pool, distributor=distributor, recognizer=RecognizerSettings(batch_max=8, library_refresh_s=300)) as loop, \
            Collector(settings, topic_of(ModelPackaged, settings.topic_prefix), topic_of(ImageRecognized, settings.topic_prefix),
                      topic_of(ImageUnrecognized, settings.topic_prefix)) as out:
        for name in ("converter", "packager", "distributor", "recognizer"):
            await loop.start(name)
        async with _fleet(settings, loop.apps["distributor"], 20) as agents:
            await eventually(lambda: _known_devices(pool, settings, 20), timeout=30)
            candidate = await _candidate(loop.adapters.blobs, settings.state_dir)
            await publish(settings, candidate, project="shapes", key="shapes-detector")

            async def all_active() -> bool:
                return all(a.active is not None and a.active.model == ModelRef(model_id="shapes-detector", version=1) for a in agents)

            await eventually(all_active, timeout=240)
            states = await eventually(lambda: _all_activated(pool, settings, 20), timeout=30)
            assert set(states.values()) == {DeviceState.ACTIVATED.value}
            # Every agent predicts with the activated (INT8 edge) model.
            boxes = agents[0].predict(_scene(8000).encode())
            assert boxes and {b.class_name for b in boxes} <= set(CLASSES)

        packaged = [Envelope[ModelPackaged].model_validate(m).payload for m in out.messages if m.get("event_type") == "model.packaged"]
        assert {(p.target, p.precision) for p in packaged} == {(Target.SERVER, Precision.FP32), (Target.EDGE, Precision.INT8)}
        schema = settings.schema_for("distributor")
        releases = {r["target"]: dict(r) for r in await pool.fetch(f'SELECT * FROM "{schema}".releases')}
        assert releases["edge"]["status"] == "completed" and releases["edge"]["stage_index"] == 2
        assert releases["server"]["status"] == "completed"

        # The library: registered as candidate, then production for server (at once) and edge (rollout done).
        library = settings.schema_for("library")
        aliases = {(r["target"], r["alias"]) for r in await pool.fetch(
            f'SELECT e.target, a.alias FROM "{library}".aliases a JOIN "{library}".entries e ON e.id = a.entry_id')}
        assert ("server", "production") in aliases and ("edge", "production") in aliases

        # The recognizer answers with the released model.
        scene = _scene(8100)
        data = scene.encode(quality=92)
        ref = await loop.adapters.blobs.put(data)
        accepted = ImageAccepted(
            submission_id="s-release", source=ImageSource(domain={}), hashes=ImageHashes(phash="0" * 16),
            image=ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=160, height=120, format="JPEG", byte_size=len(data)),
        )
        await publish(settings, accepted, project="shapes", key=ref.sha256)
        await eventually(lambda: any(m.get("event_type") in ("image.recognized", "image.unrecognized") for m in out.messages), timeout=60)
        answer = next(m for m in out.messages if m.get("event_type") in ("image.recognized", "image.unrecognized"))
        recognition = answer["payload"].get("recognition") or {}
        assert answer["payload"].get("reason") != "no_model"
        assert recognition.get("model") == {"model_id": "shapes-detector", "version": 1}

        # The package server: ranges and the ETag.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=loop.apps["distributor"]), base_url=PUBLIC) as http:
            edge = next(p for p in packaged if p.target is Target.EDGE)
            whole = await http.get(f"/v1/packages/{edge.package_sha256}")
            assert whole.status_code == 200 and whole.headers["etag"] == f'"{edge.package_sha256}"'
            part = await http.get(f"/v1/packages/{edge.package_sha256}", headers={"Range": "bytes=100-199"})
            assert part.status_code == 206 and part.content == whole.content[100:200]
            assert (await http.get(f"/v1/packages/{edge.package_sha256}", headers={"If-None-Match": f'"{edge.package_sha256}"'})).status_code == 304
            assert (await http.get("/v1/packages/" + "0" * 64)).status_code == 404


async def _known_devices(pool: Any, settings: Any, n: int) -> bool:
    with contextlib.suppress(Exception):
        return await pool.fetchval(f'SELECT count(*) FROM "{settings.schema_for("distributor")}".devices') >= n
    return False


async def _all_activated(pool: Any, settings: Any, n: int) -> dict[str, str] | None:
    states = await _release_devices(pool, settings)
    activated = [d for d, s in states.items() if s == DeviceState.ACTIVATED.value]
    return states if len(activated) >= n else None


async def _package(settings: Any, blobs: Any, version: int) -> ModelPackaged:
    """An edge package of the detector, signed with the embedded key pair (as the packager would)."""
    model = onnx_bytes(128, dynamic=False)
    key = load_private(ensure_key_pair(settings.state_dir / "keys"))
    files = {package.MODEL_FILE: model}
    spec = package.make_manifest(
        model=ModelRef(model_id="canary-detector", version=version), project="canary", target=Target.EDGE, precision=Precision.FP32,
        classes=CLASSES, input_shape=[1, 3, 128, 128], dataset_version="ds-x", created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    built = package.build(spec, files, key)
    stored = await blobs.put(built.archive)
    await blobs.put(model)
    return ModelPackaged(
        lineage=Lineage(model=ModelRef(model_id="canary-detector", version=version), dataset_version="ds-x", class_names=CLASSES, imgsz=128),
        target=Target.EDGE, precision=Precision.FP32, package_uri=stored.uri, package_sha256=stored.sha256, size_bytes=stored.size,
        manifest_sha256=built.manifest_sha256, signature=built.signature, key_id=built.key_id, metrics=Metrics(map50_95=0.5, map50=0.7),
    )


@pytest.mark.slow
async def test_canary_failures_stop_the_rollout_and_roll_back(settings, pool) -> None:  # noqa: ANN001
    canary = ["dev-00", "dev-01"]
    distributor = DistributorSettings(public_url=PUBLIC, stages=[10.0, 100.0], canary_devices=canary, max_failure_rate=0.4)
    async with Services(settings, pool, distributor=distributor) as loop:
        await loop.start("distributor")
        blobs = loop.adapters.blobs
        good = await _package(settings, blobs, 1)
        # Version 1 rolls out everywhere; the canaries of version 2 cannot run its input size.
        async with _fleet(settings, loop.apps["distributor"], 8, small=()) as agents:
            await eventually(lambda: _known_devices(pool, settings, 8), timeout=30)
            await publish(settings, good, project="canary", key="canary-detector")
            await eventually(lambda: all(a.active is not None for a in agents), timeout=120)
        async with _fleet(settings, loop.apps["distributor"], 8, small=tuple(canary)) as agents:
            bad = await _package(settings, blobs, 2)
            await publish(settings, bad, project="canary", key="canary-detector")
            schema = settings.schema_for("distributor")

            async def rolled_back() -> bool:
                status = await pool.fetchval(f'SELECT status FROM "{schema}".releases WHERE version = 2')
                return status == "rolled_back"

            await eventually(rolled_back, timeout=120)

            async def events() -> list[tuple[str, str, str | None]]:
                return [(r["device_id"], r["state"], r["reason"]) for r in await pool.fetch(
                    f"""SELECT e.device_id, e.state, e.reason FROM "{schema}".device_events e JOIN "{schema}".releases r USING (release_id)
                        WHERE r.version = 2 ORDER BY e.id""")]

            await eventually(lambda: _failed_both(events, canary), timeout=30)
            seen = await events()
            assert {(d, reason) for d, state, reason in seen if state == "failed"} == {(d, "input_size_mismatch") for d in canary}
            assert not any(state == "activated" for _, state, _ in seen), "no device got version 2"
            assert all(a.active is not None and a.active.model.version == 1 for a in agents)
            reason = await pool.fetchval(f'SELECT reason FROM "{schema}".releases WHERE version = 2')
            assert "devices of stage 0 failed" in reason
            # Every device of the fleet was told to roll back; the canaries stayed on version 1 throughout.
            await eventually(lambda: _rolled_back(events, 8), timeout=30)
            report = {r["version"]: r for r in await releases_report(pool, schema)}
            assert report[1]["status"] == "completed" and report[1]["devices"] == {"activated": 8}
            assert report[2]["status"] == "rolled_back" and report[2]["devices"].get("rolled_back", 0) >= 6


async def _failed_both(events: Any, canary: list[str]) -> bool:
    return {d for d, state, _ in await events() if state == "failed"} == set(canary)


async def _rolled_back(events: Any, n: int) -> bool:
    return len({d for d, state, _ in await events() if state == "rolled_back"}) >= n


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")




async def _release(pool: Any, settings: Any, version: int) -> dict[str, Any] | None:
    row = await pool.fetchrow(f'SELECT * FROM "{settings.schema_for("distributor")}".releases WHERE version = $1', version)
    return dict(row) if row else None


async def test_operators_pause_resume_promote_and_roll_back_a_release(settings, pool) -> None:  # noqa: ANN001
    from visionloop.contracts import DeviceStatus, ReleaseCommand, ReleaseCommandKind

    # A device that never answers ("dev-99", known by its heartbeat) holds every stage: only operators move it.
    distributor = DistributorSettings(public_url=PUBLIC, stages=[10.0, 100.0], canary_devices=["dev-00", "dev-99"], min_activated_fraction=1.0)
    async with Services(settings, pool, distributor=distributor) as loop:
        await loop.start("distributor")
        blobs = loop.adapters.blobs
        await publish(settings, DeviceStatus(fleet="edge", device_id="dev-99", state=DeviceState.HEARTBEAT), project="canary", key="edge")
        async with _fleet(settings, loop.apps["distributor"], 4) as agents:
            await eventually(lambda: _known_devices(pool, settings, 5), timeout=30)
            await publish(settings, await _package(settings, blobs, 1), project="canary", key="canary-detector")
            await eventually(lambda: agents[0].active is not None, timeout=60)

            async def command(kind: ReleaseCommandKind) -> None:
                await publish(settings, ReleaseCommand(command=kind, fleet="edge", issued_by="test"), project="canary", key="edge")

            async def status_is(status: str, stage: int) -> bool:
                row = await _release(pool, settings, 1)
                return row is not None and row["status"] == status and row["stage_index"] == stage

            await command(ReleaseCommandKind.PAUSE)
            await eventually(lambda: status_is("paused", 0), timeout=30)
            assert all(a.active is None for a in agents[1:]), "only the canary stage got the release"
            await command(ReleaseCommandKind.RESUME)
            await eventually(lambda: status_is("rolling", 0), timeout=30)
            await command(ReleaseCommandKind.PROMOTE)  # stage 1: the whole fleet
            await eventually(lambda: status_is("rolling", 1), timeout=30)
            await eventually(lambda: all(a.active is not None for a in agents), timeout=60)
            await command(ReleaseCommandKind.PROMOTE)  # the last stage: done
            await eventually(lambda: status_is("completed", 1), timeout=30)
            assert "promote by test" in (await _release(pool, settings, 1))["reason"]

            # Version 2 everywhere (promoted through both stages), then rolled back to version 1.
            await publish(settings, await _package(settings, blobs, 2), project="canary", key="canary-detector")
            await eventually(lambda: _release(pool, settings, 2), timeout=30)
            await command(ReleaseCommandKind.PROMOTE)
            await eventually(lambda: all(a.active is not None and a.active.model.version == 2 for a in agents), timeout=60)
            await command(ReleaseCommandKind.ROLLBACK)

            async def back_on_one() -> bool:
                row = await _release(pool, settings, 2)
                return row["status"] == "rolled_back" and all(a.active is not None and a.active.model.version == 1 for a in agents)

            await eventually(back_on_one, timeout=60)
            assert "rollback by test" in (await _release(pool, settings, 2))["reason"]
            library = settings.schema_for("library")
            production = await pool.fetchval(
                f"""SELECT e.version FROM "{library}".aliases a JOIN "{library}".entries e ON e.id = a.entry_id
                    WHERE a.alias = 'production' AND e.target = 'edge' AND e.model_id = 'canary-detector'""")
            assert production == 1, "the library's edge production model is the one rolled back to"
