"""The labelling economy of a project, pure: what each model version bought and what it cost.

Given rows the gateway keeps (economy_store.py reads them), `assemble` computes per model version:

- **test mAP50-95**: the candidate's metrics in its latest `model.evaluated` event;
- **human seconds**: the recorded time of every task a person answered through the gateway,
  from the lease to the submit (the gateway measures it; Label Studio's own timer is not used);
- **auto-accept rate**: auto-accepted label sets / all verified label sets (imports and test-set
  labels left out: nobody labelled them in the loop);
- **auto-accept precision**: estimated from spot checks, the auto-acceptable pre-labels the
  verifier sent to a person anyway: the share of their boxes the person kept (matched at IoU 0.3
  and the same class, nudged or not), with the counts behind it;

and the **queue depth over time**: open tasks by kind, derived from task timestamps.

Attribution rule: a task, answer or label belongs to the model version that pre-labelled it (a
re-annotate task inherits its parent's); one with no pre-labels (an image no model recognised
and found nothing in) belongs to the version *in service* when it was answered or verified —
the newest version whose pre-labels had reached the gateway by then (`model_versions.first_seen`),
or to no version ("no model") before the first.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, Field

Version = tuple[str, int]
"""(model_id, version) of a model."""

KINDS = ("annotate", "review", "reannotate")
QUEUE_SAMPLES = 120
"""Points of the queue-depth series (evenly spaced from the first task to now)."""
LEFT_OUT_METHODS = ("import",)
"""Verification methods not counted in the auto-accept rate."""


# -- rows in --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """A version's latest test-set evaluation."""

    model: Version
    map50_95: float
    map50: float
    passed: bool
    test_set_version: str
    at: datetime
    test_images: int | None = None


@dataclass(frozen=True)
class ServiceStart:
    """When the gateway first saw pre-labels of a version (it was in service from then on)."""

    model: Version
    first_seen: datetime


@dataclass(frozen=True)
class HumanAnswer:
    """One task a person answered through the gateway: its recorded lease-to-submit time."""

    kind: str
    seconds: float
    answered_at: datetime
    model: Version | None = None
    """The model whose pre-labels the task started from (None: none)."""


@dataclass(frozen=True)
class VerifiedLabel:
    """One verified label set."""

    method: str
    at: datetime
    model: Version | None = None
    for_test_set: bool = False


@dataclass(frozen=True)
class SpotCheck:
    """A person's answer to auto-acceptable pre-labels drawn for a spot check."""

    model: Version | None
    prelabels: int
    deleted: int
    relabelled: int
    unchanged: int
    drawn: int
    at: datetime


@dataclass(frozen=True)
class QueueSpan:
    """When a task was waiting for a person: from joining the queue to its first answer or end."""

    kind: str
    entered: datetime
    left: datetime | None = None
    """None: still open."""


@dataclass
class EconomyRows:
    """Everything `assemble` reads, as economy_store.py fetches it."""

    evaluations: Sequence[Evaluation] = ()
    service: Sequence[ServiceStart] = ()
    answers: Sequence[HumanAnswer] = ()
    verified: Sequence[VerifiedLabel] = ()
    spot_checks: Sequence[SpotCheck] = ()
    queue: Sequence[QueueSpan] = ()


# -- figures out ----------------------------------------------------------------------------------------


class VersionFigures(BaseModel):
    """What one model version bought and cost (model_id null: work done before any model)."""

    model_id: str | None
    version: int | None
    label: str = Field(description="`model_id v3`, or `no model`.")
    map50_95: float | None = Field(None, description="Test mAP50-95 (latest `model.evaluated`).")
    map50: float | None = None
    passed: bool | None = Field(None, description="Whether it passed the gate.")
    test_set_version: str | None = None
    human_tasks: int = Field(0, description="Tasks people answered through the gateway.")
    human_seconds: float = Field(0.0, description="Their recorded time, lease to submit, summed.")
    seconds_per_task: float | None = None
    tasks_by_kind: dict[str, int] = Field(default_factory=dict)
    verified: int = Field(0, description="Verified label sets (imports and test-set labels left out).")
    auto_accepted: int = 0
    auto_accept_rate: float | None = Field(None, description="auto_accepted / verified.")
    spot_checked_images: int = Field(0, description="Auto-acceptable images a person reviewed anyway.")
    spot_checked_boxes: int = Field(0, description="Pre-label boxes on them.")
    boxes_kept: int = Field(0, description="Boxes the person kept (same object, same class).")
    boxes_unchanged: int = Field(0, description="Kept exactly as they were.")
    boxes_deleted: int = 0
    boxes_relabelled: int = 0
    boxes_missed: int = Field(0, description="Boxes the person had to draw: objects the model missed.")
    auto_accept_precision: float | None = Field(None, description="boxes_kept / spot_checked_boxes.")


