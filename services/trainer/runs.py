"""The trainer's run worker: claims queued runs (a lease in PostgreSQL, renewed while it trains),
snapshots the dataset into an immutable version, writes it out as a YOLO dataset and trains in a
child process (`child.py`), then records the model and emits `model trained`. A run whose
trainer died is queued again (or failed) by the next sweep; a run past `time_limit_s` is killed."""

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
from pathlib import Path
from typing import Any

from visionloop.contracts import Box, DatasetRef, ModelRef, Progress, StatusKind
from visionloop.libs.blob import BlobError
from visionloop.libs.bus import Runtime
from visionloop.libs.db import quote_ident
from visionloop.libs.formats import LabelledImage, file_name_for, write_yolo
from visionloop.libs.manifest import Member, manifest
from visionloop.libs.yolo import cpu_threads
from visionloop.services.trainer import decide, pretrained, store
from visionloop.services.trainer.config import Policy
from visionloop.services.trainer.dataset import (
    assign_splits,
    exclusions,
    near_test_duplicates,
    version_of,
)
from visionloop.services.trainer.handlers import Context

log = logging.getLogger("visionloop.services.trainer.service")


class RunFailed(Exception):
    """A run ends without a model; `reason` is its code (`crashed`, `time_limit`, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RunWorker:
    """Claims and trains queued runs, one at a time per project (`runtime.background`)."""

    def __init__(self, runtime: Runtime, ctx: Context) -> None:
        self.runtime, self.ctx, self.config, self.blobs = runtime, ctx, ctx.config, ctx.blobs
        self.work_dir = (runtime.settings.state_dir / "trainer").resolve()
        self.children: dict[str, asyncio.subprocess.Process] = {}
        """The training child of each run this worker runs now."""

    @property
    def s(self) -> str:
        return quote_ident(self.runtime.schema)

    @property
    def pool(self) -> Any:
        assert self.runtime.pool is not None
        return self.runtime.pool

    async def __call__(self) -> None:
        """Claim and run queued trainings until stopped."""
        while True:
            await self.sweep_expired()
            run = await store.claim(self.pool, self.s, self.runtime.producer, self.config.lease_s)
            if run is None:
                self.ctx.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ctx.wake.wait(), self.config.poll_interval_s)
                continue
            await self.execute(run)

    async def sweep_expired(self) -> None:
        """Runs whose trainer died under them (lease gone): queue them again, or fail them."""
        async with self.pool.acquire() as conn, conn.transaction():
            for row in await store.expired_runs(conn, self.s):
                queued = await store.queued_run(conn, self.s, row["project"])
                policy = self.config.policy(row["project"])
                if decide.lost_run_fate(row["attempts"], policy, another_queued=queued is not None) == "queued":
                    await store.requeue(conn, self.s, row["run_id"])
                    log.warning("run %s lost its trainer; queued again", row["run_id"])
                else:
                    await store.fail_lost(conn, self.s, row["run_id"])
                    self.runtime.counters["runs_failed_trainer_lost"] += 1

    async def execute(self, run: dict[str, Any]) -> None:
        run_id, project = run["run_id"], run["project"]
        started = time.monotonic()
        renewer = asyncio.create_task(self.renew(run_id), name=f"trainer-lease-{run_id}")
        try:
            outcome = await self.train_run(run, self.config.policy(project), started)
        except RunFailed as exc:
            await self.finish_failed(run_id, project, exc.reason, str(exc))
        except asyncio.CancelledError:
            # Stopping: the run goes back to the queue at once (this start does not count).
            with contextlib.suppress(Exception):
                await asyncio.shield(store.give_back(self.pool, self.s, run_id))
            raise
        except Exception as exc:
            log.exception("run %s failed", run_id)
            await self.finish_failed(run_id, project, "internal_error", f"{type(exc).__name__}: {exc}")
        else:
            self.runtime.counters["runs_succeeded"] += 1
            log.info("run %s: %s v%d trained in %.1f s", run_id, outcome.model_id, outcome.version, time.monotonic() - started)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        with contextlib.suppress(Exception):
            await self.prune()

    async def prune(self) -> None:
        """Delete local run folders and datasets beyond the newest `keep_runs` runs of each project."""
        rows = await store.runs_to_keep(self.pool, self.s, self.config.keep_runs)
        kept_runs = {r["run_id"] for r in rows if r["keep"]}
        kept_data = {r["dataset_version"] for r in rows if r["keep"] and r["dataset_version"]}
        known_runs = {r["run_id"] for r in rows}
        for kind, keep, known in (("runs", kept_runs, known_runs), ("datasets", kept_data, None)):
            folder = self.work_dir / kind
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                # Only what this trainer's table knows is deleted (another replica's fresh folder is not).
                if path.name not in keep and (known is None or path.name in known):
                    await asyncio.to_thread(shutil.rmtree, path, True)
                    self.runtime.counters[f"pruned_{kind}"] += 1

    async def renew(self, run_id: str) -> None:
        """Keep the run's lease; stop its child when it is cancelled (`visionloop trainer cancel`)."""
        while True:
            await asyncio.sleep(min(self.config.lease_s / 3, 5.0))
            with contextlib.suppress(Exception):
                await store.renew(self.pool, self.s, run_id, self.config.lease_s)
                if await store.cancelled(self.pool, self.s, run_id) and run_id in self.children:
                    log.warning("run %s was cancelled: stopping its training", run_id)
                    _kill(self.children[run_id])

    async def finish_failed(self, run_id: str, project: str, reason: str, message: str) -> None:
        if await store.cancelled(self.pool, self.s, run_id):
            self.runtime.counters["runs_cancelled"] += 1
            log.warning("run %s (%s) stopped: it was cancelled", run_id, project)
            return
        await store.fail(self.pool, self.s, run_id, reason, message)
        self.runtime.counters[f"runs_failed_{reason}"] += 1
        log.warning("run %s (%s) failed: %s: %s", run_id, project, reason, message)
        await self.runtime.status(
            StatusKind.FAILED,
            progress=Progress(task="training", task_id=run_id, step=0, message=f"{project}: {reason}"),
            message=f"training run {run_id} of {project} failed ({reason}): {message}"[:1024],
        )

    async def train_run(self, run: dict[str, Any], policy: Policy, started: float) -> ModelRef:
        run_id, project = run["run_id"], run["project"]
        snap = await self.snapshot(run_id, project, policy)
        folder = self.work_dir / "runs" / run_id
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        parent = snap["champion"]
        base = _base_checkpoint(policy) if parent is None else None
        data = await self.materialise(snap)
        hyper = decide.hyperparameters(policy, json.loads(run["hyperparameters"]), first=parent is None and base is None)
        job = {
            "state_dir": str(self.work_dir), "data": str(data), "out_dir": str(folder / "out"), "model": policy.model_yaml,
            "parent_class_names": None, "class_names": snap["class_names"], "hyperparameters": hyper, "device": policy.device,
            "base_checkpoint": str(base) if base else None,
        }
        if parent is not None:
            weights = folder / "parent.pt"
            weights.write_bytes(await self.blobs.get(parent["weights_uri"]))
            job["model"] = str(weights)
            job["parent_class_names"] = json.loads(parent["class_names"])
        (folder / "job.json").write_text(json.dumps(job, indent=2))
        result = await self.run_child(run_id, project, folder, policy)
        weights_path = Path(result["weights"])
        if not weights_path.is_file():
            raise RunFailed("no_weights", f"the run reported {weights_path} but it is not there")
        ref = await self.blobs.put_file(weights_path, content_type="application/octet-stream")
        return await self.finish_succeeded(run, snap, parent, hyper, result, ref.uri, ref.sha256, time.monotonic() - started)

    async def snapshot(self, run_id: str, project: str, policy: Policy) -> dict[str, Any]:
        """Freeze the dataset for this run: test set and training version, manifests in the blob store."""
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_project(conn, project)
            class_names = await store.taxonomy(conn, self.s, project)
            rows = await store.samples(conn, self.s, project)
            best = await store.champion(conn, self.s, project)
        if not class_names:
            raise RunFailed("not_enough_data", f"{project} has no classes yet")
        test_rows = [r for r in rows if r["role"] == "test"]
        test_members = [Member(json.loads(r["image"]), json.loads(r["boxes"]), r["label_hash"], "test") for r in test_rows]
        near = near_test_duplicates(
            [(r["image_id"], r["phash"], r["dhash"]) for r in rows if r["role"] == "train"],
            [(r["image_id"], r["phash"], r["dhash"]) for r in test_rows],
            policy.near_duplicate_radius,
        )
        if near:
            log.info("trainer: %s run %s leaves out %d training image(s) as near duplicates of test images: %s",
                     project, run_id, len(near), ", ".join(f"{i[:12]} (~{t[:12]}, {d} bits)" for i, (t, d) in sorted(near.items())[:10])
                     + (" ..." if len(near) > 10 else ""))
        train_rows = [r for r in rows if r["role"] == "train" and r["image_id"] not in near]
        members = assign_splits([(json.loads(r["image"]), json.loads(r["boxes"]), r["label_hash"]) for r in train_rows], policy.val_fraction)
        test_ref: DatasetRef | None = None
        if test_members:
            version = version_of("ts", class_names, test_members)
            blob = await self.blobs.put(manifest(project, version, class_names, test_members), content_type="application/json")
            test_ref = DatasetRef(version=version, uri=blob.uri, images=len(test_members))
        version = version_of("ds", class_names, members)
        blob = await self.blobs.put(manifest(project, version, class_names, members), content_type="application/json")
        train_n = sum(m.split == "train" for m in members)
        async with self.pool.acquire() as conn, conn.transaction():
            await store.record_snapshot(
                conn, self.s, run_id=run_id, project=project, version=version, uri=blob.uri, class_names=class_names,
                train_images=train_n, val_images=len(members) - train_n, excluded=exclusions(near),
                snapshot_seq=max((r["seq"] for r in rows), default=0), test_version=test_ref.version if test_ref else None,
                test_images=test_ref.images if test_ref else 0, test_uri=test_ref.uri if test_ref else None,
            )
        self.runtime.counters["near_test_excluded"] += len(near)
        if len(members) < policy.min_train_images:
            raise RunFailed("not_enough_data", f"{len(members)} training images (after {len(near)} near duplicates of test images); at least {policy.min_train_images} needed")
        return {
            "version": version, "uri": blob.uri, "members": members, "class_names": class_names,
            "train_images": train_n, "val_images": len(members) - train_n, "test": test_ref, "champion": dict(best) if best else None,
        }

    async def materialise(self, snap: dict[str, Any]) -> Path:
        """The dataset version as an Ultralytics YOLO dataset on local disk (reused when present)."""
        root = self.work_dir / "datasets" / snap["version"]
        done = root / ".complete"
        if done.exists():
            return root / "data.yaml"
        shutil.rmtree(root, ignore_errors=True)
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
                    content = await self.blobs.get(str(member.image["blob_uri"]))
                except BlobError as exc:
                    raise RunFailed("image_missing", f"image {member.image_id} of the dataset: {exc}") from exc
            path = root / "images" / image.split / image.file_name
            await asyncio.to_thread(path.write_bytes, content)

        await asyncio.gather(*(fetch(m, i) for m, i in zip(snap["members"], images, strict=True)))
        done.write_text(snap["version"])
        return data

    async def run_child(self, run_id: str, project: str, folder: Path, policy: Policy) -> dict[str, Any]:
        """Train in a child process; stream its progress; kill it past the time limit."""
        stderr = open(folder / "train.log", "wb")  # noqa: SIM115 - closed below
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads()))  # the child trains on as many (libs/yolo.py)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "visionloop.services.trainer.child", str(folder / "job.json"),
            stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True, cwd=folder, env=env,
            preexec_fn=_die_with_trainer,
        )
        await store.set_pid(self.pool, self.s, run_id, proc.pid)
        self.children[run_id] = proc
        await self.runtime.status(StatusKind.PROGRESS, progress=Progress(task="training", task_id=run_id, step=0, message=f"{project}: started"))
        result: dict[str, Any] = {}
        error: dict[str, Any] = {}
        try:
            await asyncio.wait_for(self._read_child(proc, run_id, project, result, error), policy.time_limit_s)
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
            self.children.pop(run_id, None)
        return _outcome(proc.returncode, result, error, folder)

    async def _read_child(self, proc: asyncio.subprocess.Process, run_id: str, project: str, result: dict[str, Any],
                          error: dict[str, Any]) -> None:
        """The child's JSON lines: epochs, its start, its result or its error; until it exits."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict):
                continue
            if line.get("event") == "epoch":
                await self.progress(run_id, project, line)
            elif line.get("event") == "start" and isinstance(line.get("base_checkpoint"), dict):
                await self.started_from(run_id, project, line["base_checkpoint"])
            elif line.get("event") == "done":
                result.update(line)
            elif line.get("event") == "error":
                error.update(line)
        await proc.wait()

    async def started_from(self, run_id: str, project: str, record: dict[str, Any]) -> None:
        """Keep a base checkpoint's class mapping with the run, and say it on the status topic."""
        try:
            await store.set_base_checkpoint(self.pool, self.s, run_id, record)
        except Exception as exc:  # the training goes on; the mapping is still in its train.log and the log line below
            log.warning("run %s: could not record its base checkpoint mapping: %s", run_id, exc)
        log.info("run %s (%s): %s", run_id, project, pretrained.summary(record, limit=4000))
        await self.runtime.status(StatusKind.PROGRESS, progress=Progress(task="training", task_id=run_id, step=0,
                                                                         message=f"{project}: {pretrained.summary(record)}"))

    async def progress(self, run_id: str, project: str, line: dict[str, Any]) -> None:
        metrics = {f"loss.{k}": float(v) for k, v in (line.get("losses") or {}).items() if isinstance(v, int | float)}
        metrics |= {f"val.{k}": float(v) for k, v in (line.get("metrics") or {}).items() if isinstance(v, int | float)}
        epoch = int(line.get("epoch", 0))
        self.runtime.gauges[f"training.{project}.epoch"] = float(epoch)
        with contextlib.suppress(Exception):
            await store.set_epoch(self.pool, self.s, run_id, epoch)
        await self.runtime.status(
            StatusKind.PROGRESS,
            progress=Progress(task="training", task_id=run_id, step=epoch, total=line.get("epochs"), metrics=metrics, message=project),
        )

    async def finish_succeeded(self, run: dict[str, Any], snap: dict[str, Any], parent: dict[str, Any] | None, hyper: dict[str, Any],
                               result: dict[str, Any], weights_uri: str, weights_sha: str, duration: float) -> ModelRef:
        run_id, project = run["run_id"], run["project"]
        model_id = decide.model_line(project)
        async with self.runtime.transaction() as unit:
            version = await store.add_model(unit.conn, unit.schema, model_id=model_id, project=project, run_id=run_id,
                                            weights_uri=weights_uri, weights_sha256=weights_sha, class_names=snap["class_names"],
                                            imgsz=int(hyper["imgsz"]))
            ref = ModelRef(model_id=model_id, version=version)
            unit.emit(decide.trained(ref=ref, run_id=run_id, snap=snap, parent=parent, hyper=hyper, result=result,
                                     weights_uri=weights_uri, weights_sha256=weights_sha, duration_s=duration), project=project)
        epochs = int(result.get("epochs") or 0)
        await self.runtime.status(
            StatusKind.PROGRESS,
            progress=Progress(task="training", task_id=run_id, step=epochs, total=epochs, message=f"{project}: {model_id} v{version} trained"),
        )
        return ref


def _outcome(code: int | None, result: dict[str, Any], error: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The child's result, or the `RunFailed` its exit says."""
    if code == 0 and result:
        return result
    if error:
        raise RunFailed(str(error.get("reason") or "training_error"), f"{error.get('type', 'error')}: {error.get('message', '')}")
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        raise RunFailed("crashed", f"the training process was killed by {name} (out of memory, or killed){_tail(folder / 'train.log')}")
    raise RunFailed("crashed", f"the training process exited with status {code}{_tail(folder / 'train.log')}")


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
