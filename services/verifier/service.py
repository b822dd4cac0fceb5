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
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

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
from visionloop.libs.bus import Runtime, Unit
from visionloop.libs.db import quote_ident
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.services.verifier.calibrate import (
    Calibration,
    Sample,
    calibrate,
    decide,
    model_key,
    model_label,
    score_samples,
)
from visionloop.services.verifier.config import Policy, VerifierSettings
from visionloop.services.verifier.consensus import vote
from visionloop.services.verifier.verify import Verdict, check_boxes, verify

log = logging.getLogger(__name__)


def label_id_for(submission_ids: Sequence[str]) -> str:
    """A label set's id, fixed by the submissions behind it."""
    return "label-" + hashlib.sha256("\n".join(sorted(submission_ids)).encode()).hexdigest()[:24]


# -- calibration store ---------------------------------------------------------------------------------
#
# Evidence and thresholds are keyed by (project, model line, model version, class): the model
# version that drew the pre-labels (`model_key`), so a new version starts with none.


async def recalibrate(conn: asyncpg.Connection, s: str, project: str, model: tuple[str, int], class_name: str, policy: Policy) -> Calibration:
    """Recompute and store one class's calibration on one model version from its newest samples."""
    model_id, version = model
    # One recomputation at a time per class, so concurrent verdicts cannot store a stale one last.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-calibration:{project}:{model_id}@{version}:{class_name}")
    rows = await conn.fetch(
        f"""SELECT score, correct FROM {s}.calibration_samples
            WHERE project = $1 AND model_id = $2 AND model_version = $3 AND class_name = $4 ORDER BY id DESC LIMIT $5""",
        project, model_id, version, class_name, policy.calibration_window,
    )
    cal = calibrate(
        class_name, [Sample(r["score"], r["correct"]) for r in rows], target=policy.target_precision, confidence=policy.confidence,
        min_samples=policy.min_samples, min_support=policy.min_support, model=model,
    )
    await conn.execute(
        f"""INSERT INTO {s}.calibration (project, model_id, model_version, class_name, threshold, precision, samples, support,
                status, target, correct, support_correct, lower_bound, confidence)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            ON CONFLICT (project, model_id, model_version, class_name) DO UPDATE SET threshold = EXCLUDED.threshold,
                precision = EXCLUDED.precision, samples = EXCLUDED.samples, support = EXCLUDED.support,
                status = EXCLUDED.status, target = EXCLUDED.target, correct = EXCLUDED.correct,
                support_correct = EXCLUDED.support_correct, lower_bound = EXCLUDED.lower_bound,
                confidence = EXCLUDED.confidence, updated_at = now()""",
        project, model_id, version, class_name, cal.threshold, cal.precision, cal.samples, cal.support, cal.status,
        policy.target_precision, cal.correct, cal.support_correct, cal.lower_bound, policy.confidence,
    )
    return cal


async def add_samples(conn: asyncpg.Connection, s: str, project: str, model: tuple[str, int], submission_id: str,
                      samples: list[tuple[str, Sample]], policy: Policy) -> list[Calibration]:
    """Record verified pre-label boxes of one model version and recompute the calibration of their classes."""
    if not samples:
        return []
    model_id, version = model
    await conn.executemany(
        f"""INSERT INTO {s}.calibration_samples (project, model_id, model_version, class_name, score, correct, submission_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        [(project, model_id, version, c, sample.score, sample.correct, submission_id) for c, sample in samples],
    )
    return [await recalibrate(conn, s, project, model, c, policy) for c in sorted({c for c, _ in samples})]


def _stored(row: asyncpg.Record) -> Calibration:
    return Calibration(
        row["class_name"], row["samples"], row["threshold"], row["precision"], row["support"], row["status"],
        correct=row["correct"], support_correct=row["support_correct"], lower_bound=row["lower_bound"],
        target=row["target"], confidence=row["confidence"], model=(row["model_id"], row["model_version"]),
    )


async def calibration_of(conn: asyncpg.Connection, s: str, project: str, model: tuple[str, int], policy: Policy) -> dict[str, Calibration]:
    """The calibration in force for the pre-labels of one model version, by class.

    A class stored under another target or confidence than the policy's (the settings changed,
    or the row predates the bound) is recomputed first, so no threshold outlives its rule.
    """
    rows = await conn.fetch(
        f"SELECT * FROM {s}.calibration WHERE project = $1 AND model_id = $2 AND model_version = $3", project, model[0], model[1]
    )
    found = {}
    for row in rows:
        current = row["target"] == policy.target_precision and row["confidence"] == policy.confidence
        found[row["class_name"]] = _stored(row) if current else await recalibrate(conn, s, project, model, row["class_name"], policy)
    return found


async def calibration_report(pool: asyncpg.Pool, schema: str, project: str | None = None) -> list[dict[str, Any]]:
    """Every class's calibration per model version (threshold, counts, precision and its bound), for the CLI and status."""
    s = quote_ident(schema)
    rows = await pool.fetch(
        f"""SELECT project, model_id, model_version, class_name, threshold, correct, samples, support_correct, support,
                   precision, lower_bound, target, confidence, status, updated_at
            FROM {s}.calibration WHERE $1::text IS NULL OR project = $1 ORDER BY project, model_id, model_version, class_name""",
        project,
    )
    return [{**dict(r), "updated_at": r["updated_at"].isoformat()} for r in rows]


