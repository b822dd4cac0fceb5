"""The trainer's handlers, one per consumed topic: `label verified` into the dataset (and a run
queued when enough training images are new), `training requested`, and what the loop says of its
models (`model evaluated`, `model registered`). Each takes the trainer's `Context` first; the
wiring binds it (`service.py`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from visionloop.contracts import (
    Alias,
    Envelope,
    LabelVerified,
    ModelEvaluated,
    ModelRegistered,
    TrainingRequested,
)
from visionloop.libs.blob import BlobError, BlobStore
from visionloop.libs.bus import PermanentError, Unit
from visionloop.libs.perceptual import hash_image
from visionloop.services.trainer import decide, store
from visionloop.services.trainer.config import TUNABLE, TrainerSettings
from visionloop.services.trainer.dataset import label_hash, merge_taxonomy

log = logging.getLogger("visionloop.services.trainer.service")


@dataclass
class Context:
    """What the handlers share: the settings, the blob store, the counters, and the run worker's
    wake-up (set when a run is queued)."""

    config: TrainerSettings
    blobs: BlobStore
    counters: Counter[str]
    wake: asyncio.Event = field(default_factory=asyncio.Event)


async def on_verified(ctx: Context, event: Envelope[LabelVerified], unit: Unit[Any]) -> None:
    """Add a verified label set to the project's dataset; queue a run when enough are new."""
    v, project, s = event.payload, event.project, unit.schema
    policy = ctx.config.policy(project)
    boxes = [b.model_dump(mode="json", exclude={"score"}) for b in v.boxes]
    h = label_hash(boxes)
    # The image's hashes, read and computed before the project lock (a relabelled image has them already).
    known = await store.sample(unit.conn, s, project, v.image.image_id)
    phash, dhash = (known["phash"], known["dhash"]) if known is not None else await _hashes(ctx, v.image.blob_uri)
    await store.lock_project(unit.conn, project)
    existing = await store.sample(unit.conn, s, project, v.image.image_id)
    stored = await store.taxonomy(unit.conn, s, project)
    merged = merge_taxonomy(stored, v.class_names, (b.class_name for b in v.boxes))
    if merged != stored:
        await store.save_taxonomy(unit.conn, s, project, merged)
    if decide.unchanged(existing, h, for_test_set=v.for_test_set):
        ctx.counters["labels_unchanged"] += 1
        return
    if v.for_test_set and existing is not None and existing["role"] == "train":
        ctx.counters["moved_to_test"] += 1
        log.warning("%s: image %s was a training image and is now in the test set", project, v.image.image_id[:12])
    tests = await store.test_count(unit.conn, s, project) if decide.needs_test_count(existing, for_test_set=v.for_test_set) else 0
    role = decide.role_of(existing, for_test_set=v.for_test_set, image_id=v.image.image_id, test_count=tests, policy=policy)
    await store.save_sample(
        unit.conn, s, project=project, image_id=v.image.image_id, label_id=v.label_id, image=v.image.model_dump_json(),
        boxes=json.dumps(boxes), label_hash=h, provenance=v.provenance.model_dump_json(), role=role, phash=phash, dhash=dhash,
    )
    ctx.counters[f"samples_{role}"] += 1
    if v.provenance.batch_id is not None:
        ctx.wake.set()  # a run an import asked for may be whole now
        return  # imported labels never fire the count trigger: the import asks for its own run
    if role == "train" and policy.trigger in ("count", "both"):
        new = await store.new_training_images(unit.conn, s, project)
        if new is not None and decide.count_trigger(policy, new):
            run_id, _ = await store.queue_run(unit.conn, s, project, {"kind": "count", "new_images": new})
            ctx.counters["runs_queued"] += 1
            log.info("%s: %d new verified images: run %s queued", project, new, run_id)
            ctx.wake.set()


async def _hashes(ctx: Context, blob_uri: str) -> tuple[str | None, str | None]:
    try:
        data = await ctx.blobs.get(blob_uri)
    except BlobError as exc:
        raise PermanentError(f"image_missing: {exc}") from exc
    try:
        found, _ = await asyncio.to_thread(hash_image, data)
    except Exception as exc:  # unreadable image: it cannot train either
        raise PermanentError(f"image_unreadable: {exc}") from exc
    return found.phash_hex, found.dhash_hex


async def on_requested(ctx: Context, event: Envelope[TrainingRequested], unit: Unit[Any]) -> None:
    """Queue a run now (or coalesce into the queued one), with this run's overrides."""
    req, project = event.payload, event.project
    policy = ctx.config.policy(project)
    unknown = sorted(set(req.hyperparameters) - TUNABLE)
    if unknown:
        raise PermanentError(f"unknown_hyperparameter: {', '.join(unknown)} (allowed: {', '.join(sorted(TUNABLE))})")
    if policy.trigger == "count":
        ctx.counters["requests_ignored"] += 1
        log.warning("%s: training requested by %s ignored: the project trains on label counts only", project, req.requested_by)
        return
    trigger = {"kind": req.trigger.value, "requested_by": req.requested_by, "event_id": str(event.event_id)}
    waits = decide.import_wait(req, policy)
    if waits is not None:
        trigger |= {"import_id": req.import_id, "import_labels": req.import_labels}
    run_id, new = await store.queue_run(unit.conn, unit.schema, project, trigger, req.hyperparameters,
                                        waits_for=waits, wait_s=policy.import_wait_s if waits else None)
    ctx.counters["runs_queued" if new else "requests_coalesced"] += 1
    if waits is not None:
        log.info("%s: import %s asks for run %s: it starts once its %d label sets are in (at most %.0f s)",
                 project, req.import_id, run_id, waits["labels"], policy.import_wait_s)
    ctx.wake.set()


async def on_evaluated(ctx: Context, event: Envelope[ModelEvaluated], unit: Unit[Any]) -> None:
    """Remember the gate's verdict on its model: which passed (the champion fine-tuning starts
    from), the test set's figures and the reasons of a failure (`visionloop trainer runs`)."""
    evaluated = event.payload
    ref = evaluated.lineage.model
    await store.mark_passed(
        unit.conn, unit.schema, event.project, ref.model_id, ref.version, evaluated.passed,
        map50_95=evaluated.candidate.map50_95, map50=evaluated.candidate.map50,
        failures=[f.model_dump(mode="json", exclude_none=True) for f in evaluated.failures],
    )


async def on_registered(ctx: Context, event: Envelope[ModelRegistered], unit: Unit[Any]) -> None:
    """A model promoted to production is the champion from now on (also after a rollback)."""
    if Alias.PRODUCTION not in event.payload.aliases:
        return
    ref = event.payload.lineage.model
    await store.mark_production(unit.conn, unit.schema, event.project, ref.model_id, ref.version)
