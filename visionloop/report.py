"""`visionloop report PROJECT`: the labelling economy of a project, as Markdown and PNG plots.

The same numbers as the dashboard's economy panel (`GET /v1/projects/{project}/economy`),
assembled by the gateway's own code (`labeling_gateway.economy`) from the gateway's tables,
read directly like the CLI's other reports. Per model version: test mAP50-95, human seconds
and tasks, auto-accept rate and precision with their counts; and the queue depth by kind.
The Markdown goes to stdout and, with the plots (matplotlib, Agg), to `--out`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from visionloop.services.labeling_gateway.economy import EconomyOut, VersionFigures, assemble, version_axis

GATEWAY = "labeling-gateway"
PLOTS = {
    "map50_95": "Test mAP50-95 per model version",
    "human_seconds": "Human seconds per model version",
    "seconds_per_task": "Human seconds per task",
    "auto_accept": "Auto-accept rate and precision",
    "queue": "Queue depth over time",
}
"""Plot files (`NAME.png`) and their titles."""


class ReportUnavailable(Exception):
    """The report cannot be made (no gateway tables, unknown project): `message` says what to do."""


# -- reading ----------------------------------------------------------------------------------------------


async def load(settings: Any, project: str, now: datetime | None = None) -> EconomyOut:
    """The project's economy, read from the gateway's schema in the configured database."""
    from visionloop.libs.db import create_pool, quote_ident
    from visionloop.services.labeling_gateway import economy_store, store

    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        schema = settings.schema_for(GATEWAY)
        if not await economy_store.has_tables(pool, schema):
            raise ReportUnavailable(
                f"schema {schema} has no gateway tables with the economy (migration 0003): start the labeling-gateway once"
            )
        s = quote_ident(schema)
        async with pool.acquire() as conn:
            if not await store.project_exists(conn, s, project):
                known = ", ".join(await store.projects(conn, s)) or "none"
                raise ReportUnavailable(f"the gateway knows no project {project!r} (projects: {known})")
            rows = await economy_store.economy_rows(conn, s, project)
    finally:
        await pool.close()
    return assemble(project, rows, now or datetime.now(UTC))


# -- Markdown ---------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _version_row(v: VersionFigures) -> str:
    gate = "–" if v.passed is None else ("passed" if v.passed else "failed")
    cells = [
        v.label, _num(v.map50_95), gate, str(v.human_tasks), f"{v.human_seconds:,.0f}", _num(v.seconds_per_task, 1),
        str(v.verified), str(v.auto_accepted), _pct(v.auto_accept_rate), str(v.spot_checked_images),
        f"{v.boxes_kept} / {v.spot_checked_boxes}", _pct(v.auto_accept_precision),
        f"{v.boxes_deleted} / {v.boxes_relabelled} / {v.boxes_missed}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(economy: EconomyOut, plots: dict[str, str] | None = None) -> str:
    """The report as Markdown; `plots` maps plot names to the files the text links to."""
    lines = [
        f"# Labelling economy — {economy.project}",
        "",
        f"As of {economy.generated_at:%Y-%m-%d %H:%M:%S} UTC, from the labelling gateway's tables "
        "(the dashboard's economy panel shows the same numbers).",
        "",
        "## Per model version",
        "",
    ]
    if economy.versions:
        lines += [
            "| model version | test mAP50-95 | gate | human tasks | human seconds | s per task | verified | auto-accepted "
            "| auto-accept rate | spot-checked images | boxes kept / checked | auto-accept precision | deleted / relabelled / missed |",
            "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
            *(_version_row(v) for v in economy.versions),
        ]
    else:
        lines.append("Nothing yet: no model was evaluated, no task answered, no label verified.")
    lines += ["", "## Queue depth", ""]
    q = economy.queue
    if q.summary:
        lines += [
            f"Open tasks by kind from {q.times[0]:%Y-%m-%d %H:%M} to {q.times[-1]:%Y-%m-%d %H:%M} UTC.",
            "",
            "| kind | now | peak | peak at (UTC) | mean (time-weighted) |",
            "|---|--:|--:|---|--:|",
            *(f"| {k.kind} | {k.now} | {k.peak} | {f'{k.peak_at:%Y-%m-%d %H:%M:%S}' if k.peak_at else '–'} | {k.mean:.1f} |"
              for k in q.summary),
        ]
    else:
        lines.append("No task yet.")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{PLOTS.get(name, name)}]({path})" for name, path in plots.items()]
    lines += ["", "## How the numbers are measured", ""]
    lines += [f"- **{name}**: {rule}." for name, rule in economy.rules.items()]
    return "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------------------


def _draw_queue(economy: EconomyOut, ax: Any) -> bool:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    from matplotlib.ticker import MaxNLocator

    q = economy.queue
    for kind, depth in q.depth.items():
        if kind == "all":
            ax.step(q.times, depth, where="post", label=kind, color="#98a2b3", linestyle="--", linewidth=1.2, zorder=1)
        else:
            ax.step(q.times, depth, where="post", label=kind, linewidth=1.8, zorder=2)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("open tasks")
    if q.times:
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.legend(loc="upper left")
    return bool(q.times)


def _draw_versions(name: str, economy: EconomyOut, ax: Any) -> bool:
    """Draw one per-version plot on `ax`; False when there is nothing to draw."""
    vs = economy.versions
    labels, axis = version_axis(vs)
    tilt = len(vs) > 8 or any(len(label) > 12 for label in labels)
    ax.set_xticks(range(len(vs)), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_xlabel(axis)
    if name == "map50_95":
        points = [(i, v.map50_95, v.passed) for i, v in enumerate(vs) if v.map50_95 is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "-", color="#2e5aac")
        for i, value, passed in points:
            ax.plot(i, value, "o", color="#2e5aac", markerfacecolor="#2e5aac" if passed else "white")
        ax.set_ylabel("mAP50-95 (hollow: failed the gate)")
        return bool(points)
    if name in ("human_seconds", "seconds_per_task"):
        values = [(v.human_seconds if name == "human_seconds" else v.seconds_per_task) if v.human_tasks else None for v in vs]
        shown = [i for i, value in enumerate(values) if value is not None]
        ax.bar(shown, [values[i] for i in shown], color="#12805c")
        ax.set_ylabel("seconds (lease to submit)" if name == "human_seconds" else "seconds per task")
        return bool(shown)
    drawn = False
    for attr, color, label in (("auto_accept_rate", "#2e5aac", "auto-accept rate"),
                               ("auto_accept_precision", "#b54708", "auto-accept precision")):
        points = [(i, getattr(v, attr)) for i, v in enumerate(vs) if getattr(v, attr) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=label)
        drawn = drawn or bool(points)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.legend(loc="lower right")
    return drawn


def write_plots(economy: EconomyOut, folder: Path) -> dict[str, str]:
    """The PNG plots in `folder`; their file names by plot name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = {}
    for name, title in PLOTS.items():
        fig = Figure(figsize=(7.5, 3.8), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        drawn = _draw_queue(economy, ax) if name == "queue" else _draw_versions(name, economy, ax)
        if not drawn:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="#667085")
        ax.set_title(title)
        ax.grid(axis="y", color="#e4e7ec")
        fig.savefig(folder / f"{name}.png")
        written[name] = f"{name}.png"
    return written


