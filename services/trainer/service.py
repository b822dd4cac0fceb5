"""trainer: step 6 of the loop. Verified samples become a model.

Consumes `label verified` into the project's dataset (PostgreSQL: each image's newest verified
label set, its provenance, its perceptual hashes and its role, `train` or `test`), `training
requested` commands, and what the loop later says of its models (`model evaluated`, `model
registered`: which one is the champion). Emits `model trained`, and training progress on the
status topic.

- **Test set.** Labels imported for the test set, and a hash-chosen share of new verified images
  until the project's test set is full, are `test` images: frozen, never trained on. Nor is a
  near duplicate of one (pHash + dHash within the dedup radius): it is left out of every
  training snapshot.
- **Triggers.** `min_new_images` new training images since the last run's snapshot, or a
  command, or both (per project). A run waits `queued` (one per project: later requests are
  coalesced into it) until no run of the project is `running`.
- **Runs.** A background worker claims queued runs (a lease in PostgreSQL, renewed while it
  trains: a replica that dies loses its run to the next one), snapshots the dataset into an
  immutable, content-hashed version, writes it out as a YOLO dataset from the blob store and
  trains in a child process (`child.py`): a crash or out-of-memory kill of the child fails the
  run, not the service, and a run past `time_limit_s` is killed. The child dies with the
  trainer (even a SIGKILLed one), so a run re-queued by the lease never trains twice at once.
  The first model of a project trains from the model yaml, or fine-tunes the operator's
  `base_checkpoint` with its classes mapped by name (`pretrained.py`; the mapping is kept with the
  run); later ones fine-tune the champion, its head extended by name for new classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

from visionloop.contracts import (
    Alias,
    DatasetRef,
    Envelope,
    LabelVerified,
    Lineage,
    Metrics,
    ModelEvaluated,
    ModelRef,
    ModelRegistered,
    ModelTrained,
    Progress,
    StatusKind,
    TrainingRequested,
    TrainMetrics,
)
from visionloop.libs.blob import BlobError
from visionloop.libs.bus import PermanentError, Runtime, Unit
from visionloop.libs.db import quote_ident
from visionloop.libs.formats import LabelledImage, file_name_for, write_yolo
from visionloop.libs.perceptual import hash_image
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.services.trainer import pretrained
from visionloop.services.trainer.config import TUNABLE, Policy, TrainerSettings
from visionloop.libs.manifest import Member, manifest
from visionloop.services.trainer.dataset import (
    assign_splits,
    label_hash,
    merge_taxonomy,
    near_test_duplicates,
    reserved_for_test,
    version_of,
)

log = logging.getLogger(__name__)

MAX_TRIGGERS = 20
"""Requests remembered on one queued run (the rest are coalesced into it, uncounted)."""


def model_line(project: str) -> str:
    """The model id of a project's detector line."""
    return f"{project}-detector"


class RunFailed(Exception):
    """A run ends without a model; `reason` is its code (`crashed`, `time_limit`, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _clip(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(1.0, max(0.0, number)) if number == number else 0.0


# -- dataset queries -------------------------------------------------------------------------------


async def taxonomy(conn: asyncpg.Connection, s: str, project: str) -> list[str]:
    """The project's class list (head order)."""
    stored = await conn.fetchval(f"SELECT class_names FROM {s}.taxonomies WHERE project = $1", project)
    return json.loads(stored) if stored else []


async def champion(conn: asyncpg.Connection | asyncpg.Pool, s: str, project: str) -> asyncpg.Record | None:
    """The model later runs fine-tune: the newest production model, else the newest that passed."""
    return await conn.fetchrow(
        f"""SELECT * FROM {s}.models WHERE project = $1 AND (production_at IS NOT NULL OR passed)
            ORDER BY production_at DESC NULLS LAST, version DESC LIMIT 1""",
        project,
    )


