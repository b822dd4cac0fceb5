"""The dashboard (issue 8): the gateway follows heartbeats, releases and device reports into its
read model, and `GET /v1/dashboard` shows services with throughput and lag, the queue by kind,
the model library and releases with device states; a headless Chromium renders the page.
(docs/dashboard.png is the screenshot tests/test_demo.py takes of the quick demo's dashboard.)"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from detector import onnx_bytes
from helpers import eventually, produce, publish
from labelling import Lab, fake_image, publish_many, recognized, running_lab, unrecognized

from visionloop.contracts import (
    Alias,
    Detection,
    DeviceStatus,
    EdgeRelease,
    Envelope,
    ImageIngested,
    Metrics,
    ModelRef,
    PipelineStatus,
    Target,
    topic_of,
)
from visionloop.contracts.release import DeviceState, RolloutStage
from visionloop.contracts.status import StatusKind
from visionloop.libs.library import LibraryWriter
from visionloop.services.labeling_gateway.admin import create_project

ENV = {"VL_VERIFIER_PROJECTS": '{"dash": {"auto_accept": false}}'}


# -- through the broker and PostgreSQL -----------------------------------------------------------------


@pytest.fixture(scope="module")
async def lab(kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    folder = tmp_path_factory.mktemp("dashboard")
    async with running_lab(kafka_bootstrap, database_url, folder, env=ENV, services=("labeling-gateway", "verifier", "dedup")) as running:
        await running.use_project("dash")
        await publish_many(running.settings, [unrecognized(fake_image(n), 0.5) for n in range(3)], project="dash")
        car = Detection(x1=10, y1=10, x2=90, y2=90, class_name="car", score=0.9)
        await publish_many(running.settings, [recognized(fake_image(10 + n), [car]) for n in range(2)], project="dash")
        async with LibraryWriter(running.settings, pool=running.pool, blobs=running.blobs) as library:
            await library.add(onnx_bytes(), project="dash", alias=Alias.PRODUCTION, metrics=Metrics(map50_95=0.612, map50=0.834))
        release = EdgeRelease(
            release_id="rel-dash-1", fleet="cameras", target=Target.EDGE, model=ModelRef(model_id="dash-detector", version=1),
            package_uri="file:///packages/dash-1.tar", package_sha256="0" * 64, signature="c2lnbmF0dXJl", key_id="k1",
            stage=RolloutStage(index=0, percent=25.0),
        )
        await publish(running.settings, release, project="dash", key="cameras")
        reports = [("cam-1", DeviceState.ACTIVATED), ("cam-2", DeviceState.ACTIVATED), ("cam-3", DeviceState.FAILED), ("cam-1", DeviceState.HEARTBEAT)]
        for device, state in reports:
            await publish(running.settings, DeviceStatus(fleet="cameras", device_id=device, state=state, release_id="rel-dash-1",
                                                         model=release.model), project="dash", key="cameras")
        # Something dedup cannot read: it is dead-lettered, and dedup's consumer group commits its offset.
        await produce(running.settings, topic_of(ImageIngested, running.settings.topic_prefix), b"not json", b"x")
        await running.wait_tasks(5, where="project = 'dash' AND state = 'queued'")
        yield running


async def _dashboard(lab: Lab, ready: Any, token: str = "annotator", timeout: float = 30) -> dict[str, Any]:
    """The dashboard's JSON once `ready(data)` holds."""
    seen: dict[str, Any] = {}

    async def check() -> bool:
        answer = await lab.http.get("/v1/dashboard", headers=lab.auth(token))
        assert answer.status_code == 200, answer.text
        seen.update(answer.json())
        return bool(ready(seen))

    await eventually(check, timeout=timeout, interval=0.3)
    return seen


def _live(data: dict[str, Any]) -> bool:
    services = {s["service"]: s for s in data["services"]}
    return (
        {"labeling-gateway", "verifier", "dedup"} <= set(services)
        and services["labeling-gateway"]["handled_per_s"] is not None
        and services["labeling-gateway"]["handled"] >= 5  # the heartbeat after the tasks were made
        and data["lag_read_at"] is not None
        and services["dedup"]["dead_lettered"] >= 1
        and any(g["service"] == "dedup" for g in data["lags"])
        and any(r["devices"].get("failed") for r in data["releases"])
        and bool(data["models"])
    )


async def test_dashboard_shows_services_queue_models_and_releases(lab: Lab) -> None:
    data = await _dashboard(lab, _live)
    services = {s["service"]: s for s in data["services"]}
    gateway = services["labeling-gateway"]
    assert gateway["state"] == "running" and gateway["handled"] >= 5 and gateway["handled_per_s"] >= 0
    assert gateway["lag"] is not None and gateway["seen_s_ago"] < 10
    lags = {g["group"]: g for g in data["lags"]}
    unrecognized_group = f"{lab.settings.topic_prefix}labeling-gateway.image.unrecognized"
    # committed, not end: the embedded broker (Tansu) sometimes reports stale end offsets
    assert lags[unrecognized_group]["committed"] >= 3 and lags[unrecognized_group]["lag"] >= 0
    assert lags[unrecognized_group]["service"] == "labeling-gateway"
    [dedup] = [g for g in data["lags"] if g["service"] == "dedup"]
    assert dedup["topic"] == topic_of(ImageIngested, lab.settings.topic_prefix) and dedup["committed"] >= 1
    queue = {q["kind"]: q for q in data["queue"] if q["project"] == "dash"}
    assert queue["annotate"]["queued"] == 3 and queue["annotate"]["total"] == 3
    assert queue["review"]["queued"] == 2
    [model] = [m for m in data["models"] if m["model_id"] == "dash-detector"]
    assert model["aliases"] == ["production"] and model["map50_95"] == pytest.approx(0.612) and model["version"] == 1
    [release] = [r for r in data["releases"] if r["release_id"] == "rel-dash-1"]
    assert release["status"] == "canary" and release["stage_percent"] == 25.0 and release["fleet"] == "cameras"
    # cam-1's heartbeat came after its activation: it is alive, and still activated
    assert release["devices"] == {"activated": 2, "failed": 1}


