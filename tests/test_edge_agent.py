"""The edge agent over the real broker, with packages served by a local HTTP server: valid packages
are activated and predict; every tampered or unfitting package is refused with its reason and never
runs; rollback returns to last-known-good; the active model survives a restart; the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import tarfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from detector import onnx_bytes, variant
from helpers import Collector, eventually, publish

from visionloop.contracts import (
    DeviceFailureReason,
    DeviceState,
    DeviceStatus,
    EdgeRelease,
    ModelRef,
    ReleaseAction,
    RolloutStage,
    Target,
    topic_of,
)
from visionloop.libs import package, signing
from visionloop.libs.scenes import render_scene
from visionloop.services.edge_agent.agent import EdgeAgent
from visionloop.services.edge_agent.http import create_app, local_token
from visionloop.services.edge_agent.slots import Refused, Slots

CLASSES = ["circle", "square", "triangle"]
FLEET = "lab"
KEYS = signing.generate()
STRANGER = signing.generate()
TRUST = signing.TrustStore.load([KEYS[1]])


def scene_png(seed: int = 1) -> tuple[bytes, Any]:
    scene = render_scene(seed, width=160, height=120, classes=tuple(CLASSES), objects=(1, 3), size=(0.25, 0.5))
    return scene.encode("PNG"), scene


def build(version: int, *, keys: tuple[bytes, bytes] = KEYS, model: bytes | None = None, **changes: Any) -> package.Built:
    values: dict[str, Any] = dict(
        model=ModelRef(model_id="demo-detector", version=version), project="demo", target="edge", precision="fp32",
        classes=CLASSES, input_shape=[1, 3, 128, 128], created_at=datetime(2025, 1, 1, tzinfo=UTC),
        dataset_version="ds-1", metrics={"map50_95": 0.6}, fleets=[],
    )
    values.update(changes)
    data = model if model is not None else variant(onnx_bytes(128, dynamic=False), f"v{version}")
    return package.build(package.make_manifest(**values), {"model.onnx": data}, signing.load_private(keys[0]))


def members(archive: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def tar_of(items: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class PackageServer:
    """Serves package bytes by path over HTTP on loopback (what the distributor does for real)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.unavailable: dict[str, int] = {}
        """Path -> how many more requests answer 503 (a package server restarting)."""
        self.url = ""

    def add(self, name: str, data: bytes) -> str:
        self.files[f"/p/{name}"] = data
        return f"{self.url}/p/{name}"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        data = self.files.get(scope["path"])
        status = 200 if data is not None else 404
        body = data if data is not None else b"not found"
        if self.unavailable.get(scope["path"], 0) > 0:
            self.unavailable[scope["path"]] -= 1
            status, body = 503, b"starting"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server() -> AsyncIterator[PackageServer]:
    app = PackageServer()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(uv.serve())
    await eventually(lambda: uv.started)
    app.url = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    yield app
    uv.should_exit = True
    with contextlib.suppress(Exception):
        await task


def release(built: package.Built, url: str, release_id: str, *, version: int | None = None, **changes: Any) -> EdgeRelease:
    version = version or package.Manifest.model_validate_json(built.manifest_bytes).model.version
    values: dict[str, Any] = dict(
        release_id=release_id, fleet=FLEET, target=Target.EDGE, model=ModelRef(model_id="demo-detector", version=version),
        package_uri=f"file:///packages/{built.sha256}", package_url=url, package_sha256=built.sha256,
        signature=built.signature, key_id=built.key_id, stage=RolloutStage(index=0, percent=100),
    )
    values.update(changes)
    return EdgeRelease(**values)


def statuses(seen: Collector, release_id: str | None = None) -> list[DeviceStatus]:
    found = [DeviceStatus.model_validate(m["payload"]) for m in seen.messages if m.get("event_type") == "device.status"]
    return [s for s in found if release_id is None or s.release_id == release_id]


async def final(seen: Collector, release_id: str, timeout: float = 20.0) -> DeviceStatus:
    """The status a release ended in (activated, failed or rolled back)."""
    ends = {DeviceState.ACTIVATED, DeviceState.FAILED, DeviceState.ROLLED_BACK}
    done = await eventually(lambda: [s for s in statuses(seen, release_id) if s.state in ends], timeout=timeout)
    return done[-1]


