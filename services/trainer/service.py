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

from pathlib import Path

from visionloop.contracts import (
    LabelVerified,
    ModelEvaluated,
    ModelRegistered,
    ModelTrained,
    TrainingRequested,
)
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.trainer import handlers
from visionloop.services.trainer.config import TrainerSettings
from visionloop.services.trainer.handlers import Context
from visionloop.services.trainer.runs import RunWorker


def wire(runtime: Runtime, adapters: Adapters, config: TrainerSettings) -> None:
    """Register the trainer's handlers and its run worker on the runtime."""
    ctx = Context(config=config, blobs=adapters.blobs, counters=runtime.counters)
    runtime.consume(LabelVerified, bound(handlers.on_verified, ctx))
    runtime.consume(TrainingRequested, bound(handlers.on_requested, ctx))
    runtime.consume(ModelEvaluated, bound(handlers.on_evaluated, ctx))
    runtime.consume(ModelRegistered, bound(handlers.on_registered, ctx))
    runtime.produces(ModelTrained)
    runtime.background("runs", RunWorker(runtime, ctx))


SPEC = ServiceSpec(
    name="trainer",
    description="Keeps each project's dataset and trains its next model (in a child process) when enough labels are new.",
    wire=wire,
    settings=TrainerSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
