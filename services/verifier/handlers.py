"""The verifier's handler of `label submitted` and what it does per kind of submission: a
pre-label set (auto-accept or a person), a consensus group member (wait, then vote once), a single
person's or an import's set. The context comes first; the wiring binds it (`service.py`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from visionloop.contracts import (
    Box,
    Envelope,
    LabelActions,
    Labeller,
    LabelRejected,
    LabelRejectReason,
    LabelSourceKind,
    LabelSubmitted,
    LabelVerified,
    Provenance,
    VerificationMethod,
)
from visionloop.libs.bus import Unit
from visionloop.services.verifier import decide, store
from visionloop.services.verifier.calibrate import model_key, model_label, score_samples
from visionloop.services.verifier.config import Policy, VerifierSettings
from visionloop.services.verifier.consensus import vote
from visionloop.services.verifier.verify import Verdict, check_boxes, verify

log = logging.getLogger("visionloop.services.verifier.service")


@dataclass
class Context:
    """What the handlers share: the settings and the runtime's counters and gauges."""

    config: VerifierSettings
    counters: Counter[str]
    gauges: dict[str, float]


async def on_submitted(ctx: Context, event: Envelope[LabelSubmitted], unit: Unit[Any]) -> None:
    """Verify a submission: accept it, auto-accept pre-labels, vote, or reject with the reason."""
    sub, project, s = event.payload, event.project, unit.schema
    policy = ctx.config.policy(project)
    if await store.decided(unit.conn, s, sub.submission_id):
        ctx.counters["already_decided"] += 1
        return
    class_names = await store.taxonomy(unit.conn, s, project, sub.class_names)
    if sub.source is LabelSourceKind.PRELABEL:
        await _prelabels(ctx, unit, sub, project, class_names, policy)
    elif sub.consensus_group and (sub.consensus_size or 1) > 1:
        await _consensus(ctx, unit, sub, project, class_names, policy)
    else:
        await _single(ctx, unit, sub, project, class_names, policy)


async def _prelabels(ctx: Context, unit: Unit[Any], sub: LabelSubmitted, project: str, class_names: list[str] | None,
                     policy: Policy) -> None:
    model = model_key(sub.prelabel_model)
    checked = check_boxes(sub.boxes, sub.image.width, sub.image.height, class_names, policy)
    calibration = (await store.calibration_of(unit.conn, unit.schema, project, model, policy)
                   if decide.needs_calibration(checked, policy) else None)
    found = decide.prelabel_outcome(sub, checked, policy, calibration, class_names)
    if found.verdict.accepted:
        await _verified(ctx, unit, sub, project, found.verdict, [sub], class_names, actions=found.actions)
    else:
        await _rejected(ctx, unit, sub, project, found.verdict)
    await store.record_offer(unit.conn, unit.schema, sub, project, model, found.outcome)
    ctx.counters[f"prelabels_{found.outcome}"] += 1


async def _single(ctx: Context, unit: Unit[Any], sub: LabelSubmitted, project: str, class_names: list[str] | None,
                  policy: Policy) -> None:
    verdict = verify(sub, class_names, policy)
    if verdict.accepted:
        await _verified(ctx, unit, sub, project, verdict, [sub], class_names)
        await _learn(ctx, unit, sub, project, verdict.boxes, policy)
    else:
        await _rejected(ctx, unit, sub, project, verdict)
        if verdict.reason is LabelRejectReason.REVIEWER_REJECTED:
            await _learn(ctx, unit, sub, project, [], policy)  # every pre-label was wrong, in the reviewer's word