class QueueKindSummary(BaseModel):
    """Queue depth of one kind (or `all`) over the series."""

    kind: str
    now: int
    peak: int
    peak_at: datetime | None
    mean: float = Field(description="Time-weighted mean depth from the first task to now.")


class QueueSeries(BaseModel):
    """Open tasks by kind over time, sampled at evenly spaced instants."""

    times: list[datetime] = Field(default_factory=list)
    depth: dict[str, list[int]] = Field(default_factory=dict, description="Per kind and `all`, one value per time.")
    summary: list[QueueKindSummary] = Field(default_factory=list)


class EconomyOut(BaseModel):
    """The economy of one project."""

    project: str
    generated_at: datetime
    versions: list[VersionFigures]
    queue: QueueSeries
    rules: dict[str, str] = Field(description="How each figure is measured and attributed.")


RULES = {
    "map50_95": "the candidate's test-set mAP50-95 in the version's latest model.evaluated event",
    "human_seconds": "lease-to-submit time the gateway recorded for each task a person answered through it (Label Studio answers left out)",
    "attribution": (
        "the model version that pre-labelled the task (a re-annotate task inherits its parent's); with no pre-labels, "
        "the newest version whose pre-labels had reached the gateway when the task was answered (or the label verified)"
    ),
    "auto_accept_rate": "auto-accepted label sets / all verified label sets of the version (imports and test-set labels left out)",
    "auto_accept_precision": (
        "spot checks: auto-acceptable pre-labels a person reviewed anyway; kept boxes (matched at IoU 0.3, same class) "
        "/ pre-label boxes"
    ),
    "queue": "a task waits from its creation (or the verifier's refusal of its pre-labels) to its first answer or its end",
}


# -- the assembly -------------------------------------------------------------------------------------


def in_service(starts: Sequence[ServiceStart], at: datetime) -> Version | None:
    """The version in service at `at`: the newest first seen at or before it (None before any)."""
    best: ServiceStart | None = None
    for start in starts:
        if start.first_seen <= at and (best is None or (start.first_seen, start.model[1]) > (best.first_seen, best.model[1])):
            best = start
    return best.model if best else None


def _figures(table: dict[Version | None, VersionFigures], model: Version | None) -> VersionFigures:
    if model not in table:
        label = f"{model[0]} v{model[1]}" if model else "no model"
        table[model] = VersionFigures(model_id=model[0] if model else None, version=model[1] if model else None, label=label)
    return table[model]


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def per_version(rows: EconomyRows) -> list[VersionFigures]:
    """The figures of every version that has any, ordered by model and version (`no model` first)."""
    table: dict[Version | None, VersionFigures] = {}
    for e in rows.evaluations:
        f = _figures(table, e.model)
        f.map50_95, f.map50, f.passed, f.test_set_version = e.map50_95, e.map50, e.passed, e.test_set_version
    for a in rows.answers:
        f = _figures(table, a.model or in_service(rows.service, a.answered_at))
        f.human_tasks += 1
        f.human_seconds += a.seconds
        f.tasks_by_kind[a.kind] = f.tasks_by_kind.get(a.kind, 0) + 1
    for v in rows.verified:
        if v.for_test_set or v.method in LEFT_OUT_METHODS:
            continue
        f = _figures(table, v.model or in_service(rows.service, v.at))
        f.verified += 1
        f.auto_accepted += v.method == "auto"
    for c in rows.spot_checks:
        f = _figures(table, c.model or in_service(rows.service, c.at))
        f.spot_checked_images += 1
        f.spot_checked_boxes += c.prelabels
        f.boxes_kept += max(c.prelabels - c.deleted - c.relabelled, 0)
        f.boxes_unchanged += c.unchanged
        f.boxes_deleted += c.deleted
        f.boxes_relabelled += c.relabelled
        f.boxes_missed += c.drawn
    for f in table.values():
        f.human_seconds = round(f.human_seconds, 3)
        f.seconds_per_task = None if not f.human_tasks else round(f.human_seconds / f.human_tasks, 3)
        f.auto_accept_rate = _ratio(f.auto_accepted, f.verified)
        f.auto_accept_precision = _ratio(f.boxes_kept, f.spot_checked_boxes)
    return [table[k] for k in sorted(table, key=lambda k: ("", -1) if k is None else k)]


