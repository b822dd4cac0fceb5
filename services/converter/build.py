"""Building a gated model's artifacts (the batch consumer's `prepare` step, outside any
transaction): its weights fetched and checked against their SHA-256, the test set and calibration
images fetched, `convert.convert` run in a worker thread, the artifacts that may ship stored."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionloop.contracts import Artifact, Box, Envelope, ModelEvaluated, RefusedArtifact
from visionloop.libs.blob import BlobStore
from visionloop.libs.bus import PermanentError, Runtime
from visionloop.libs.manifest import read_manifest
from visionloop.libs.warmup import WarmUp
from visionloop.services.converter.config import ConverterSettings
from visionloop.services.converter.convert import Built, Job, LabelledImage, convert
from visionloop.services.converter.decide import calibration_members

log = logging.getLogger("visionloop.services.converter.service")

WARM_UP = WarmUp()
"""Ultralytics and ONNX Runtime's quantiser imported once at start (`preload`); builds wait for it."""


@dataclass
class Conversion:
    """What converting one model produced (the handler records it and emits the event)."""

    artifacts: list[Artifact]
    refused: list[RefusedArtifact]
    built: list[Built]
    seconds: float


class Builder:
    """Builds artifacts for one runtime."""

    def __init__(self, runtime: Runtime, blobs: BlobStore, config: ConverterSettings) -> None:
        self.runtime, self.blobs, self.config = runtime, blobs, config
        self.work_root = (runtime.settings.state_dir / "converter").resolve()

    async def prepare(self, events: list[Envelope[ModelEvaluated]]) -> list[Any]:
        """Each event's conversion (None: it failed the gate), or the exception for the bus."""
        out: list[Any] = []
        for event in events:
            if not event.payload.passed:
                out.append(None)  # nothing to build: the handler records the skip
                continue
            try:
                out.append(await self.build(event))
            except PermanentError as exc:  # dead-lettered without retries; the message says why
                log.error("converting %s: %s", event.payload.lineage.model, exc)
                out.append(exc)
            except Exception as exc:  # noqa: BLE001 - the bus retries this event alone, then dead-letters it
                log.exception("converting %s failed", event.payload.lineage.model)
                out.append(exc)
        return out

    async def build(self, event: Envelope[ModelEvaluated]) -> Conversion:
        e, policy = event.payload, self.config.policy(event.project)
        ref = e.lineage.model
        loop = asyncio.get_running_loop()
        started = loop.time()
        weights = await self.weights_file(e.weights_uri, e.weights_sha256)
        measured = await self.test_set(e)
        images = await self.calibration(e, policy.calibration_images) if policy.edge_precision == "int8" else []
        fetched = loop.time()
        work_dir = self.work_root / "work" / f"{ref.model_id}-v{ref.version}-{uuid.uuid4().hex[:8]}"
        job = Job(
            weights=weights, work_dir=work_dir, state_dir=self.work_root, imgsz=e.lineage.imgsz, class_names=e.lineage.class_names,
            reference_map50_95=e.candidate.map50_95, policy=policy, test_set=measured[0] if measured else None,
            metric_classes=measured[1] if measured else (), calibration=images, model_tag=f"{ref.model_id} v{ref.version}",
        )
        try:
            built = await asyncio.to_thread(WARM_UP.after, convert, job)
            converted = loop.time()
            artifacts = [await self.store(b) for b in built if b.refusal is None and b.path is not None]
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        done = loop.time()
        _log_targets(e, built)
        log.info("%s v%d converted in %.2f s: fetching %.2f s, converting %.2f s, storing %.2f s", ref.model_id, ref.version,
                 done - started, fetched - started, converted - fetched, done - converted)
        self.runtime.gauges.update({
            "converter.last.fetch_s": round(fetched - started, 3), "converter.last.convert_s": round(converted - fetched, 3),
            "converter.last.store_s": round(done - converted, 3),
        })
        return Conversion(artifacts=artifacts, refused=[b.refusal for b in built if b.refusal is not None], built=built,
                          seconds=done - started)

    async def store(self, b: Built) -> Artifact:
        """An artifact that may ship, in the blob store."""
        assert b.path is not None
        stored = await self.blobs.put_file(b.path, content_type="application/octet-stream")
        return Artifact(target=b.target, precision=b.precision, input_shape=b.input_shape, uri=stored.uri, sha256=stored.sha256,
                        size_bytes=stored.size, parity=b.parity)

    async def weights_file(self, uri: str, sha256: str) -> Path:
        path = self.work_root / "weights" / f"{sha256}.pt"
        if not path.exists():
            data = await self.blobs.get(uri)
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise PermanentError(
                    f"the weights at {uri} hash to {actual}, not the {sha256} the event names: the event "
                    "describes other weights; publish `model evaluated` again with the right ones"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return path

    async def test_set(self, e: ModelEvaluated) -> tuple[list[LabelledImage], list[str]] | None:
        """The frozen test set's images and labels, and its class list; None without one."""
        if e.test_set is None or e.test_set.images == 0:
            return None
        doc = read_manifest(await self.blobs.get(e.test_set.uri))
        classes = list(doc["class_names"])
        classes += [name for name in e.lineage.class_names if name not in classes]
        images = [
            LabelledImage(image_id=item["image"]["image_id"], data=await self.blobs.get(item["image"]["blob_uri"]),
                          boxes=[Box.model_validate(b) for b in item["boxes"]])
            for item in doc["images"]
        ]
        return (images, classes) if images else None

    async def calibration(self, e: ModelEvaluated, count: int) -> list[bytes]:
        """Up to `count` training images of the model's dataset (none when the event names none)."""
        if e.dataset is None or e.dataset.images == 0:
            return []
        doc = read_manifest(await self.blobs.get(e.dataset.uri))
        return [await self.blobs.get(item["image"]["blob_uri"]) for item in calibration_members(doc["images"], count)]


def _log_targets(e: ModelEvaluated, built: list[Built]) -> None:
    ref = e.lineage.model
    for b in built:
        verdict = f"refused ({b.refusal.reason.value})" if b.refusal else "ships"
        if not b.seconds:
            log.info("%s v%d %s %s: %s, not built", ref.model_id, ref.version, b.target.value, b.precision.value, verdict)
            continue
        log.info("%s v%d %s %s: %s; %s; raw diff %s px, mAP50-95 %s (PyTorch %.4f)", ref.model_id, ref.version,
                 b.target.value, b.precision.value, verdict, ", ".join(f"{k} {v:.2f} s" for k, v in b.seconds.items()),
                 b.parity.max_abs_diff_px, b.parity.map50_95, e.candidate.map50_95)


def preload(state_dir: Path) -> None:
    """Import Ultralytics (torch) and ONNX Runtime's quantiser once, at start (`WARM_UP`)."""
    WARM_UP.run(_import_tools, state_dir)


def _import_tools(state_dir: Path) -> None:
    import importlib

    for module in ("onnx", "onnxruntime", "onnxruntime.quantization"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            log.warning("converter: %s", exc)
    from visionloop.libs.yolo import YoloUnavailable, ultralytics

    try:
        ultralytics(state_dir)
    except YoloUnavailable as exc:
        log.warning("converter: %s", exc)
