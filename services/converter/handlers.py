"""The converter's handler of `model evaluated`: record the conversion (or the skip of a model
that failed the gate) and emit `model converted`; the building happened in `build.Builder.prepare`.
The context comes first; the wiring binds it (`service.py`)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from visionloop.contracts import Envelope, ModelConverted, ModelEvaluated
from visionloop.libs.bus import Unit
from visionloop.services.converter import store
from visionloop.services.converter.build import Conversion
from visionloop.services.converter.decide import outcome_of, shipped_artifact

log = logging.getLogger("visionloop.services.converter.service")


@dataclass
class Context:
    """The runtime's counters."""

    counters: Counter[str]


async def on_evaluated(ctx: Context, event: Envelope[ModelEvaluated], unit: Unit[Any], found: Conversion | None) -> None:
    """Record the conversion (or the skip) and emit `model converted` for a model that passed the gate."""
    e, project, s = event.payload, event.project, unit.schema
    ref = e.lineage.model
    outcome = "skipped_failed_gate" if found is None else outcome_of(found.artifacts, found.refused)
    await store.record_model(unit.conn, s, project, e, outcome, found.seconds if found else None)
    if found is None:
        ctx.counters["skipped_failed_gate"] += 1
        log.info("%s v%d failed the gate: nothing to convert", ref.model_id, ref.version)
        return
    for b in found.built:
        await store.record_target(unit.conn, s, project, e, b, shipped_artifact(found.artifacts, b.target, b.refusal is not None))
    unit.emit(ModelConverted(lineage=e.lineage, metrics=e.candidate, artifacts=found.artifacts, refused=found.refused), project=project)
    ctx.counters["converted"] += 1
    for artifact in found.artifacts:
        ctx.counters[f"artifacts_{artifact.target.value}_{artifact.precision.value}"] += 1
    for refusal in found.refused:
        ctx.counters[f"refused_{refusal.reason.value}"] += 1
    log.info("%s v%d: %s (%s)", ref.model_id, ref.version, outcome,
             ", ".join([f"{a.target.value} {a.precision.value} {a.size_bytes} B" for a in found.artifacts]
                       + [f"{r.target.value} {r.precision.value} refused: {r.reason.value}" for r in found.refused]))