def iou(a: Any, b: Any) -> float:
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = w * h
    return inter / ((a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter)


# -- over the broker ------------------------------------------------------------------------------------
async def test_activate_predict_rollback_and_restart(settings, server: PackageServer, tmp_path: Path) -> None:  # noqa: ANN001
    home = tmp_path / "cam-1"
    v1, v2 = build(1), build(2)
    r1 = release(v1, server.add("v1.tar", v1.archive), "rel-1")
    r2 = release(v2, server.add("v2.tar", v2.archive), "rel-2")
    agent = EdgeAgent(settings, FLEET, "cam-1", home, TRUST, heartbeat_s=0.5)
    async with Collector(settings, topic_of(DeviceStatus, settings.topic_prefix)) as seen:
        await agent.start()
        try:
            await publish(settings, r1, project="demo")
            assert (await final(seen, "rel-1")).state is DeviceState.ACTIVATED
            steps = [s.state for s in statuses(seen, "rel-1") if s.state is not DeviceState.HEARTBEAT]
            assert steps == [DeviceState.DOWNLOADED, DeviceState.VERIFIED, DeviceState.ACTIVATED]
            assert agent.active is not None and agent.active.model.version == 1

            image, scene = scene_png(1)
            boxes = agent.predict(image)
            for truth in scene.boxes:
                assert any(b.class_name == truth.class_name and iou(b, truth) > 0.5 for b in boxes), (truth, boxes)

            token = local_token(agent.home)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(agent, token=token)), base_url="http://edge",
                                         headers={"Authorization": f"Bearer {token}"}) as http:
                health = (await http.get("/healthz")).json()
                assert health["active_model"] == {"model_id": "demo-detector", "version": 1}
                model = (await http.get("/v1/model")).json()
                assert model["classes"] == CLASSES and model["package_sha256"] == v1.sha256 and model["release_id"] == "rel-1"
                answer = await http.post("/v1/predict", content=image, headers={"content-type": "image/png"})
                assert answer.status_code == 200 and answer.json()["model"]["version"] == 1
                assert [b["class_name"] for b in answer.json()["boxes"]] == [b.class_name for b in boxes]
                bad = await http.post("/v1/predict", content=b"not an image")
                assert bad.status_code == 400 and bad.json()["reason"] == "image_undecodable"

            await publish(settings, r2, project="demo")
            assert (await final(seen, "rel-2")).state is DeviceState.ACTIVATED
            assert agent.active.model.version == 2 and agent.last_known_good == ModelRef(model_id="demo-detector", version=1)
            # The same release again: a no-op, reported activated once more.
            before = agent.counters["activated"]
            await publish(settings, r2, project="demo")
            await eventually(lambda: agent.counters["already_active"] == 1)
            assert agent.counters["activated"] == before

            # Other fleets' releases and stages that leave this device out are ignored.
            await publish(settings, release(v1, r1.package_url, "rel-other", fleet="elsewhere"), project="demo")
            await publish(settings, release(v1, r1.package_url, "rel-canary", stage=RolloutStage(index=0, percent=1, devices=["cam-9"])), project="demo")
            await eventually(lambda: agent.counters["other_fleet"] == 1 and agent.counters["not_addressed"] == 1)
            assert not statuses(seen, "rel-other") and not statuses(seen, "rel-canary")

            back = release(v2, r2.package_url, "rel-2", action=ReleaseAction.ROLLBACK, rollback_to=ModelRef(model_id="demo-detector", version=1))
            await publish(settings, back, project="demo")
            await eventually(lambda: any(s.state is DeviceState.ROLLED_BACK for s in statuses(seen, "rel-2")))
            assert agent.active.model.version == 1 and agent.last_known_good is None
            assert agent.predict(image)  # the rolled-back-to model serves
            assert any(s.state is DeviceState.HEARTBEAT and s.active_model is not None for s in statuses(seen))
        finally:
            await agent.stop()

        # A restart keeps the active model and does not replay handled releases.
        again = EdgeAgent(settings, FLEET, "cam-1", home, TRUST, heartbeat_s=0.5)
        await again.start()
        try:
            assert again.active is not None and again.active.model.version == 1 and again.active.release_id == "rel-1"
            await eventually(lambda: any(s.state is DeviceState.HEARTBEAT for s in again.history))
            await asyncio.sleep(1.0)
            assert again.counters["activated"] == 0 and again.counters["rolled_back"] == 0
            assert len(again.predict(image)) == len(boxes)
        finally:
            await again.stop()


