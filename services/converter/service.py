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
from pathlib import Path

from visionloop.contracts import ModelConverted, ModelEvaluated
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.converter import handlers
from visionloop.services.converter.build import Builder, preload
from visionloop.services.converter.config import ConverterSettings
from visionloop.services.converter.handlers import Context


def wire(runtime: Runtime, adapters: Adapters, config: ConverterSettings) -> None:
    """Register the converter's handler on the runtime."""
    ctx = Context(counters=runtime.counters)
    builder = Builder(runtime, adapters.blobs, config)

    async def warm_up() -> None:
        """Import Ultralytics (torch) and ONNX Runtime's quantiser once at start, not when the first model waits."""
        await asyncio.to_thread(preload, builder.work_root)
        await asyncio.Event().wait()

    on_evaluated = bound(handlers.on_evaluated, ctx)
    runtime.consume_batch(ModelEvaluated, on_evaluated, prepare=builder.prepare, max_records=1)
    runtime.background("warm-up", warm_up)
    runtime.produces(ModelConverted)


SPEC = ServiceSpec(
    name="converter",
    description="Exports each model that passed the gate to ONNX for server (FP32) and edge (INT8 by default), and ships only artifacts that match PyTorch.",
    wire=wire,
    settings=ConverterSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
