"""The evaluation report a person reads when a candidate passes or fails the gate: one JSON
document and two plots (PR curves per class at IoU 0.5; AP50-95 per class, candidate beside
the champion).

Pure: bytes in memory, no blob store, no clock, so the same evaluation renders the same JSON.
Plots use matplotlib's object API on the Agg canvas (no pyplot state), safe in any thread.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from visionloop.contracts import GateFailure, GateFailureReason
from visionloop.libs.detmetrics import Evaluation

_SIZE = (6.0, 4.0)
_DPI = 100
_LEGEND_MAX = 12  # more classes than this crowd the legend; their curves still show


def render(
    evaluation: Evaluation,
    *,
    candidate: dict,
    champion: dict | None,
    failures: Sequence[GateFailure],
    test_set_version: str,
    passed: bool,
) -> dict[str, bytes]:
    """`report.json`, `pr_curves.png` and `per_class_ap.png` for one gated candidate.

    `candidate` identifies the model (id, version, weights hash...); `champion` is the
    champion's identity and metrics on the same test set, either a `Metrics` dump or a dict
    with one under `metrics`, or None for a project's first model. The report holds them
    as given, the candidate's `Evaluation.to_json()` under `candidate.metrics`, the failures,
    the verdict and the test set version; no timestamp, so it is the same on every render.
    """
    report = {
        "test_set_version": test_set_version,
        "passed": passed,
        "candidate": {**candidate, "metrics": evaluation.to_json()},
        "champion": champion,
        "failures": [f.model_dump(mode="json") for f in failures],
    }
    return {
        "report.json": json.dumps(report, indent=1, sort_keys=True, default=str).encode(),
        "pr_curves.png": _pr_curves(evaluation, candidate),
        "per_class_ap.png": _per_class_ap(evaluation, _champion_ap(champion), failures, passed),
    }


def _champion_ap(champion: Mapping[str, Any] | None) -> tuple[dict[str, float], float | None] | None:
    """The champion's AP per class and mAP50-95, from a `Metrics` dump or one under `metrics`."""
    if champion is None:
        return None
    metrics = champion.get("metrics") if isinstance(champion.get("metrics"), Mapping) else champion
    return dict(metrics.get("per_class_ap") or {}), metrics.get("map50_95")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=_DPI, metadata={"Software": None})
    return out.getvalue()


def _label(candidate: Mapping[str, Any]) -> str:
    model, version = candidate.get("model_id"), candidate.get("version")
    return f"{model} v{version}" if model and version else str(model or "candidate")


def _pr_curves(evaluation: Evaluation, candidate: Mapping[str, Any]) -> bytes:
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    for name, (recall, precision) in evaluation.pr_curves.items():
        ap50 = evaluation.per_class_ap50.get(name, 0.0)
        ax.plot(recall, precision, linewidth=1.2, label=f"{name} {ap50:.3f}")
    if not evaluation.pr_curves:
        _nothing_labelled(ax)
    elif len(evaluation.pr_curves) <= _LEGEND_MAX:
        ax.legend(title="class, AP50", fontsize=7, title_fontsize=7, loc="lower left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{_label(candidate)}: PR at IoU 0.5, mAP50 {evaluation.map50:.3f}", fontsize=9)
    return _png(fig)


def _nothing_labelled(ax: Any) -> None:
    ax.text(0.5, 0.5, "no labelled boxes in the test set", ha="center", va="center", transform=ax.transAxes)


def _per_class_ap(
    evaluation: Evaluation,
    champion: tuple[dict[str, float], float | None] | None,
    failures: Sequence[GateFailure],
    passed: bool,
) -> bytes:
    ours = evaluation.per_class_ap
    theirs, their_map = champion if champion is not None else ({}, None)
    names = list(ours) + [n for n in theirs if n not in ours]
    regressed = {f.class_name for f in failures if f.reason == GateFailureReason.CLASS_REGRESSION}
    wide = min(max(_SIZE[0], 0.35 * len(names)), 16.0)  # room for many class names
    fig = Figure(figsize=(wide, _SIZE[1]), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    width = 0.4 if champion is not None else 0.8
    offset = width / 2 if champion is not None else 0.0
    xs = list(range(len(names)))
    bars = ax.bar(
        [x - offset for x in xs], [ours.get(n, 0.0) for n in names], width,
        label=f"candidate {evaluation.map50_95:.3f}", color="tab:blue",
    )
    for bar, name in zip(bars, names):
        if name in regressed:
            bar.set_color("tab:red")  # a class the gate refused
    if champion is not None:
        label = "champion" if their_map is None else f"champion {their_map:.3f}"
        ax.bar([x + offset for x in xs], [theirs.get(n, 0.0) for n in names], width, label=label, color="tab:gray")
        ax.legend(title="mAP50-95", fontsize=7, title_fontsize=7, loc="upper right")
    if not names:
        _nothing_labelled(ax)
    crowded = len(names) > 6
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=45 if crowded else 0, ha="right" if crowded else "center", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP50-95")
    ax.grid(True, axis="y", alpha=0.3)
    verdict = "passed" if passed else "failed"
    ax.set_title(f"AP50-95 per class (red: refused by the gate), gate {verdict}", fontsize=9)
    return _png(fig)
