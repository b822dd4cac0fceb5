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

A project's gate settings may be changed at run time (`visionloop evaluator set`: the
`gate_settings` table, read at every evaluation), and `rejudge requested` (`visionloop evaluator
rejudge`) judges a gated model again under them, on the figures already measured.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from visionloop.contracts import ModelEvaluated, ModelRegistered, ModelRejudgeRequested, ModelTrained
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.evaluator import handlers
from visionloop.services.evaluator.assess import Assessor, preload
from visionloop.services.evaluator.config import EvaluatorSettings
from visionloop.services.evaluator.handlers import Context


def wire(runtime: Runtime, adapters: Adapters, config: EvaluatorSettings) -> None:
    """Register the evaluator's handlers on the runtime."""
    ctx = Context(counters=runtime.counters, gauges=runtime.gauges)
    assessor = Assessor(runtime, adapters.blobs, config)

    async def warm_up() -> None:
        """Import Ultralytics (torch) and matplotlib once at start, not when the first candidate waits."""
        await asyncio.to_thread(preload, assessor.work_dir)
        await asyncio.Event().wait()

    runtime.consume_batch(ModelTrained, bound(handlers.on_trained, ctx), prepare=assessor.prepare, max_records=1)
    runtime.background("warm-up", warm_up)
    runtime.consume_batch(ModelRejudgeRequested, bound(handlers.on_rejudge, ctx), prepare=assessor.prepare_rejudge, max_records=1)
    runtime.consume(ModelRegistered, bound(handlers.on_registered, ctx))
    runtime.produces(ModelEvaluated)


SPEC = ServiceSpec(
    name="evaluator",
    description="Measures each trained candidate on the frozen test set and gates it against floors and the champion.",
    wire=wire,
    settings=EvaluatorSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
