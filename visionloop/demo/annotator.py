"""A simulated person at the labelling gateway: draws boxes from the world's ground truth and
reviews pre-labels, over the gateway's HTTP API, keeping the counts and the time a person would
have spent.

What the person does with a task is decided by `people.decide` (pure): the ground truth at IoU
0.5, filtered through the person's error rates (`people.PersonErrors`: misses, box jitter
relative to the box's size and class confusion when drawing; rubber-stamping a wrong pre-label
set and not noticing an object the pre-labels missed when checking shown boxes). Review tasks end
in `accept`, `correct` or `reject`.

Time is simulated, never slept: every task's counted actions (`effort.Actions`: boxes drawn,
images reviewed, boxes shown, boxes corrected) are priced by `effort.Costs` (35 s a drawn box, 4 s
a reviewed image plus 1.6 s a box shown, 8 s a box moved, relabelled or deleted, by default);
every task that shows boxes is charged the review, an annotate task with model boxes included.
`tally.seconds` is always `effort.seconds(tally.actions, costs)`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import numpy as np

from visionloop.contracts import Box, ReviewDecision
from visionloop.demo.effort import Actions, Costs, seconds
from visionloop.demo.people import MIN_SIDE_PX, PERFECT, RIGHT_IOU, TIGHT_IOU, Edit, PersonErrors
from visionloop.demo.people import decide as decide_task
from visionloop.demo.world import World

__all__ = ["MIN_SIDE_PX", "PERFECT", "RIGHT_IOU", "Annotator", "Costs", "GatewayError", "Outcome", "PersonErrors", "Tally"]


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
    """True objects left unlabelled by the person (not drawn, or unnoticed in a review)."""
    kept: int = 0
    moved: int = 0
    relabelled: int = 0
    deleted: int = 0
    confused: int = 0
    """Drawn boxes given a wrong class."""
    stamped: bool = False
    """A starting set with a wrong box was left (accepted) as it was."""
    seconds: float = 0.0
    """Simulated time the task cost (`effort.seconds(actions, costs)`)."""
    submission_id: str | None = None
    actions: Actions = field(default_factory=Actions)
    """What the task took the person (`effort.Actions`; empty unless submitted)."""
    label_actions: dict[str, int] = field(default_factory=dict)
    """The gateway's own count of what was done to the starting boxes (`LabelActions`)."""


@dataclass
class Tally:
    """The counters of the demo report; `seconds` is always the `actions` priced at `costs`."""

    costs: Costs = field(default_factory=Costs)
    actions: Actions = field(default_factory=Actions)
    """Every submitted task's actions, summed."""
    actions_by_kind: dict[str, Actions] = field(default_factory=dict)
    tasks: Counter[str] = field(default_factory=Counter)
    """Tasks answered, by kind."""
    boxes_drawn: int = 0
    """Boxes drawn in annotate and re-annotate tasks."""
    boxes_missed: int = 0
    """True objects left unlabelled: not drawn (`miss_rate`) or unnoticed in a review (`review_miss_rate`)."""
    boxes_added: int = 0
    """Boxes drawn while correcting pre-labels in a review (objects the model missed)."""
    boxes_kept: int = 0
    """Starting boxes kept as they were."""
    boxes_moved: int = 0
    boxes_relabelled: int = 0
    boxes_deleted: int = 0
    boxes_confused: int = 0
    """Drawn boxes given a wrong class (`confusion_rate`)."""
    stamped: int = 0
    """Starting sets with a wrong box left (accepted) as they were (`rubber_stamp_rate`)."""
    accepts: int = 0
    corrections: int = 0
    rejects: int = 0
    skipped: int = 0
    """Tasks skipped because the world does not know the image."""
    lease_lost: int = 0

    @property
    def boxes_corrected(self) -> int:
        """Boxes changed while correcting: moved, relabelled, deleted or added (in a review)."""
        return self.boxes_moved + self.boxes_relabelled + self.boxes_deleted + self.boxes_added

    @property
    def seconds(self) -> float:
        """Simulated seconds of every submitted task: `effort.seconds(actions, costs)`."""
        return seconds(self.actions, self.costs)

    @property
    def seconds_by_kind(self) -> Counter[str]:
        """Simulated seconds by task kind."""
        return Counter({kind: seconds(a, self.costs) for kind, a in self.actions_by_kind.items()})


