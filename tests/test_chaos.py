"""`visionloop bench chaos`: the reduced run (services SIGKILLed, the broker restarted) loses and
duplicates nothing; the reconciliation catches what it should.

The reduced run (`ChaosConfig.ci()`): 150 images in three waves through ingest, dedup, the
recognizer, the gateway (simulated people over HTTP), the verifier and the trainer's dataset,
every service its own process; ingest, dedup, the recognizer, the gateway and the verifier are
each SIGKILLed once at random moments and the embedded broker restarts under the second wave.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from visionloop.bench.chaos import PROJECT, SOURCE, ChaosConfig, Truth, reconcile, run_chaos_bench
from visionloop.contracts import (
    Envelope,
    ImageAccepted,
    ImageHashes,
    ImageIngested,
    ImageRef,
    ImageSource,
    topic_of,
)
from visionloop.contracts.topics import spec_for
from visionloop.libs.bus import Runtime
from visionloop.libs.embedded import EmbeddedBroker
from visionloop.libs.kafka import client_kwargs, consumer_kwargs, ensure_named


@pytest.mark.long
def test_reduced_chaos_loses_and_duplicates_nothing(database_url: str, tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_chaos_bench(ChaosConfig.ci(), state=tmp_path / "chaos", database_url=database_url, plot=tmp_path / "chaos.png")
    took = time.monotonic() - started
    try:
        assert result["submitted"] == 150
        assert result["lost"] == 0 and result["duplicated"] == 0, result["discrepancies"]
        assert result["terminal"] == 150, result["discrepancies"]
        assert result["broker_restarts"] == 1
        assert result["kills"] >= 5 and set(result["kills_by_service"]) == {"ingest", "dedup", "recognizer", "labeling-gateway", "verifier"}
        assert result["labelled"] > 100 and result["rejected"] > 0
        assert result["ok"], result["discrepancies"]
        assert (tmp_path / "chaos.png").stat().st_size > 10_000
    finally:
        print(f"reduced chaos run: {took:.0f} s wall; {result['kills']} kills; discrepancies: {result['discrepancies']}")
        asyncio.run(_drop_schemas(database_url, f"chaos{Path(result['folder']).name.removeprefix('run-')}_"))


async def _drop_schemas(database_url: str, prefix: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for row in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", prefix + "%"):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
    finally:
        await conn.close()


# -- restarts that strand nobody -------------------------------------------------------------------------


def test_supervisor_pins_the_port_of_a_service_whose_config_file_comes_in_extra_env(settings, tmp_path) -> None:  # noqa: ANN001
    """`port: 0` in the file `extra_env` names: one free port for the life of the stack, so the
    gateway restarted after a SIGKILL is where its labellers left it."""
    from visionloop.supervisor import Supervisor

    config = tmp_path / "config.yaml"
    config.write_text("labeling_gateway:\n  port: 0\n")
    supervisor = Supervisor(settings, ["labeling-gateway"], extra_env={"VL_CONFIG": str(config)})
    port = supervisor.children["labeling-gateway"].env.get("VL_LABELING_GATEWAY_PORT")
    assert port is not None and int(port) > 0


def test_a_training_child_dies_with_its_sigkilled_trainer(tmp_path) -> None:  # noqa: ANN001
    """The training child runs in its own session (no signal of the trainer's reaches it): it must
    not train on, orphaned, while the next trainer runs the re-queued run again."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(
        "import asyncio, sys\n"
        "from visionloop.services.trainer.runs import _die_with_trainer\n"
        "async def main():\n"
        "    child = await asyncio.create_subprocess_exec(sys.executable, '-c', 'import time; time.sleep(120)',\n"
        "                                                 start_new_session=True, preexec_fn=_die_with_trainer)\n"
        "    print(child.pid, flush=True)\n"
        "    await asyncio.sleep(120)\n"
        "asyncio.run(main())\n"
    )
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(trainer.stdout.readline())
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{child}/stat") as stat:  # a zombie waiting for init to reap it is gone too
                if stat.read().split(") ", 1)[1].startswith("Z"):
                    break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the training child outlived its SIGKILLed trainer")
    finally:
        trainer.kill()


