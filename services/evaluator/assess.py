"""Measuring a candidate (the batch consumer's `prepare` step, outside any transaction): its test
set loaded from the blob store, the candidate and (when not measured on this test set version
before) the champion run over it, the gate applied, the report rendered and stored."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from visionloop.contracts import Box, Envelope, Metrics, ModelRef, ModelRejudgeRequested, ModelTrained
from visionloop.libs.blob import BlobStore
from visionloop.libs.bus import Runtime
from visionloop.libs.db import quote_ident
from visionloop.libs.detmetrics import Evaluation, evaluate
from visionloop.libs.manifest import read_manifest
from visionloop.libs.warmup import WarmUp
from visionloop.services.evaluator import decide, store
from visionloop.services.evaluator.config import EvaluatorSettings, Policy
from visionloop.services.evaluator.decide import Assessment
from visionloop.services.evaluator.gate import gate
from visionloop.services.evaluator.predict import predict
from visionloop.services.evaluator.report import render

log = logging.getLogger("visionloop.services.evaluator.service")

WARM_UP = WarmUp()
"""Ultralytics and matplotlib imported once at start (`preload`); measuring waits for it."""


@dataclass
class LoadedTestSet:
    """A frozen test set in memory: images in order, their labels, the classes averaged over."""

    version: str
    ids: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    truth: dict[str, list[Box]] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)


class Assessor:
    """Measures candidates for one runtime."""

    def __init__(self, runtime: Runtime, blobs: BlobStore, config: EvaluatorSettings) -> None:
        self.runtime, self.blobs, self.config = runtime, blobs, config
        self.work_dir = (runtime.settings.state_dir / "evaluator").resolve()

    async def prepare(self, events: list[Envelope[ModelTrained]]) -> list[Any]:
        """Each event's assessment, or the exception (the bus retries that event alone, then dead-letters it)."""
        out: list[Any] = []
        for event in events:
            try:
                out.append(await self.assess(event.payload, event.project))
            except Exception as exc:  # noqa: BLE001 - handed back to the bus
                log.exception("evaluating %s failed", event.payload.lineage.model)
                out.append(exc)
        return out

    async def prepare_rejudge(self, events: list[Envelope[ModelRejudgeRequested]]) -> list[Any]:
        """Each requested model's (project, `model trained`, new assessment); None for a model this
        evaluator never gated; or the exception for the bus."""
        pool, s = self.runtime.pool, quote_ident(self.runtime.schema)
        assert pool is not None
        out: list[Any] = []
        for event in events:
            try:
                known = await store.trained_of(pool, s, event.payload.model)
                out.append(None if known is None else (*known, await self.rejudge(known[1], known[0])))
            except Exception as exc:  # noqa: BLE001 - handed back to the bus
                log.exception("judging %s again failed", event.payload.model)
                out.append(exc)
        return out

    async def rejudge(self, t: ModelTrained, project: str) -> Assessment:
        """The gate again on the figures already measured (the candidate's and the champion's on this
        test set version; its report kept); a figure not at hand is measured, as for a new candidate."""
        pool, s = self.runtime.pool, quote_ident(self.runtime.schema)
        assert pool is not None
        if (none := decide.without_test_set(t, project)) is not None:
            return none
        assert t.test_set is not None
        version = t.test_set.version
        candidate = await store.stored_metrics(pool, s, t.lineage.model, version)
        champ = await store.champion_of(pool, s, project, t.lineage.model)
        champ_ref = ModelRef(model_id=champ["model_id"], version=champ["version"]) if champ else None
        champ_metrics = await store.stored_metrics(pool, s, champ_ref, version) if champ_ref else None
        if candidate is None or (champ_ref is not None and champ_metrics is None):
            return await self.assess(t, project)
        failures = gate(candidate, champ_metrics, await self.policy(project))
        return Assessment(candidate=candidate, failures=failures, test_set_version=version, champion=champ_metrics,
                          champion_ref=champ_ref, report_uri=await store.report_of(pool, s, t.lineage.model, version))

    async def policy(self, project: str) -> Policy:
        """The project's policy: the environment's and the config file's, with the changes made at
        run time (`visionloop evaluator set`, read at every evaluation)."""
        pool, s = self.runtime.pool, quote_ident(self.runtime.schema)
        overrides = await store.gate_overrides(pool, s, project) if pool is not None else {}
        return decide.with_overrides(self.config.policy(project), overrides)

    async def assess(self, t: ModelTrained, project: str) -> Assessment:
        """Measure a candidate on its frozen test set (and the champion when needed) and gate it."""
        if (none := decide.without_test_set(t, project)) is not None:
            return none
        assert t.test_set is not None
        policy = await self.policy(project)
        loop = asyncio.get_running_loop()
        started = loop.time()
        tests = await self.test_set(t)
        loaded = loop.time()
        cand = await self.measure(t.weights_uri, t.weights_sha256, t.lineage.imgsz, tests, policy)
        measured = loop.time()
        champ_ref, champ_metrics, champ_measured = await self.champion(project, t.lineage.model, tests, policy)
        champion_done = loop.time()
        candidate = cand.metrics()
        failures = gate(candidate, champ_metrics, policy)
        report_uri = await self.report(t, cand, champ_ref, champ_metrics, failures, policy)
        done = loop.time()
        self.runtime.gauges.update({
            "evaluator.last.load_s": round(loaded - started, 3), "evaluator.last.measure_s": round(measured - loaded, 3),
            "evaluator.last.champion_s": round(champion_done - measured, 3), "evaluator.last.report_s": round(done - champion_done, 3),
        })
        log.info("%s v%d measured: test set in %.2f s, candidate %.2f s, champion %.2f s, report %.2f s", t.lineage.model.model_id,
                 t.lineage.model.version, loaded - started, measured - loaded, champion_done - measured, done - champion_done)
        return Assessment(
            candidate=candidate, failures=failures, test_set_version=t.test_set.version, champion=champ_metrics,
            champion_ref=champ_ref, champion_measured=champ_measured, report_uri=report_uri,
            images_per_s=len(tests.images) / (measured - loaded) if measured > loaded else None,
        )

    async def test_set(self, t: ModelTrained) -> LoadedTestSet:
        """The candidate's frozen test set: images decoded, labels, classes."""
        assert t.test_set is not None
        doc = read_manifest(await self.blobs.get(t.test_set.uri))
        found = LoadedTestSet(t.test_set.version, class_names=decide.metric_classes(doc["class_names"], t.lineage.class_names))
        for item in doc["images"]:
            image_id = item["image"]["image_id"]
            image = Image.open(io.BytesIO(await self.blobs.get(item["image"]["blob_uri"])))
            image.load()
            found.ids.append(image_id)
            found.images.append(image)
            found.truth[image_id] = [Box.model_validate(b) for b in item["boxes"]]
        return found

    async def champion(self, project: str, candidate: ModelRef, tests: LoadedTestSet, policy: Policy) -> tuple[ModelRef | None, Metrics | None, bool]:
        """The champion, its metrics on this test set version, and whether they were measured now."""
        pool, s = self.runtime.pool, quote_ident(self.runtime.schema)
        assert pool is not None
        champ = await store.champion_of(pool, s, project, candidate)
        if champ is None:
            return None, None, False
        ref = ModelRef(model_id=champ["model_id"], version=champ["version"])
        stored = await store.stored_metrics(pool, s, ref, tests.version)
        if stored is not None:
            return ref, stored, False
        measured = await self.measure(champ["weights_uri"], champ["weights_sha256"], champ["imgsz"], tests, policy)
        return ref, measured.metrics(), True

    async def report(self, t: ModelTrained, cand: Evaluation, champ_ref: ModelRef | None, champ_metrics: Metrics | None,
                     failures: list[Any], policy: Policy) -> str:
        """The report (JSON, PR curve and per-class PNGs) in the blob store; its URI."""
        assert t.test_set is not None
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
                plots[name] = (await self.blobs.put(content, content_type="image/png")).uri
        report = json.loads(files["report.json"])
        report["plots"] = plots
        report["policy"] = policy.model_dump(mode="json")
        return (await self.blobs.put(json.dumps(report, sort_keys=True, indent=1).encode(), content_type="application/json")).uri

    async def weights_file(self, uri: str, sha256: str) -> Path:
        path = self.work_dir / "weights" / f"{sha256}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(await self.blobs.get(uri))
            tmp.replace(path)
        return path

    async def measure(self, uri: str, sha256: str, imgsz: int, tests: LoadedTestSet, policy: Policy) -> Evaluation:
        weights = await self.weights_file(uri, sha256)
        found = await asyncio.to_thread(
            WARM_UP.after, predict, self.work_dir, weights, tests.images, imgsz=imgsz, device=policy.device, batch=policy.batch
        )
        preds = dict(zip(tests.ids, found, strict=True))
        return await asyncio.to_thread(evaluate, tests.truth, preds, tests.class_names, conf=policy.conf, match_iou=policy.match_iou)


def preload(state_dir: Path) -> None:
    """Import Ultralytics (torch) and matplotlib once, at start (`WARM_UP`)."""
    WARM_UP.run(_import_tools, state_dir)


def _import_tools(state_dir: Path) -> None:
    import importlib

    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        importlib.import_module(module)
    from visionloop.libs.yolo import YoloUnavailable, ultralytics

    try:
        ultralytics(state_dir)
    except YoloUnavailable as exc:
        log.warning("evaluator: %s", exc)