async def queue_run(conn: asyncpg.Connection, s: str, project: str, trigger: Mapping[str, Any], hyperparameters: Mapping[str, Any] | None = None) -> tuple[str, bool]:
    """Queue a run for `project`, or coalesce into the one already queued; (run id, new?)."""
    run_id = f"run-{uuid.uuid4().hex[:16]}"
    row = await conn.fetchrow(
        f"""INSERT INTO {s}.runs (run_id, project, status, triggers, hyperparameters)
            VALUES ($1, $2, 'queued', jsonb_build_array($3::jsonb), $4::jsonb)
            ON CONFLICT (project) WHERE status = 'queued' DO UPDATE SET
                triggers = CASE WHEN jsonb_array_length({s}.runs.triggers) < {MAX_TRIGGERS}
                                THEN {s}.runs.triggers || EXCLUDED.triggers ELSE {s}.runs.triggers END,
                hyperparameters = {s}.runs.hyperparameters || EXCLUDED.hyperparameters
            RETURNING run_id, (xmax = 0) AS inserted""",
        run_id, project, json.dumps(dict(trigger)), json.dumps(dict(hyperparameters or {})),
    )
    return row["run_id"], row["inserted"]


async def runs_report(pool: asyncpg.Pool, schema: str, project: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent runs, newest first (the CLI and dashboards)."""
    s = quote_ident(schema)
    rows = await pool.fetch(
        f"""SELECT run_id, project, status, reason, error, attempts, epoch, dataset_version, test_set_version,
                   model_id, version, triggers, base_checkpoint, created_at, started_at, finished_at
            FROM {s}.runs WHERE $1::text IS NULL OR project = $1 ORDER BY created_at DESC LIMIT $2""",
        project, limit,
    )
    out = []
    for r in rows:
        row = dict(r)
        row["triggers"] = json.loads(row["triggers"])
        row["base_checkpoint"] = json.loads(row["base_checkpoint"]) if row["base_checkpoint"] else None
        for key in ("created_at", "started_at", "finished_at"):
            row[key] = row[key].isoformat() if row[key] else None
        out.append(row)
    return out


# -- the service ---------------------------------------------------------------------------------


def wire(runtime: Runtime, adapters: Adapters, config: TrainerSettings) -> None:
    """Register the trainer's handlers and its run worker on the runtime."""
    blobs = adapters.blobs
    work_dir = (runtime.settings.state_dir / "trainer").resolve()
    wake = asyncio.Event()

    async def on_verified(event: Envelope[LabelVerified], unit: Unit[Any]) -> None:
        """Add a verified label set to the project's dataset; queue a run when enough are new."""
        v, project, s = event.payload, event.project, unit.schema
        policy = config.policy(project)
        boxes = [b.model_dump(mode="json", exclude={"score"}) for b in v.boxes]
        h = label_hash(boxes)
        # The image's hashes, read and computed before the project lock (a relabelled image has them already).
        known = await unit.conn.fetchrow(
            f"SELECT phash, dhash FROM {s}.samples WHERE project = $1 AND image_id = $2", project, v.image.image_id
        )
        phash, dhash = (known["phash"], known["dhash"]) if known is not None else await hashes(v.image.blob_uri)
        await unit.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-trainer:{project}")
        existing = await unit.conn.fetchrow(
            f"SELECT role, label_hash FROM {s}.samples WHERE project = $1 AND image_id = $2", project, v.image.image_id
        )
        stored = await taxonomy(unit.conn, s, project)
        merged = merge_taxonomy(stored, v.class_names, (b.class_name for b in v.boxes))
        if merged != stored:
            await unit.conn.execute(
                f"""INSERT INTO {s}.taxonomies (project, class_names) VALUES ($1, $2::jsonb)
                    ON CONFLICT (project) DO UPDATE SET class_names = EXCLUDED.class_names, updated_at = now()""",
                project, json.dumps(merged),
            )
        if existing is not None and existing["label_hash"] == h and not (v.for_test_set and existing["role"] != "test"):
            runtime.counters["labels_unchanged"] += 1
            return
        if v.for_test_set:
            role = "test"
            if existing is not None and existing["role"] == "train":
                runtime.counters["moved_to_test"] += 1
                log.warning("%s: image %s was a training image and is now in the test set", project, v.image.image_id[:12])
        elif existing is not None:
            role = existing["role"]
        else:
            test_count = await unit.conn.fetchval(f"SELECT count(*) FROM {s}.samples WHERE project = $1 AND role = 'test'", project)
            role = "test" if test_count < policy.test_set_size and reserved_for_test(v.image.image_id, policy.test_fraction) else "train"
        await unit.conn.execute(
            f"""INSERT INTO {s}.samples (project, image_id, label_id, image, boxes, label_hash, provenance, role, phash, dhash)
                VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7::jsonb, $8, $9, $10)
                ON CONFLICT (project, image_id) DO UPDATE SET label_id = EXCLUDED.label_id, image = EXCLUDED.image,
                    boxes = EXCLUDED.boxes, label_hash = EXCLUDED.label_hash, provenance = EXCLUDED.provenance,
                    role = EXCLUDED.role, seq = nextval('{s}.sample_seq'), verified_at = now()""",
            project, v.image.image_id, v.label_id, v.image.model_dump_json(), json.dumps(boxes), h,
            v.provenance.model_dump_json(), role, phash, dhash,
        )
        runtime.counters[f"samples_{role}"] += 1
        if role == "train" and policy.trigger in ("count", "both"):
            await maybe_trigger(unit, project, policy)

    async def hashes(blob_uri: str) -> tuple[str | None, str | None]:
        try:
            data = await blobs.get(blob_uri)
        except BlobError as exc:
            raise PermanentError(f"image_missing: {exc}") from exc
        try:
            found, _ = await asyncio.to_thread(hash_image, data)
        except Exception as exc:  # unreadable image: it cannot train either
            raise PermanentError(f"image_unreadable: {exc}") from exc
        return found.phash_hex, found.dhash_hex

    async def maybe_trigger(unit: Unit[Any], project: str, policy: Policy) -> None:
        s = unit.schema
        if await unit.conn.fetchval(f"SELECT true FROM {s}.runs WHERE project = $1 AND status = 'queued'", project):
            return
        since = await unit.conn.fetchval(f"SELECT coalesce(max(snapshot_seq), 0) FROM {s}.runs WHERE project = $1", project)
        new = await unit.conn.fetchval(
            f"SELECT count(*) FROM {s}.samples WHERE project = $1 AND role = 'train' AND seq > $2", project, since
        )
        if new >= policy.min_new_images:
            run_id, _ = await queue_run(unit.conn, s, project, {"kind": "count", "new_images": new})
            runtime.counters["runs_queued"] += 1
            log.info("%s: %d new verified images: run %s queued", project, new, run_id)
            wake.set()

    async def on_requested(event: Envelope[TrainingRequested], unit: Unit[Any]) -> None:
        """Queue a run now (or coalesce into the queued one), with this run's overrides."""
        req, project = event.payload, event.project
        policy = config.policy(project)
        unknown = sorted(set(req.hyperparameters) - TUNABLE)
        if unknown:
            raise PermanentError(f"unknown_hyperparameter: {', '.join(unknown)} (allowed: {', '.join(sorted(TUNABLE))})")
        if policy.trigger == "count":
            runtime.counters["requests_ignored"] += 1
            log.warning("%s: training requested by %s ignored: the project trains on label counts only", project, req.requested_by)
            return
        run_id, new = await queue_run(
            unit.conn, unit.schema, project,
            {"kind": req.trigger.value, "requested_by": req.requested_by, "event_id": str(event.event_id)},
            req.hyperparameters,
        )
        runtime.counters["runs_queued" if new else "requests_coalesced"] += 1
        wake.set()

    async def on_evaluated(event: Envelope[ModelEvaluated], unit: Unit[Any]) -> None:
        """Remember which of its models passed the gate (the champion fine-tuning starts from)."""
        ref = event.payload.lineage.model
        await unit.conn.execute(
            f"UPDATE {unit.schema}.models SET passed = $3 WHERE model_id = $1 AND version = $2 AND project = $4",
            ref.model_id, ref.version, event.payload.passed, event.project,
        )

    async def on_registered(event: Envelope[ModelRegistered], unit: Unit[Any]) -> None:
        """A model promoted to production is the champion from now on (also after a rollback)."""
        if Alias.PRODUCTION not in event.payload.aliases:
            return
        ref = event.payload.lineage.model
        await unit.conn.execute(
            f"UPDATE {unit.schema}.models SET production_at = now() WHERE model_id = $1 AND version = $2 AND project = $3",
            ref.model_id, ref.version, event.project,
        )

    # -- the run worker ----------------------------------------------------------------------------

    async def worker() -> None:
        """Claim and run queued trainings, one at a time per project, until stopped."""
        assert runtime.pool is not None
        while True:
            await sweep_expired()
            run = await claim()
            if run is None:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), config.poll_interval_s)
                continue
            await execute(run)

    async def sweep_expired() -> None:
        """Runs whose trainer died under them (lease gone): queue them again, or fail them."""
        assert runtime.pool is not None
        s = quote_ident(runtime.schema)
        async with runtime.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT run_id, project, attempts, triggers FROM {s}.runs WHERE status = 'running' AND lease_until < now() FOR UPDATE SKIP LOCKED"
            )
            for row in rows:
                queued = await conn.fetchval(f"SELECT run_id FROM {s}.runs WHERE project = $1 AND status = 'queued'", row["project"])
                if row["attempts"] < config.policy(row["project"]).max_attempts and queued is None:
                    await conn.execute(
                        f"UPDATE {s}.runs SET status = 'queued', owner = NULL, pid = NULL, lease_until = NULL WHERE run_id = $1", row["run_id"]
                    )
                    log.warning("run %s lost its trainer; queued again", row["run_id"])
                else:
                    await conn.execute(
                        f"""UPDATE {s}.runs SET status = 'failed', reason = 'trainer_lost', finished_at = now(),
                            error = 'the trainer running it stopped and it was not started again' WHERE run_id = $1""",
                        row["run_id"],
                    )
                    runtime.counters["runs_failed_trainer_lost"] += 1

    async def claim() -> dict[str, Any] | None:
        assert runtime.pool is not None
        s = quote_ident(runtime.schema)
        row = await runtime.pool.fetchrow(
            f"""UPDATE {s}.runs SET status = 'running', owner = $1, attempts = attempts + 1, started_at = now(),
                    lease_until = now() + make_interval(secs => $2)
                WHERE run_id = (
                    SELECT r.run_id FROM {s}.runs r WHERE r.status = 'queued'
                      AND NOT EXISTS (SELECT 1 FROM {s}.runs x WHERE x.project = r.project AND x.status = 'running')
                    ORDER BY r.created_at FOR UPDATE SKIP LOCKED LIMIT 1)
                RETURNING *""",
            runtime.producer, config.lease_s,
        )
        return dict(row) if row else None

    async def execute(run: dict[str, Any]) -> None:
        run_id, project = run["run_id"], run["project"]
        policy = config.policy(project)
        started = time.monotonic()
        renewer = asyncio.create_task(renew(run_id), name=f"trainer-lease-{run_id}")
        try:
            outcome = await train_run(run, policy, started)
        except RunFailed as exc:
            await finish_failed(run_id, project, exc.reason, str(exc))
        except asyncio.CancelledError:
            # Stopping: the run goes back to the queue at once (this start does not count).
            with contextlib.suppress(Exception):
                assert runtime.pool is not None
                await asyncio.shield(runtime.pool.execute(
                    f"UPDATE {quote_ident(runtime.schema)}.runs SET lease_until = now() - interval '1 second', attempts = attempts - 1 WHERE run_id = $1",
                    run_id,
                ))
            raise
        except Exception as exc:
            log.exception("run %s failed", run_id)
            await finish_failed(run_id, project, "internal_error", f"{type(exc).__name__}: {exc}")
        else:
            runtime.counters["runs_succeeded"] += 1
            log.info("run %s: %s v%d trained in %.1f s", run_id, outcome.model_id, outcome.version, time.monotonic() - started)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        with contextlib.suppress(Exception):
            await prune()

    async def prune() -> None:
        """Delete local run folders and datasets beyond the newest `keep_runs` runs of each project."""
        assert runtime.pool is not None
        rows = await runtime.pool.fetch(
            f"""SELECT run_id, dataset_version, (n <= $1 OR status IN ('queued', 'running')) AS keep FROM (
                    SELECT run_id, dataset_version, status, row_number() OVER (PARTITION BY project ORDER BY created_at DESC) AS n
                    FROM {quote_ident(runtime.schema)}.runs) ranked""",
            config.keep_runs,
        )
        kept_runs = {r["run_id"] for r in rows if r["keep"]}
        kept_data = {r["dataset_version"] for r in rows if r["keep"] and r["dataset_version"]}
        known_runs = {r["run_id"] for r in rows}
        for kind, keep, known in (("runs", kept_runs, known_runs), ("datasets", kept_data, None)):
            folder = work_dir / kind
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                # Only what this trainer's table knows is deleted (another replica's fresh folder is not).
                if path.name not in keep and (known is None or path.name in known):
                    await asyncio.to_thread(shutil.rmtree, path, True)
                    runtime.counters[f"pruned_{kind}"] += 1

    async def renew(run_id: str) -> None:
        assert runtime.pool is not None
        s = quote_ident(runtime.schema)
        while True:
            await asyncio.sleep(config.lease_s / 3)
            with contextlib.suppress(Exception):
                await runtime.pool.execute(
                    f"UPDATE {s}.runs SET lease_until = now() + make_interval(secs => $2) WHERE run_id = $1 AND status = 'running'",
                    run_id, config.lease_s,
                )

    async def finish_failed(run_id: str, project: str, reason: str, message: str) -> None:
        assert runtime.pool is not None
        await runtime.pool.execute(
            f"""UPDATE {quote_ident(runtime.schema)}.runs SET status = 'failed', reason = $2, error = $3, finished_at = now(), pid = NULL
                WHERE run_id = $1""",
            run_id, reason, message[:4000],
        )
        runtime.counters[f"runs_failed_{reason}"] += 1
        log.warning("run %s (%s) failed: %s: %s", run_id, project, reason, message)
        await runtime.status(
            StatusKind.FAILED,
            progress=Progress(task="training", task_id=run_id, step=0, message=f"{project}: {reason}"),
            message=f"training run {run_id} of {project} failed ({reason}): {message}"[:1024],
        )

    async def train_run(run: dict[str, Any], policy: Policy, started: float) -> ModelRef:
        run_id, project = run["run_id"], run["project"]
        snap = await snapshot(run_id, project, policy)
        folder = work_dir / "runs" / run_id
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        parent = snap["champion"]
        base = _base_checkpoint(policy) if parent is None else None
        data = await materialise(snap)
        hyper = hyperparameters(policy, json.loads(run["hyperparameters"]), first=parent is None and base is None)
        job = {
            "state_dir": str(work_dir),
            "data": str(data),
            "out_dir": str(folder / "out"),
            "model": policy.model_yaml,
            "parent_class_names": None,
            "class_names": snap["class_names"],
            "hyperparameters": hyper,
            "device": policy.device,
            "base_checkpoint": str(base) if base else None,
        }
        if parent is not None:
            weights = folder / "parent.pt"
            weights.write_bytes(await blobs.get(parent["weights_uri"]))
            job["model"] = str(weights)
            job["parent_class_names"] = json.loads(parent["class_names"])
        (folder / "job.json").write_text(json.dumps(job, indent=2))
        result = await run_child(run_id, project, folder, policy)
        weights_path = Path(result["weights"])
        if not weights_path.is_file():
            raise RunFailed("no_weights", f"the run reported {weights_path} but it is not there")
        ref = await blobs.put_file(weights_path, content_type="application/octet-stream")
        return await finish_succeeded(run, snap, parent, hyper, result, ref.uri, ref.sha256, time.monotonic() - started)

    async def snapshot(run_id: str, project: str, policy: Policy) -> dict[str, Any]:
        """Freeze the dataset for this run: test set and training version, manifests in the blob store."""
        assert runtime.pool is not None
        s = quote_ident(runtime.schema)
        async with runtime.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-trainer:{project}")
            class_names = await taxonomy(conn, s, project)
            rows = await conn.fetch(
                f"SELECT image_id, image, boxes, label_hash, role, phash, dhash, seq FROM {s}.samples WHERE project = $1", project
            )
            best = await champion(conn, s, project)
        if not class_names:
            raise RunFailed("not_enough_data", f"{project} has no classes yet")
        test_rows = [r for r in rows if r["role"] == "test"]
        test_members = [Member(json.loads(r["image"]), json.loads(r["boxes"]), r["label_hash"], "test") for r in test_rows]
        near = near_test_duplicates(
            [(r["image_id"], r["phash"], r["dhash"]) for r in rows if r["role"] == "train"],
            [(r["phash"], r["dhash"]) for r in test_rows],
            policy.near_duplicate_radius,
        )
        train_rows = [r for r in rows if r["role"] == "train" and r["image_id"] not in near]
        members = assign_splits([(json.loads(r["image"]), json.loads(r["boxes"]), r["label_hash"]) for r in train_rows], policy.val_fraction)
        snapshot_seq = max((r["seq"] for r in rows), default=0)
        test_ref: DatasetRef | None = None
        if test_members:
            version = version_of("ts", class_names, test_members)
            blob = await blobs.put(manifest(project, version, class_names, test_members), content_type="application/json")
            test_ref = DatasetRef(version=version, uri=blob.uri, images=len(test_members))
        version = version_of("ds", class_names, members)
        blob = await blobs.put(manifest(project, version, class_names, members), content_type="application/json")
        train_n = sum(m.split == "train" for m in members)
        val_n = len(members) - train_n
        async with runtime.pool.acquire() as conn, conn.transaction():
            if test_ref is not None:
                await conn.execute(
                    f"INSERT INTO {s}.test_sets (version, project, images, uri) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    test_ref.version, project, test_ref.images, test_ref.uri,
                )
            await conn.execute(
                f"""INSERT INTO {s}.dataset_versions (version, project, class_names, train_images, val_images, excluded_near_test, test_set_version, uri)
                    VALUES ($1, $2, $3::jsonb, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING""",
                version, project, json.dumps(class_names), train_n, val_n, len(near), test_ref.version if test_ref else None, blob.uri,
            )
            await conn.execute(
                f"UPDATE {s}.runs SET snapshot_seq = $2, dataset_version = $3, test_set_version = $4 WHERE run_id = $1",
                run_id, snapshot_seq, version, test_ref.version if test_ref else None,
            )
        runtime.counters["near_test_excluded"] += len(near)
        if len(members) < policy.min_train_images:
            raise RunFailed("not_enough_data", f"{len(members)} training images (after {len(near)} near duplicates of test images); at least {policy.min_train_images} needed")
        return {
            "version": version, "uri": blob.uri, "members": members, "class_names": class_names,
            "train_images": train_n, "val_images": val_n, "test": test_ref, "champion": dict(best) if best else None,
        }

    async def materialise(snap: dict[str, Any]) -> Path:
        """The dataset version as an Ultralytics YOLO dataset on local disk (reused when present)."""
        root = work_dir / "datasets" / snap["version"]
        done = root / ".complete"
        if done.exists():
            return root / "data.yaml"
        shutil.rmtree(root, ignore_errors=True)
        from visionloop.contracts import Box

        images = [
            LabelledImage(
                file_name=file_name_for(m.image_id, str(m.image.get("format", "JPEG"))),
                width=int(m.image["width"]), height=int(m.image["height"]),
                boxes=tuple(Box.model_validate(b) for b in m.boxes), split=m.split, image_id=m.image_id,
            )
            for m in snap["members"]
        ]
        data = await asyncio.to_thread(write_yolo, root, images, snap["class_names"])
        gate = asyncio.Semaphore(16)

        async def fetch(member: Member, image: LabelledImage) -> None:
            async with gate:
                try:
                    content = await blobs.get(str(member.image["blob_uri"]))
                except BlobError as exc:
                    raise RunFailed("image_missing", f"image {member.image_id} of the dataset: {exc}") from exc
            path = root / "images" / image.split / image.file_name
            await asyncio.to_thread(path.write_bytes, content)

        await asyncio.gather(*(fetch(m, i) for m, i in zip(snap["members"], images, strict=True)))
        done.write_text(snap["version"])
        return data

    async def run_child(run_id: str, project: str, folder: Path, policy: Policy) -> dict[str, Any]:
        """Train in a child process; stream its progress; kill it past the time limit."""
        assert runtime.pool is not None
        s = quote_ident(runtime.schema)
        stderr = open(folder / "train.log", "wb")  # noqa: SIM115 - closed below
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() or 1)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "visionloop.services.trainer.child", str(folder / "job.json"),
            stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True, cwd=folder, env=env,
            preexec_fn=_die_with_trainer,
        )
        await runtime.pool.execute(f"UPDATE {s}.runs SET pid = $2 WHERE run_id = $1", run_id, proc.pid)
        await runtime.status(StatusKind.PROGRESS, progress=Progress(task="training", task_id=run_id, step=0, message=f"{project}: started"))
        result: dict[str, Any] = {}
        error: dict[str, Any] = {}

        async def read() -> None:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(line, dict):
                    continue
                if line.get("event") == "epoch":
                    await progress(run_id, project, line)
                elif line.get("event") == "start" and isinstance(line.get("base_checkpoint"), dict):
                    await started_from(run_id, project, line["base_checkpoint"])
                elif line.get("event") == "done":
                    result.update(line)
                elif line.get("event") == "error":
                    error.update(line)
            await proc.wait()

        try:
            await asyncio.wait_for(read(), policy.time_limit_s)
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            raise RunFailed("time_limit", f"still training after {policy.time_limit_s:.0f} s; killed") from None
        except BaseException:
            _kill(proc)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        finally:
            stderr.close()
        code = proc.returncode
        if code == 0 and result:
            return result
        if error:
            raise RunFailed(str(error.get("reason") or "training_error"), f"{error.get('type', 'error')}: {error.get('message', '')}")
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            raise RunFailed("crashed", f"the training process was killed by {name} (out of memory, or killed){_tail(folder / 'train.log')}")
        raise RunFailed("crashed", f"the training process exited with status {code}{_tail(folder / 'train.log')}")

    async def started_from(run_id: str, project: str, record: dict[str, Any]) -> None:
        """Keep a base checkpoint's class mapping with the run, and say it on the status topic."""
        assert runtime.pool is not None
        try:
            await runtime.pool.execute(
                f"UPDATE {quote_ident(runtime.schema)}.runs SET base_checkpoint = $2::jsonb WHERE run_id = $1", run_id, json.dumps(record)
            )
        except Exception as exc:  # the training goes on; the mapping is still in its train.log and the log line below
            log.warning("run %s: could not record its base checkpoint mapping: %s", run_id, exc)
        log.info("run %s (%s): %s", run_id, project, pretrained.summary(record, limit=4000))
        await runtime.status(StatusKind.PROGRESS, progress=Progress(task="training", task_id=run_id, step=0, message=f"{project}: {pretrained.summary(record)}"))

    async def progress(run_id: str, project: str, line: dict[str, Any]) -> None:
        metrics = {f"loss.{k}": float(v) for k, v in (line.get("losses") or {}).items() if isinstance(v, int | float)}
        metrics |= {f"val.{k}": float(v) for k, v in (line.get("metrics") or {}).items() if isinstance(v, int | float)}
        epoch = int(line.get("epoch", 0))
        runtime.gauges[f"training.{project}.epoch"] = float(epoch)
        assert runtime.pool is not None
        with contextlib.suppress(Exception):
            await runtime.pool.execute(f"UPDATE {quote_ident(runtime.schema)}.runs SET epoch = $2 WHERE run_id = $1", run_id, epoch)
        await runtime.status(
            StatusKind.PROGRESS,
            progress=Progress(task="training", task_id=run_id, step=epoch, total=line.get("epochs"), metrics=metrics, message=project),
        )

    async def finish_succeeded(
        run: dict[str, Any], snap: dict[str, Any], parent: dict[str, Any] | None, hyper: dict[str, Any],
        result: dict[str, Any], weights_uri: str, weights_sha: str, duration: float,
    ) -> ModelRef:
        run_id, project = run["run_id"], run["project"]
        model_id = model_line(project)
        val = result.get("val") or {}
        async with runtime.transaction() as unit:
            s = unit.schema
            await unit.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-trainer-models:{model_id}")
            version = await unit.conn.fetchval(f"SELECT coalesce(max(version), 0) + 1 FROM {s}.models WHERE model_id = $1", model_id)
            ref = ModelRef(model_id=model_id, version=version)
            await unit.conn.execute(
                f"""INSERT INTO {s}.models (model_id, version, project, run_id, weights_uri, weights_sha256, class_names, imgsz)
                    VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)""",
                model_id, version, project, run_id, weights_uri, weights_sha, json.dumps(snap["class_names"]), int(hyper["imgsz"]),
            )
            await unit.conn.execute(
                f"""UPDATE {s}.runs SET status = 'succeeded', model_id = $2, version = $3, finished_at = now(), pid = NULL
                    WHERE run_id = $1""",
                run_id, model_id, version,
            )
            unit.emit(
                ModelTrained(
                    lineage=Lineage(
                        model=ref,
                        parent=ModelRef(model_id=parent["model_id"], version=parent["version"]) if parent else None,
                        dataset_version=snap["version"],
                        class_names=snap["class_names"],
                        imgsz=int(hyper["imgsz"]),
                    ),
                    run_id=run_id,
                    weights_uri=weights_uri,
                    weights_sha256=weights_sha,
                    metrics=TrainMetrics(
                        epochs=int(result.get("epochs") or 0),
                        best_epoch=result.get("best_epoch"),
                        val=Metrics(
                            map50_95=_clip(val.get("map50_95")), map50=_clip(val.get("map50")),
                            precision=_clip(val.get("precision")), recall=_clip(val.get("recall")),
                            images=snap["val_images"],
                        ) if val else None,
                        train_images=snap["train_images"],
                        val_images=snap["val_images"],
                        final_losses={k: float(x) for k, x in (result.get("final_losses") or {}).items() if isinstance(x, int | float)},
                    ),
                    hyperparameters=hyper,
                    device=str(result.get("device") or "cpu")[:32],
                    duration_s=duration,
                    dataset=DatasetRef(version=snap["version"], uri=snap["uri"], images=len(snap["members"])),
                    test_set=snap["test"],
                ),
                project=project,
            )
        await runtime.status(
            StatusKind.PROGRESS,
            progress=Progress(task="training", task_id=run_id, step=int(result.get("epochs") or 0), total=int(result.get("epochs") or 0),
                              message=f"{project}: {model_id} v{version} trained"),
        )
        return ref

    runtime.consume(LabelVerified, on_verified)
    runtime.consume(TrainingRequested, on_requested)
    runtime.consume(ModelEvaluated, on_evaluated)
    runtime.consume(ModelRegistered, on_registered)
    runtime.produces(ModelTrained)
    runtime.background("runs", worker)


