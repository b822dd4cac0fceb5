"""The demo's report: Markdown and PNG plots, from the run's events and the annotators' counters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _plot(result: dict[str, Any], folder: Path) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = result["rounds"]
    names = [f"round {i + 1}" for i in range(len(rounds))]
    files = []
    fig = Figure(figsize=(9, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.bar(names, [r["model"]["metrics"]["map50_95"] if r["model"] else 0 for r in rounds], color="#3b7dd8")
    ax1.set_title("mAP50-95 (frozen test set)")
    ax1.set_ylim(0, 1)
    ax2.bar(names, [r["human_actions_per_image"] for r in rounds], color="#d8843b")
    ax2.set_title("human actions per image")
    ax3.bar(names, [r["labelling_seconds"] / max(1, r["accepted"]) for r in rounds], color="#5aa65a")
    ax3.set_title("simulated seconds per image")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(folder / "rounds.png")
    files.append("rounds.png")
    return files


def write_report(result: dict[str, Any], folder: Path) -> Path:
    """Write `report.md`, `summary.json` and the plots under `folder`; return the Markdown file."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = _plot(result, folder)
    lines = ["# visionloop demo report", "", f"Wall time: {result['wall_s']} s. Every figure comes from this run's events "
             "and the simulated people's counters.", ""]
    lines += ["| round | submitted | accepted | rejected (reason: count) | tasks | boxes drawn | boxes corrected | accept clicks | "
              "actions/image | simulated s | auto-accepted | model | mAP50-95 | gate |", "|" + "---|" * 14]
    for r in result["rounds"]:
        model = r["model"] or {}
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(r["rejected"].items())) or "-"
        tasks = ", ".join(f"{k} {v}" for k, v in sorted(r["tasks"].items())) or "-"
        gate = "passed" if model.get("passed") else ("failed: " + ", ".join(f["reason"] for f in model.get("failures", [])) if model else "-")
        lines.append(
            f"| {r['round']} | {r['submitted']} | {r['accepted']} | {rejected} | {tasks} | {r['boxes_drawn']} | {r['boxes_corrected']} | "
            f"{r['accept_clicks']} | {r['human_actions_per_image']} | {r['labelling_seconds']} | {r['verified_by_method'].get('auto', 0)} "
            f"({r['auto_accept_rate']:.0%}) | v{model.get('version', '-')} ({', '.join(model.get('classes', []))}) | "
            f"{model.get('metrics', {}).get('map50_95', 0):.3f} | {gate} |"
        )
    precision = result["auto_accept_precision"]
    lines += ["", f"Auto-accepted boxes' precision against the ground truth: {precision if precision is not None else 'n/a (none auto-accepted)'}.", ""]
    lines += ["## Releases", "", "| at (s) | event | fleet | action | model | stage |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['at_s']} | {e['type']} | {e['fleet']} | {e['action']} | {e['model']} | {e['stage']} |" for e in result["releases"]]
    lines += ["", "Devices at the end: " + ", ".join(f"{d} {v}" for d, v in sorted(result["devices"].items())), ""]
    lines += [f"![{p}]({p})" for p in plots]
    (folder / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
