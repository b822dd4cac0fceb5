"""A simulated person at the labelling gateway: draws boxes from the world's ground truth and
reviews pre-labels, over the gateway's HTTP API, keeping the counts and the time a person would
have spent.

Its judgement is the ground truth at IoU 0.5: a starting box (a pre-label, a model's guess, a
rejected answer's box) over a true object of the same class is right and kept as it is (drawn
again, "moved", when the task is being corrected anyway and the box is looser than `tight_iou`);
one over a true object of another class is relabelled; one over no true object is deleted; a true object
no starting box covers is drawn, with gaussian jitter `noise_px` on each corner, and missed with
probability `miss_rate`. Review tasks end in one decision: `accept` when every pre-label is right
and nothing is missing, `reject` when no pre-label is over any true object, `correct` otherwise.

Time is simulated, never slept: `seconds_per_box` per drawn box (35 s, the figure published for
drawing a box by hand), `seconds_per_review` per review decision (a few seconds: verifying a box
is that much cheaper) and `seconds_per_correction` per box moved, relabelled or deleted.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from visionloop.contracts import Box, ReviewDecision
from visionloop.demo.world import World
from visionloop.libs.boxes import match

RIGHT_IOU = 0.5
"""A box over a true object at this IoU or more is that object."""
MIN_SIDE_PX = 4.0
"""A drawn box is kept at least this wide and high (a jittered small box must stay a box)."""


@dataclass(frozen=True)
class Outcome:
    """What the annotator did with one task (one per-image record of the demo report)."""

    task_id: str
    kind: str
    """The task's kind (`annotate`, `review`, `reannotate`)."""
    image_id: str
    action: str
    """`submitted`, `skipped` (the world does not know the image) or `lease_lost`."""
    decision: ReviewDecision | None = None
    boxes: tuple[Box, ...] = ()
    """The boxes submitted (for `accept`: the pre-labels kept)."""
    truth: int = 0
    """True objects in the image."""
    drawn: int = 0
    missed: int = 0
    kept: int = 0
    moved: int = 0
    relabelled: int = 0
    deleted: int = 0
    seconds: float = 0.0
    """Simulated time the task cost."""
    submission_id: str | None = None
    actions: dict[str, int] = field(default_factory=dict)
    """The gateway's own count of what was done to the starting boxes (`LabelActions`)."""


@dataclass
class Tally:
    """The counters of the demo report."""

    tasks: Counter[str] = field(default_factory=Counter)
    """Tasks answered, by kind."""
    boxes_drawn: int = 0
    """Boxes drawn in annotate and re-annotate tasks."""
    boxes_missed: int = 0
    """True objects the annotator failed to draw (`miss_rate`)."""
    boxes_added: int = 0
    """Boxes drawn while correcting pre-labels (objects the model missed)."""
    boxes_kept: int = 0
    """Starting boxes kept as they were."""
    boxes_moved: int = 0
    boxes_relabelled: int = 0
    boxes_deleted: int = 0
    accepts: int = 0
    corrections: int = 0
    rejects: int = 0
    skipped: int = 0
    """Tasks skipped because the world does not know the image."""
    lease_lost: int = 0
    seconds: float = 0.0
    seconds_by_kind: Counter[str] = field(default_factory=Counter)

    @property
    def boxes_corrected(self) -> int:
        """Boxes changed while correcting: moved, relabelled, deleted or added."""
        return self.boxes_moved + self.boxes_relabelled + self.boxes_deleted + self.boxes_added


@dataclass(frozen=True)
class _Edit:
    boxes: list[Box]
    right: int = 0
    """Starting boxes over a true object of their class (IoU >= `RIGHT_IOU`)."""
    drawn: int = 0
    missed: int = 0
    kept: int = 0
    moved: int = 0
    relabelled: int = 0
    deleted: int = 0
    all_wrong: bool = False


