"""The loop benchmark: how much human time the loop saves, and at what model quality.

Three arms run the demo's scenario (`visionloop/demo/scenario.py`) on the same seeds: for a
seed, every arm gets the same images in the same order (with the same duplicates and bad
images), the same frozen test set, the same simulated people (who err: `demo/people.py`) and the
same training budget; every service runs as in production.

- **manual**: released models never serve the recognizer, so a person draws every box.
- **assisted**: released models pre-label from round 2; people review every pre-label set
  (accept, correct, reject); nothing is auto-accepted.
- **loop**: assisted, plus calibrated auto-accept (Clopper–Pearson bound per class and model
  version, the verifier's product settings) with spot checks.

Effort is priced from the people's counted actions (`demo/effort.py`): seconds per drawn box,
per reviewed image, per box shown, per corrected box; every task that shows boxes is charged the
review. The figures (`loopsummary.py`) are per seed, then a mean with a 95 % Student-t interval
over seeds: the effort reduction of the loop and of the assisted arm against manual, and the
paired mAP50-95 difference of the final models (loop minus manual; "equal quality" when the
whole interval lies within ±0.02). The same runs are priced over a grid of costs. What
auto-accept let through is audited against the truth: box precision (with its exact bound) and
the recall of objects in auto-accepted images. A non-learning detector's mAP50-95 on the test set
(`baseline.py`) shows how much of the figure needs learning at all.

The shape, costs, error rates and verifier settings are the documented defaults
(docs/benchmarks.md), printed and written into the JSON; other shapes are new rows, never
replacements.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visionloop.bench import machine

STATE = Path(".visionloop") / "bench" / "loop"

BENCH_ROUNDS = (100, 400, 120)
"""The default stream: bootstrap, review round, new-class round (images submitted per round)."""
BENCH_SEEDS = 3
BENCH_EPOCHS = 30
"""Epochs of the first model (from scratch) in every arm."""
BENCH_FINETUNE_EPOCHS = 8
"""Fine-tuning epochs per later model in every arm."""
BENCH_TEST_IMAGES = 80
BENCH_NEW_CLASS_TEST_IMAGES = 24


def base_config(*, quick: bool, rounds: tuple[int, int, int] | None, world: str, dataset: str | None,
                errors: Any = None, costs: Any = None, epochs: tuple[int | None, int | None] | None = None) -> Any:
    """The scenario every arm and seed runs (before the arm and the seed are set); `epochs`
    (first model, each later model; None keeps one) replaces the size's training budget."""
    from visionloop.demo.scenario import DemoConfig

    if quick:
        base = DemoConfig.quick()
    else:
        base = DemoConfig(rounds=BENCH_ROUNDS, epochs=BENCH_EPOCHS, finetune_epochs=BENCH_FINETUNE_EPOCHS,
                          test_images=BENCH_TEST_IMAGES, new_class_test_images=BENCH_NEW_CLASS_TEST_IMAGES)
    base = replace(base, world=world, dataset=dataset, errors=errors, costs=costs)
    if epochs is not None:
        base = replace(base, epochs=epochs[0] or base.epochs, finetune_epochs=epochs[1] or base.finetune_epochs)
    return replace(base, rounds=rounds) if rounds is not None else base


def settings_of(base: Any, costs: Any, errors: Any) -> dict[str, Any]:
    """The fixed settings of a run, as printed and written into the JSON."""
    from visionloop.services.verifier.config import Policy

    verifier = Policy().model_dump(include={"target_precision", "confidence", "min_samples", "min_support",
                                                    "spot_check_rate", "match_iou"}) | dict(base.verifier)
    return {"rounds": list(base.rounds), "epochs": base.epochs, "finetune_epochs": base.finetune_epochs, "imgsz": base.imgsz,
            "test_images": base.test_images, "new_class_test_images": base.new_class_test_images,
            "image_size": [base.width, base.height], "objects": list(base.objects), "object_size": list(base.object_size),
            "bad_item_rates": {"exact_dup": base.exact_dup_rate, "near_dup": base.near_dup_rate, "low_res": base.low_res_rate,
                               "corrupt": base.corrupt_rate},
            "costs": asdict(costs), "errors": asdict(errors), "verifier": verifier}


