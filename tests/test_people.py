"""The simulated people's error models and the effort model, pure (no gateway, no HTTP): the
effort arithmetic, each error rate observed over many draws, the perfect person's decisions, and
the annotator's tally priced exactly by its counted actions."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from visionloop.contracts import Box, ReviewDecision
from visionloop.demo.annotator import Annotator
from visionloop.demo.effort import COST_GRID, Actions, Costs, seconds
from visionloop.demo.people import PERFECT, Edit, PersonErrors, decide, draw_box
from visionloop.libs.boxes import iou

N = 20_000
CLASSES = ["circle", "square", "triangle", "star"]
W = H = 1000


def _box(x1: float, y1: float, x2: float, y2: float, cls: str = "circle") -> Box:
    return Box(x1=x1, y1=y1, x2=x2, y2=y2, class_name=cls)


def _errors(**rates: float) -> PersonErrors:
    return PersonErrors(**{**vars(PERFECT), **rates})


def _decide(start: list[Box], truth: list[Box], kind: str, errors: PersonErrors = PERFECT, rng: np.random.Generator | None = None) -> Edit:
    rng = rng if rng is not None else np.random.default_rng(0)
    return decide(start, truth, kind=kind, errors=errors, rng=rng, width=W, height=H, classes=CLASSES)


TRUTH = [_box(100, 100, 200, 180, "circle"), _box(400, 400, 520, 460, "square"), _box(700, 100, 760, 300, "star")]


# -- effort -------------------------------------------------------------------------------------------


def test_a_known_sequence_of_actions_costs_a_known_number_of_seconds() -> None:
    costs = Costs(draw_box_s=35, review_image_s=4, review_box_s=1, correct_box_s=8)
    drawing = Actions(tasks=1, boxes_drawn=3)                                                  # 3 x 35 = 105
    annotate_with_model_boxes = Actions(tasks=1, boxes_drawn=1, images_reviewed=1, boxes_shown=2, boxes_corrected=1)  # 35 + 4 + 2 + 8 = 49
    accept = Actions(tasks=1, images_reviewed=1, boxes_shown=3)                                # 4 + 3 = 7
    total = drawing + annotate_with_model_boxes + accept
    assert total == Actions(tasks=3, boxes_drawn=4, images_reviewed=2, boxes_shown=5, boxes_corrected=1)
    assert [seconds(a, costs) for a in (drawing, annotate_with_model_boxes, accept)] == [105, 49, 7]
    assert seconds(total, costs) == 161
    assert total - accept == drawing + annotate_with_model_boxes
    assert seconds(Actions(), costs) == 0


def test_an_annotate_task_with_model_boxes_is_charged_the_review_and_one_without_is_not() -> None:
    costs = Costs()
    model_boxes = [TRUTH[0], _box(0, 0, 30, 30, "square")]  # one right (kept), one over nothing (deleted)
    edit = _decide(model_boxes, TRUTH, "annotate")
    assert edit.actions == Actions(tasks=1, boxes_drawn=2, images_reviewed=1, boxes_shown=2, boxes_corrected=1)
    assert seconds(edit.actions, costs) == pytest.approx(2 * 35 + 4 + 2 * 1.6 + 8)
    bare = _decide([], TRUTH, "annotate")
    assert bare.actions == Actions(tasks=1, boxes_drawn=3)
    assert seconds(bare.actions, costs) == pytest.approx(3 * 35)
    # A review of an empty pre-label set is still a reviewed image.
    assert _decide([], TRUTH, "review").actions.images_reviewed == 1


def test_costs_actions_and_errors_refuse_bad_values() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="draw_box_s"):
            Costs(draw_box_s=bad)
    with pytest.raises(ValueError, match="boxes_shown"):
        Actions(boxes_shown=-1)
    for name in ("miss_rate", "jitter_frac", "confusion_rate", "rubber_stamp_rate", "review_miss_rate"):
        for bad in (-0.01, 1.01, float("nan")):
            with pytest.raises(ValueError, match=name):
                PersonErrors(**{name: bad})
    with pytest.raises(ValueError, match="jitter_px"):
        PersonErrors(jitter_px=-1)
    assert PersonErrors(miss_rate=1.0, rubber_stamp_rate=0.0).miss_rate == 1.0


def test_the_cost_grid_is_every_combination_once() -> None:
    assert len(COST_GRID) == 3 * 3 * 2 * 2 == len(set(COST_GRID))
    assert {c.draw_box_s for c in COST_GRID} == {20, 35, 50} and {c.review_image_s for c in COST_GRID} == {2, 4, 8}
    assert {c.review_box_s for c in COST_GRID} == {1, 2} and {c.correct_box_s for c in COST_GRID} == {8, 15}


# -- the annotator's errors -------------------------------------------------------------------------------


def test_the_miss_rate_is_observed() -> None:
    rng = np.random.default_rng(1)
    errors = _errors(miss_rate=0.1)
    truth = [_box(50 * i, 10, 50 * i + 40, 50) for i in range(10)]
    missed = sum(_decide([], truth, "annotate", errors, rng).missed for _ in range(N // 10))
    assert missed / N == pytest.approx(0.1, abs=0.01)


def test_box_jitter_is_relative_to_the_box_size() -> None:
    rng = np.random.default_rng(2)
    errors = _errors(jitter_frac=0.05)
    for true in (_box(300, 300, 340, 320), _box(300, 300, 500, 420)):  # 40 x 20 and 200 x 120
        drawn = [draw_box(true, errors, rng, width=W, height=H)[0] for _ in range(N // 4)]
        for edge, side in (("x1", true.width), ("x2", true.width), ("y1", true.height), ("y2", true.height)):
            off = np.array([getattr(b, edge) - getattr(true, edge) for b in drawn]) / side
            assert off.std() == pytest.approx(0.05, abs=0.003), (true, edge)
            assert abs(off.mean()) < 0.003
    assert np.mean([iou(b, true) for b in drawn]) == pytest.approx(0.85, abs=0.02)  # sd 0.05 of the side


def test_the_old_absolute_noise_adds_to_the_relative_jitter() -> None:
    rng = np.random.default_rng(3)
    true = _box(300, 300, 400, 400)
    drawn = [draw_box(true, _errors(jitter_frac=0.03, jitter_px=4.0), rng, width=W, height=H)[0] for _ in range(N // 4)]
    assert np.std([b.x1 - true.x1 for b in drawn]) == pytest.approx(math.hypot(3.0, 4.0), rel=0.05)


def test_class_confusion_is_observed_and_uniform_among_the_other_classes() -> None:
    rng = np.random.default_rng(4)
    errors = _errors(confusion_rate=0.2)
    true = _box(100, 100, 200, 200, "square")
    drawn = [draw_box(true, errors, rng, width=W, height=H, classes=CLASSES) for _ in range(N)]
    confused = [b.class_name for b, wrong in drawn if wrong]
    assert len(confused) / N == pytest.approx(0.2, abs=0.01)
    assert all(b.class_name == "square" for b, wrong in drawn if not wrong)
    shares = Counter(confused)
    assert set(shares) == {"circle", "triangle", "star"}
    assert all(n / len(confused) == pytest.approx(1 / 3, abs=0.03) for n in shares.values())
    # With one class there is nothing to confuse it with.
    assert not any(draw_box(true, _errors(confusion_rate=1.0), rng, width=W, height=H, classes=["square"])[1] for _ in range(50))


def test_drawn_boxes_stay_inside_the_image_and_at_least_min_side() -> None:
    rng = np.random.default_rng(5)
    errors = _errors(jitter_frac=0.5)
    for _ in range(2000):
        box, _ = draw_box(_box(0, 0, 6, 6), errors, rng, width=50, height=40)
        assert 0 <= box.x1 and box.x2 <= 50 and 0 <= box.y1 and box.y2 <= 40
        assert box.width >= 4 - 1e-9 and box.height >= 4 - 1e-9


# -- the reviewer's errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["class", "nothing", "loose"])
def test_the_rubber_stamp_rate_is_observed(wrong: str) -> None:
    rng = np.random.default_rng(6)
    errors = _errors(rubber_stamp_rate=0.3)
    first = TRUTH[0]
    bad = {
        "class": first.model_copy(update={"class_name": "star"}),
        "nothing": None,
        "loose": first.model_copy(update={"x1": first.x1 + 60, "x2": first.x2 + 60}),  # IoU 0.25: too loose to be that object
    }[wrong]
    start = [*TRUTH, _box(850, 850, 900, 900)] if bad is None else [bad, *TRUTH[1:]]
    n = N if wrong == "class" else N // 2  # the other two kinds: fewer draws, a wider tolerance (3 sd)
    edits = [_decide(start, TRUTH, "review", errors, rng) for _ in range(n)]
    stamped = [e for e in edits if e.stamped]
    assert len(stamped) / n == pytest.approx(0.3, abs=0.01 if n == N else 0.014)
    assert all(e.decision is ReviewDecision.ACCEPT and list(e.boxes) == start for e in stamped)
    assert all(e.decision is ReviewDecision.CORRECT for e in edits if not e.stamped)


def test_a_hopeless_set_is_rejected_unless_stamped() -> None:
    rng = np.random.default_rng(7)
    start = [_box(850, 850, 900, 900, "circle")]
    edits = [_decide(start, TRUTH, "review", _errors(rubber_stamp_rate=0.2), rng) for _ in range(5000)]
    decisions = Counter(e.decision for e in edits)
    assert set(decisions) == {ReviewDecision.ACCEPT, ReviewDecision.REJECT}
    assert decisions[ReviewDecision.ACCEPT] / 5000 == pytest.approx(0.2, abs=0.02)


def test_the_reviewer_miss_rate_is_observed() -> None:
    rng = np.random.default_rng(8)
    errors = _errors(review_miss_rate=0.1, miss_rate=0.9)  # the annotator's own miss rate plays no part in a review
    start = TRUTH[:2]  # right, one object missing
    edits = [_decide(start, TRUTH, "review", errors, rng) for _ in range(N)]
    unnoticed = [e for e in edits if e.missed]
    assert len(unnoticed) / N == pytest.approx(0.1, abs=0.01)
    assert all(e.decision is ReviewDecision.ACCEPT and list(e.boxes) == start for e in unnoticed)
    noticed = [e for e in edits if not e.missed]
    assert all(e.decision is ReviewDecision.CORRECT and e.drawn == 1 and len(e.boxes) == 3 for e in noticed)
    assert all(e.actions == Actions(tasks=1, images_reviewed=1, boxes_shown=2, boxes_drawn=1) for e in noticed)


def test_a_correcting_reviewer_draws_with_the_annotators_errors() -> None:
    rng = np.random.default_rng(9)
    errors = _errors(confusion_rate=0.25, jitter_frac=0.05)
    edits = [_decide(TRUTH[:2], TRUTH, "review", errors, rng) for _ in range(4000)]
    added = [e.boxes[-1] for e in edits]
    assert sum(e.confused for e in edits) / 4000 == pytest.approx(0.25, abs=0.025)
    assert all(b.x1 != TRUTH[2].x1 for b in added)
    assert all(e.boxes[:2] == tuple(TRUTH[:2]) for e in edits)  # the right pre-labels are kept as they are


# -- the perfect person: the truth exactly --------------------------------------------------------------


def test_a_perfect_reviewer_decides_by_the_truth() -> None:
    first = TRUTH[0]
    loose = first.model_copy(update={"x1": first.x1 + 15, "x2": first.x2 + 15})
    assert 0.5 <= iou(loose, first) < 0.75
    cases = {
        "right": (list(TRUTH), ReviewDecision.ACCEPT, {}),
        "wrong class": ([first.model_copy(update={"class_name": "star"}), *TRUTH[1:]], ReviewDecision.CORRECT, {"relabelled": 1}),
        "missing": (TRUTH[1:], ReviewDecision.CORRECT, {"drawn": 1}),
        "loose but right": ([loose, *TRUTH[1:]], ReviewDecision.ACCEPT, {}),
        "over nothing": ([*TRUTH, _box(850, 850, 900, 900)], ReviewDecision.CORRECT, {"deleted": 1}),
        "loose and a wrong class": ([loose, TRUTH[1].model_copy(update={"class_name": "circle"}), TRUTH[2]], ReviewDecision.CORRECT,
                                    {"moved": 1, "relabelled": 1}),
        "all wrong": ([_box(850, 850, 900, 900)], ReviewDecision.REJECT, {}),
    }
    rng = np.random.default_rng(10)
    state = rng.bit_generator.state
    for name, (start, decision, counts) in cases.items():
        edit = _decide(start, TRUTH, "review", PERFECT, rng)
        assert edit.decision is decision, name
        for field in ("drawn", "moved", "relabelled", "deleted"):
            assert getattr(edit, field) == counts.get(field, 0), (name, field)
        if decision is ReviewDecision.CORRECT:
            assert sorted(b.class_name for b in edit.boxes) == sorted(b.class_name for b in TRUTH), name
        assert edit.missed == 0 and not edit.stamped
        assert edit.actions.boxes_shown == len(start) and edit.actions.images_reviewed == 1
        assert edit.actions.boxes_corrected == edit.moved + edit.relabelled + edit.deleted
    assert rng.bit_generator.state == state  # a person with no errors draws no chance at all


def test_an_annotator_keeps_right_boxes_leaves_a_stamped_set_and_draws_the_rest() -> None:
    model_boxes = [TRUTH[0], _box(850, 850, 900, 900, "square")]
    edit = _decide(model_boxes, TRUTH, "annotate")
    assert (edit.decision, edit.kept, edit.deleted, edit.drawn) == (None, 1, 1, 2)
    assert edit.boxes[0] == TRUTH[0] and list(edit.boxes[1:]) == TRUTH[1:]
    stamped = _decide(model_boxes, TRUTH, "reannotate", _errors(rubber_stamp_rate=1.0))
    assert stamped.stamped and list(stamped.boxes[:2]) == model_boxes and stamped.drawn == 2 and stamped.deleted == 0
    assert stamped.actions == Actions(tasks=1, boxes_drawn=2, images_reviewed=1, boxes_shown=2)


def test_the_same_seed_gives_the_same_person() -> None:
    errors = PersonErrors()
    one = [_decide(TRUTH[:1], TRUTH, "review", errors, np.random.default_rng(11)) for _ in range(3)]
    assert one[0] == one[1] == one[2]


# -- the annotator's tally ----------------------------------------------------------------------------


def _task(kind: str, start: list[Box]) -> dict:
    return {"kind": kind, "decision_required": kind == "review", "classes": CLASSES, "image": {"width": W, "height": H},
            "start_boxes": [b.model_dump(exclude={"score"}) for b in start]}


async def test_the_tally_is_its_actions_priced_and_the_old_keywords_still_work() -> None:
    async with Annotator("http://127.0.0.1:9", "token", "p", world=None, user_id="u", rng_seed=5,  # type: ignore[arg-type]
                         noise_px=2.0, miss_rate=0.2, seconds_per_box=30.0, seconds_per_review=3.0, seconds_per_correction=9.0) as person:
        assert person.errors == PersonErrors(miss_rate=0.2, jitter_px=2.0)  # the other rates: the published defaults
        assert person.costs == Costs(draw_box_s=30.0, review_image_s=3.0, correct_box_s=9.0)
        tasks = [_task("annotate", []), _task("annotate", TRUTH[:1]), _task("review", TRUTH[:2]), _task("reannotate", [])] * 25
        total = Actions()
        spent = 0.0
        for task in tasks:
            edit = person.decide(task, TRUTH)
            person._count(task["kind"], edit)
            total += edit.actions
            spent += seconds(edit.actions, person.costs)
        tally = person.tally
        assert tally.actions == total and tally.actions.tasks == 100 == sum(tally.tasks.values())
        assert tally.seconds == seconds(tally.actions, person.costs) == pytest.approx(spent)
        assert sum(tally.seconds_by_kind.values()) == pytest.approx(tally.seconds)
        assert tally.boxes_drawn + tally.boxes_added == total.boxes_drawn
        assert tally.boxes_moved + tally.boxes_relabelled + tally.boxes_deleted == total.boxes_corrected
        assert tally.boxes_missed > 0
    with pytest.raises(ValueError, match="miss_rate"):
        Annotator("http://127.0.0.1:9", "token", "p", world=None, user_id="u", miss_rate=1.5)  # type: ignore[arg-type]
    async with Annotator("http://127.0.0.1:9", "t", "p", world=None, user_id="u", errors=PERFECT, costs=Costs(review_box_s=2.0)) as perfect:  # type: ignore[arg-type]
        assert perfect.errors == PERFECT and perfect.costs.review_box_s == 2.0