def _gauges_of(project: str, model: tuple[str, int], cal: Calibration) -> dict[str, float]:
    """Heartbeat gauges of one class's calibration: `calibration.<project>.<model>@v<n>.<class>.<figure>`."""
    key = f"calibration.{project}.{model_label(model)}.{cal.class_name}"
    figures = {"samples": cal.samples, "threshold": cal.threshold, "precision": cal.precision, "lower_bound": cal.lower_bound}
    return {f"{key}.{name}": float(value) for name, value in figures.items() if value is not None}


def _gauges(report: list[dict[str, Any]]) -> dict[str, float]:
    gauges: dict[str, float] = {}
    for row in report:
        cal = Calibration(row["class_name"], row["samples"], row["threshold"], row["precision"], row["support"], row["status"],
                          lower_bound=row["lower_bound"])
        gauges.update(_gauges_of(row["project"], (row["model_id"], row["model_version"]), cal))
    return gauges


# -- the service ------------------------------------------------------------------------------------------


def wire(runtime: Runtime, adapters: Adapters, config: VerifierSettings) -> None:
    """Register the verifier's handler on the runtime."""

    async def taxonomy(unit: Unit[Any], project: str, carried: list[str] | None) -> list[str] | None:
        if carried is not None:
            await unit.conn.execute(
                f"""INSERT INTO {unit.schema}.taxonomies (project, class_names) VALUES ($1, $2::jsonb)
                    ON CONFLICT (project) DO UPDATE SET class_names = EXCLUDED.class_names, updated_at = now()""",
                project, json.dumps(carried),
            )
            return carried
        stored = await unit.conn.fetchval(f"SELECT class_names FROM {unit.schema}.taxonomies WHERE project = $1", project)
        return json.loads(stored) if stored else None

    async def on_submitted(event: Envelope[LabelSubmitted], unit: Unit[Any]) -> None:
        """Verify a submission: accept it, auto-accept pre-labels, vote, or reject with the reason."""
        sub, project, s = event.payload, event.project, unit.schema
        policy = config.policy(project)
        if await unit.conn.fetchval(f"SELECT true FROM {s}.verdicts WHERE submission_id = $1", sub.submission_id):
            runtime.counters["already_decided"] += 1
            return
        class_names = await taxonomy(unit, project, sub.class_names)
        if sub.source is LabelSourceKind.PRELABEL:
            await prelabels(unit, sub, project, class_names, policy)
        elif sub.consensus_group and (sub.consensus_size or 1) > 1:
            await consensus(unit, sub, project, class_names, policy)
        else:
            await single(unit, sub, project, class_names, policy)

    async def prelabels(unit: Unit[Any], sub: LabelSubmitted, project: str, class_names: list[str] | None, policy: Policy) -> None:
        model = model_key(sub.prelabel_model)
        checked = check_boxes(sub.boxes, sub.image.width, sub.image.height, class_names, policy)
        if not checked.accepted:
            outcome = "rejected"
            await rejected(unit, sub, project, checked)
        elif not policy.auto_accept:
            outcome = "needs_review"
            await rejected(unit, sub, project, Verdict(False, reason=LabelRejectReason.NEEDS_REVIEW, message="auto-accept is off for this project"))
        else:
            cal = await calibration_of(unit.conn, unit.schema, project, model, policy)
            decision = decide(sub.boxes, cal, image_id=sub.image.image_id, spot_check_rate=policy.spot_check_rate,
                              taxonomy=class_names, model_classes=sub.prelabel_classes, model=model)
            if decision.accepted:
                outcome = "auto_accepted"
                boxes = [b.model_copy(update={"score": None}) for b in checked.boxes]
                await verified(unit, sub, project, Verdict(True, boxes=boxes, method=VerificationMethod.AUTO), [sub], class_names,
                               actions=LabelActions(prelabels_accepted=len(boxes)))
            else:
                assert decision.reason is not None
                outcome = decision.reason.value
                await rejected(unit, sub, project, Verdict(False, reason=decision.reason, message=decision.message))
        await unit.conn.execute(
            f"""INSERT INTO {unit.schema}.prelabel_offers (task_id, project, image_id, model_id, model_version, outcome)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (task_id) DO UPDATE SET outcome = EXCLUDED.outcome, model_id = EXCLUDED.model_id,
                    model_version = EXCLUDED.model_version, decided_at = now()""",
            sub.task_id, project, sub.image.image_id, model[0], model[1], outcome,
        )
        runtime.counters[f"prelabels_{outcome}"] += 1

    async def single(unit: Unit[Any], sub: LabelSubmitted, project: str, class_names: list[str] | None, policy: Policy) -> None:
        verdict = verify(sub, class_names, policy)
        if verdict.accepted:
            await verified(unit, sub, project, verdict, [sub], class_names)
            await learn(unit, sub, project, verdict.boxes, policy)
        else:
            await rejected(unit, sub, project, verdict)
            if verdict.reason is LabelRejectReason.REVIEWER_REJECTED:
                await learn(unit, sub, project, [], policy)  # every pre-label was wrong, in the reviewer's word

    async def consensus(unit: Unit[Any], sub: LabelSubmitted, project: str, class_names: list[str] | None, policy: Policy) -> None:
        group, size = sub.consensus_group, sub.consensus_size or 1
        assert group is not None
        s = unit.schema
        await unit.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-consensus:{group}")
        await unit.conn.execute(
            f"""INSERT INTO {s}.consensus_submissions (group_id, submission_id, labeller, payload) VALUES ($1, $2, $3, $4::jsonb)
                ON CONFLICT DO NOTHING""",
            group, sub.submission_id, sub.labeller.user_id, sub.model_dump_json(),
        )
        await record(unit, sub, project, "pending", None, None)
        if await unit.conn.fetchval(f"SELECT true FROM {s}.consensus_groups WHERE group_id = $1", group):
            return
        rows = await unit.conn.fetch(f"SELECT payload FROM {s}.consensus_submissions WHERE group_id = $1 ORDER BY received_at, submission_id", group)
        members: dict[str, LabelSubmitted] = {}
        for row in rows:
            member = LabelSubmitted.model_validate_json(row["payload"])
            members.setdefault(member.labeller.user_id, member)
        if len(members) < size:
            runtime.counters["consensus_waiting"] += 1
            return
        everyone = list(members.values())
        valid = [b.boxes for b in (verify(m, class_names, policy) for m in everyone) if b.accepted]
        result = vote(valid, labellers=size, iou=policy.consensus_iou, quorum=policy.consensus_quorum, max_disputed=policy.consensus_max_disputed)
        if result.agreed:
            verdict = Verdict(True, boxes=result.boxes, method=VerificationMethod.CONSENSUS)
            await verified(unit, sub, project, verdict, everyone, class_names)
            await learn(unit, sub, project, result.boxes, policy)
        else:
            assert result.reason is not None
            await rejected(unit, sub, project, Verdict(False, reason=result.reason, message=result.message))
        outcome = "verified" if result.agreed else "rejected"
        await unit.conn.execute(f"INSERT INTO {s}.consensus_groups (group_id, project, outcome) VALUES ($1, $2, $3)", group, project, outcome)
        await unit.conn.execute(
            f"UPDATE {s}.verdicts SET outcome = $2 WHERE submission_id = ANY($1::text[])", [m.submission_id for m in everyone], outcome
        )

    async def learn(unit: Unit[Any], sub: LabelSubmitted, project: str, final: list[Box], policy: Policy) -> None:
        """People verified boxes shown with pre-labels: each pre-label is a calibration sample."""
        if not sub.prelabels or sub.source is LabelSourceKind.PRELABEL:
            return
        samples = score_samples(sub.prelabels, final, match_iou=policy.match_iou)
        model = model_key(sub.prelabel_model)
        updated = await add_samples(unit.conn, unit.schema, project, model, sub.submission_id, samples, policy)
        for cal in updated:
            key = f"calibration.{project}.{model_label(model)}.{cal.class_name}"
            for figure in ("threshold", "precision", "lower_bound"):
                runtime.gauges.pop(f"{key}.{figure}", None)  # a threshold that no longer stands must not linger
            runtime.gauges.update(_gauges_of(project, model, cal))
        runtime.counters["calibration_samples"] += len(samples)

    async def verified(
        unit: Unit[Any], sub: LabelSubmitted, project: str, verdict: Verdict, behind: Sequence[LabelSubmitted],
        class_names: list[str] | None, *, actions: LabelActions | None = None,
    ) -> None:
        ids = [m.submission_id for m in behind]
        spot = await unit.conn.fetchval(f"SELECT outcome = 'spot_check' FROM {unit.schema}.prelabel_offers WHERE task_id = $1", sub.task_id)
        durations = [m.duration_s for m in behind if m.duration_s is not None]
        totals = actions or LabelActions(**{
            name: sum(getattr(m.actions, name) for m in behind) for name in LabelActions.model_fields
        })
        labellers: list[Labeller] = list({m.labeller.user_id: m.labeller for m in behind}.values())
        label_id = label_id_for(ids)
        assert verdict.method is not None
        unit.emit(
            LabelVerified(
                label_id=label_id,
                image=sub.image,
                boxes=verdict.boxes,
                provenance=Provenance(
                    method=verdict.method,
                    labellers=labellers,
                    prelabel_model=sub.prelabel_model,
                    actions=totals,
                    duration_s=sum(durations) if durations else None,
                    spot_check=bool(spot),
                    submission_ids=ids,
                ),
                for_test_set=sub.for_test_set,
                class_names=class_names,
            ),
            project=project,
        )
        await record(unit, sub, project, "verified", None, label_id)
        runtime.counters[f"verified_{verdict.method.value}"] += 1

    async def rejected(unit: Unit[Any], sub: LabelSubmitted, project: str, verdict: Verdict) -> None:
        assert verdict.reason is not None
        unit.emit(
            LabelRejected(
                submission_id=sub.submission_id,
                task_id=sub.task_id,
                image=sub.image,
                reason=verdict.reason,
                message=verdict.message or verdict.reason.value,
                issues=verdict.issues,
                labeller=sub.labeller,
            ),
            project=project,
        )
        await record(unit, sub, project, "rejected", verdict.reason.value, None)
        runtime.counters[f"rejected_{verdict.reason.value}"] += 1

    async def record(unit: Unit[Any], sub: LabelSubmitted, project: str, outcome: str, reason: str | None, label_id: str | None) -> None:
        await unit.conn.execute(
            f"""INSERT INTO {unit.schema}.verdicts (submission_id, project, task_id, image_id, source, outcome, reason, label_id)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                ON CONFLICT (submission_id) DO UPDATE SET outcome = EXCLUDED.outcome, reason = EXCLUDED.reason,
                    label_id = EXCLUDED.label_id, decided_at = now()""",
            sub.submission_id, project, sub.task_id, sub.image.image_id, sub.source.value, outcome, reason, label_id,
        )

    async def refresh_gauges() -> None:
        """Load the calibration into the heartbeat's gauges (then every minute)."""
        while True:
            if runtime.pool is not None:
                runtime.gauges.update(_gauges(await calibration_report(runtime.pool, runtime.schema)))
            await asyncio.sleep(60)

    runtime.consume(LabelSubmitted, on_submitted)
    runtime.produces(LabelVerified, LabelRejected)
    runtime.background("calibration-gauges", refresh_gauges)



SPEC = ServiceSpec(
    name="verifier",
    description="Verifies submitted labels and pre-labels (checks, calibrated auto-accept, consensus).",
    wire=wire,
    settings=VerifierSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