async def test_bad_packages_are_refused_and_never_run(settings, server: PackageServer, tmp_path: Path) -> None:  # noqa: ANN001
    good = build(1)
    parts = members(good.archive)
    flipped = bytearray(good.archive)
    flipped[good.archive.index(parts[2][1][:64]) + 5000] ^= 0x01
    edited = tar_of([("manifest.json", parts[0][1].replace(b'"project":"demo"', b'"project":"evil"')), *parts[1:]])
    stranger = build(1, keys=STRANGER)
    cases: dict[str, tuple[EdgeRelease, DeviceFailureReason]] = {}

    def case(name: str, archive: bytes, reason: DeviceFailureReason, built: package.Built = good, **changes: Any) -> None:
        url = server.add(f"{name}.tar", archive)
        changes.setdefault("package_sha256", hashlib.sha256(archive).hexdigest())
        cases[name] = (release(built, url, name, version=1, **changes), reason)

    case("flipped", bytes(flipped), DeviceFailureReason.CHECKSUM_MISMATCH)
    case("flipped-outer", bytes(flipped), DeviceFailureReason.CHECKSUM_MISMATCH, package_sha256=good.sha256)
    case("edited", edited, DeviceFailureReason.BAD_SIGNATURE)
    case("stranger", stranger.archive, DeviceFailureReason.UNKNOWN_KEY, stranger)
    case("truncated", good.archive[:3000], DeviceFailureReason.MANIFEST_INVALID)
    case("extra", tar_of([*parts, ("run.sh", b"#!/bin/sh\nrm -rf /\n")]), DeviceFailureReason.MANIFEST_INVALID)
    case("traversal", tar_of([*parts[:2], ("../../model.onnx", parts[2][1])]), DeviceFailureReason.MANIFEST_INVALID)
    other_fleet = build(1, fleets=["elsewhere"])
    case("fleet", other_fleet.archive, DeviceFailureReason.WRONG_FLEET, other_fleet)
    server_pkg = build(1, target="server")
    case("target", server_pkg.archive, DeviceFailureReason.WRONG_TARGET, server_pkg)
    case("release-target", good.archive, DeviceFailureReason.WRONG_TARGET, target=Target.SERVER)
    huge = build(1, input_shape=[1, 3, 1280, 1280])
    case("input", huge.archive, DeviceFailureReason.INPUT_SIZE_MISMATCH, huge)
    two = build(1, classes=["circle", "square"])
    case("selftest", two.archive, DeviceFailureReason.SELF_TEST_FAILED, two)
    case("model", good.archive, DeviceFailureReason.MANIFEST_INVALID, model=ModelRef(model_id="demo-detector", version=7))
    cases["missing"] = (release(good, f"{server.url}/p/nothing.tar", "missing"), DeviceFailureReason.DOWNLOAD_FAILED)

    home = tmp_path / "cam-2"
    agent = EdgeAgent(settings, FLEET, "cam-2", home, TRUST)
    async with Collector(settings, topic_of(DeviceStatus, settings.topic_prefix)) as seen:
        await agent.start()
        try:
            for rel, _ in cases.values():
                await publish(settings, rel, project="demo")
            for name, (_, reason) in cases.items():
                end = await final(seen, name)
                assert (end.state, end.reason) == (DeviceState.FAILED, reason), (name, end)
                assert end.message and end.active_model is None
            assert agent.active is None and Slots(home).pointer().active is None
            with pytest.raises(Exception, match="no_model"):
                agent.predict(scene_png()[0])
            # The device still takes a good package afterwards.
            await publish(settings, release(good, server.add("good.tar", good.archive), "good"), project="demo")
            assert (await final(seen, "good")).state is DeviceState.ACTIVATED
        finally:
            await agent.stop()


# -- without a broker -------------------------------------------------------------------------------------
def mock_http(files: dict[str, bytes]) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        data = files.get(request.url.path)
        return httpx.Response(200, content=data) if data is not None else httpx.Response(404)

    return httpx.AsyncClient(transport=httpx.MockTransport(answer))


async def test_failed_self_test_after_the_switch_goes_back(settings, tmp_path: Path) -> None:  # noqa: ANN001
    v1, v2 = build(1), build(2)
    http = mock_http({"/v1.tar": v1.archive, "/v2.tar": v2.archive})
    agent = EdgeAgent(settings, FLEET, "cam-3", tmp_path / "home", TRUST, http=http)
    assert await agent.handle(release(v1, "http://edge/v1.tar", "r1")) is DeviceState.ACTIVATED
    first_slot = agent.active.slot

    def broken(slot: str) -> Any:
        raise Refused(DeviceFailureReason.SELF_TEST_FAILED, "simulated: the model does not run from disk")

    agent._load_slot = broken  # type: ignore[method-assign]
    assert await agent.handle(release(v2, "http://edge/v2.tar", "r2")) is DeviceState.FAILED
    last = agent.history[-1]
    assert last.reason is DeviceFailureReason.SELF_TEST_FAILED and "switched back" in (last.message or "")
    assert agent.active.model.version == 1 and Slots(agent.home).pointer().active == first_slot
    # Nothing to roll back to from the very first model: refused, still serving.
    assert await agent.handle(release(v1, "http://edge/v1.tar", "r1", action=ReleaseAction.ROLLBACK)) is DeviceState.FAILED
    assert agent.active.model.version == 1
    # A fresh process on the same home serves v1.
    assert EdgeAgent(settings, FLEET, "cam-3", tmp_path / "home", TRUST).load().model.version == 1
    # A damaged slot is not loaded.
    (agent.home / "slots" / first_slot / "package.tar").write_bytes(b"damaged")
    assert EdgeAgent(settings, FLEET, "cam-3", tmp_path / "home", TRUST).load() is None
    await http.aclose()


