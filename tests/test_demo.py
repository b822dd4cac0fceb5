"""`visionloop demo --quick`: the whole loop, three rounds, every service, real training; the report
and the one-line JSON summary. (What the figures should reach is the demo's business, not this
test's: it checks that the loop closes and the report holds the run's figures.)

The same run (it takes minutes, so it runs once) is watched in headless Chromium: the link the
demo prints to the gateway's dashboard is opened twice, during round 1's labelling and after the
first release, and the page must show live numbers that moved in between. Set
`VL_UPDATE_SCREENSHOT=1` to copy its screenshot (after the first release) to docs/dashboard.png."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
LINK = re.compile(r"dashboard: (http://\S+)/dashboard\?token=(\S+)")


@dataclass
class Browsed:
    """What the browser saw of the dashboard at one moment, and the JSON that decided the moment."""

    moment: str
    data: dict[str, Any]
    dom: str
    seconds: float


@dataclass
class QuickDemo:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    browsed: list[Browsed] = field(default_factory=list)
    screenshot: Path | None = None
    browser_s: float = 0.0
    browser_error: str | None = None


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary
    # A short virtual-time budget: the page's first poll renders; a second one (2 s later) is enough.
    return subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars", "--virtual-time-budget=3000", *args],
        capture_output=True, text=True, timeout=60,
    )


def _running(data: dict[str, Any]) -> set[str]:
    return {s["service"] for s in data["services"] if s["state"] == "running" and s["handled_per_s"] is not None}


def _labelling(data: dict[str, Any]) -> bool:
    """Round 1: every service runs and reports a throughput, people have tasks, no model yet."""
    return {"ingest", "dedup", "recognizer", "labeling-gateway", "verifier"} <= _running(data) and not data["models"] and any(
        q["kind"] == "annotate" and q["total"] > 0 for q in data["queue"])


def _released(data: dict[str, Any]) -> bool:
    """After the first release: v1 in the library, an edge release whose devices report it active."""
    return any(m["version"] == 1 for m in data["models"]) and any(
        r["model_version"] == 1 and r["kind"] == "edge" and r["devices"].get("activated") for r in data["releases"])


def _watch(demo: subprocess.Popen[str], log: Path, folder: Path, run: QuickDemo) -> None:
    """While the demo runs: find its dashboard link, then dump the page at the two moments."""

    def alive() -> None:
        if demo.poll() is not None:
            raise RuntimeError(f"the demo ended (status {demo.returncode}) before the dashboard was seen at both moments")

    deadline = time.monotonic() + 120
    while not (found := LINK.search(log.read_text())):
        alive()
        assert time.monotonic() < deadline, "the demo printed no dashboard link"
        time.sleep(0.5)
    base, token = found.groups()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=15) as http:

        def until(ready: Callable[[dict[str, Any]], bool], pace: float) -> dict[str, Any]:
            # No deadline of its own but the demo's: on a loaded machine training alone can take minutes.
            while True:
                alive()
                data = http.get("/v1/dashboard").raise_for_status().json()
                if ready(data):
                    return data
                time.sleep(pace)

        url = f"{base}/dashboard?token={token}"
        # Round 1's labelling lasts some 20 s, its queue fills and empties in waves: look often then.
        # Then the page's own pace until the release (each poll costs the gateway a few queries).
        for moment, ready, pace in (("round 1 labelling", _labelling, 0.5), ("after the first release", _released, 2.0)):
            data = until(ready, pace)
            started = time.monotonic()
            dumped = _chromium("--dump-dom", url)
            run.browsed.append(Browsed(moment, data, dumped.stdout, time.monotonic() - started))
            run.browser_s += time.monotonic() - started
            (folder / f"dashboard-{len(run.browsed)}.html").write_text(dumped.stdout)
            (folder / f"dashboard-{len(run.browsed)}.json").write_text(json.dumps(data, indent=1))
        started = time.monotonic()
        shot = folder / "dashboard.png"
        taken = _chromium(f"--screenshot={shot}", "--window-size=1280,1000", url)
        run.browser_s += time.monotonic() - started
        assert shot.is_file(), taken.stderr[-2000:]
        run.screenshot = shot


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> QuickDemo:
    """One quick demo, watched in Chromium while it runs when Chromium is installed."""
    folder = tmp_path_factory.mktemp("demo")
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    started = time.monotonic()
    with out.open("w") as stdout, err.open("w") as stderr:
        demo = subprocess.Popen([sys.executable, "-m", "visionloop.cli", "demo", "--quick", "--json"], cwd=folder,
                                stdout=stdout, stderr=stderr, text=True, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
        run = QuickDemo(returncode=-1, stdout="", stderr="", wall_s=0.0)
        try:
            if shutil.which("chromium") is not None:
                try:
                    _watch(demo, err, folder, run)
                except Exception as exc:  # the demo's own test still judges the run
                    run.browser_error = f"{type(exc).__name__}: {exc}"
            demo.wait(timeout=2300)
        finally:
            if demo.poll() is None:  # Ctrl-C first, so the demo stops its embedded PostgreSQL and broker
                demo.send_signal(signal.SIGINT)
                try:
                    demo.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    demo.kill()
                    demo.wait()
                    _kill_left_under(folder)
    run.returncode, run.stdout, run.stderr = demo.returncode, out.read_text(), err.read_text()
    run.wall_s = time.monotonic() - started
    return run


@pytest.mark.long
@pytest.mark.timeout(2400)
def test_quick_demo_closes_the_loop_three_times(quick_demo: QuickDemo) -> None:
    assert quick_demo.returncode == 0, quick_demo.stderr[-4000:]
    summary = json.loads(quick_demo.stdout.strip().splitlines()[-1])
    assert summary["passed"] == [True, True, True]
    assert len(summary["map50_95"]) == 3 and all(0.0 <= m <= 1.0 for m in summary["map50_95"])
    assert set(summary["devices"].values()) == {"v3"}, "every simulated edge agent runs the last model"
    # Duplicates, near duplicates, low-resolution and corrupt images were all refused, with their reasons.
    assert {"duplicate", "near_duplicate", "low_resolution"} <= set(summary["rejections"])
    assert {"corrupt", "not_an_image"} & set(summary["rejections"])
    # Round 1 is all drawing by hand; later rounds start from the model's pre-labels.
    assert summary["human_actions_per_image"][0] > 0
    report = Path(summary["report"])
    assert report.is_file() and (report.parent / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    text = report.read_text()
    assert "round 3" in text and "star" in text and "release.edge" in text
    # The progress: milestones as lines, the steps as bars (printed once at the end: stderr is no terminal).
    log = quick_demo.stderr
    assert "round 1: empty library, people label" in log and "v1 passed the gate" in log
    assert LINK.search(log)
    for step in ("round 1 · images decided", "round 1 · labels verified", "round 1 · training v1 (epochs)",
                 "round 3 · edge agents activated v3"):
        assert log.count(step) == 1, f"{step!r}: {log.count(step)} times in\n{log[-3000:]}"
    assert re.search(r"round 1 · training v1 \(epochs\).*\b30/30\b", log), log[-3000:]
    assert re.search(r"round 3 · edge agents activated v3.*\b3/3\b", log), log[-3000:]


@pytest.mark.long
@pytest.mark.timeout(2400)  # when it runs alone, the demo starts here
def test_dashboard_shows_the_quick_demo_live_in_chromium(quick_demo: QuickDemo) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the demo ran without a browser watching")
    assert quick_demo.browser_error is None, f"{quick_demo.browser_error}\n{quick_demo.stderr[-3000:]}"
    print(f"demo {quick_demo.wall_s:.1f} s; chromium {quick_demo.browser_s:.1f} s (" + ", ".join(
        f"{b.moment}: {b.seconds:.1f} s" for b in quick_demo.browsed) + ")")
    during, after = quick_demo.browsed
    for seen in (during, after):
        dom = seen.dom
        assert 'data-state="ok"' in dom and "updated " in dom, (seen.moment, dom[-3000:])
        for service in ("ingest", "dedup", "recognizer", "labeling-gateway", "verifier", "trainer", "distributor"):
            assert f'<tr data-key="{service}/' in dom, (seen.moment, service)
        assert '<span class="badge running">running</span>' in dom
    # Round 1: services at work (handled counts, throughput), nothing in the library or released yet.
    gateway = _services(during.dom)["labeling-gateway"]
    assert gateway[2] == "running" and re.fullmatch(r"[\d,]+\.\d", gateway[6]) and int(gateway[5].replace(",", "")) > 0, gateway
    assert '<section id="models" class="panel">' in during.dom and '<section id="releases" class="panel wide">' in during.dom
    # After the first release: v1 in the library (server and edge builds), its edge release with devices reporting.
    assert '<tr data-key="photo-detector@1/server">' in after.dom and '<tr data-key="photo-detector@1/edge">' in after.dom
    assert re.search(r'<td>photo-detector v1</td>.*?<span class="badge activated">\d+ activated</span>', after.dom), after.dom[-3000:]
    # The numbers moved: every service handled more.
    handled = [_handled(b.dom) for b in (during, after)]
    moved = [s for s in handled[0] if handled[1].get(s, 0) > handled[0][s]]
    assert {"ingest", "dedup", "labeling-gateway", "verifier"} <= set(moved), handled
    # The page kept what the JSON said: people had annotate tasks while round 1 was labelled.
    assert any(q["project"] == "photo" and q["kind"] == "annotate" for q in during.data["queue"])
    shot = quick_demo.screenshot
    assert shot is not None and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
    if os.environ.get("VL_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS / "dashboard.png")


def _kill_left_under(folder: Path) -> None:
    """Kill what a SIGKILLed demo left running from `folder` (its embedded PostgreSQL and broker
    outlive it: they were to be stopped by the demo itself)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(str(folder) in part for part in proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _services(dom: str) -> dict[str, list[str]]:
    """Each service's row of the services panel as the page shows it: the text of its cells."""
    panel = dom[dom.index('<section id="services"'):dom.index('<section id="queue"')]
    return {service: [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", cells)]
            for service, cells in re.findall(r'<tr data-key="([^"/]+)/[^"]*">(.*?)</tr>', panel)}


def _handled(dom: str) -> dict[str, int]:
    """Each service's `handled` count (the sixth cell)."""
    return {s: int(cells[5].replace(",", "")) for s, cells in _services(dom).items() if re.fullmatch(r"[\d,]+", cells[5])}
