"""The evaluator's handlers, one per consumed topic: `model trained` (record the measurement,
emit the gate's verdict; the measuring happened in `assess.Assessor.prepare`) and `model
registered` (which model is the champion). The context comes first; the wiring binds it."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from visionloop.contracts import Alias, Envelope, ModelRegistered, ModelRejudgeRequested, ModelTrained
from visionloop.libs.bus import Unit
from visionloop.services.evaluator import decide, store
from visionloop.services.evaluator.decide import Assessment

log = logging.getLogger("visionloop.services.evaluator.service")


@dataclass
class Context:
    """The runtime's counters and gauges."""

    counters: Counter[str]
    gauges: dict[str, float]


async def on_trained(ctx: Context, event: Envelope[ModelTrained], unit: Unit[Any], found: Assessment) -> None:
    """Record the measurement and emit the gate's verdict."""
    await _verdict(ctx, unit, event.payload, event.project, found)


async def on_rejudge(ctx: Context, event: Envelope[ModelRejudgeRequested], unit: Unit[Any],
                     found: tuple[str, ModelTrained, Assessment] | None) -> None:
    """A model judged again under the project's current gate settings: its new verdict, emitted as
    any other (a pass is converted, packaged and released as usual)."""
    ref = event.payload.model
    if found is None:
        ctx.counters["rejudge_unknown_model"] += 1
        log.warning("rejudge of %s v%d (asked by %s) refused (unknown_model): this evaluator never gated it",
                    ref.model_id, ref.version, event.payload.requested_by)
        return
    project, trained, assessment = found
    ctx.counters["rejudged"] += 1
    log.info("%s v%d judged again, as asked by %s", ref.model_id, ref.version, event.payload.requested_by)
    await _verdict(ctx, unit, trained, project, assessment)


async def _verdict(ctx: Context, unit: Unit[Any], t: ModelTrained, project: str, found: Assessment) -> None:
    s = unit.schema
    passed = not found.failures
    await store.record_model(unit.conn, s, project, t, passed=passed, failures=found.failures)
    for model, metrics, uri in decide.measurements_to_store(t, found):
        await store.record_evaluation(unit.conn, s, project, model, found.test_set_version, metrics, uri)
    unit.emit(decide.evaluated(t, found), project=project)
    ctx.counters["passed" if passed else "failed"] += 1
    for failure in found.failures:
        ctx.counters[f"failed_{failure.reason.value}"] += 1
    if found.images_per_s is not None:
        ctx.gauges["evaluator.images_per_s"] = round(found.images_per_s, 2)
    ref = t.lineage.model
    log.info("%s v%d: %s (mAP50-95 %.3f on %s)", ref.model_id, ref.version, "passed" if passed else "failed",
             found.candidate.map50_95, found.test_set_version)


async def on_registered(ctx: Context, event: Envelope[ModelRegistered], unit: Unit[Any]) -> None:
    """A model promoted to production is the champion candidates are compared with."""
    if Alias.PRODUCTION not in event.payload.aliases:
        return
    await store.mark_production(unit.conn, unit.schema, event.project, event.payload.lineage.model)
