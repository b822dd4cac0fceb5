"""Reconciliation: PostgreSQL against the event log; every discrepancy with its ids."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from visionloop.bench.chaos.config import FLEET, KNOWN_RELEASE_STATES, PENDING_PERSON, PROJECT

log = logging.getLogger(__name__)


@dataclass
class Truth:
    """What PostgreSQL holds at the end, per service (the rows `reconcile` needs)."""

    submissions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """ingest: submission id -> outcome, reason, image id."""
    images: dict[str, str] = field(default_factory=dict)
    """ingest: image id -> its first submission."""
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """dedup: image id -> outcome, reason."""
    recognitions: Counter[str] = field(default_factory=Counter)
    """recognizer: image id -> decisions recorded."""
    tasks: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    """gateway: image id -> task states."""
    labels: set[str] = field(default_factory=set)
    """gateway: image ids with a verified label set kept for training."""
    samples: dict[str, str] = field(default_factory=dict)
    """trainer: image id -> role (train, test)."""
    runs: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    """trainer: model id, version, run id."""
    library: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    """model library: (model id, version, target) -> entries."""
    releases: list[dict[str, Any]] = field(default_factory=list)
    release_devices: defaultdict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    """distributor: release id -> device id -> state."""


async def load_truth(pool: Any, settings: Any) -> Truth:
    """Read every table `reconcile` needs (a service that never ran has no tables: nothing from it)."""
    def q(service: str, table: str) -> str:
        return f'"{settings.schema_for(service)}".{table}'

    async def rows(sql: str, *args: Any) -> list[Any]:
        try:
            return list(await pool.fetch(sql, *args))
        except Exception as exc:  # asyncpg.UndefinedTableError: the service never started
            log.warning("chaos: %s", exc)
            return []

    t = Truth()
    for r in await rows(f"SELECT submission_id, outcome, reason, image_id FROM {q('ingest', 'submissions')} WHERE project = $1", PROJECT):
        t.submissions[r["submission_id"]] = dict(r)
    for r in await rows(f"SELECT image_id, first_submission FROM {q('ingest', 'images')}"):
        t.images[r["image_id"]] = r["first_submission"]
    for r in await rows(f"SELECT image_id, outcome, reason FROM {q('dedup', 'decisions')} WHERE project = $1", PROJECT):
        t.decisions[r["image_id"]] = dict(r)
    for r in await rows(f"SELECT image_id, count(*) AS n FROM {q('recognizer', 'recognitions')} WHERE project = $1 GROUP BY image_id", PROJECT):
        t.recognitions[r["image_id"]] = int(r["n"])
    for r in await rows(f"SELECT image_id, state FROM {q('labeling-gateway', 'tasks')} WHERE project = $1", PROJECT):
        t.tasks[r["image_id"]].append(r["state"])
    for r in await rows(f"SELECT image_id FROM {q('labeling-gateway', 'labels')} WHERE project = $1 AND NOT for_test_set", PROJECT):
        t.labels.add(r["image_id"])
    for r in await rows(f"SELECT image_id, role FROM {q('trainer', 'samples')} WHERE project = $1", PROJECT):
        t.samples[r["image_id"]] = r["role"]
    t.runs = [dict(r) for r in await rows(
        f"SELECT run_id, status, reason, attempts, version FROM {q('trainer', 'runs')} WHERE project = $1 ORDER BY created_at", PROJECT)]
    t.models = [dict(r) for r in await rows(
        f"SELECT model_id, version, run_id FROM {q('trainer', 'models')} WHERE project = $1 ORDER BY version", PROJECT)]
    for r in await rows(f"SELECT model_id, version, target, count(*) AS n FROM {q('library', 'entries')} WHERE project = $1 "
                        "GROUP BY model_id, version, target", PROJECT):
        t.library[(r["model_id"], int(r["version"]), r["target"])] = int(r["n"])
    t.releases = [dict(r) for r in await rows(
        f"SELECT release_id, fleet, target, version, status, updated_at FROM {q('distributor', 'releases')} WHERE project = $1 "
        "ORDER BY created_at", PROJECT)]
    for r in await rows(f"SELECT release_id, device_id, state FROM {q('distributor', 'release_devices')}"):
        t.release_devices[r["release_id"]][r["device_id"]] = r["state"]
    return t


@dataclass
class Reconciliation:
    """The counts of `reconcile`, and every discrepancy as a sentence with its ids."""

    submitted: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    labelled: int = 0
    pending: int = 0
    lost: int = 0
    duplicated: int = 0
    duplicated_by_kind: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    """Messages a service gave up on (a discrepancy: under chaos nothing may be refused for good)."""
    releases: dict[str, str] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    discrepancies: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> int:
        """Submissions with exactly one terminal decision."""
        return self.rejected + self.labelled + self.pending


DUPLICATE_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "image.ingested": lambda e: ("ingest answer", e["payload"]["submission_id"]),
    "image.accepted": lambda e: ("decision", e["payload"]["submission_id"]),
    "image.rejected": lambda e: ("decision", e["payload"]["submission_id"]),
    "image.recognized": lambda e: ("recognition", e["causation_id"]),
    "image.unrecognized": lambda e: ("recognition", e["causation_id"]),
    "label.submitted": lambda e: ("label submission", e["payload"]["submission_id"]),
    "label.verified": lambda e: ("verified label", e["payload"]["label_id"]),
    "label.rejected": lambda e: ("label verdict", e["payload"]["submission_id"]),
    "model.trained": lambda e: ("trained model", e["payload"]["lineage"]["model"]["model_id"], e["payload"]["lineage"]["model"]["version"]),
    "model.evaluated": lambda e: ("evaluation", e["payload"]["lineage"]["model"]["model_id"], e["payload"]["lineage"]["model"]["version"]),
    "model.converted": lambda e: ("conversion", e["payload"]["lineage"]["model"]["model_id"], e["payload"]["lineage"]["model"]["version"]),
    "model.packaged": lambda e: ("package", e["payload"]["lineage"]["model"]["model_id"], e["payload"]["lineage"]["model"]["version"],
                                 e["payload"]["target"]),
    "release.edge": lambda e: ("release step", e["payload"]["release_id"], e["payload"]["action"], e["payload"]["stage"]["index"]),
    "release.server": lambda e: ("release step", e["payload"]["release_id"], e["payload"]["action"], e["payload"]["stage"]["index"]),
}
"""Per event type, the effect it records: two events (two event ids) with one key are one effect twice."""


@dataclass
class _Seen:
    """What the project's events record, indexed for `reconcile`."""

    by_key: defaultdict[Any, set[str]] = field(default_factory=lambda: defaultdict(set))
    """Effect (`DUPLICATE_KEYS`) -> the ids of the events that record it."""
    decisions: defaultdict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    """Submission id -> its `image accepted` and `image rejected` events."""
    registrations: defaultdict[tuple[str, int, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    """(model id, version, target) -> when it was registered."""
    verified_images: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """Image id -> the ids of its verified labels kept for training."""
    verified_event_images: set[str] = field(default_factory=set)
    """Image ids with a `label verified` event kept for training."""


def _dead_letters(out: Reconciliation, events: Iterable[dict[str, Any]]) -> None:
    """Count every message a service gave up on, as a discrepancy."""
    for e in events:
        if e.get("event_type") == "message.deadlettered":
            p = e.get("payload") or {}
            out.dead_letters += 1
            out.discrepancies.append(f"dead letter: {p.get('service')} gave up on {p.get('original', {}).get('topic')} "
                                     f"({p.get('reason')}: {str(p.get('message'))[:200]})")


def _index(project_events: list[dict[str, Any]]) -> _Seen:
    """Index the project's events by the effect each records (an event missing a field is left out)."""
    seen = _Seen()
    for e in project_events:
        kind = e.get("event_type")
        with contextlib.suppress(KeyError, TypeError):
            if kind in DUPLICATE_KEYS:
                seen.by_key[DUPLICATE_KEYS[kind](e)].add(str(e["event_id"]))
            if kind in ("image.accepted", "image.rejected"):
                seen.decisions[e["payload"]["submission_id"]].append(e)
            elif kind == "model.registered":
                p = e["payload"]
                ref = p["lineage"]["model"]
                seen.registrations[(ref["model_id"], int(ref["version"]), p["target"])].add(str(p["registered_at"]))
            elif kind == "label.verified" and not e["payload"].get("for_test_set"):
                image = e["payload"]["image"]["image_id"]
                seen.verified_images[image].add(e["payload"]["label_id"])
                seen.verified_event_images.add(image)
    return seen


def _duplicate(out: Reconciliation, kind: str, extra: int, message: str) -> None:
    """Count `extra` copies of one effect, as a discrepancy."""
    out.duplicated += extra
    out.duplicated_by_kind[kind] += extra
    out.discrepancies.append(f"duplicated: {message}")


def _duplicates(out: Reconciliation, seen: _Seen, truth: Truth) -> None:
    """Count every effect recorded more than once, in the events or in PostgreSQL."""
    for key, ids in seen.by_key.items():
        if len(ids) > 1:
            _duplicate(out, key[0], len(ids) - 1, f"{key[0]} {key[1:]} recorded by {len(ids)} events ({', '.join(sorted(ids)[:4])})")
    for ref, stamps in seen.registrations.items():
        if len(stamps) > 1:
            _duplicate(out, "library registration", len(stamps) - 1, f"model {ref} registered {len(stamps)} times")
    for ref, n in truth.library.items():
        if n > 1:
            _duplicate(out, "library registration", n - 1, f"model {ref} has {n} library entries")
    for image, labels in seen.verified_images.items():
        if len(labels) > 1:
            _duplicate(out, "verified image", len(labels) - 1, f"image {image[:16]} verified {len(labels)} times ({', '.join(sorted(labels))})")
    runs = Counter(m["run_id"] for m in truth.models)
    for run_id, n in runs.items():
        if n > 1:
            _duplicate(out, "model per run", n - 1, f"run {run_id} produced {n} model versions")


def _lost(out: Reconciliation, submission: str, where: str) -> None:
    """Count one submission lost, as a discrepancy saying where."""
    out.lost += 1
    out.discrepancies.append(f"lost: {submission}: {where}")


def _rejected(out: Reconciliation, submission: str, row: dict[str, Any], event: dict[str, Any], truth: Truth) -> None:
    """Count a rejected submission; name a rejection its service's table does not show."""
    reason = event["payload"]["reason"]
    stage = event["payload"].get("stage")
    if stage == "ingest" and (row["outcome"] != "rejected" or row["reason"] != reason):
        out.discrepancies.append(f"mismatch: {submission}: rejected by ingest ({reason}) but ingest's table says {row['outcome']} {row['reason']}")
    elif stage == "dedup":
        db = truth.decisions.get(row["image_id"] or "")
        if db is None:
            out.discrepancies.append(f"mismatch: {submission}: rejected by dedup ({reason}) but dedup has no decision on its image")
        elif reason not in ("duplicate",) and (db["outcome"] != "rejected" or db["reason"] != reason):
            out.discrepancies.append(f"mismatch: {submission}: rejected by dedup ({reason}), dedup's table says {db['outcome']} {db['reason']}")
    out.rejected += 1
    out.reasons[reason] += 1


def _accepted(out: Reconciliation, submission: str, event: dict[str, Any], truth: Truth, seen: _Seen) -> None:
    """Count an accepted submission labelled or waiting for a person; anything else is lost."""
    image = event["payload"]["image"]["image_id"]
    db = truth.decisions.get(image)
    if db is None or db["outcome"] != "accepted":
        out.discrepancies.append(f"mismatch: {submission}: accepted, but dedup's table says {db['outcome'] if db else 'nothing'}")
    states = truth.tasks.get(image, [])
    if image in truth.labels and image in seen.verified_event_images:
        out.labelled += 1
        if image not in truth.samples:
            out.discrepancies.append(f"mismatch: {submission}: image {image[:16]} is labelled but not in the trainer's dataset")
    elif any(s in PENDING_PERSON for s in states):
        out.pending += 1
    elif not truth.recognitions.get(image):
        _lost(out, submission, f"accepted (image {image[:16]}) but never recognised or refused by the recognizer")
    elif not states:
        _lost(out, submission, f"recognised (image {image[:16]}) but no labelling task was made")
    else:
        _lost(out, submission, f"image {image[:16]} is neither labelled nor waiting for a person (tasks: {', '.join(states)})")


def _submissions(out: Reconciliation, items: dict[str, Any], seen: _Seen, truth: Truth) -> None:
    """Follow every submission to its one terminal decision; then the trainer's images to their labels."""
    for submission in sorted(items):
        row = truth.submissions.get(submission)
        decided = seen.decisions.get(submission, [])
        if row is None:
            _lost(out, submission, "ingest has no record of it")
            continue
        if not decided:
            _lost(out, submission, f"ingest {row['outcome']} it but no decision was ever published")
            continue
        event = decided[0]
        if event["event_type"] == "image.rejected":
            _rejected(out, submission, row, event, truth)
            continue
        _accepted(out, submission, event, truth, seen)
    for image, role in truth.samples.items():
        if role == "train" and image not in truth.labels:
            out.discrepancies.append(f"mismatch: the trainer trains on image {image[:16]}, which has no verified label at the gateway")


def _releases(out: Reconciliation, truth: Truth, devices: dict[str, int | None]) -> None:
    """Check every release ended, each device runs the fleet's last completed release, and no training run is left open."""
    for release in truth.releases:
        out.releases[release["release_id"]] = release["status"]
        if release["status"] not in KNOWN_RELEASE_STATES:
            out.discrepancies.append(f"release {release['release_id']} ended {release['status']}, not completed, superseded or rolled back")
    edge = [r for r in truth.releases if r["target"] == "edge" and r["fleet"] == FLEET and r["status"] == "completed"]
    last = max(edge, key=lambda r: r["updated_at"]) if edge else None
    for device, version in sorted(devices.items()):
        expected = last["version"] if last else None
        reported = truth.release_devices.get(last["release_id"], {}).get(device) if last else None
        out.devices[device] = {"version": version, "expected": expected, "reported": reported}
        if version != expected:
            out.discrepancies.append(f"device {device} runs v{version}, the fleet's last completed release is v{expected}")
        elif last is not None and reported != "activated":
            out.discrepancies.append(f"device {device} runs v{version} but the distributor has it {reported} for {last['release_id']}")
    for run in truth.runs:
        if run["status"] in ("queued", "running"):
            out.discrepancies.append(f"training run {run['run_id']} ended {run['status']}")


def reconcile(items: dict[str, Any], events: Iterable[dict[str, Any]], truth: Truth, devices: dict[str, int | None]) -> Reconciliation:
    """Check the end state against the invariants of the module docstring; count and name every discrepancy.

    `items`: what upstream submitted, by submission id; `events`: the event log (one per event id);
    `devices`: each edge agent's active model version at the end.
    """
    out = Reconciliation(submitted=len(items))
    project_events = [e for e in events if e.get("project") == PROJECT]
    _dead_letters(out, events)
    seen = _index(project_events)
    _duplicates(out, seen, truth)
    _submissions(out, items, seen, truth)
    _releases(out, truth, devices)
    return out
