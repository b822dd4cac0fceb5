"""The loop benchmark: how much human labelling effort the loop saves at equal model quality.

Two arms, the same scenario (`visionloop/demo/scenario.py`): the same seed, so the same images
in the same order (with the same duplicates and bad images), the same frozen test set, the same
simulated people and the same training settings; every service runs as in production.

- **manual**: released models never serve the recognizer (no `production` server model), so
  every accepted image becomes an annotate task and a person draws every box.
- **loop**: the loop as it is: from round 2 the released model pre-labels; a person reviews
  (accepts, corrects, rejects) and the calibrated verifier auto-accepts confident pre-labels,
  with spot checks.

Human effort is the simulated people's time: 35 s per box drawn by hand and a few seconds per
verification (the published figures for drawing boxes versus verifying them: Papadopoulos et
al., CVPR 2016, measured verification-based annotation 6-9x faster), plus the box counts. The
figure of merit is `effort_reduction` = 1 - loop / manual, at the final models' test mAP50-95
(the same test set; `equal_map` says whether they are within 0.02).

The stream's shape decides the whole-run figure. Round 1 (the bootstrap: an empty library) is
drawn by hand in both arms, so it bounds the reduction; the loop earns its keep in the rounds
after it. The bench's default stream (`BENCH_ROUNDS`) is the demo's scenario with a longer review
round (150 bootstrap images, 800 reviewed, 200 with a new class), as a loop in service sees a
stream much longer than its bootstrap; `--rounds` sets other shapes (the demo's own 200/150/150
gives 55 %, docs/benchmarks.md), and `effort_reduction_after_round_1` is reported for every shape.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visionloop.bench import machine

STATE = Path(".visionloop") / "bench" / "loop"

BENCH_ROUNDS = (150, 800, 200)
"""The default stream: bootstrap, review round, new-class round (images submitted per round)."""
BENCH_FINETUNE_EPOCHS = 10
"""Fine-tuning epochs per model in both arms (the demo's 20 on this longer stream would double the wall time)."""


def _effort(result: dict[str, Any]) -> dict[str, Any]:
    rounds = result["rounds"]
    return {
        "effort_s": round(sum(r["labelling_seconds"] for r in rounds), 1),
        "effort_by_round_s": [r["labelling_seconds"] for r in rounds],
        "auto_accept_rate_by_round": [r["auto_accept_rate"] for r in rounds],
        "boxes_drawn": sum(r["boxes_drawn"] for r in rounds),
        "boxes_corrected": sum(r["boxes_corrected"] for r in rounds),
        "accept_clicks": sum(r["accept_clicks"] for r in rounds),
        "images": sum(r["accepted"] for r in rounds),
        "map50_95": rounds[-1]["model"]["metrics"]["map50_95"] if rounds[-1]["model"] else 0.0,
        "map50_95_by_round": [r["model"]["metrics"]["map50_95"] if r["model"] else None for r in rounds],
        "wall_s": result["wall_s"],
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Cumulative human effort against each model's test mAP50-95, both arms, one marker per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, style in (("manual", "o-"), ("loop", "s-")):
        effort = result[arm]["effort_by_round_s"]
        cumulative = [sum(effort[: i + 1]) / 3600 for i in range(len(effort))]
        maps = result[arm]["map50_95_by_round"]
        left.plot(cumulative, maps, style, label=f"{arm}: {cumulative[-1]:.1f} h, mAP {maps[-1]:.3f}")
        for i, (x, y) in enumerate(zip(cumulative, maps, strict=True)):
            left.annotate(f"v{i + 1}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    left.set_xlabel("cumulative human effort (simulated hours)")
    left.set_ylabel("test mAP50-95 of the round's model")
    left.set_title(f"effort at equal mAP: {result['effort_reduction']:.1%} less")
    left.legend(loc="lower right")
    rounds = range(1, len(result["manual"]["effort_by_round_s"]) + 1)
    width = 0.38
    right.bar([r - width / 2 for r in rounds], [s / 3600 for s in result["manual"]["effort_by_round_s"]], width, label="manual")
    right.bar([r + width / 2 for r in rounds], [s / 3600 for s in result["loop"]["effort_by_round_s"]], width, label="loop")
    right.set_xticks(list(rounds), [f"round {r}\n({n} images)" for r, n in zip(rounds, result["rounds"], strict=True)])
    right.set_ylabel("human effort (simulated hours)")
    right.set_title("effort per round")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_loop_bench(*, quick: bool = False, rounds: tuple[int, int, int] | None = None,
                   console: Console | None = None) -> dict[str, Any]:
    """Run both arms one after the other; print a table; return the results."""
    from dataclasses import replace

    from visionloop.demo.scenario import DemoConfig, run_demo

    console = console or Console(stderr=True)
    base = DemoConfig.quick() if quick else DemoConfig(rounds=BENCH_ROUNDS, finetune_epochs=BENCH_FINETUNE_EPOCHS)
    if rounds is not None:
        base = replace(base, rounds=rounds)
    started = time.monotonic()
    console.print("[bold]arm 1/2: manual[/] (every image labelled by hand)")
    manual = run_demo(replace(base, assist=False), state=STATE, console=console)
    console.print("[bold]arm 2/2: loop[/] (pre-labels, review, calibrated auto-accept)")
    loop = run_demo(base, state=STATE, console=console)
    from visionloop.demo.report import write_report

    for arm in (manual, loop):
        write_report(arm, Path(arm["folder"]) / "report")
    a, b = _effort(manual), _effort(loop)
    result: dict[str, Any] = {
        "machine": machine(),
        "size": "quick" if quick else "default",
        "rounds": list(base.rounds),
        "epochs": base.epochs,
        "finetune_epochs": base.finetune_epochs,
        "manual_effort_s": a["effort_s"],
        "loop_effort_s": b["effort_s"],
        "effort_reduction": round(1 - b["effort_s"] / a["effort_s"], 4) if a["effort_s"] else None,
        "map50_95_manual": a["map50_95"],
        "map50_95_loop": b["map50_95"],
        "equal_map": abs(a["map50_95"] - b["map50_95"]) <= 0.02,
        "auto_accept_precision": loop["auto_accept_precision"],
        "manual": a,
        "loop": b,
        "manual_report": manual["folder"],
        "loop_report": loop["folder"],
        "wall_s": round(time.monotonic() - started, 1),
    }
    after_a, after_b = sum(a["effort_by_round_s"][1:]), sum(b["effort_by_round_s"][1:])
    result["effort_reduction_after_round_1"] = round(1 - after_b / after_a, 4) if after_a else None
    result["plot"] = str(plot(result, Path(loop["folder"]).parent / f"bench-loop-{Path(loop['folder']).name}.png"))
    table = Table(title="visionloop bench loop")
    table.add_column("measure")
    table.add_column("manual", justify="right")
    table.add_column("loop", justify="right")
    table.add_row("human effort (simulated)", f"{a['effort_s'] / 3600:.2f} h", f"{b['effort_s'] / 3600:.2f} h")
    table.add_row("effort by round (s)", ", ".join(f"{x:,.0f}" for x in a["effort_by_round_s"]),
                  ", ".join(f"{x:,.0f}" for x in b["effort_by_round_s"]))
    table.add_row("boxes drawn by hand", str(a["boxes_drawn"]), str(b["boxes_drawn"]))
    table.add_row("boxes corrected / accept clicks", f"{a['boxes_corrected']} / {a['accept_clicks']}", f"{b['boxes_corrected']} / {b['accept_clicks']}")
    table.add_row("final model mAP50-95 (test set)", f"{a['map50_95']:.3f}", f"{b['map50_95']:.3f}")
    table.add_row("mAP50-95 by round", ", ".join(f"{m:.3f}" for m in a["map50_95_by_round"] if m is not None),
                  ", ".join(f"{m:.3f}" for m in b["map50_95_by_round"] if m is not None))
    console.print(table)
    reduction = result["effort_reduction"]
    console.print(f"effort reduction: [bold]{reduction:.1%}[/] (target >= 75 %) at "
                  f"{'equal' if result['equal_map'] else 'UNEQUAL'} mAP (|diff| {abs(a['map50_95'] - b['map50_95']):.3f}, within 0.02 counts); "
                  f"auto-accepted boxes' precision {result['auto_accept_precision']}")
    return result