async def test_throughput_follows_heartbeat_counters(lab: Lab) -> None:
    """Heartbeats out of order or from a restarted instance do not produce nonsense rates."""
    now = datetime.now(UTC)

    async def beat(uptime: float, handled: int, at: datetime) -> None:
        status = PipelineStatus(service="bench", instance="b-1", kind=StatusKind.HEARTBEAT, uptime_s=uptime, counters={"handled": handled})
        envelope = Envelope.of(status, producer="test", project="dash").model_copy(update={"occurred_at": at})
        await produce(lab.settings, topic_of(status, lab.settings.topic_prefix), envelope.model_dump_json().encode(), b"bench")

    await beat(10.0, 100, now - timedelta(seconds=4))
    await beat(12.0, 300, now - timedelta(seconds=2))
    await beat(11.0, 200, now - timedelta(seconds=3))  # late: ignored
    data = await _dashboard(lab, lambda d: any(s["service"] == "bench" and s["handled"] == 300 for s in d["services"]))
    [bench] = [s for s in data["services"] if s["service"] == "bench"]
    assert bench["handled_per_s"] == 100.0
    await beat(1.0, 5, now)  # restarted: no rate until the next heartbeat
    data = await _dashboard(lab, lambda d: any(s["service"] == "bench" and s["handled"] == 5 for s in d["services"]))
    assert [s["handled_per_s"] for s in data["services"] if s["service"] == "bench"] == [None]


async def test_dashboard_needs_a_token_and_scopes_the_queue(lab: Lab) -> None:
    missing = await lab.http.get("/v1/dashboard")
    assert (missing.status_code, missing.json()["reason"]) == (401, "unauthenticated")
    forged = await lab.http.get("/v1/dashboard", headers={"Authorization": "Bearer vl_000000000000_forged"})
    assert forged.status_code == 401
    await create_project(lab.settings, "elsewhere", ["car"])
    other = await lab.token("annotator", "elsewhere", project="elsewhere")
    scoped = (await lab.http.get("/v1/dashboard", headers=lab.auth(other))).json()
    assert scoped["queue"] == [] and scoped["models"] == [] and scoped["services"]
    everything = (await lab.http.get("/v1/dashboard", headers=lab.auth("global-admin"))).json()
    assert any(q["project"] == "dash" for q in everything["queue"])
    # The page and its files are public and hold no data; anything else under static is not served.
    page = await lab.http.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "'self'" in page.headers["content-security-policy"]
    assert "token" in page.text and "http://" not in page.text and "https://" not in page.text
    for name, media in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        asset = await lab.http.get(f"/dashboard/static/{name}")
        assert asset.status_code == 200 and media in asset.headers["content-type"]
        assert "http://" not in asset.text and "https://" not in asset.text  # no CDN, no external fonts
    assert (await lab.http.get("/dashboard/static/..%2Fdashboard.py")).status_code == 404
    assert (await lab.http.get("/dashboard/static/dashboard.html")).status_code == 404


# -- the page in a real browser ------------------------------------------------------------------------


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary
    return subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars", "--virtual-time-budget=8000", *args],
        capture_output=True, text=True, timeout=60,
    )


async def test_page_renders_live_numbers_in_chromium(lab: Lab, tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: apt-get install chromium")
    await _dashboard(lab, _live)  # the read model is filled and the lag is read
    url = f"{lab.base_url}/dashboard?token={lab.tokens['admin']}"
    dumped = await asyncio.to_thread(_chromium, "--dump-dom", url)
    dom = dumped.stdout
    assert '<tr data-key="labeling-gateway/' in dom and '<tr data-key="dedup/' in dom, (dom[-3000:], dumped.stderr[-2000:])
    assert '<tr data-key="dash/annotate"><td>dash</td><td><span class="badge annotate">annotate</span></td><td class="n">0</td><td class="n">3</td>' in dom
    assert '<tr data-key="dash-detector@1/server">' in dom and 'badge production">production</span>' in dom
    assert '<tr data-key="rel-dash-1">' in dom and "2 activated" in dom and "1 failed" in dom
    assert 'data-state="ok"' in dom and "updated " in dom
    shot = tmp_path / "dashboard.png"
    taken = await asyncio.to_thread(_chromium, f"--screenshot={shot}", "--window-size=1280,900", url)
    assert shot.is_file() and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    # A refused token is dropped and the page asks for another one.
    refused = (await asyncio.to_thread(_chromium, "--dump-dom", f"{lab.base_url}/dashboard?token=vl_000000000000_forged")).stdout
    assert '<form id="login">' in refused and '<main id="panels" hidden="">' in refused and "send an API token" in refused
