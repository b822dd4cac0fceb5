"""evaluator: step 7 of the loop. A model becomes a candidate only if it is measurably good enough.

Consumes `model trained`; measures the candidate on the project's frozen test set (the manifest
the trainer froze when the run started: test images with their labels) and emits `model
evaluated` with pass or fail, every reason for a failure, candidate and champion metrics side by
side, and a report (JSON plus PR-curve and per-class PNGs) in the blob store.

- Metrics (`libs/detmetrics.py`): COCO mAP50-95 and mAP50 (agreeing with pycocotools), AP per
  class, precision and recall at the operating threshold, and per-image agreement (every label
  found at IoU 0.5 with the right class, nothing extra).
- Champion: the project's newest production model (`model registered` with alias
  `production`), else its newest candidate that passed. Its metrics are measured on the same
  test set version; a champion measured on an older version is measured again.
- The gate (`gate.py`) is a pure function of those metrics and the project's policy; the first
  model of a project is gated on the floors alone.

Measuring runs in the batch consumer's `prepare` step, outside any database transaction; only
the results are written in the handler's transaction.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from visionloop.contracts import (
    Alias,
    Box,
    Envelope,
    GateFailure,
    GateFailureReason,
    Metrics,
    ModelEvaluated,
    ModelRef,
    ModelRegistered,
    ModelTrained,
)
from visionloop.libs.bus import Runtime, Unit
from visionloop.libs.db import quote_ident
from visionloop.libs.detmetrics import Evaluation, evaluate
from visionloop.libs.manifest import read_manifest
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.libs.warmup import WarmUp
from visionloop.services.evaluator.config import EvaluatorSettings, Policy
from visionloop.services.evaluator.gate import gate
from visionloop.services.evaluator.predict import predict
from visionloop.services.evaluator.report import render

log = logging.getLogger(__name__)


@dataclass
class Assessment:
    """What measuring one candidate found (the handler records it and emits the verdict)."""

    candidate: Metrics
    failures: list[GateFailure]
    test_set_version: str
    champion: Metrics | None = None
    champion_ref: ModelRef | None = None
    champion_measured: bool = False
    """True when the champion was measured now (a new test set version): store it."""
    report_uri: str | None = None
    images_per_s: float | None = None


def _zero(images: int = 0) -> Metrics:
    return Metrics(map50_95=0.0, map50=0.0, images=images)


async def champion_of(pool: Any, s: str, project: str, exclude: ModelRef) -> dict[str, Any] | None:
    """The project's champion: newest production model, else newest that passed (not `exclude`)."""
    row = await pool.fetchrow(
        f"""SELECT * FROM {s}.models WHERE project = $1 AND (production_at IS NOT NULL OR passed)
              AND NOT (model_id = $2 AND version = $3)
            ORDER BY production_at DESC NULLS LAST, evaluated_at DESC LIMIT 1""",
        project, exclude.model_id, exclude.version,
    )
    return dict(row) if row else None