def version_axis(versions: Sequence[VersionFigures]) -> tuple[list[str], str]:
    """Short labels for a plot's version axis, and the axis title: `v3` and `model version
    (econ-detector)` when every version is of one model, the full labels otherwise."""
    ids = {v.model_id for v in versions if v.model_id is not None}
    if len(ids) == 1:
        return [v.label if v.version is None else f"v{v.version}" for v in versions], f"model version ({ids.pop()})"
    return [v.label for v in versions], "model version"


def _depth_at(enters: list[datetime], leaves: list[datetime], at: datetime) -> int:
    return bisect.bisect_right(enters, at) - bisect.bisect_right(leaves, at)


def _summary(kind: str, spans: Sequence[QueueSpan], start: datetime, now: datetime) -> QueueKindSummary:
    """Depth now, the exact peak and the time-weighted mean, by a sweep over enter/leave events."""
    events = sorted([(s.entered, 1) for s in spans] + [(max(s.left, s.entered), -1) for s in spans if s.left is not None],
                    key=lambda e: (e[0], e[1]))  # leaves first at one instant
    depth = peak = 0
    peak_at: datetime | None = None
    area, last = 0.0, start
    for at, delta in events:
        at = min(at, now)
        area += depth * (at - last).total_seconds()
        last = at
        depth += delta
        if depth > peak:
            peak, peak_at = depth, at
    area += depth * (now - last).total_seconds()
    span_s = (now - start).total_seconds()
    return QueueKindSummary(kind=kind, now=depth, peak=peak, peak_at=peak_at, mean=round(area / span_s, 3) if span_s > 0 else float(depth))


def queue_series(spans: Sequence[QueueSpan], now: datetime, samples: int = QUEUE_SAMPLES) -> QueueSeries:
    """Open tasks by kind (and `all`) at `samples` instants from the first task to `now`."""
    if not spans:
        return QueueSeries()
    start = min(s.entered for s in spans)
    now = max(now, start)
    count = max(samples, 2) if now > start else 1
    step = (now - start) / max(count - 1, 1)
    times = [start + step * i for i in range(count - 1)] + [now]  # the last one exactly now
    kinds = [k for k in KINDS if any(s.kind == k for s in spans)]
    kinds += sorted({s.kind for s in spans} - set(kinds))
    series = QueueSeries(times=times)
    for kind in [*kinds, "all"]:
        chosen = [s for s in spans if kind == "all" or s.kind == kind]
        enters = sorted(s.entered for s in chosen)
        leaves = sorted(max(s.left, s.entered) for s in chosen if s.left is not None)
        series.depth[kind] = [_depth_at(enters, leaves, t) for t in times]
        series.summary.append(_summary(kind, chosen, start, now))
    return series


def assemble(project: str, rows: EconomyRows, now: datetime, samples: int = QUEUE_SAMPLES) -> EconomyOut:
    """The economy of `project` from its rows, as of `now`."""
    return EconomyOut(
        project=project, generated_at=now, versions=per_version(rows), queue=queue_series(rows.queue, now, samples), rules=dict(RULES),
    )