async def test_http_without_a_model(settings, tmp_path: Path) -> None:  # noqa: ANN001
    agent = EdgeAgent(settings, FLEET, "cam-4", tmp_path / "home", TRUST)
    token = local_token(tmp_path / "home")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(agent, token=token)), base_url="http://edge",
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        assert (await http.get("/healthz")).json()["active_model"] is None
        model = await http.get("/v1/model")
        assert model.status_code == 503 and model.json()["reason"] == "no_model"
        answer = await http.post("/v1/predict", content=scene_png()[0])
        assert answer.status_code == 503 and answer.json()["reason"] == "no_model"



async def test_cli_predicts_with_the_installed_model(settings, tmp_path: Path) -> None:  # noqa: ANN001
    import json

    from typer.testing import CliRunner

    from visionloop.services.edge_agent.cli import edge_app

    v1 = build(1)
    http = mock_http({"/v1.tar": v1.archive})
    agent = EdgeAgent(settings, FLEET, "cam-5", tmp_path / "home", TRUST, http=http)
    assert await agent.handle(release(v1, "http://edge/v1.tar", "r1")) is DeviceState.ACTIVATED
    await http.aclose()
    (tmp_path / "trusted.pub").write_bytes(KEYS[1])
    (tmp_path / "scene.png").write_bytes(scene_png(1)[0])
    runner = CliRunner()
    result = runner.invoke(edge_app, ["--home", str(tmp_path / "home"), "--trust", str(tmp_path / "trusted.pub"), "predict", str(tmp_path / "scene.png")])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["model"]["version"] == 1 and len(answer["boxes"]) == len(agent.predict(scene_png(1)[0]))
    folder = runner.invoke(edge_app, ["--home", str(tmp_path / "home"), "--trust", str(tmp_path), "predict", str(tmp_path / "scene.png")])
    assert folder.exit_code == 0  # a folder of trusted keys works too
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "s.pub").write_bytes(STRANGER[1])
    refused = runner.invoke(edge_app, ["--home", str(tmp_path / "home"), "--trust", str(stranger), "predict", str(tmp_path / "scene.png")])
    assert refused.exit_code == 1 and "no_model" in refused.output
    assert runner.invoke(edge_app, []).exit_code == 2  # the agent needs --fleet and --device


async def test_a_package_server_that_is_briefly_away_is_tried_again(settings, server, tmp_path) -> None:  # noqa: ANN001
    """The distributor SIGKILLed mid-release (the chaos bench's case): the device's first downloads
    fail with 503 and the device tries again (1 s, 2 s) instead of failing the release at once."""
    good = build(1)
    url = server.add("flaky.tar", good.archive)
    server.unavailable["/p/flaky.tar"] = 2
    agent = EdgeAgent(settings, FLEET, "cam-9", tmp_path / "cam-9", TRUST)
    async with Collector(settings, topic_of(DeviceStatus, settings.topic_prefix)) as seen:
        await agent.start()
        try:
            await publish(settings, release(good, url, "flaky"), project="demo")
            assert (await final(seen, "flaky", timeout=40)).state is DeviceState.ACTIVATED
            assert agent.counters["download_retries"] == 2
        finally:
            await agent.stop()



async def test_the_local_api_needs_the_agents_own_token(settings, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 16, item 1: the token is made at first start in a file only its owner reads, kept
    across starts; without it the model and predictions answer 401, health stays open."""
    import stat

    home = tmp_path / "home"
    token = local_token(home)
    assert local_token(home) == token and len(token) >= 40
    assert stat.S_IMODE((home / "api-token").stat().st_mode) == 0o600
    agent = EdgeAgent(settings, FLEET, "cam-5", home, TRUST)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(agent, token=token)), base_url="http://edge") as http:
        assert (await http.get("/healthz")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            for call in (http.get("/v1/model", headers=headers), http.post("/v1/predict", content=scene_png()[0], headers=headers)):
                answer = await call
                assert (answer.status_code, answer.json()["reason"]) == (401, "unauthenticated"), headers
        assert (await http.get("/v1/model", headers={"Authorization": f"Bearer {token}"})).json()["reason"] == "no_model"