def baseline(base: Any) -> dict[str, Any]:
    """The non-learning detector on the first seed's frozen test set (the starting classes)."""
    from visionloop.bench.baseline import baseline_map
    from visionloop.demo.dataset import world_for

    world = world_for(Path(base.dataset) if base.dataset else None, style=base.world, seed=base.seed, width=base.width,
                      height=base.height, objects=base.objects, size=base.object_size)
    items = world.test_set(base.test_images, tuple(world.classes), offset=0)
    return baseline_map(((_image(i.data), i.truth or ()) for i in items), list(world.classes))


def _image(data: bytes) -> Any:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def run_loop_bench(*, quick: bool = False, rounds: tuple[int, int, int] | None = None, seeds: int | None = None,
                   world: str = "photo", dataset: str | None = None, errors: Any = None, costs: Any = None,
                   epochs: tuple[int | None, int | None] | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run every arm on every seed, one after the other; print the figures; return them."""
    from visionloop.bench.loopsummary import run_record, summarise
    from visionloop.demo.effort import COST_GRID, Costs
    from visionloop.demo.people import PersonErrors
    from visionloop.demo.report import write_report
    from visionloop.demo.scenario import ARMS, run_demo

    console = console or Console(stderr=True)
    costs, errors = costs or Costs(), errors or PersonErrors()
    base = base_config(quick=quick, rounds=rounds, world=world, dataset=dataset, errors=errors, costs=costs, epochs=epochs)
    n_seeds = seeds if seeds is not None else BENCH_SEEDS
    started = time.monotonic()
    fixed = settings_of(base, costs, errors)
    console.print(f"[bold]settings[/] (fixed before the run): {fixed}")
    no_learning = baseline(base)
    console.print(f"non-learning baseline on the test set: mAP50-95 {no_learning['map50_95']:.3f}")
    runs = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ledger = STATE / f"bench-loop-{stamp}.jsonl"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text(json.dumps({"settings": fixed, "baseline": no_learning}) + "\n")
    console.print(f"each run's record is appended to {ledger} as it ends")
    for s in range(n_seeds):
        for a, arm in enumerate(ARMS):
            console.print(f"[bold]seed {s + 1}/{n_seeds}, arm {a + 1}/{len(ARMS)}: {arm}[/]")
            result = run_demo(replace(base, seed=base.seed + s, arm=arm), state=STATE, console=console)
            write_report(result, Path(result["folder"]) / "report")
            runs.append(run_record(base.seed + s, arm, result))
            with ledger.open("a") as f:
                f.write(json.dumps(runs[-1]) + "\n")
    figures = summarise(runs, arms=ARMS, costs=costs, grid=COST_GRID)
    result = {
        "machine": machine(), "size": "quick" if quick else "default", "world": dataset or world, "seeds": n_seeds, "arms": list(ARMS), "settings": fixed,
        "baseline_no_learning_map50_95": no_learning["map50_95"], "baseline_no_learning_map50": no_learning.get("map50"),
        **figures, "runs": runs, "wall_s": round(time.monotonic() - started, 1),
    }
    result["plot"] = str(plot(result, STATE / f"bench-loop-{stamp}.png"))
    (STATE / f"bench-loop-{stamp}.json").write_text(json.dumps(result, indent=1))
    _table(result, console)
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    """The headline: test mAP50-95 against cumulative human hours, each arm's mean over seeds with
    its 95 % band, one marker per round's model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visionloop.bench.loopstats import mean_ci
    from visionloop.bench.loopsummary import effort_by_round
    from visionloop.demo.effort import Costs

    costs = Costs(**result["settings"]["costs"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm, style in zip(result["arms"], ("o-", "^-", "s-"), strict=False):
        mine = [r for r in result["runs"] if r["arm"] == arm]
        if not mine:
            continue
        n = len(mine[0]["map50_95_by_round"])
        hours = []
        for r in mine:
            effort = effort_by_round(r, costs)
            hours.append([sum(effort[: i + 1]) / 3600 for i in range(n)])
        x = [sum(h[i] for h in hours) / len(hours) for i in range(n)]
        stats = [mean_ci([r["map50_95_by_round"][i] for r in mine]) for i in range(n)]
        y = [s.mean if s.mean is not None else float("nan") for s in stats]
        low = [s.low if s.low is not None else v for s, v in zip(stats, y, strict=True)]
        high = [s.high if s.high is not None else v for s, v in zip(stats, y, strict=True)]
        line, = ax.plot(x, y, style, label=f"{arm}: {x[-1]:.1f} h, mAP {y[-1]:.3f}")
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("cumulative human time (simulated hours, mean over seeds)")
    ax.set_ylabel("test mAP50-95 of the round's model")
    reduction = result.get("effort_reduction_mean")
    ax.set_title(f"{result['world']}: {result['seeds']} seeds, loop effort reduction "
                 f"{'n/a' if reduction is None else f'{reduction:.1%}'}")
    ax.axhline(result["baseline_no_learning_map50_95"], color="grey", linestyle=":", label="no learning (baseline)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if pct else f"{value:.3f}"


def _ci(pair: list[Any], pct: bool = False) -> str:
    return f"[{_fmt(pair[0], pct)}, {_fmt(pair[1], pct)}]"


def _table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"visionloop bench loop — {result['world']}, {result['seeds']} seeds")
    table.add_column("round")
    for arm in result["arms"]:
        table.add_column(f"{arm}: h / mAP", justify="right")
    table.add_column("loop − manual: effort / mAP (95 %)", justify="right")
    for row in result["per_round"]:
        cells = [f"{row[arm]['effort_s_mean'] / 3600:.2f} / {_fmt(row[arm]['map50_95_mean'])}" for arm in result["arms"]]
        loop = row.get("loop", {})
        cells.append(f"{_fmt(loop.get('effort_reduction_mean'), True)} {_ci(loop.get('effort_reduction_ci95', [None, None]), True)} / "
                     f"{_fmt(loop.get('map50_95_diff_mean'))} {_ci(loop.get('map50_95_diff_ci95', [None, None]))}")
        table.add_row(str(row["round"]), *cells)
    console.print(table)
    console.print(
        f"effort reduction, loop vs manual: [bold]{_fmt(result['effort_reduction_mean'], True)}[/] "
        f"95 % {_ci(result['effort_reduction_ci95'], True)}; assisted vs manual {_fmt(result['assisted_effort_reduction_mean'], True)}; "
        f"final mAP50-95 difference (loop − manual) {_fmt(result['map50_95_diff_mean'])} {_ci(result['map50_95_diff_ci95'])}: "
        f"{'equal' if result['equal_quality'] else 'NOT shown equal'} (within ±0.02 counts)")
    console.print(
        f"auto-accepted: {result['auto_accepted_boxes']} boxes, precision {_fmt(result['auto_accept_precision'])} "
        f"(95 % lower bound {_fmt(result['auto_accept_precision_lower95'])}); recall of true objects in auto-accepted images "
        f"{_fmt(result['auto_accepted_object_recall'])} {_ci(result['auto_accepted_object_recall_ci95'])} of "
        f"{result['auto_accepted_true_objects']}; no-learning baseline mAP50-95 {_fmt(result['baseline_no_learning_map50_95'])}")
    grid = sorted(g["effort_reduction_mean"] for g in result["cost_grid"] if g["effort_reduction_mean"] is not None)
    if grid:
        console.print(f"over the cost grid ({len(grid)} points): loop reduction {grid[0]:.1%} to {grid[-1]:.1%}, median "
                      f"{grid[len(grid) // 2]:.1%}; wall {result['wall_s'] / 60:.1f} min")