async def _consensus(ctx: Context, unit: Unit[Any], sub: LabelSubmitted, project: str, class_names: list[str] | None,
                     policy: Policy) -> None:
    group, size = sub.consensus_group, sub.consensus_size or 1
    assert group is not None
    still_open = await store.join_group(unit.conn, unit.schema, group, sub)
    await store.record(unit.conn, unit.schema, sub, project, "pending", None, None)
    if not still_open:
        return
    members: dict[str, LabelSubmitted] = {}
    for member in await store.group_members(unit.conn, unit.schema, group):
        members.setdefault(member.labeller.user_id, member)
    if len(members) < size:
        ctx.counters["consensus_waiting"] += 1
        return
    everyone = list(members.values())
    valid = [b.boxes for b in (verify(m, class_names, policy) for m in everyone) if b.accepted]
    result = vote(valid, labellers=size, iou=policy.consensus_iou, quorum=policy.consensus_quorum, max_disputed=policy.consensus_max_disputed)
    if result.agreed:
        await _verified(ctx, unit, sub, project, Verdict(True, boxes=result.boxes, method=VerificationMethod.CONSENSUS), everyone, class_names)
        await _learn(ctx, unit, sub, project, result.boxes, policy)
    else:
        assert result.reason is not None
        await _rejected(ctx, unit, sub, project, Verdict(False, reason=result.reason, message=result.message))
    await store.close_group(unit.conn, unit.schema, group, project, "verified" if result.agreed else "rejected",
                            [m.submission_id for m in everyone])


async def _learn(ctx: Context, unit: Unit[Any], sub: LabelSubmitted, project: str, final: list[Box], policy: Policy) -> None:
    """People verified boxes shown with pre-labels: each pre-label is a calibration sample."""
    if not sub.prelabels or sub.source is LabelSourceKind.PRELABEL:
        return
    samples = score_samples(sub.prelabels, final, match_iou=policy.match_iou)
    model = model_key(sub.prelabel_model)
    updated = await store.add_samples(unit.conn, unit.schema, project, model, sub.submission_id, samples, policy)
    for cal in updated:
        key = f"calibration.{project}.{model_label(model)}.{cal.class_name}"
        for figure in ("threshold", "precision", "lower_bound"):
            ctx.gauges.pop(f"{key}.{figure}", None)  # a threshold that no longer stands must not linger
        ctx.gauges.update(decide.gauges_of(project, model, cal))
    ctx.counters["calibration_samples"] += len(samples)


async def _verified(ctx: Context, unit: Unit[Any], sub: LabelSubmitted, project: str, verdict: Verdict, behind: Sequence[LabelSubmitted],
                    class_names: list[str] | None, *, actions: LabelActions | None = None) -> None:
    ids = [m.submission_id for m in behind]
    spot = await store.spot_checked(unit.conn, unit.schema, sub.task_id)
    durations = [m.duration_s for m in behind if m.duration_s is not None]
    totals = actions or LabelActions(**{name: sum(getattr(m.actions, name) for m in behind) for name in LabelActions.model_fields})
    labellers: list[Labeller] = list({m.labeller.user_id: m.labeller for m in behind}.values())
    label_id = decide.label_id_for(ids)
    assert verdict.method is not None
    provenance = Provenance(method=verdict.method, labellers=labellers, prelabel_model=sub.prelabel_model, actions=totals,
                            duration_s=sum(durations) if durations else None, spot_check=spot, submission_ids=ids,
                            batch_id=sub.task_id if sub.source is LabelSourceKind.IMPORT else None)
    unit.emit(LabelVerified(label_id=label_id, image=sub.image, boxes=verdict.boxes, provenance=provenance,
                            for_test_set=sub.for_test_set, class_names=class_names), project=project)
    await store.record(unit.conn, unit.schema, sub, project, "verified", None, label_id)
    ctx.counters[f"verified_{verdict.method.value}"] += 1


async def _rejected(ctx: Context, unit: Unit[Any], sub: LabelSubmitted, project: str, verdict: Verdict) -> None:
    assert verdict.reason is not None
    unit.emit(LabelRejected(submission_id=sub.submission_id, task_id=sub.task_id, image=sub.image, reason=verdict.reason,
                            message=verdict.message or verdict.reason.value, issues=verdict.issues, labeller=sub.labeller),
              project=project)
    await store.record(unit.conn, unit.schema, sub, project, "rejected", verdict.reason.value, None)
    ctx.counters[f"rejected_{verdict.reason.value}"] += 1
