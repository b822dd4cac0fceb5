"""`visionloop trainer cancel` of a run that is training (issue 18): the run worker's own code on the
in-memory bus with its SQL on PostgreSQL. The training child is a stand-in that trains forever
(the real one needs minutes), started by `RunWorker.run_child` as a real one is: its own session,
its pid recorded. The cancel goes through the CLI; the worker's lease renewal sees it and kills the
child's process group; the run keeps the reason `cancelled`, never `crashed`."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from visionloop.cli import app
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus
from visionloop.libs.db import quote_ident
from visionloop.services.trainer import runs, store
from visionloop.services.trainer.config import TrainerSettings
from visionloop.services.trainer.handlers import Context
from visionloop.services.trainer.service import SPEC


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(")")[-1].split()[0] != "Z"


async def test_cancelling_a_running_run_stops_its_training_within_seconds(fake_bus: FakeBus, tmp_path: Path, database_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = fake_bus.runtime("trainer", pool=fake_bus.pool)  # type: ignore[attr-defined]
    await trainer.migrate(SPEC.migrations)
    config = TrainerSettings(lease_s=1.5, poll_interval_s=0.1)  # the lease renews (and checks for a cancel) every 0.5 s
    worker = runs.RunWorker(trainer, Context(config=config, blobs=LocalBlobStore(tmp_path / "blobs"), counters=trainer.counters))
    forever = tmp_path / "python"
    forever.write_text("#!/bin/sh\nexec sleep 600\n")  # a child that never ends on its own
    forever.chmod(0o755)
    monkeypatch.setattr(runs, "sys", SimpleNamespace(executable=str(forever)))

    async def train_run(run: dict[str, Any], policy: Any, started: float) -> Any:
        folder = tmp_path / "runs" / run["run_id"]
        folder.mkdir(parents=True)
        (folder / "job.json").write_text(json.dumps({}))
        return await worker.run_child(run["run_id"], run["project"], folder, policy)

    monkeypatch.setattr(worker, "train_run", train_run)
    s = quote_ident(trainer.schema)
    run_id, _ = await store.queue_run(fake_bus.pool, s, "yard", {"trigger": "manual"})  # type: ignore[attr-defined]
    run = await store.claim(fake_bus.pool, s, trainer.producer, config.lease_s)  # type: ignore[attr-defined]
    assert run is not None and run["run_id"] == run_id
    training = asyncio.create_task(worker.execute(run))
    while run_id not in worker.children:
        await asyncio.sleep(0.05)
    pid = worker.children[run_id].pid
    assert _alive(pid)

    env = {"VL_DATABASE_URL": database_url, "VL_KAFKA_BOOTSTRAP": "127.0.0.1:9", "VL_SCHEMA_PREFIX": trainer.settings.schema_prefix,
           "VL_STATE_DIR": str(tmp_path / "cli")}
    asked = time.monotonic()
    done = await asyncio.to_thread(CliRunner().invoke, app, ["trainer", "cancel", run_id], env=env)
    assert done.exit_code == 0, done.output
    said = " ".join(done.output.split())  # the console wraps at its width
    assert f"run {run_id} of yard cancelled (running): its trainer stops the training within seconds" in said

    await asyncio.wait_for(training, timeout=10)
    assert time.monotonic() - asked < 5 and not _alive(pid) and run_id not in worker.children
    row = await fake_bus.pool.fetchrow(f"SELECT * FROM {s}.runs WHERE run_id = $1", run_id)  # type: ignore[attr-defined]
    assert (row["status"], row["reason"]) == ("failed", "cancelled") and row["error"].startswith("cancelled by ")
    assert trainer.counters["runs_cancelled"] == 1 and not trainer.counters["runs_failed_crashed"]
    again = await asyncio.to_thread(CliRunner().invoke, app, ["trainer", "cancel", run_id], env=env)
    assert again.exit_code == 2 and "not_cancellable" in again.output