def wire(runtime: Runtime, adapters: Adapters, config: EvaluatorSettings) -> None:
    """Register the evaluator's handlers on the runtime."""
    blobs = adapters.blobs
    work_dir = (runtime.settings.state_dir / "evaluator").resolve()

    async def weights_file(uri: str, sha256: str) -> Path:
        path = work_dir / "weights" / f"{sha256}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(await blobs.get(uri))
            tmp.replace(path)
        return path

    async def measure(uri: str, sha256: str, imgsz: int, images: list[Image.Image], ids: list[str],
                      truth: dict[str, list[Box]], class_names: list[str], policy: Policy) -> Evaluation:
        weights = await weights_file(uri, sha256)
        found = await asyncio.to_thread(
            _WARM_UP.after, predict, work_dir, weights, images, imgsz=imgsz, device=policy.device, batch=policy.batch
        )
        preds = dict(zip(ids, found, strict=True))
        return await asyncio.to_thread(evaluate, truth, preds, class_names, conf=policy.conf, match_iou=policy.match_iou)

    async def assess(event: Envelope[ModelTrained]) -> Assessment:
        t, project = event.payload, event.project
        policy = config.policy(project)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if t.test_set is None or t.test_set.images == 0:
            return Assessment(
                candidate=_zero(), test_set_version=t.test_set.version if t.test_set else "none",
                failures=[GateFailure(reason=GateFailureReason.NO_TEST_SET, message=f"{project} has no frozen test set: nothing to gate on")],
            )
        doc = read_manifest(await blobs.get(t.test_set.uri))
        class_names = list(doc["class_names"])
        for name in t.lineage.class_names:
            if name not in class_names:
                class_names.append(name)
        ids: list[str] = []
        images: list[Image.Image] = []
        truth: dict[str, list[Box]] = {}
        for item in doc["images"]:
            image_id = item["image"]["image_id"]
            data = await blobs.get(item["image"]["blob_uri"])
            image = Image.open(io.BytesIO(data))
            image.load()
            ids.append(image_id)
            images.append(image)
            truth[image_id] = [Box.model_validate(b) for b in item["boxes"]]
        loaded = loop.time()
        cand = await measure(t.weights_uri, t.weights_sha256, t.lineage.imgsz, images, ids, truth, class_names, policy)
        measured = loop.time()
        measured_s = measured - loaded
        assert runtime.pool is not None
        s = quote_ident(runtime.schema)
        champ = await champion_of(runtime.pool, s, project, t.lineage.model)
        champ_metrics: Metrics | None = None
        champ_ref: ModelRef | None = None
        champ_measured = False
        champ_eval: Evaluation | None = None
        if champ is not None:
            champ_ref = ModelRef(model_id=champ["model_id"], version=champ["version"])
            stored = await runtime.pool.fetchval(
                f"SELECT metrics FROM {s}.evaluations WHERE model_id = $1 AND version = $2 AND test_set_version = $3",
                champ["model_id"], champ["version"], t.test_set.version,
            )
            if stored:
                champ_metrics = Metrics.model_validate_json(stored)
            else:
                champ_eval = await measure(champ["weights_uri"], champ["weights_sha256"], champ["imgsz"], images, ids, truth, class_names, policy)
                champ_metrics = champ_eval.metrics()
                champ_measured = True
        champion_done = loop.time()
        candidate = cand.metrics()
        failures = gate(candidate, champ_metrics, policy)
        files = render(
            cand,
            candidate={"model_id": t.lineage.model.model_id, "version": t.lineage.model.version, "weights_sha256": t.weights_sha256,
                       "dataset_version": t.lineage.dataset_version, "class_names": t.lineage.class_names},
            champion=None if champ_metrics is None else {
                "model_id": champ_ref.model_id if champ_ref else None, "version": champ_ref.version if champ_ref else None,
                "metrics": champ_metrics.model_dump(mode="json"),
            },
            failures=failures, test_set_version=t.test_set.version, passed=not failures,
        )
        plots = {}
        for name, content in files.items():
            if name.endswith(".png"):
                plots[name] = (await blobs.put(content, content_type="image/png")).uri
        report = json.loads(files["report.json"])
        report["plots"] = plots
        report["policy"] = policy.model_dump(mode="json")
        report_ref = await blobs.put(json.dumps(report, sort_keys=True, indent=1).encode(), content_type="application/json")
        done = loop.time()
        runtime.gauges.update({
            "evaluator.last.load_s": round(loaded - started, 3), "evaluator.last.measure_s": round(measured_s, 3),
            "evaluator.last.champion_s": round(champion_done - measured, 3), "evaluator.last.report_s": round(done - champion_done, 3),
        })
        log.info("%s v%d measured: test set in %.2f s, candidate %.2f s, champion %.2f s, report %.2f s", t.lineage.model.model_id,
                 t.lineage.model.version, loaded - started, measured_s, champion_done - measured, done - champion_done)
        return Assessment(
            candidate=candidate, failures=failures, test_set_version=t.test_set.version, champion=champ_metrics,
            champion_ref=champ_ref, champion_measured=champ_measured, report_uri=report_ref.uri,
            images_per_s=len(images) / measured_s if measured_s > 0 else None,
        )

    async def prepare(events: list[Envelope[ModelTrained]]) -> list[Any]:
        out: list[Any] = []
        for event in events:
            try:
                out.append(await assess(event))
            except Exception as exc:  # noqa: BLE001 - the bus retries this event alone, then dead-letters it
                log.exception("evaluating %s failed", event.payload.lineage.model)
                out.append(exc)
        return out

    async def on_trained(event: Envelope[ModelTrained], unit: Unit[Any], found: Assessment) -> None:
        """Record the measurement and emit the gate's verdict."""
        t, project, s = event.payload, event.project, unit.schema
        passed = not found.failures
        ref = t.lineage.model
        await unit.conn.execute(
            f"""INSERT INTO {s}.models (model_id, version, project, weights_uri, weights_sha256, class_names, imgsz, passed)
                VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)
                ON CONFLICT (model_id, version) DO UPDATE SET passed = EXCLUDED.passed, evaluated_at = now()""",
            ref.model_id, ref.version, project, t.weights_uri, t.weights_sha256, json.dumps(t.lineage.class_names), t.lineage.imgsz, passed,
        )
        rows = [(ref, found.candidate, found.report_uri)]
        if found.champion_measured and found.champion_ref is not None and found.champion is not None:
            rows.append((found.champion_ref, found.champion, None))
        if found.test_set_version != "none":
            for model, metrics, uri in rows:
                await unit.conn.execute(
                    f"""INSERT INTO {s}.evaluations (model_id, version, test_set_version, project, metrics, report_uri)
                        VALUES ($1, $2, $3, $4, $5::jsonb, $6)
                        ON CONFLICT (model_id, version, test_set_version) DO UPDATE SET metrics = EXCLUDED.metrics,
                            report_uri = coalesce(EXCLUDED.report_uri, {s}.evaluations.report_uri), measured_at = now()""",
                    model.model_id, model.version, found.test_set_version, project, metrics.model_dump_json(), uri,
                )
        unit.emit(
            ModelEvaluated(
                lineage=t.lineage,
                weights_uri=t.weights_uri,
                weights_sha256=t.weights_sha256,
                passed=passed,
                failures=found.failures,
                test_set_version=found.test_set_version,
                candidate=found.candidate,
                champion=found.champion,
                champion_model=found.champion_ref,
                report_uri=found.report_uri,
                dataset=t.dataset,
                test_set=t.test_set,
            ),
            project=project,
        )
        runtime.counters["passed" if passed else "failed"] += 1
        for failure in found.failures:
            runtime.counters[f"failed_{failure.reason.value}"] += 1
        if found.images_per_s is not None:
            runtime.gauges["evaluator.images_per_s"] = round(found.images_per_s, 2)
        log.info("%s v%d: %s (mAP50-95 %.3f on %s)", ref.model_id, ref.version, "passed" if passed else "failed",
                 found.candidate.map50_95, found.test_set_version)

    async def on_registered(event: Envelope[ModelRegistered], unit: Unit[Any]) -> None:
        """A model promoted to production is the champion candidates are compared with."""
        if Alias.PRODUCTION not in event.payload.aliases:
            return
        ref = event.payload.lineage.model
        await unit.conn.execute(
            f"UPDATE {unit.schema}.models SET production_at = now() WHERE model_id = $1 AND version = $2 AND project = $3",
            ref.model_id, ref.version, event.project,
        )

    async def warm_up() -> None:
        """Import Ultralytics (torch) and matplotlib once at start, not when the first candidate waits."""
        await asyncio.to_thread(_preload, work_dir)
        await asyncio.Event().wait()

    runtime.consume_batch(ModelTrained, on_trained, prepare=prepare, max_records=1)
    runtime.background("warm-up", warm_up)
    runtime.consume(ModelRegistered, on_registered)
    runtime.produces(ModelEvaluated)


_WARM_UP = WarmUp()


def _preload(state_dir: Path) -> None:
    _WARM_UP.run(_import_tools, state_dir)


def _import_tools(state_dir: Path) -> None:
    import importlib

    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        importlib.import_module(module)
    from visionloop.libs.yolo import YoloUnavailable, ultralytics

    try:
        ultralytics(state_dir)
    except YoloUnavailable as exc:
        log.warning("evaluator: %s", exc)


SPEC = ServiceSpec(
    name="evaluator",
    description="Measures each trained candidate on the frozen test set and gates it against floors and the champion.",
    wire=wire,
    settings=EvaluatorSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
