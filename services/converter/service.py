"""converter: step 8 of the loop. A gated model becomes files a server and an edge device can run.

Consumes `model evaluated`. A candidate that failed the gate is recorded and skipped. For one
that passed, the converter fetches its weights (checked against their SHA-256), builds

- a **server** artifact: ONNX FP32, dynamic batch, height and width, at the training size;
- an **edge** artifact: ONNX with a static `1x3xSxS` input, by default INT8 (Conv layers only,
  calibrated on the project's training images), or FP16 / FP32 (`edge_precision`),

holds each to the parity rules of `convert.py` (raw outputs against PyTorch; test-set mAP50-95
against the evaluator's PyTorch figure), stores the artifacts that pass in the blob store and
emits one `model converted` with the artifacts and, for any that may not ship, the refusal with
its reason and numbers. With both refused it still emits it, artifacts empty.

Export, calibration and measurement run in the batch consumer's `prepare` step, in a worker
thread, outside any database transaction; only the results are written in the handler's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionloop.contracts import (
    Artifact,
    Box,
    Envelope,
    ModelConverted,
    ModelEvaluated,
    RefusedArtifact,
)
from visionloop.libs.bus import PermanentError, Runtime, Unit
from visionloop.libs.manifest import read_manifest
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.libs.warmup import WarmUp
from visionloop.services.converter.config import ConverterSettings
from visionloop.services.converter.convert import Built, Job, LabelledImage, convert
from visionloop.services.converter.decide import calibration_members

log = logging.getLogger(__name__)


@dataclass
class Conversion:
    """What converting one model produced (the handler records it and emits the event)."""

    artifacts: list[Artifact]
    refused: list[RefusedArtifact]
    built: list[Built]
    seconds: float


def outcome_of(conversion: Conversion) -> str:
    """`converted` (every target ships), `partial` or `refused` (none does)."""
    if not conversion.artifacts:
        return "refused"
    return "partial" if conversion.refused else "converted"


def wire(runtime: Runtime, adapters: Adapters, config: ConverterSettings) -> None:
    """Register the converter's handler on the runtime."""
    blobs = adapters.blobs
    work_root = (runtime.settings.state_dir / "converter").resolve()

    async def weights_file(uri: str, sha256: str) -> Path:
        path = work_root / "weights" / f"{sha256}.pt"
        if not path.exists():
            data = await blobs.get(uri)
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

    async def test_set(e: ModelEvaluated) -> tuple[list[LabelledImage], list[str]] | None:
        """The frozen test set's images and labels, and its class list; None without one."""
        if e.test_set is None or e.test_set.images == 0:
            return None
        doc = read_manifest(await blobs.get(e.test_set.uri))
        classes = list(doc["class_names"])
        classes += [name for name in e.lineage.class_names if name not in classes]
        images = [
            LabelledImage(
                image_id=item["image"]["image_id"],
                data=await blobs.get(item["image"]["blob_uri"]),
                boxes=[Box.model_validate(b) for b in item["boxes"]],
            )
            for item in doc["images"]
        ]
        return (images, classes) if images else None

    async def calibration(e: ModelEvaluated, count: int) -> list[bytes]:
        """Up to `count` training images of the model's dataset (none when the event names none)."""
        if e.dataset is None or e.dataset.images == 0:
            return []
        doc = read_manifest(await blobs.get(e.dataset.uri))
        return [await blobs.get(item["image"]["blob_uri"]) for item in calibration_members(doc["images"], count)]

    async def build(event: Envelope[ModelEvaluated]) -> Conversion:
        e, project = event.payload, event.project
        policy = config.policy(project)
        ref = e.lineage.model
        loop = asyncio.get_running_loop()
        started = loop.time()
        weights = await weights_file(e.weights_uri, e.weights_sha256)
        measured = await test_set(e)
        images = await calibration(e, policy.calibration_images) if policy.edge_precision == "int8" else []
        fetched = loop.time()
        work_dir = work_root / "work" / f"{ref.model_id}-v{ref.version}-{uuid.uuid4().hex[:8]}"
        job = Job(
            weights=weights, work_dir=work_dir, state_dir=work_root, imgsz=e.lineage.imgsz, class_names=e.lineage.class_names,
            reference_map50_95=e.candidate.map50_95, policy=policy, test_set=measured[0] if measured else None,
            metric_classes=measured[1] if measured else (), calibration=images, model_tag=f"{ref.model_id} v{ref.version}",
        )
        try:
            built = await asyncio.to_thread(_WARM_UP.after, convert, job)
            converted = loop.time()
            artifacts: list[Artifact] = []
            for b in built:
                if b.refusal is not None or b.path is None:
                    continue
                stored = await blobs.put_file(b.path, content_type="application/octet-stream")
                artifacts.append(Artifact(
                    target=b.target, precision=b.precision, input_shape=b.input_shape, uri=stored.uri,
                    sha256=stored.sha256, size_bytes=stored.size, parity=b.parity,
                ))
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        done = loop.time()
        for b in built:
            verdict = f"refused ({b.refusal.reason.value})" if b.refusal else "ships"
            if not b.seconds:
                log.info("%s v%d %s %s: %s, not built", ref.model_id, ref.version, b.target.value, b.precision.value, verdict)
                continue
            log.info("%s v%d %s %s: %s; %s; raw diff %s px, mAP50-95 %s (PyTorch %.4f)", ref.model_id, ref.version,
                     b.target.value, b.precision.value, verdict, ", ".join(f"{k} {v:.2f} s" for k, v in b.seconds.items()),
                     b.parity.max_abs_diff_px, b.parity.map50_95, e.candidate.map50_95)
        log.info("%s v%d converted in %.2f s: fetching %.2f s, converting %.2f s, storing %.2f s", ref.model_id, ref.version,
                 done - started, fetched - started, converted - fetched, done - converted)
        runtime.gauges.update({
            "converter.last.fetch_s": round(fetched - started, 3), "converter.last.convert_s": round(converted - fetched, 3),
            "converter.last.store_s": round(done - converted, 3),
        })
        return Conversion(
            artifacts=artifacts, refused=[b.refusal for b in built if b.refusal is not None], built=built,
            seconds=done - started,
        )

    async def prepare(events: list[Envelope[ModelEvaluated]]) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if not event.payload.passed:
                out.append(None)  # nothing to build: the handler records the skip
                continue
            try:
                out.append(await build(event))
            except PermanentError as exc:  # dead-lettered without retries; the message says why
                log.error("converting %s: %s", event.payload.lineage.model, exc)
                out.append(exc)
            except Exception as exc:  # noqa: BLE001 - the bus retries this event alone, then dead-letters it
                log.exception("converting %s failed", event.payload.lineage.model)
                out.append(exc)
        return out

    async def on_evaluated(event: Envelope[ModelEvaluated], unit: Unit[Any], found: Conversion | None) -> None:
        """Record the conversion (or the skip) and emit `model converted` for a model that passed the gate."""
        e, project, s = event.payload, event.project, unit.schema
        ref = e.lineage.model
        outcome = "skipped_failed_gate" if found is None else outcome_of(found)
        await unit.conn.execute(
            f"""INSERT INTO {s}.models (model_id, version, project, weights_sha256, passed_gate, outcome, reference_map50_95,
                    test_set_version, seconds)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                ON CONFLICT (model_id, version) DO UPDATE SET project = EXCLUDED.project, weights_sha256 = EXCLUDED.weights_sha256,
                    passed_gate = EXCLUDED.passed_gate, outcome = EXCLUDED.outcome, reference_map50_95 = EXCLUDED.reference_map50_95,
                    test_set_version = EXCLUDED.test_set_version, seconds = EXCLUDED.seconds, handled_at = now()""",
            ref.model_id, ref.version, project, e.weights_sha256, e.passed, outcome, e.candidate.map50_95,
            e.test_set.version if e.test_set else None, found.seconds if found else None,
        )
        if found is None:
            runtime.counters["skipped_failed_gate"] += 1
            log.info("%s v%d failed the gate: nothing to convert", ref.model_id, ref.version)
            return
        shipped = {a.target: a for a in found.artifacts}
        for b in found.built:
            artifact = shipped.get(b.target) if b.refusal is None else None
            await unit.conn.execute(
                f"""INSERT INTO {s}.conversions (model_id, version, target, project, precision, outcome, reason, message,
                        input_shape, max_abs_diff_px, map50_95, map50_95_delta, tolerance, artifact_uri, artifact_sha256,
                        size_bytes, seconds)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12, $13, $14, $15, $16, $17::jsonb)
                    ON CONFLICT (model_id, version, target) DO UPDATE SET project = EXCLUDED.project,
                        precision = EXCLUDED.precision, outcome = EXCLUDED.outcome, reason = EXCLUDED.reason,
                        message = EXCLUDED.message, input_shape = EXCLUDED.input_shape, max_abs_diff_px = EXCLUDED.max_abs_diff_px,
                        map50_95 = EXCLUDED.map50_95, map50_95_delta = EXCLUDED.map50_95_delta, tolerance = EXCLUDED.tolerance,
                        artifact_uri = EXCLUDED.artifact_uri, artifact_sha256 = EXCLUDED.artifact_sha256,
                        size_bytes = EXCLUDED.size_bytes, seconds = EXCLUDED.seconds, converted_at = now()""",
                ref.model_id, ref.version, b.target.value, project, b.precision.value,
                "shipped" if artifact else "refused", b.refusal.reason.value if b.refusal else None,
                b.refusal.message if b.refusal else None, json.dumps(b.input_shape) if b.input_shape else None,
                b.parity.max_abs_diff_px, b.parity.map50_95, b.parity.map50_95_delta, b.parity.tolerance,
                artifact.uri if artifact else None, artifact.sha256 if artifact else None,
                artifact.size_bytes if artifact else None, json.dumps({k: round(v, 3) for k, v in b.seconds.items()}),
            )
        unit.emit(
            ModelConverted(lineage=e.lineage, metrics=e.candidate, artifacts=found.artifacts, refused=found.refused),
            project=project,
        )
        runtime.counters["converted"] += 1
        for artifact in found.artifacts:
            runtime.counters[f"artifacts_{artifact.target.value}_{artifact.precision.value}"] += 1
        for refusal in found.refused:
            runtime.counters[f"refused_{refusal.reason.value}"] += 1
        log.info("%s v%d: %s (%s)", ref.model_id, ref.version, outcome,
                 ", ".join([f"{a.target.value} {a.precision.value} {a.size_bytes} B" for a in found.artifacts]
                           + [f"{r.target.value} {r.precision.value} refused: {r.reason.value}" for r in found.refused]))

    async def warm_up() -> None:
        """Import Ultralytics (torch) and ONNX Runtime's quantiser once at start, not when the first model waits."""
        await asyncio.to_thread(_preload, work_root)
        await asyncio.Event().wait()

    runtime.consume_batch(ModelEvaluated, on_evaluated, prepare=prepare, max_records=1)
    runtime.background("warm-up", warm_up)
    runtime.produces(ModelConverted)


_WARM_UP = WarmUp()


def _preload(state_dir: Path) -> None:
    _WARM_UP.run(_import_tools, state_dir)


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


SPEC = ServiceSpec(
    name="converter",
    description="Exports each model that passed the gate to ONNX for server (FP32) and edge (INT8 by default), and ships only artifacts that match PyTorch.",
    wire=wire,
    settings=ConverterSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
