"""verifier: step 5 of the loop. Only verified labels reach training.

Consumes `label submitted`; emits `label verified` (with provenance: human, auto, consensus or
import; who; the pre-labels' model; the labelling-cost counters) or `label rejected` (reason,
sentence, the problem of each box).

- A person's (or an import's) label set passes the checks in verify.py.
- A pre-label set (source `prelabel`, offered by the gateway for every recognised image) is
  auto-accepted when calibrate.py says so (its classes calibrated on the very model version that
  drew it, with a lower confidence bound of their precision at the target; its model knowing
  every class of the taxonomy); otherwise it is rejected with `needs_review` or `spot_check`,
  and the gateway hands it to a reviewer. Every human verdict on pre-labels (reviews, spot
  checks) adds calibration samples to the evidence of that model version.
- Submissions of a consensus group wait until `consensus_size` distinct people have answered;
  then consensus.py votes once for the group.

The taxonomy is the gateway's: submissions carry the project's class list (`class_names`), and
the verifier keeps the last one per project for submissions that carry none.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from visionloop.contracts import LabelRejected, LabelSubmitted, LabelVerified
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.verifier import decide, handlers, store
from visionloop.services.verifier.config import VerifierSettings
from visionloop.services.verifier.handlers import Context


def wire(runtime: Runtime, adapters: Adapters, config: VerifierSettings) -> None:
    """Register the verifier's handler and its calibration gauges on the runtime."""
    ctx = Context(config=config, counters=runtime.counters, gauges=runtime.gauges)

    async def refresh_gauges() -> None:
        """Load the calibration into the heartbeat's gauges (then every minute)."""
        while True:
            if runtime.pool is not None:
                runtime.gauges.update(decide.gauges(await store.calibration_report(runtime.pool, runtime.schema)))
            await asyncio.sleep(60)

    runtime.consume(LabelSubmitted, bound(handlers.on_submitted, ctx))
    runtime.produces(LabelVerified, LabelRejected)
    runtime.background("calibration-gauges", refresh_gauges)


SPEC = ServiceSpec(
    name="verifier",
    description="Verifies submitted labels and pre-labels (checks, calibrated auto-accept, consensus).",
    wire=wire,
    settings=VerifierSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