class Annotator:
    """One simulated labeller with one gateway token.

    `http` is an `httpx.AsyncClient` to share (its base URL is used; the token goes on each
    request); without one the annotator opens its own on `base_url` (close it with `aclose`).
    A reviewer (or admin) token gets review tasks too; an annotator token only draws.
    `errors` are the person's error rates and `costs` the seconds per action (the published
    defaults when None). The older keywords still work and override one field each: `noise_px`
    (`errors.jitter_px`), `miss_rate` (`errors.miss_rate`), `seconds_per_box` (`costs.draw_box_s`),
    `seconds_per_review` (`costs.review_image_s`), `seconds_per_correction` (`costs.correct_box_s`).
    `tight_iou`: when a task is being corrected anyway, a right box looser than this is drawn
    again (moved); it never stops an `accept`. `kinds` limits the tasks asked for (`annotate`,
    `review`, `reannotate`; every kind the token may take when None); it may be changed between calls.
    Every chance is drawn from one generator seeded with `rng_seed`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        project: str,
        world: World,
        *,
        user_id: str,
        errors: PersonErrors | None = None,
        costs: Costs | None = None,
        noise_px: float | None = None,
        miss_rate: float | None = None,
        seconds_per_box: float | None = None,
        seconds_per_review: float | None = None,
        seconds_per_correction: float | None = None,
        tight_iou: float = TIGHT_IOU,
        kinds: Sequence[str] | None = None,
        rng_seed: int = 0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.errors = _override(errors or PersonErrors(), jitter_px=noise_px, miss_rate=miss_rate)
        self.costs = _override(costs or Costs(), draw_box_s=seconds_per_box, review_image_s=seconds_per_review,
                               correct_box_s=seconds_per_correction)
        if not 0.0 <= tight_iou <= 1.0:
            raise ValueError(f"tight_iou must be in [0, 1], got {tight_iou!r}")
        self.project = project
        self.world = world
        self.user_id = user_id
        self.tight_iou = tight_iou
        self.kinds = kinds
        self.rng = np.random.default_rng(rng_seed)
        self._headers = {"Authorization": f"Bearer {token}"}
        self._own = http is None
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=30)
        self.tally = Tally(costs=self.costs)
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
        """Lease the next task, decide from the ground truth (through the person's errors), answer
        it; None when no task is left."""
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

        edit = self.decide(task, truth)
        body: dict[str, Any] = dict(lease)
        if edit.decision is not None:
            body["decision"] = edit.decision.value
        if edit.decision is None or edit.decision is ReviewDecision.CORRECT:
            body["boxes"] = [_box_in(b) for b in edit.boxes]
        answer = await self.http.post(self._url(f"tasks/{task_id}/submit"), headers=self._headers, json=body)
        if answer.status_code == 409:
            self.tally.lease_lost += 1
            return self._record(Outcome(task_id=task_id, kind=kind, image_id=image["image_id"], action="lease_lost"))
        _raise_for(answer, ok=(201,))
        out = answer.json()
        self._count(kind, edit)
        return self._record(Outcome(
            task_id=task_id, kind=kind, image_id=image["image_id"], action="submitted", decision=edit.decision,
            boxes=edit.boxes, truth=len(truth), drawn=edit.drawn, missed=edit.missed, kept=edit.kept, moved=edit.moved,
            relabelled=edit.relabelled, deleted=edit.deleted, confused=edit.confused, stamped=edit.stamped,
            seconds=seconds(edit.actions, self.costs), submission_id=out["submission_id"], actions=edit.actions,
            label_actions=out.get("actions", {}),
        ))

    # -- decisions ----------------------------------------------------------------------------------

    def decide(self, task: dict[str, Any], truth: Sequence[Box]) -> Edit:
        """What this person does with a leased task (the gateway's task JSON), by `people.decide`."""
        image = task["image"]
        classes = task.get("classes") or list(getattr(self.world, "classes", ()))
        return decide_task(
            [_box(b) for b in task["start_boxes"]], truth, kind=task["kind"], errors=self.errors, rng=self.rng,
            width=image["width"], height=image["height"], classes=classes,
            decision_required=bool(task.get("decision_required")) or task["kind"] == "review", tight_iou=self.tight_iou,
        )

    def _count(self, kind: str, edit: Edit) -> None:
        t = self.tally
        t.tasks[kind] += 1
        t.actions += edit.actions
        t.actions_by_kind[kind] = t.actions_by_kind.get(kind, Actions()) + edit.actions
        if edit.decision is None:
            t.boxes_drawn += edit.drawn
        else:
            t.boxes_added += edit.drawn
            t.accepts += edit.decision is ReviewDecision.ACCEPT
            t.corrections += edit.decision is ReviewDecision.CORRECT
            t.rejects += edit.decision is ReviewDecision.REJECT
        t.boxes_missed += edit.missed
        t.boxes_kept += edit.kept
        t.boxes_moved += edit.moved
        t.boxes_relabelled += edit.relabelled
        t.boxes_deleted += edit.deleted
        t.boxes_confused += edit.confused
        t.stamped += edit.stamped

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


def _override(value: Any, **changes: Any) -> Any:
    """`value` with the fields given (not None) replaced: the older keyword arguments."""
    given = {k: v for k, v in changes.items() if v is not None}
    return replace(value, **given) if given else value