class Annotator:
    """One simulated labeller with one gateway token.

    `http` is an `httpx.AsyncClient` to share (its base URL is used; the token goes on each
    request); without one the annotator opens its own on `base_url` (close it with `aclose`).
    A reviewer (or admin) token gets review tasks too; an annotator token only draws.
    `tight_iou`: when a task is being corrected anyway, a right box looser than this is drawn
    again (moved); it never stops an `accept`. `kinds` limits the tasks asked for (`annotate`,
    `review`, `reannotate`; every kind the token may take when None); it may be changed between calls.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        project: str,
        world: World,
        *,
        user_id: str,
        noise_px: float = 2.0,
        miss_rate: float = 0.0,
        seconds_per_box: float = 35.0,
        seconds_per_review: float = 4.0,
        seconds_per_correction: float = 8.0,
        tight_iou: float = 0.75,
        kinds: Sequence[str] | None = None,
        rng_seed: int = 0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not 0.0 <= miss_rate <= 1.0:
            raise ValueError(f"miss_rate {miss_rate} is not a probability")
        self.project = project
        self.world = world
        self.user_id = user_id
        self.noise_px = noise_px
        self.miss_rate = miss_rate
        self.seconds_per_box = seconds_per_box
        self.seconds_per_review = seconds_per_review
        self.seconds_per_correction = seconds_per_correction
        self.tight_iou = tight_iou
        self.kinds = kinds
        self.rng = np.random.default_rng(rng_seed)
        self._headers = {"Authorization": f"Bearer {token}"}
        self._own = http is None
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=30)
        self.tally = Tally()
        self.records: list[Outcome] = []
        """Every task handled, in order."""

    async def aclose(self) -> None:
        """Close the HTTP client if the annotator opened it."""
        if self._own:
            await self.http.aclose()

    async def __aenter__(self) -> "Annotator":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the loop ---------------------------------------------------------------------------------

    async def drain(self, max_tasks: int | None = None, idle_s: float = 0.0, poll_s: float = 0.2) -> list[Outcome]:
        """Answer tasks until the queue has none for this labeller (waiting up to `idle_s` for
        more to appear) or `max_tasks` were handled; the outcomes of this call."""
        done: list[Outcome] = []
        idle_since: float | None = None
        while max_tasks is None or len(done) < max_tasks:
            outcome = await self.run_once()
            if outcome is not None:
                done.append(outcome)
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since if idle_since is not None else now
            if now - idle_since >= idle_s:
                break
            await asyncio.sleep(poll_s)
        return done

    async def run_once(self) -> Outcome | None:
        """Lease the next task, decide from the ground truth, answer it; None when no task is left."""
        params = [("kind", k) for k in self.kinds] if self.kinds else None
        got = await self.http.post(self._url("tasks/next"), headers=self._headers, params=params)
        if got.status_code == 204:
            return None
        _raise_for(got)
        task = got.json()
        task_id, kind = task["task_id"], task["kind"]
        image = task["image"]
        lease = {"lease_id": task["lease"]["lease_id"]}
        truth = self.world.truth(image["image_id"])
        if truth is None:
            skipped = await self.http.post(self._url(f"tasks/{task_id}/skip"), headers=self._headers, json=lease)
            _raise_for(skipped, ok=(204, 409))
            self.tally.skipped += 1
            return self._record(Outcome(task_id=task_id, kind=kind, image_id=image["image_id"], action="skipped"))

        start = [_box(b) for b in task["start_boxes"]]
        edit = self._edit(start, truth, width=image["width"], height=image["height"])
        body: dict[str, Any] = dict(lease)
        decision: ReviewDecision | None = None
        if task.get("decision_required") or kind == "review":
            if start and edit.right == len(start) == len(truth):
                decision = ReviewDecision.ACCEPT
                edit = _Edit(boxes=start, right=len(start), kept=len(start))
            elif start and edit.all_wrong:
                decision = ReviewDecision.REJECT
                edit = _Edit(boxes=[])
            else:
                decision = ReviewDecision.CORRECT
                body["boxes"] = [_box_in(b) for b in edit.boxes]
            body["decision"] = decision.value
        else:
            body["boxes"] = [_box_in(b) for b in edit.boxes]

        seconds = self._seconds(kind, decision, edit)
        answer = await self.http.post(self._url(f"tasks/{task_id}/submit"), headers=self._headers, json=body)
        if answer.status_code == 409:
            self.tally.lease_lost += 1
            return self._record(Outcome(task_id=task_id, kind=kind, image_id=image["image_id"], action="lease_lost"))
        _raise_for(answer, ok=(201,))
        out = answer.json()
        self._count(kind, decision, edit, seconds)
        return self._record(Outcome(
            task_id=task_id, kind=kind, image_id=image["image_id"], action="submitted", decision=decision,
            boxes=tuple(edit.boxes), truth=len(truth), drawn=edit.drawn, missed=edit.missed, kept=edit.kept,
            moved=edit.moved, relabelled=edit.relabelled, deleted=edit.deleted, seconds=seconds,
            submission_id=out["submission_id"], actions=out.get("actions", {}),
        ))

    # -- decisions ----------------------------------------------------------------------------------

    def _edit(self, start: Sequence[Box], truth: Sequence[Box], *, width: int, height: int) -> _Edit:
        """Turn the starting boxes into the truth as a person would: keep, tighten, relabel,
        delete, draw."""
        # Same-class pairs first: a right box must not be "relabelled" onto a neighbour.
        same = match(start, truth, min_iou=RIGHT_IOU, same_class=True)
        used_start = {p.left for p in same}
        used_truth = {p.right for p in same}
        final: list[Box] = []
        kept = moved = relabelled = 0
        for p in same:
            if p.iou >= self.tight_iou:
                final.append(start[p.left])
                kept += 1
            else:  # right object, sloppy box: drawn again over it
                final.append(self._draw(truth[p.right], width, height))
                moved += 1
        for p in match(start, truth, min_iou=RIGHT_IOU, same_class=False):
            if p.left in used_start or p.right in used_truth:
                continue
            used_start.add(p.left)
            used_truth.add(p.right)
            final.append(start[p.left].model_copy(update={"class_name": truth[p.right].class_name}))
            relabelled += 1
        drawn = missed = 0
        for j, true in enumerate(truth):
            if j in used_truth:
                continue
            if self.miss_rate > 0 and self.rng.random() < self.miss_rate:
                missed += 1
                continue
            final.append(self._draw(true, width, height))
            drawn += 1
        all_wrong = bool(start) and not match(start, truth, min_iou=RIGHT_IOU, same_class=False)
        return _Edit(
            boxes=final, right=len(same), drawn=drawn, missed=missed, kept=kept, moved=moved, relabelled=relabelled,
            deleted=len(start) - len(used_start), all_wrong=all_wrong,
        )

    def _draw(self, true: Box, width: int, height: int) -> Box:
        """A person's box around a true object: each corner off by gaussian noise, inside the image."""
        x1, y1, x2, y2 = (v + float(self.rng.normal(0.0, self.noise_px)) if self.noise_px > 0 else v
                          for v in (true.x1, true.y1, true.x2, true.y2))
        x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
        y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
        x1, x2 = _widen(x1, x2, width)
        y1, y2 = _widen(y1, y2, height)
        return Box(x1=x1, y1=y1, x2=x2, y2=y2, class_name=true.class_name)

    def _seconds(self, kind: str, decision: ReviewDecision | None, edit: _Edit) -> float:
        fixes = edit.moved + edit.relabelled + edit.deleted
        review = self.seconds_per_review if decision is not None else 0.0
        return review + edit.drawn * self.seconds_per_box + fixes * self.seconds_per_correction

    def _count(self, kind: str, decision: ReviewDecision | None, edit: _Edit, seconds: float) -> None:
        t = self.tally
        t.tasks[kind] += 1
        if decision is None:
            t.boxes_drawn += edit.drawn
        else:
            t.boxes_added += edit.drawn
            t.accepts += decision is ReviewDecision.ACCEPT
            t.corrections += decision is ReviewDecision.CORRECT
            t.rejects += decision is ReviewDecision.REJECT
        t.boxes_missed += edit.missed
        t.boxes_kept += edit.kept
        t.boxes_moved += edit.moved
        t.boxes_relabelled += edit.relabelled
        t.boxes_deleted += edit.deleted
        t.seconds += seconds
        t.seconds_by_kind[kind] += seconds

    def _record(self, outcome: Outcome) -> Outcome:
        self.records.append(outcome)
        return outcome

    def _url(self, path: str) -> str:
        return f"/v1/projects/{self.project}/{path}"


class GatewayError(RuntimeError):
    """The gateway refused a request the annotator should not have got wrong."""


def _raise_for(response: httpx.Response, ok: tuple[int, ...] = (200,)) -> None:
    if response.status_code not in ok:
        raise GatewayError(f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:500]}")


def _box(raw: dict[str, Any]) -> Box:
    return Box(x1=raw["x1"], y1=raw["y1"], x2=raw["x2"], y2=raw["y2"], class_name=raw["class_name"])


def _box_in(box: Box) -> dict[str, Any]:
    return {"class_name": box.class_name, "x1": box.x1, "y1": box.y1, "x2": box.x2, "y2": box.y2}


def _widen(a: float, b: float, limit: float) -> tuple[float, float]:
    """Grow [a, b] to `MIN_SIDE_PX` (or the whole image if smaller), staying inside [0, limit]."""
    side = min(MIN_SIDE_PX, limit)
    if b - a >= side:
        return a, b
    centre = (a + b) / 2
    a = min(max(centre - side / 2, 0.0), limit - side)
    return a, a + side
