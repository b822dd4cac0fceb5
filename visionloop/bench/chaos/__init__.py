"""The chaos benchmark (`visionloop bench chaos`): the quick-demo scenario while the platform is shot at.

Every service runs as its own OS process under the `Supervisor` (as `visionloop up --processes`
runs them) on the embedded stack. The scenario is the demo's (`visionloop/demo/scenario.py`): an
upstream publisher streams synthetic scenes with duplicates, low-resolution and corrupt images in
waves; simulated people label and review over the gateway's HTTP API; each round asks for
training; passing models are converted, packaged, registered and rolled out to simulated edge
agents; a later round adds a class. Sizes are the quick demo's scenes and training, with at least
1,000 submitted images.

Meanwhile the monkey (`Monkey`, seeded):

- SIGKILLs every service `kills_per_service` times at random moments (a shuffled plan, spread over
  the rounds by their size, random gaps between kills), only ever a process that is serving;
- SIGKILLs the trainer while a training run is in progress (its `runs` row is `running` and past
  its first epoch), and the converter, packager or distributor while a release is in progress
  (between a passing `model evaluated` and the last edge agent running the model);
- restarts the embedded broker once, mid-stream (right after a wave's originals went out): every
  topic, record and committed offset is gone, and the stack must re-derive what was in flight from
  PostgreSQL (the outboxes' replay).

The bench's own side lives in this process and survives all of it, as outsiders would: the
upstream publisher resends what got no answer (same submission id and bytes: ingest answers a
replay once), the people retry the gateway while it is down, the edge agents reconnect, and the
event reader reconnects after the broker restart and keeps every event once by its event id (the
replay re-publishes events already read).

At the end it reconciles PostgreSQL (ingest's submissions, dedup's decisions, the recognizer's
recognitions, the gateway's tasks and labels, the trainer's samples, runs and models, the model
library, the distributor's releases) with the event log (`reconcile`):

- every submitted image has exactly one terminal decision: rejected with a reason (by ingest or
  dedup/quality), labelled (a verified label the gateway keeps and the trainer holds), or pending
  a person (a task in the queue). Anything else is `lost`, with where it stopped;
- nothing happened twice (`duplicated`): one ingest answer and one decision per submission, one
  recognition per accepted image, one verdict per label submission, one verified label set per
  image, one trained model per run and per version, one evaluation, conversion and package per
  model, one library registration per model version and target, one event per release step;
- every release ends in a known state (completed, superseded or rolled back: none left rolling or
  paused) and every edge agent runs the model of the fleet's last completed release.

It prints the counts and exits non-zero on any discrepancy; `--json` ends with one line.

In this package: `config` (world and settings), `events` (the event reader), `monkey` (the
kills), `run` (one run), `reconcile` (PostgreSQL against the event log), `report` (the command).
"""

from __future__ import annotations

from visionloop.bench.chaos.config import (
    CLASSES,
    FLEET,
    NEW_CLASS,
    PLOT,
    PROJECT,
    SOURCE,
    STATE,
    ChaosConfig,
    ChaosStalled,
)
from visionloop.bench.chaos.events import EventLog
from visionloop.bench.chaos.monkey import Kill, Monkey
from visionloop.bench.chaos.reconcile import Reconciliation, Truth, load_truth, reconcile
from visionloop.bench.chaos.report import run_chaos_bench, summary
from visionloop.bench.chaos.run import ChaosRun

__all__ = ["CLASSES", "ChaosConfig", "ChaosRun", "ChaosStalled", "EventLog", "FLEET", "Kill", "Monkey", "NEW_CLASS", "PLOT", "PROJECT", "Reconciliation", "SOURCE", "STATE", "Truth", "load_truth", "reconcile", "run_chaos_bench", "summary"]
