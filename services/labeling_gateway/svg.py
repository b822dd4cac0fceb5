"""Plots as inline SVG, drawn in Python: no chart library, nothing fetched at run time.

Each chart is one `<svg role="img">` with a `<title>` and `<desc>` (what a screen reader says),
axis titles, and a `<title>` on every point or bar (its value on hover). Colours and fonts are
presentation attributes, not `style=""`: the dashboard's Content-Security-Policy forbids inline
styles. Every text from data is escaped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape

from visionloop.services.labeling_gateway.economy import EconomyOut, version_axis

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 34, 66
COLORS = ("#2e5aac", "#12805c", "#b54708", "#c01048", "#6941c6", "#667085")
FONT = 'font-family="system-ui, sans-serif"'


@dataclass
class Series:
    """One named line or set of bars: a value (or None: no value) per category or time."""

    name: str
    values: Sequence[float | None]
    notes: Sequence[str] = field(default_factory=list)
    """Hover text per value (default: name and value)."""
    color: str | None = None
    """Default: the next colour of `COLORS`."""
    dashed: bool = False


def _color(s: Series, k: int) -> str:
    return s.color or COLORS[k % len(COLORS)]


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "chart"


def nice_ticks(top: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values from 0 to at least `top` (about `count` of them; whole numbers for counts)."""
    if top <= 0 or not math.isfinite(top):
        top = 1.0
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, math.ceil(step))
    return [round(i * step, 10) for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:.3g}"


def _frame(uid: str, title: str, desc: str, x_label: str, y_label: str, ticks: list[float], series: Sequence[Series]) -> list[str]:
    """The chart's opening: title, description, y grid with values, axis titles, legend."""
    plot_h = HEIGHT - TOP - BOTTOM
    top = ticks[-1]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-labelledby="{uid}-title {uid}-desc" class="chart" data-chart="{uid}" {FONT} font-size="11">',
        f'<title id="{uid}-title">{_e(title)}</title>',
        f'<desc id="{uid}-desc">{_e(desc)}</desc>',
        f'<text x="{LEFT}" y="18" font-size="13" font-weight="600" fill="#1d2330">{_e(title)}</text>',
    ]
    for tick in ticks:
        y = TOP + plot_h - plot_h * tick / top
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7ec"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#667085">{_fmt(tick)}</text>')
    parts.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#98a2b3"/>')
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#98a2b3"/>')
    parts.append(f'<text class="axis-title" x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - 26}" text-anchor="middle" fill="#1d2330">{_e(x_label)}</text>')
    parts.append(
        f'<text class="axis-title" x="14" y="{TOP + plot_h / 2:.0f}" text-anchor="middle" fill="#1d2330" '
        f'transform="rotate(-90 14 {TOP + plot_h / 2:.0f})">{_e(y_label)}</text>'
    )
    x = LEFT
    for i, s in enumerate(series):
        parts.append(f'<rect x="{x}" y="{HEIGHT - 14}" width="10" height="10" fill="{_color(s, i)}"/>')
        parts.append(f'<text x="{x + 14}" y="{HEIGHT - 5}" fill="#1d2330">{_e(s.name)}</text>')
        x += 24 + 7 * len(s.name)
    return parts


def _empty(parts: list[str], message: str) -> str:
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT / 2:.0f}" text-anchor="middle" fill="#667085">{_e(message)}</text>')
    return "\n".join([*parts, "</svg>"])


def _note(s: Series, i: int, label: str, value: float) -> str:
    return s.notes[i] if i < len(s.notes) and s.notes[i] else f"{label}: {s.name} {_fmt(value)}"


