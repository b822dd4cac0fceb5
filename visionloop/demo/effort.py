"""What a simulated person's work costs in seconds: counted actions priced by per-action costs.

Pure, no I/O. A task's `Actions` count what a person did (boxes drawn, images reviewed, boxes
shown, boxes corrected); `seconds(actions, costs)` prices them. Effort is kept as counts and
priced afterwards, so the same runs answer any set of costs (`COST_GRID`).

The charging rule: every task that shows boxes to a person is charged the review, per image and
per box shown, including an annotate task that starts from the model's boxes (the person has to
check each of them before drawing the rest); a review task is charged the per-image review even
when it shows no box (the person still looks and decides). An annotate task with no starting box
shows nothing: it pays for drawing only. A box drawn anew costs `draw_box_s` wherever it is
drawn (annotate, re-annotate, or a review's correction); a starting box moved, relabelled or
deleted costs `correct_box_s`.

Default costs and where they come from (full references in docs/benchmarks.md):

- `draw_box_s` = 35 s: one high-quality ILSVRC box took 35 s (Papadopoulos, Uijlings, Keller &
  Ferrari, "Extreme clicking for efficient object annotation", ICCV 2017, abstract), the figure
  of Su, Deng & Fei-Fei's drawing-plus-quality-check protocol
  ("Crowdsourcing annotations for visual object detection", AAAI HCOMP workshop 2012); with their
  coverage check as well, 42 s per box (Papadopoulos et al., CVPR 2016, introduction).
- `review_box_s` = 1.6 s: a yes/no verification of one box (Papadopoulos, Uijlings, Keller &
  Ferrari, "We don't need no bounding-boxes", CVPR 2016; the figure is read from a secondary
  summary of the paper, not from the paper itself).
- `review_image_s` = 4 s: an assumption (looking at an image and deciding); the grid spans 2-8 s.
- `correct_box_s` = 8 s: an assumption, a little more than re-drawing a box by extreme clicking
  (7 s per box, Papadopoulos et al., ICCV 2017, abstract); moving, relabelling and deleting all
  cost the same.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

__all__ = ["COST_GRID", "Actions", "Costs", "seconds"]


@dataclass(frozen=True)
class Costs:
    """Seconds per action of a person labelling boxes."""

    draw_box_s: float = 35.0
    """A box drawn by hand (annotate, re-annotate, or an object added while correcting)."""
    review_image_s: float = 4.0
    """An image whose boxes a person checks (a review, or an annotate task with starting boxes)."""
    review_box_s: float = 1.6
    """Each box shown to a person (checked, whatever is then done with it)."""
    correct_box_s: float = 8.0
    """Each shown box moved, relabelled or deleted."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0 or value == float("inf"):
                raise ValueError(f"Costs.{f.name} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True)
class Actions:
    """What one task (or a sum of tasks) took a person: counts, never seconds."""

    tasks: int = 0
    """Tasks these counts add up over."""
    boxes_drawn: int = 0
    """Boxes drawn anew (every object drawn, in any kind of task)."""
    images_reviewed: int = 0
    """Tasks whose starting boxes a person checked (or review tasks with none)."""
    boxes_shown: int = 0
    """Starting boxes shown to a person (pre-labels, model guesses, a rejected answer's boxes)."""
    boxes_corrected: int = 0
    """Shown boxes moved, relabelled or deleted."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Actions.{f.name} must be a count (an int >= 0), got {value!r}")

    def __add__(self, other: Actions) -> Actions:
        if not isinstance(other, Actions):
            return NotImplemented
        return Actions(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: Actions) -> Actions:
        """What was done between two running totals (`later - earlier`)."""
        if not isinstance(other, Actions):
            return NotImplemented
        return Actions(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


def seconds(actions: Actions, costs: Costs) -> float:
    """The simulated seconds `actions` took a person at `costs`."""
    return (
        actions.boxes_drawn * costs.draw_box_s
        + actions.images_reviewed * costs.review_image_s
        + actions.boxes_shown * costs.review_box_s
        + actions.boxes_corrected * costs.correct_box_s
    )


COST_GRID: tuple[Costs, ...] = tuple(
    Costs(draw_box_s=draw, review_image_s=image, review_box_s=box, correct_box_s=correct)
    for draw, image, box, correct in itertools.product((20.0, 35.0, 50.0), (2.0, 4.0, 8.0), (1.0, 2.0), (8.0, 15.0))
)
"""The costs the loop benchmark reports over: drawing 20/35/50 s x review per image 2/4/8 s x
per box shown 1/2 s x correction 8/15 s (36 points)."""
