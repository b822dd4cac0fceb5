"""`visionloop up` on the embedded default: starts, answers, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def state_dir() -> Path:
    # Under the project's state folder: pgserver (as root) opens read access on its parents.
    path = REPO / ".visionloop" / "test" / f"up-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def _env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")}
    return env | {"VL_STATE_DIR": str(state_dir), "VL_INGEST_PORT": "0", "VL_LABELING_GATEWAY_PORT": "0", "VL_DISTRIBUTOR_PORT": "0", "VL_HEARTBEAT_INTERVAL_S": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "visionloop.cli", *args]


def _noise(path: Path, size: tuple[int, int]) -> Path:
    """An image of random pixels (it does not compress): a big file of a known kind."""
    from PIL import Image

    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path, quality=100)
    return path


def test_up_smoke_pushes_a_sample_image_through(state_dir: Path) -> None:
    done = subprocess.run(_cli("up", "--smoke"), env=_env(state_dir), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "image.ingested" in done.stderr
    assert "stopped cleanly" in done.stderr
    assert not (state_dir / "run.json").exists()


def test_up_runs_until_interrupted_and_stops_everything(state_dir: Path) -> None:
    """Ctrl-C at a terminal (SIGINT to the whole process group): `up` stops everything it started,
    and its watch does not take the stopping broker or PostgreSQL for a death."""
    proc = subprocess.Popen(_cli("up"), env=_env(state_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        run_file = state_dir / "run.json"
        deadline = time.monotonic() + 120
        while not run_file.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "visionloop up did not come up within 120 s"
            time.sleep(0.2)
        run = json.loads(run_file.read_text())
        assert run["services"] and run["kafka_embedded"] is True
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("tansu" in " ".join(c.cmdline()) for c in children)

        status = subprocess.run(_cli("status", "--json"), env=_env(state_dir), capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr[-3000:]
        snap = json.loads(status.stdout.strip().splitlines()[-1])
        assert {i["service"] for i in snap["instances"]} >= {"ingest"}
        assert any(lag["topic"] == "vl.image.submitted.v1" for lag in snap["lags"])
        assert any(e["topic"] == "vl.pipeline.status.v1" and e["messages"] > 0 for e in snap["last_events"])
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends it
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped cleanly" in err
    assert "died" not in err, err[-3000:]
    assert not run_file.exists()
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert not (state_dir / "postgres" / "postmaster.pid").exists()


@pytest.mark.long
def test_up_processes_restarts_killed_services_one_by_one(state_dir: Path, tmp_path: Path) -> None:
    """`up --processes`: each service its own process; a SIGKILLed one comes back and serves; `restart` restarts one."""
    from visionloop.libs.scenes import render_scene

    proc = subprocess.Popen(_cli("up", "--processes", "--services", "ingest,dedup"), env=_env(state_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = state_dir / "processes"
    try:
        run_file = state_dir / "run.json"
        deadline = time.monotonic() + 180
        while not run_file.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "visionloop up --processes did not come up within 180 s"
            time.sleep(0.2)
        assert json.loads(run_file.read_text())["mode"] == "processes"
        pids = {name: json.loads((ready / f"{name}.json").read_text())["pid"] for name in ("ingest", "dedup")}
        children = {c.pid for c in psutil.Process(proc.pid).children()}
        assert set(pids.values()) <= children and len(set(pids.values())) == 2  # two processes, both supervised

        os.kill(pids["ingest"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while json.loads((ready / "ingest.json").read_text())["pid"] == pids["ingest"]:
            assert time.monotonic() < deadline, "the killed ingest did not come back within 120 s"
            time.sleep(0.2)

        restarted = subprocess.run(_cli("restart", "dedup"), env=_env(state_dir), capture_output=True, text=True, timeout=150)
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        assert f"pid {pids['dedup']} ->" in restarted.stdout + restarted.stderr

        image = tmp_path / "scene.jpg"
        image.write_bytes(render_scene(seed=11).encode())
        submitted = subprocess.run(_cli("submit", str(image), "--project", "procs"), env=_env(state_dir), capture_output=True,
                                   text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        assert "image.accepted" in submitted.stdout  # through the restarted ingest and the restarted dedup
        # Files the submit topic cannot carry go over ingest's HTTP API; every file gets one line (issue 16, item 5).
        big_png, big_jpeg, notes = _noise(tmp_path / "big.png", (820, 800)), _noise(tmp_path / "big.jpg", (1700, 1300)), tmp_path / "notes.txt"
        notes.write_text("not an image")
        assert 1_500_000 < big_png.stat().st_size < 2_000_000 and big_jpeg.stat().st_size > 4_000_000
        submitted = subprocess.run(_cli("submit", str(big_png), str(big_jpeg), str(notes), "--project", "procs"), env=_env(state_dir),
                                   capture_output=True, text=True, timeout=180)
        assert "Traceback" not in submitted.stderr, submitted.stderr[-3000:]
        lines = submitted.stdout.strip().splitlines()
        assert len(lines) == 3 and submitted.returncode == 1, submitted.stdout
        assert all("image.ingested" in line and "over ingest's HTTP API" in line for line in lines[:2]), lines
        assert "rejected by ingest (not_an_image)" in lines[2], lines
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    assert "ingest (pid" in err and "restarting" in err  # the supervisor said what it did
    assert not any((ready / f"{name}.json").exists() for name in ("ingest", "dedup"))


@pytest.mark.long
def test_up_replicas_share_port_and_group_and_a_killed_broker_is_restarted(state_dir: Path, tmp_path: Path) -> None:
    """`up --processes --replicas ingest=2,dedup=2`: two processes each, one HTTP port, one consumer
    group; then the embedded broker is SIGKILLed: `up` says so in one line, starts it again, and
    images submitted afterwards are decided."""
    from visionloop.libs.scenes import render_scene

    proc = subprocess.Popen(_cli("up", "--processes", "--services", "ingest,dedup", "--replicas", "ingest=2,dedup=2"),
                            env=_env(state_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = state_dir / "processes"
    names = ("ingest", "ingest-2", "dedup", "dedup-2")
    try:
        run_file = state_dir / "run.json"
        deadline = time.monotonic() + 240
        while not run_file.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "visionloop up --processes --replicas did not come up within 240 s"
            time.sleep(0.2)
        assert json.loads(run_file.read_text())["replicas"] == {"ingest": 2, "dedup": 2}
        readies = {name: json.loads((ready / f"{name}.json").read_text()) for name in names}
        children = {c.pid for c in psutil.Process(proc.pid).children()}
        assert {r["pid"] for r in readies.values()} <= children and len({r["pid"] for r in readies.values()}) == 4
        assert readies["ingest"]["endpoints"]["ingest"] == readies["ingest-2"]["endpoints"]["ingest"]  # one port

        broker = next(c for c in psutil.Process(proc.pid).children() if "python" not in c.name())
        broker.kill()
        for n in range(4):
            image = tmp_path / f"scene{n}.jpg"
            image.write_bytes(render_scene(seed=40 + n).encode())
        submitted = subprocess.run(_cli("submit", *(str(tmp_path / f"scene{n}.jpg") for n in range(4)), "--project", "replicas"),
                                   env=_env(state_dir), capture_output=True, text=True, timeout=240)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert submitted.stdout.count("image.accepted") == 4, submitted.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("embedded broker died (killed by SIGKILL)") == 1, err[-3000:]
    assert "embedded broker restarted" in err
    assert not any((ready / f"{name}.json").exists() for name in names)


def test_up_that_cannot_start_says_why_in_one_line_and_leaves_no_process(state_dir: Path) -> None:
    """Issue 16, item 6: ingest's port is taken: ingest exits at once naming the port, `up` says so in
    one line (no traceback, no 120-s wait) and no service process outlives it."""
    import socket

    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    started = time.monotonic()
    try:
        result = subprocess.run(_cli("up", "--processes", "--services", "ingest,dedup"),
                                env=_env(state_dir) | {"VL_INGEST_PORT": str(port)}, capture_output=True, text=True, timeout=240)
    finally:
        holder.close()
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "could not start" in line]
    assert len(said) == 1 and f"127.0.0.1:{port}" in said[0], result.stderr[-3000:]
    assert took < 100, f"took {took:.0f} s"
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if "visionloop.cli" in " ".join(p.info["cmdline"] or ()) and str(state_dir) in " ".join(p.info["cmdline"] or ())]
    assert not left, f"processes left behind: {left}"