def category_chart(
    title: str, categories: Sequence[str], series: Sequence[Series], *, x_label: str, y_label: str,
    bars: bool = False, y_max: float | None = None, empty: str = "no data yet",
) -> str:
    """Values per category (model versions): lines through points, or grouped bars."""
    values = [v for s in series for v in s.values if v is not None]
    ticks = nice_ticks(y_max if y_max is not None else max(values, default=0.0) or 1.0)
    uid = _slug(title)
    desc = "; ".join(
        f"{s.name}: " + ", ".join(f"{c} {_fmt(v)}" for c, v in zip(categories, s.values, strict=False) if v is not None)
        for s in series if any(v is not None for v in s.values)
    )
    parts = _frame(uid, title, desc or empty, x_label, y_label, ticks, series)
    if not values:
        return _empty(parts, empty)
    plot_w, plot_h, top = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM, ticks[-1]
    slot = plot_w / max(len(categories), 1)
    every = max(1, math.ceil(len(categories) / 10))  # at most ten labels under the axis
    for i, c in enumerate(categories):
        if i % every == 0:
            short = c if len(c) <= 14 else c[:6] + "…" + c[-7:]
            parts.append(f'<text x="{LEFT + slot * (i + 0.5):.1f}" y="{TOP + plot_h + 15}" text-anchor="middle" fill="#667085">{_e(short)}</text>')
    width = slot * 0.7 / max(len(series), 1)
    for k, s in enumerate(series):
        color = _color(s, k)
        points, path = [], []
        for i, (c, v) in enumerate(zip(categories, s.values, strict=False)):
            if v is None:
                path.append(None)
                continue
            y = TOP + plot_h - plot_h * min(v, top) / top
            if bars:
                x = LEFT + slot * i + slot * 0.15 + width * k
                points.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{TOP + plot_h - y:.1f}" '
                              f'fill="{color}"><title>{_e(_note(s, i, c, v))}</title></rect>')
            else:
                x = LEFT + slot * (i + 0.5)
                path.append((x, y))
                points.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"><title>{_e(_note(s, i, c, v))}</title></circle>')
        if not bars:
            parts.append(f'<path class="line" d="{_path(path)}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts += points
    return "\n".join([*parts, "</svg>"])


def _path(points: Sequence[tuple[float, float] | None]) -> str:
    """Path data through the points; a None breaks the line."""
    out, pen_up = [], True
    for p in points:
        if p is None:
            pen_up = True
            continue
        out.append(f"{'M' if pen_up else 'L'}{p[0]:.1f},{p[1]:.1f}")
        pen_up = False
    return " ".join(out)


def _time_label(t: datetime, span_s: float) -> str:
    return t.strftime("%H:%M:%S" if span_s < 600 else "%H:%M" if span_s < 86400 else "%m-%d %H:%M")


def time_chart(title: str, times: Sequence[datetime], series: Sequence[Series], *, x_label: str, y_label: str,
               empty: str = "no data yet") -> str:
    """Counts over time as steps (the value holds until the next sample)."""
    values = [v for s in series for v in s.values if v is not None]
    ticks = nice_ticks(max(values, default=0.0) or 1.0, integer=True)
    uid = _slug(title)
    desc = "; ".join(f"{s.name}: now {_fmt(s.values[-1] or 0)}, peak {_fmt(max((v or 0) for v in s.values))}" for s in series if s.values)
    parts = _frame(uid, title, desc or empty, x_label, y_label, ticks, series)
    if not values or not times:
        return _empty(parts, empty)
    plot_w, plot_h, top = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM, ticks[-1]
    t0, span_s = times[0], max((times[-1] - times[0]).total_seconds(), 1e-9)

    def x_of(t: datetime) -> float:
        return LEFT + plot_w * (t - t0).total_seconds() / span_s if len(times) > 1 else LEFT + plot_w / 2

    for i in range(5 if len(times) > 1 else 1):
        t = t0 + (times[-1] - t0) * (i / 4) if len(times) > 1 else t0
        anchor = "end" if i == 4 else "middle"  # the last label ends at the plot's edge, inside the chart
        parts.append(f'<text x="{x_of(t):.1f}" y="{TOP + plot_h + 15}" text-anchor="{anchor}" fill="#667085">{_e(_time_label(t, span_s))}</text>')
    for k, s in enumerate(series):
        color = _color(s, k)
        d, marks = [], []
        for i, (t, v) in enumerate(zip(times, s.values, strict=False)):
            if v is None:
                continue
            x, y = x_of(t), TOP + plot_h - plot_h * v / top
            d.append(f"M{x:.1f},{y:.1f}" if not d else f"H{x:.1f} V{y:.1f}")
            marks.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}" fill-opacity="0.01">'
                         f"<title>{_e(f'{t:%Y-%m-%d %H:%M:%S} — {s.name}: {_fmt(v)}')}</title></circle>")
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        parts.append(f'<path class="line" d="{" ".join(d)}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        parts += marks
    return "\n".join([*parts, "</svg>"])


# -- the economy's plots -----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def economy_plots(economy: EconomyOut) -> dict[str, str]:
    """The dashboard's five plots of a project's economy, by name."""
    vs = economy.versions
    labels, version = version_axis(vs)
    mAP = Series("mAP50-95", [v.map50_95 for v in vs], [
        f"{v.label}: mAP50-95 {v.map50_95:.3f}, mAP50 {v.map50:.3f} ({'passed' if v.passed else 'failed'} the gate; test set {v.test_set_version})"
        if v.map50_95 is not None and v.map50 is not None else "" for v in vs
    ])
    seconds = Series("human seconds", [v.human_seconds if v.human_tasks else None for v in vs], [
        f"{v.label}: {v.human_seconds:,.0f} s over {v.human_tasks} tasks ({v.seconds_per_task or 0:.1f} s per task)" for v in vs
    ])
    per_task = Series("seconds per task", [v.seconds_per_task for v in vs], [
        f"{v.label}: {v.seconds_per_task or 0:.1f} s per task ({', '.join(f'{k} {n}' for k, n in sorted(v.tasks_by_kind.items()))})" for v in vs
    ])
    rate = Series("auto-accept rate", [v.auto_accept_rate for v in vs], [
        f"{v.label}: {_pct(v.auto_accept_rate)} auto-accepted ({v.auto_accepted} of {v.verified} verified label sets)" for v in vs
    ])
    precision = Series("auto-accept precision", [v.auto_accept_precision for v in vs], [
        f"{v.label}: {_pct(v.auto_accept_precision)} of {v.spot_checked_boxes} boxes kept on {v.spot_checked_images} spot-checked images "
        f"({v.boxes_deleted} deleted, {v.boxes_relabelled} relabelled, {v.boxes_missed} missed)" for v in vs
    ])
    q = economy.queue
    # `all` first: drawn under the kinds, dashed grey
    queue = [Series("all", q.depth["all"], color="#98a2b3", dashed=True)] if "all" in q.depth else []
    queue += [Series(kind, values) for kind, values in q.depth.items() if kind != "all"]
    return {
        "map50_95": category_chart("Test mAP50-95 per model version", labels, [mAP], x_label=version, y_label="mAP50-95",
                                   empty="no model.evaluated event yet"),
        "human_seconds": category_chart("Human seconds per model version", labels, [seconds], x_label=version,
                                        y_label="seconds (lease to submit)", bars=True, empty="no task answered yet"),
        "seconds_per_task": category_chart("Human seconds per task", labels, [per_task], x_label=version,
                                           y_label="seconds per task", bars=True, empty="no task answered yet"),
        "auto_accept": category_chart("Auto-accept rate and precision", labels, [rate, precision], x_label=version,
                                      y_label="share", y_max=1.0, empty="no label verified yet"),
        "queue": time_chart("Queue depth over time", q.times, queue, x_label="time (UTC)", y_label="open tasks", empty="no task yet"),
    }