# -- the broker restart under a running service ----------------------------------------------------------


def _ingested(n: int) -> Envelope[ImageIngested]:
    digest = hashlib.sha256(f"restart-{n}".encode()).hexdigest()
    image = ImageRef(image_id=digest, blob_uri=f"file:///blobs/{digest}", width=64, height=48, format="PNG", byte_size=100)
    return Envelope.of(ImageIngested(submission_id=f"s-{n}", image=image, source=ImageSource()), producer="test", project="p")


async def _send(settings: Any, events: list[Envelope[ImageIngested]]) -> None:
    await ensure_named(settings, [topic_of(ImageIngested, settings.topic_prefix)])
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")
    await producer.start()
    try:
        topic, spec = topic_of(ImageIngested, settings.topic_prefix), spec_for(ImageIngested)
        for e in events:
            await producer.send_and_wait(topic, e.model_dump_json().encode(), key=spec.key_of(e).encode())
    finally:
        await producer.stop()


async def _accepted_on_broker(settings: Any, want: set[str], timeout: float) -> set[str]:
    """Submission ids of the `image accepted` events the (fresh) broker holds, once all of `want` are there."""
    await ensure_named(settings, [topic_of(ImageAccepted, settings.topic_prefix)])
    consumer = AIOKafkaConsumer(topic_of(ImageAccepted, settings.topic_prefix), **consumer_kwargs(settings),
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: set[str] = set()
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not want <= found and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                found |= {json.loads(r.value)["payload"]["submission_id"] for r in records}
    finally:
        await consumer.stop()
    return found


async def test_a_running_service_loses_nothing_when_the_broker_restarts_under_it(settings, pool, tmp_path) -> None:  # noqa: ANN001
    """The embedded broker restarts under a live service: Tansu re-creates each topic a client names
    with 4 partitions, and a producer still holding the old broker's 6 would have its records
    acknowledged and dropped. Everything the service emitted, before and after, reaches the fresh broker."""
    broker = EmbeddedBroker(tmp_path / "broker.log")
    settings = settings.model_copy(update={"kafka_bootstrap": broker.start()})
    hop = Runtime("hop", settings, pool=pool)

    async def accept(event: Envelope[ImageIngested], unit: Any) -> None:
        p = event.payload
        unit.emit(ImageAccepted(submission_id=p.submission_id, image=p.image, source=p.source, hashes=ImageHashes(phash="0" * 16)))

    hop.consume(ImageIngested, accept)
    hop.produces(ImageAccepted)
    before, after = [_ingested(n) for n in range(30)], [_ingested(n) for n in range(30, 60)]
    try:
        await hop.start()
        await _send(settings, before)
        assert len(await _accepted_on_broker(settings, {e.payload.submission_id for e in before}, 30)) == 30
        broker.stop()
        broker.start()  # same port, no topics, no offsets
        await _send(settings, after)
        want = {e.payload.submission_id for e in before + after}
        found = await _accepted_on_broker(settings, want, 60)
        assert found == want, f"{len(want - found)} effects never reached the fresh broker: {sorted(want - found)[:10]}; {hop.counters}"
        assert hop.counters["epoch_replays"] == 1
    finally:
        await hop.stop()
        broker.stop()


# -- the reconciliation, on hand-made end states ----------------------------------------------------------


def _event(kind: str, payload: dict[str, Any], *, causation: str | None = None, event_id: str | None = None) -> dict[str, Any]:
    return {"event_id": event_id or str(uuid.uuid4()), "event_type": kind, "project": PROJECT, "causation_id": causation, "payload": payload}


class _Item:
    def __init__(self, name: str) -> None:
        self.name = name


def _image(image_id: str) -> dict[str, Any]:
    return {"image_id": image_id}


def _labelled_world() -> tuple[dict[str, Any], list[dict[str, Any]], Truth]:
    """Two submissions: `a` labelled, `b` a duplicate of it, rejected by dedup."""
    items = {f"{SOURCE}-a": _Item("a"), f"{SOURCE}-b": _Item("b")}
    accepted = _event("image.accepted", {"submission_id": f"{SOURCE}-a", "image": _image("img-a")})
    events = [
        _event("image.ingested", {"submission_id": f"{SOURCE}-a"}),
        _event("image.ingested", {"submission_id": f"{SOURCE}-b"}),
        accepted,
        _event("image.rejected", {"submission_id": f"{SOURCE}-b", "reason": "duplicate", "stage": "dedup", "image_id": "img-a"}),
        _event("image.unrecognized", {"image": _image("img-a")}, causation=accepted["event_id"]),
        _event("label.verified", {"label_id": "label-1", "image": _image("img-a"), "for_test_set": False}),
    ]
    truth = Truth(
        submissions={f"{SOURCE}-a": {"outcome": "ingested", "reason": None, "image_id": "img-a"},
                     f"{SOURCE}-b": {"outcome": "ingested", "reason": None, "image_id": "img-a"}},
        decisions={"img-a": {"outcome": "accepted", "reason": None}},
        labels={"img-a"}, samples={"img-a": "train"},
    )
    truth.recognitions["img-a"] = 1
    truth.tasks["img-a"].append("done")
    return items, events, truth


def test_reconcile_counts_one_terminal_decision_per_submission() -> None:
    items, events, truth = _labelled_world()
    out = reconcile(items, events, truth, {})
    assert (out.submitted, out.terminal, out.labelled, out.rejected, out.lost, out.duplicated) == (2, 2, 1, 1, 0, 0)
    assert out.reasons == {"duplicate": 1} and out.discrepancies == []


def test_reconcile_names_what_was_lost_and_where() -> None:
    items, events, truth = _labelled_world()
    items[f"{SOURCE}-c"] = _Item("c")  # submitted, never answered
    truth.labels.clear()  # a's label never reached the gateway
    out = reconcile(items, events, truth, {})
    assert out.lost == 2
    assert any(f"{SOURCE}-c: ingest has no record" in d for d in out.discrepancies)
    assert any(f"{SOURCE}-a: image img-a is neither labelled nor waiting" in d for d in out.discrepancies)


def test_reconcile_counts_an_effect_recorded_twice_but_not_a_replayed_event() -> None:
    items, events, truth = _labelled_world()
    replayed = [dict(e) for e in events]  # the same event ids again: a replay, not a duplicate
    twice = _event("label.verified", {"label_id": "label-1", "image": _image("img-a"), "for_test_set": False})
    out = reconcile(items, list({e["event_id"]: e for e in events + replayed}.values()) + [twice], truth, {})
    assert out.duplicated == 1 and out.duplicated_by_kind == {"verified label": 1}
    assert out.lost == 0 and out.terminal == 2


def test_reconcile_flags_stuck_releases_and_devices_off_the_last_release() -> None:
    from datetime import UTC, datetime

    items, events, truth = _labelled_world()
    now = datetime.now(UTC)
    truth.releases = [
        {"release_id": "r1", "fleet": "chaos-edge", "target": "edge", "version": 1, "status": "completed", "updated_at": now},
        {"release_id": "r2", "fleet": "chaos-edge", "target": "edge", "version": 2, "status": "rolling", "updated_at": now},
    ]
    truth.release_devices["r1"] = {"edge-00": "activated", "edge-01": "activated"}
    out = reconcile(items, events, truth, {"edge-00": 1, "edge-01": 2})
    assert any("r2 ended rolling" in d for d in out.discrepancies)
    assert any("edge-01 runs v2" in d for d in out.discrepancies)
    assert not any("edge-00" in d for d in out.discrepancies)