def hyperparameters(policy: Policy, overrides: Mapping[str, Any], *, first: bool) -> dict[str, Any]:
    """The Ultralytics train arguments of a run: policy defaults, the project's extras, the command's overrides."""
    base: dict[str, Any] = {
        "epochs": policy.epochs if first else policy.finetune_epochs,
        "imgsz": policy.imgsz,
        "batch": policy.batch,
        "patience": policy.patience,
    }
    extras = {k: v for k, v in policy.train_args.items() if k in TUNABLE}
    return base | extras | {k: v for k, v in overrides.items() if k in TUNABLE}


def _base_checkpoint(policy: Policy) -> Path | None:
    """The policy's base checkpoint as an absolute path (the child runs elsewhere); RunFailed when it is not there."""
    if not policy.base_checkpoint:
        return None
    path = Path(policy.base_checkpoint).expanduser().resolve()
    if not path.is_file():
        raise RunFailed(pretrained.MISSING, f"base checkpoint {path} does not exist: fix or unset the trainer's base_checkpoint setting")
    return path


def _die_with_trainer() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: the kernel SIGKILLs the child when the trainer dies, even by SIGKILL. Without this an
    # orphaned child (its own session, so no signal reaches it) trained on for the rest of its epoch
    # while the next trainer ran the re-queued run again, two trainings on the same cores.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return (": " + " | ".join(line.strip() for line in text))[:1500] if text else ""


SPEC = ServiceSpec(
    name="trainer",
    description="Keeps each project's dataset and trains its next model (in a child process) when enough labels are new.",
    wire=wire,
    settings=TrainerSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
