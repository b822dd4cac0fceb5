"""The trainer and the evaluator through the real broker and PostgreSQL, with real (tiny) training.

Scenes are 128x96 synthetic shapes; models train at 64 px for one or two epochs, so their mAP is
near zero: the gate's floors are set to 0 for the passing path and to 0.99 for the failing one.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from typing import Any

import pytest
from helpers import Collector, Services, eventually, publish
from PIL import ImageEnhance

from visionloop.contracts import (
    Box,
    DeadLetter,
    Envelope,
    GateFailureReason,
    ImageRef,
    Labeller,
    LabelVerified,
    ModelEvaluated,
    ModelRef,
    ModelTrained,
    PipelineStatus,
    Provenance,
    StatusKind,
    TrainingRequested,
    VerificationMethod,
    topic_of,
)
from visionloop.libs.perceptual import hamming, hash_image
from visionloop.libs.scenes import render_scene
from visionloop.services.evaluator.config import EvaluatorSettings
from visionloop.services.trainer.config import TrainerSettings

TWO = ("circle", "square")
THREE = ("circle", "square", "triangle")
TINY = {"imgsz": 64, "epochs": 2, "finetune_epochs": 1, "batch": 8, "device": "cpu", "train_args": {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}}


def _trainer(**overrides: Any) -> TrainerSettings:
    values: dict[str, Any] = {
        "min_new_images": 24, "test_fraction": 0.0, "test_set_size": 0, "min_train_images": 4,
        "poll_interval_s": 0.2, "lease_s": 10.0, **TINY,
    }
    return TrainerSettings(**(values | overrides))


def _evaluator(**overrides: Any) -> EvaluatorSettings:
    values: dict[str, Any] = {
        "map50_95_floor": 0.0, "agreement_floor": 0.0, "champion_tolerance": 1.0, "class_tolerance": 1.0,
        "device": "cpu", "projects": {"strict": {"map50_95_floor": 0.99}},
    }
    return EvaluatorSettings(**(values | overrides))


async def _label(blobs: Any, seed: int, *, classes: tuple[str, ...] = TWO, for_test: bool = False, near_of: int | None = None) -> LabelVerified:
    """A verified label set of one synthetic scene (or a near duplicate of scene `near_of`)."""
    scene = render_scene(seed=near_of if near_of is not None else seed, width=128, height=96, classes=classes, objects=(1, 2), size=(0.3, 0.5))
    image = scene.image
    if near_of is not None:
        image = ImageEnhance.Brightness(image).enhance(1.04)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85 if near_of is not None else 92)
    data = out.getvalue()
    ref = await blobs.put(data)
    return LabelVerified(
        label_id=f"label-{seed}",
        image=ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=128, height=96, format="JPEG", byte_size=len(data)),
        boxes=[Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes],
        provenance=Provenance(method=VerificationMethod.IMPORT if for_test else VerificationMethod.HUMAN, labellers=[Labeller(user_id="ann")]),
        for_test_set=for_test,
        class_names=list(classes),
    )


async def _send(settings: Any, label: LabelVerified, project: str) -> None:
    await publish(settings, label, project=project, key=label.image.image_id)


async def _runs(pool: Any, settings: Any, project: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch(
        f'SELECT * FROM "{settings.schema_for("trainer")}".runs WHERE project = $1 ORDER BY created_at', project
    )]


async def _samples(pool: Any, settings: Any, project: str) -> int:
    return await pool.fetchval(f'SELECT count(*) FROM "{settings.schema_for("trainer")}".samples WHERE project = $1', project)


def _of(messages: list[dict[str, Any]], event_type: str, project: str) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("event_type") == event_type and m.get("project") == project]


@pytest.mark.slow
async def test_nth_label_trains_once_then_gate_passes_fails_and_finetune_adds_a_class(settings, pool) -> None:  # noqa: ANN001
    async with Services(settings, pool, trainer=_trainer(), evaluator=_evaluator()) as loop, \
            Collector(settings, topic_of(ModelTrained, settings.topic_prefix), topic_of(ModelEvaluated, settings.topic_prefix)) as out:
        await loop.start("trainer")
        await loop.start("evaluator")
        blobs = loop.adapters.blobs
        tests = [await _label(blobs, 100 + n, for_test=True) for n in range(6)]
        near = [await _label(blobs, 200 + n, near_of=100 + n) for n in range(3)]
        train = [await _label(blobs, 300 + n) for n in range(21)]
        for label in tests + near + train[:-1]:
            await _send(settings, label, "shapes")
        await eventually(lambda: _samples(pool, settings, "shapes"), timeout=30)
        await eventually(lambda: _count_is(pool, settings, "shapes", 29), timeout=30)
        assert await _runs(pool, settings, "shapes") == [], "23 new images must not trigger a run (N = 24)"

        await _send(settings, train[-1], "shapes")  # the 24th new training image
        await out.wait(2, timeout=180)
        runs = await _runs(pool, settings, "shapes")
        assert len(runs) == 1 and runs[0]["status"] == "succeeded" and json.loads(runs[0]["triggers"])[0]["kind"] == "count"

        trained = Envelope[ModelTrained].model_validate(_of(out.messages, "model.trained", "shapes")[0]).payload
        assert trained.lineage.model == ModelRef(model_id="shapes-detector", version=1)
        assert trained.lineage.parent is None and trained.lineage.class_names == list(TWO)
        assert trained.test_set is not None and trained.test_set.images == 6
        assert trained.dataset is not None and trained.dataset.images == 21, "the 3 near duplicates of test images never train"
        assert trained.metrics.train_images + trained.metrics.val_images == 21 and trained.metrics.epochs == 2
        weights = await blobs.get(trained.weights_uri)
        assert len(weights) > 100_000

        # Test-set isolation, checked on the manifest the run trained from.
        manifest = json.loads(await blobs.get(trained.dataset.uri))
        members = {m["image"]["image_id"] for m in manifest["images"]}
        test_ids = {t.image.image_id for t in tests}
        assert not members & test_ids
        assert not members & {n.image.image_id for n in near}
        test_hashes = [hash_image(await blobs.get(t.image.blob_uri))[0] for t in tests]
        for m in manifest["images"]:
            h = hash_image(await blobs.get(m["image"]["blob_uri"]))[0]
            assert min(hamming(h.phash, t.phash) + hamming(h.dhash, t.dhash) for t in test_hashes) > 16
        assert {m["split"] for m in manifest["images"]} == {"train", "val"}

        evaluated = Envelope[ModelEvaluated].model_validate(_of(out.messages, "model.evaluated", "shapes")[0]).payload
        assert evaluated.passed and evaluated.failures == [] and evaluated.champion is None
        assert evaluated.candidate.images == 6 and evaluated.test_set_version == trained.test_set.version
        assert set(evaluated.candidate.per_class_ap) <= set(TWO)
        report = json.loads(await blobs.get(evaluated.report_uri))
        assert report["passed"] is True and set(report["plots"]) == {"pr_curves.png", "per_class_ap.png"}
        assert (await blobs.get(report["plots"]["pr_curves.png"])).startswith(b"\x89PNG")

        # The failing path: the same weights under a project whose floor cannot be met.
        strict = trained.model_copy(update={"lineage": trained.lineage.model_copy(update={"model": ModelRef(model_id="strict-detector", version=1)})})
        await publish(settings, strict, project="strict", key="strict-detector")
        await eventually(lambda: len(_of(out.messages, "model.evaluated", "strict")) == 1, timeout=60)
        failed = Envelope[ModelEvaluated].model_validate(_of(out.messages, "model.evaluated", "strict")[0]).payload
        assert not failed.passed
        floor = [f for f in failed.failures if f.reason is GateFailureReason.BELOW_FLOOR]
        assert floor and floor[0].threshold == 0.99 and floor[0].metric == "map50_95"

        # Fine-tuning: a new class appears; the next model starts from the champion (v1) and adds it by name.
        more_tests = [await _label(blobs, 400 + n, classes=THREE, for_test=True) for n in range(3)]
        more_train = [await _label(blobs, 500 + n, classes=THREE) for n in range(8)]
        for label in more_tests + more_train:
            await _send(settings, label, "shapes")
        await eventually(lambda: _count_is(pool, settings, "shapes", 41), timeout=30)
        await publish(settings, TrainingRequested(requested_by="test", hyperparameters={"epochs": 1}), project="shapes", key="shapes")
        await eventually(lambda: len(_of(out.messages, "model.evaluated", "shapes")) == 2, timeout=180)
        second = Envelope[ModelTrained].model_validate(_of(out.messages, "model.trained", "shapes")[1]).payload
        assert second.lineage.model.version == 2 and second.lineage.parent == ModelRef(model_id="shapes-detector", version=1)
        assert second.lineage.class_names == list(THREE)
        assert second.hyperparameters["epochs"] == 1
        assert second.test_set is not None and second.test_set.images == 9 and second.test_set.version != trained.test_set.version
        from visionloop.libs.yolo import ultralytics

        path = settings.state_dir / "v2.pt"
        path.write_bytes(await blobs.get(second.weights_uri))
        model = ultralytics(settings.state_dir).YOLO(str(path))
        assert [model.names[i] for i in range(len(model.names))] == list(THREE)
        gated = Envelope[ModelEvaluated].model_validate(_of(out.messages, "model.evaluated", "shapes")[1]).payload
        assert gated.champion_model == ModelRef(model_id="shapes-detector", version=1)
        assert gated.champion is not None and gated.champion.images == 9, "the champion is re-measured on the new test set"
        assert gated.passed


async def _count_is(pool: Any, settings: Any, project: str, n: int) -> bool:
    return await _samples(pool, settings, project) == n


@pytest.mark.slow
async def test_crashed_and_hung_runs_fail_and_the_next_trigger_trains(settings, pool) -> None:  # noqa: ANN001
    config = _trainer(min_new_images=1000, keep_runs=1, projects={"slow": {"time_limit_s": 2.0}})
    status_topic = topic_of(PipelineStatus, settings.topic_prefix)
    async with Services(settings, pool, trainer=config, evaluator=_evaluator()) as loop, \
            Collector(settings, topic_of(ModelTrained, settings.topic_prefix), status_topic, topic_of(DeadLetter, settings.topic_prefix)) as out:
        trainer = await loop.start("trainer")
        blobs = loop.adapters.blobs
        for project in ("slow", "crashy"):
            for n in range(12):
                await _send(settings, await _label(blobs, 600 + n), project)
        await eventually(lambda: _count_is(pool, settings, "crashy", 12), timeout=30)
        await eventually(lambda: _count_is(pool, settings, "slow", 12), timeout=30)

        # A bad command is refused with a reason, and nothing is queued for it.
        await publish(settings, TrainingRequested(hyperparameters={"rm_rf": True}), project="crashy", key="crashy")
        await eventually(lambda: any(m.get("event_type") == "message.deadlettered" for m in out.messages), timeout=30)
        dead = next(m for m in out.messages if m.get("event_type") == "message.deadlettered")
        assert "unknown_hyperparameter" in json.dumps(dead["payload"])

        # A run past its time limit is killed and reported.
        await publish(settings, TrainingRequested(requested_by="test"), project="slow", key="slow")
        await eventually(lambda: _status_is(pool, settings, "slow", "failed"), timeout=60)
        slow = (await _runs(pool, settings, "slow"))[0]
        assert slow["reason"] == "time_limit"

        # A child killed under the service (as by the OOM killer) fails its run; the service goes on.
        await publish(settings, TrainingRequested(requested_by="test"), project="crashy", key="crashy")

        async def running_pid() -> int | None:
            runs = await _runs(pool, settings, "crashy")
            return runs[0]["pid"] if runs and runs[0]["status"] == "running" else None

        pid = await eventually(running_pid, timeout=60)
        await asyncio.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: _status_is(pool, settings, "crashy", "failed"), timeout=60)
        crashed = (await _runs(pool, settings, "crashy"))[0]
        assert crashed["reason"] == "crashed" and "SIGKILL" in crashed["error"]
        def failures() -> list[dict[str, Any]]:
            return [m for m in out.messages if m.get("event_type") == "pipeline.status" and m["payload"]["kind"] == StatusKind.FAILED.value
                    and m["payload"]["service"] == "trainer"]

        # The run's row is written before its status reaches the topic's reader: wait for both failures to arrive.
        await eventually(lambda: len(failures()) >= 2, timeout=30)

        # The next trigger trains again, on the same running service.
        await publish(settings, TrainingRequested(requested_by="test"), project="crashy", key="crashy")
        await eventually(lambda: any(m.get("event_type") == "model.trained" and m["project"] == "crashy" for m in out.messages), timeout=120)
        runs = await _runs(pool, settings, "crashy")
        assert [r["status"] for r in runs] == ["failed", "succeeded"]
        assert trainer.counters["runs_failed_crashed"] == 1 and trainer.counters["runs_failed_time_limit"] == 1
        progress = [m for m in out.messages if m.get("event_type") == "pipeline.status" and m["payload"]["kind"] == "progress"
                    and (m["payload"].get("progress") or {}).get("step", 0) >= 1]
        assert progress, "epochs are reported on the status topic"
        # Only the newest run of each project keeps its local folder (weights live in the blob store).
        slow_run = (await _runs(pool, settings, "slow"))[0]["run_id"]
        await eventually(lambda: {p.name for p in (settings.state_dir / "trainer" / "runs").iterdir()} == {slow_run, runs[1]["run_id"]}, timeout=10)


async def _status_is(pool: Any, settings: Any, project: str, status: str) -> bool:
    runs = await _runs(pool, settings, project)
    return bool(runs) and runs[-1]["status"] == status


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.mark.slow
async def test_a_run_interrupted_by_a_trainer_stop_is_trained_by_the_next_trainer(settings, pool) -> None:  # noqa: ANN001
    import psutil

    config = _trainer(min_new_images=1000)
    async with Collector(settings, topic_of(ModelTrained, settings.topic_prefix)) as out:
        async with Services(settings, pool, trainer=config) as loop:
            trainer = await loop.start("trainer")
            for n in range(12):
                await _send(settings, await _label(loop.adapters.blobs, 700 + n), "resumed")
            await eventually(lambda: _count_is(pool, settings, "resumed", 12), timeout=30)
            await publish(settings, TrainingRequested(requested_by="test"), project="resumed", key="resumed")

            async def running_pid() -> int | None:
                runs = await _runs(pool, settings, "resumed")
                return runs[0]["pid"] if runs and runs[0]["status"] == "running" else None

            pid = await eventually(running_pid, timeout=60)
            await trainer.stop()  # a deploy, say: the child goes with it and the run goes back to the queue
            loop.runtimes.remove(trainer)
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        async with Services(settings, pool, trainer=config) as loop:
            await loop.start("trainer")
            await eventually(lambda: any(m.get("project") == "resumed" for m in out.messages), timeout=120)
        runs = await _runs(pool, settings, "resumed")
        assert [r["status"] for r in runs] == ["succeeded"] and runs[0]["attempts"] == 1
