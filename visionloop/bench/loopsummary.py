"""The loop benchmark's figures from its runs, pure: effort per arm under any costs, the paired
differences per seed, their intervals, the cost grid and the auto-accept audit.

A run is one arm on one seed, reduced by `run_record` to what the figures need:
`actions_by_round` (each a dict of `effort.Actions` counts), `map50_95_by_round`, and the
auto-accepted label sets against the truth (`auto_accepted`: images, boxes, right, objects).
Effort is never stored as seconds: it is priced here, so the same runs answer every cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from visionloop.bench.loopstats import (
    clopper_pearson,
    equal_quality,
    lower_bound,
    mean_ci,
    reduction,
)
from visionloop.demo.effort import Actions, Costs, seconds


def run_record(seed: int, arm: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """What the figures need of one demo run (`scenario.Demo.summary()` plus the run folder)."""
    rounds = result["rounds"]
    return {
        "seed": seed,
        "arm": arm,
        "actions_by_round": [dict(r["actions"]) for r in rounds],
        "map50_95_by_round": [r["model"]["metrics"]["map50_95"] if r["model"] else None for r in rounds],
        "passed_by_round": [bool(r["model"] and r["model"]["passed"]) for r in rounds],
        "auto_accept_rate_by_round": [r["auto_accept_rate"] for r in rounds],
        "images_by_round": [r["accepted"] for r in rounds],
        "auto_accepted": dict(result.get("auto_accepted") or {}),
        "wall_s": result["wall_s"],
        "folder": result.get("folder"),
        "embedded_restarts": dict(result.get("embedded_restarts") or {}),
    }


def effort_by_round(run: Mapping[str, Any], costs: Costs) -> list[float]:
    """The run's human seconds per round under `costs`."""
    return [seconds(Actions(**a), costs) for a in run["actions_by_round"]]


def _by_seed(runs: Sequence[Mapping[str, Any]], arm: str) -> dict[int, Mapping[str, Any]]:
    return {int(r["seed"]): r for r in runs if r["arm"] == arm}


def reductions(runs: Sequence[Mapping[str, Any]], arm: str, costs: Costs, *, rounds: slice = slice(None)) -> list[float | None]:
    """Per seed: 1 - effort(arm) / effort(manual) over `rounds` (seeds that ran both arms)."""
    manual, other = _by_seed(runs, "manual"), _by_seed(runs, arm)
    out = []
    for seed in sorted(set(manual) & set(other)):
        ours = sum(effort_by_round(other[seed], costs)[rounds])
        reference = sum(effort_by_round(manual[seed], costs)[rounds])
        out.append(reduction(ours, reference))
    return out


def map_diffs(runs: Sequence[Mapping[str, Any]], arm: str, round_index: int = -1) -> list[float | None]:
    """Per seed: mAP50-95 of the arm's model minus the manual arm's, after one round (the last by default)."""
    manual, other = _by_seed(runs, "manual"), _by_seed(runs, arm)
    out: list[float | None] = []
    for seed in sorted(set(manual) & set(other)):
        a, b = other[seed]["map50_95_by_round"][round_index], manual[seed]["map50_95_by_round"][round_index]
        out.append(None if a is None or b is None else a - b)
    return out


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def per_round(runs: Sequence[Mapping[str, Any]], arms: Sequence[str], costs: Costs) -> list[dict[str, Any]]:
    """For each round: every arm's mean effort and mAP, and each assisted arm's reduction and paired
    mAP difference against manual, with 95 % intervals over seeds."""
    n_rounds = max(len(r["actions_by_round"]) for r in runs)
    out = []
    for i in range(n_rounds):
        row: dict[str, Any] = {"round": i + 1}
        for arm in arms:
            mine = [r for r in runs if r["arm"] == arm]
            effort = mean_ci([effort_by_round(r, costs)[i] for r in mine])
            quality = mean_ci([r["map50_95_by_round"][i] for r in mine])
            row[arm] = {"effort_s_mean": _r(effort.mean, 1), "map50_95_mean": _r(quality.mean), "map50_95_ci95": quality.as_list()}
            if arm != "manual":
                red = mean_ci(reductions(runs, arm, costs, rounds=slice(i, i + 1)))
                diff = mean_ci(map_diffs(runs, arm, i))
                row[arm] |= {"effort_reduction_mean": _r(red.mean), "effort_reduction_ci95": red.as_list(),
                             "map50_95_diff_mean": _r(diff.mean), "map50_95_diff_ci95": diff.as_list()}
        out.append(row)
    return out