def write_svg_plots(economy: EconomyOut, folder: Path) -> dict[str, str]:
    """The dashboard's SVG plots in `folder` (when matplotlib is not installed)."""
    from visionloop.services.labeling_gateway.svg import economy_plots

    written = {}
    for name, svg in economy_plots(economy).items():
        (folder / f"{name}.svg").write_text(svg, encoding="utf-8")
        written[name] = f"{name}.svg"
    return written


def write_report(economy: EconomyOut, folder: Path) -> tuple[Path, str]:
    """Plots and `report.md` in `folder` (created); the Markdown file and its text."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        plots = write_plots(economy, folder)
    except ImportError:  # matplotlib comes with the `bench` and `train` extras
        plots = write_svg_plots(economy, folder)
    text = markdown(economy, plots)
    path = folder / "report.md"
    path.write_text(text, encoding="utf-8")
    return path, text


def run_report(settings: Any, project: str, out: Path | None = None, *, echo: Callable[[str], Any] = print) -> int:
    """The `visionloop report` command: print the Markdown, write it and the plots; the exit code."""
    try:
        economy = asyncio.run(load(settings, project))
    except ReportUnavailable as exc:
        print(f"refused (no_report): {exc}", file=sys.stderr)
        return 1
    path, text = write_report(economy, out or Path(f"visionloop-report-{project}"))
    echo(text)
    print(f"wrote {path} and {len(PLOTS)} plots in {path.parent}", file=sys.stderr)
    return 0
