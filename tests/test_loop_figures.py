"""The loop benchmark's figures from known runs: effort priced from actions, intervals over seeds,
"equal quality" only when the whole interval fits the band, the auto-accept audit's bounds."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from visionloop.bench.loopstats import clopper_pearson, equal_quality, lower_bound, mean_ci
from visionloop.bench.loopsummary import map_diffs, reductions, summarise
from visionloop.demo.effort import COST_GRID, Actions, Costs


def _run(seed: int, arm: str, actions: list[Actions], maps: list[float], auto: dict[str, int] | None = None) -> dict:
    return {"seed": seed, "arm": arm, "actions_by_round": [asdict(a) for a in actions], "map50_95_by_round": maps,
            "auto_accepted": auto or {}, "wall_s": 1.0}


COSTS = Costs(draw_box_s=30.0, review_image_s=4.0, review_box_s=1.0, correct_box_s=10.0)


def _runs() -> list[dict]:
    runs = []
    for seed, extra in ((1, 0), (2, 2), (3, 4)):
        # manual: 100 boxes drawn per round (3,000 s); assisted: 20 drawn, 100 images shown 200 boxes, 10 corrected
        manual = [Actions(tasks=100, boxes_drawn=100)] * 2
        assisted = [Actions(tasks=100, boxes_drawn=100), Actions(tasks=100, boxes_drawn=20 + extra, images_reviewed=100,
                                                                 boxes_shown=200, boxes_corrected=10)]
        loop = [Actions(tasks=100, boxes_drawn=100), Actions(tasks=40, boxes_drawn=10 + extra, images_reviewed=40,
                                                             boxes_shown=80, boxes_corrected=4)]
        runs += [_run(seed, "manual", manual, [0.30, 0.50 + extra / 1000]),
                 _run(seed, "assisted", assisted, [0.30, 0.50]),
                 _run(seed, "loop", loop, [0.30, 0.49], {"images": 60, "boxes": 100, "right": 95, "objects": 110})]
    return runs


def test_effort_is_priced_from_actions_and_reduced_per_seed() -> None:
    runs = _runs()
    # seed 1, loop: 3,000 + (10 * 30 + 40 * 4 + 80 * 1 + 4 * 10 = 580) = 3,580 of manual 6,000
    assert reductions(runs, "loop", COSTS)[0] == pytest.approx(1 - 3580 / 6000)
    # round 2 alone: 580 of 3,000
    assert reductions(runs, "loop", COSTS, rounds=slice(1, 2))[0] == pytest.approx(1 - 580 / 3000)
    # assisted, seed 3: 3,000 + 24 * 30 + 400 + 200 + 100 = 4,420
    assert reductions(runs, "assisted", COSTS)[2] == pytest.approx(1 - 4420 / 6000)
    assert map_diffs(runs, "loop") == pytest.approx([-0.01, -0.012, -0.014])


def test_intervals_over_seeds_and_equal_quality() -> None:
    ci = mean_ci([0.70, 0.72, 0.74])
    assert ci.mean == pytest.approx(0.72)
    assert ci.low == pytest.approx(0.72 - 4.302653 * 0.02 / 3**0.5, abs=1e-6)
    assert equal_quality(mean_ci([-0.005, 0.0, 0.005]))  # half width 0.0124
    assert not equal_quality(mean_ci([-0.01, 0.0, 0.01]))  # half width 0.0248
    assert not equal_quality(mean_ci([-0.015, 0.0, 0.015]))
    assert not equal_quality(mean_ci([0.001]))  # one seed: no interval, nothing shown equal
    summary = summarise(_runs(), arms=("manual", "assisted", "loop"), costs=COSTS, grid=COST_GRID[:2])
    assert summary["map50_95_diff_mean"] == pytest.approx(-0.012)
    assert summary["equal_quality"] is True  # [-0.017, -0.007] lies within ±0.02
    assert len(summary["cost_grid"]) == 2 and set(summary["cost_grid"][0]) >= {"costs", "effort_reduction_mean"}
    assert [r["round"] for r in summary["per_round"]] == [1, 2]
    assert summary["per_round"][0]["loop"]["effort_reduction_mean"] == pytest.approx(0.0)


def test_auto_accept_audit_pools_counts_with_exact_bounds() -> None:
    summary = summarise(_runs(), arms=("manual", "assisted", "loop"), costs=COSTS, grid=())
    assert summary["auto_accepted_boxes"] == 300 and summary["auto_accepted_right"] == 285
    assert summary["auto_accept_precision"] == pytest.approx(0.95)
    assert summary["auto_accept_precision_lower95"] == pytest.approx(lower_bound(285, 300), abs=1e-4)
    assert summary["auto_accepted_object_recall"] == pytest.approx(285 / 330, abs=1e-4)
    # the exact bounds: 8 of 8 right is not evidence of 95 % precision
    assert lower_bound(8, 8) == pytest.approx(0.05 ** (1 / 8))
    both = clopper_pearson(0, 10)
    assert both.low == 0.0 and 0.30 < both.high < 0.31