def cost_grid(runs: Sequence[Mapping[str, Any]], grid: Sequence[Costs]) -> list[dict[str, Any]]:
    """The loop's and the assisted arm's mean reduction (with the loop's interval) at every grid point."""
    out = []
    for costs in grid:
        loop = mean_ci(reductions(runs, "loop", costs))
        assisted = mean_ci(reductions(runs, "assisted", costs))
        out.append({"costs": asdict(costs), "effort_reduction_mean": _r(loop.mean), "effort_reduction_ci95": loop.as_list(),
                    "assisted_effort_reduction_mean": _r(assisted.mean)})
    return out


def audit(runs: Sequence[Mapping[str, Any]], arm: str = "loop") -> dict[str, Any]:
    """What auto-accept let through, pooled over the arm's seeds: box precision (two-sided 95 %
    interval and one-sided lower bound) and the recall of true objects in auto-accepted images."""
    pooled = {"images": 0, "boxes": 0, "right": 0, "objects": 0}
    for r in runs:
        if r["arm"] == arm:
            for key in pooled:
                pooled[key] += int(r["auto_accepted"].get(key, 0))
    precision = clopper_pearson(pooled["right"], pooled["boxes"])
    recall = clopper_pearson(pooled["right"], pooled["objects"])
    return {
        "auto_accepted_images": pooled["images"], "auto_accepted_boxes": pooled["boxes"], "auto_accepted_right": pooled["right"],
        "auto_accepted_true_objects": pooled["objects"],
        "auto_accept_precision": _r(precision.mean), "auto_accept_precision_ci95": precision.as_list(),
        "auto_accept_precision_lower95": _r(lower_bound(pooled["right"], pooled["boxes"])),
        "auto_accepted_object_recall": _r(recall.mean), "auto_accepted_object_recall_ci95": recall.as_list(),
    }


def summarise(runs: Sequence[Mapping[str, Any]], *, arms: Sequence[str], costs: Costs, grid: Sequence[Costs]) -> dict[str, Any]:
    """The bench's headline figures (the keys `visionloop bench loop --json` promises)."""
    loop = mean_ci(reductions(runs, "loop", costs))
    assisted = mean_ci(reductions(runs, "assisted", costs))
    after_1 = mean_ci(reductions(runs, "loop", costs, rounds=slice(1, None)))
    diff = mean_ci(map_diffs(runs, "loop"))
    assisted_diff = mean_ci(map_diffs(runs, "assisted"))
    return {
        "effort_reduction_mean": _r(loop.mean), "effort_reduction_ci95": loop.as_list(),
        "assisted_effort_reduction_mean": _r(assisted.mean), "assisted_effort_reduction_ci95": assisted.as_list(),
        "effort_reduction_after_round_1_mean": _r(after_1.mean), "effort_reduction_after_round_1_ci95": after_1.as_list(),
        "map50_95_diff_mean": _r(diff.mean), "map50_95_diff_ci95": diff.as_list(), "equal_quality": equal_quality(diff),
        "assisted_map50_95_diff_mean": _r(assisted_diff.mean), "assisted_map50_95_diff_ci95": assisted_diff.as_list(),
        "assisted_equal_quality": equal_quality(assisted_diff),
        **audit(runs),
        "per_round": per_round(runs, arms, costs),
        "cost_grid": cost_grid(runs, grid),
    }
