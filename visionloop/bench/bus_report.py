"""The figures of `visionloop bench bus`: where each arm's CPU went, the latency plot, the table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from visionloop.bench import cpu_model

if TYPE_CHECKING:
    from visionloop.bench.bus import ArmResult

TARGET_RATIO = 2.0
"""The framework hop may cost at most this many times the raw client's time per event."""


PARTS = ("hop", "broker", "postgres", "driver", "other")


def _plot(results: dict[str, ArmResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (hist, cdf, cpu) = plt.subplots(1, 3, figsize=(16, 4.4), width_ratios=(1.2, 1.2, 1))
    colours = {"raw": "#4c72b0", "framework": "#dd8452"}
    high = max(max(r.latencies_ms) for r in results.values())
    edges = [high * i / 60 for i in range(61)]
    for arm, result in results.items():
        label = f"{arm}: p50 {result.percentile(50):.1f} ms, p99 {result.percentile(99):.1f} ms"
        hist.hist(result.latencies_ms, bins=edges, alpha=0.6, color=colours[arm], label=label)
        ordered = sorted(result.latencies_ms)
        cdf.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post",
                 color=colours[arm], label=arm)
    for axis in (hist, cdf):
        axis.set_xlim(0, high * 1.02)
        axis.set_xlabel("hop latency, ms: produce call to output read")
    hist.set_ylabel("events")
    hist.set_title("Hop latency, one event in flight")
    hist.legend(fontsize=8)
    cdf.set_ylabel("fraction of events")
    cdf.set_title("Cumulative distribution (dotted: p50, p99)")
    for q in (0.5, 0.99):
        cdf.axhline(q, color="grey", linewidth=0.6, linestyle=":")
    cdf.legend(fontsize=8, loc="lower right")
    # Where each arm's time goes: CPU per event by process, over a backlog (median round).
    names = list(results)
    bottoms = [0.0] * len(names)
    shades = {"hop": "#c44e52", "broker": "#8172b2", "postgres": "#55a868", "driver": "#937860", "other": "#cccccc"}
    for part in PARTS:
        values = [results[n].cpu_ms(part) for n in names]
        cpu.bar(names, values, bottom=bottoms, color=shades[part], label=part)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for x, name in enumerate(names):
        cpu.annotate(f"{results[name].events_per_s:,.0f} events/s", (x, bottoms[x]), ha="center",
                     va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    cpu.set_ylim(0, max(bottoms) * 1.18)
    cpu.set_ylabel("CPU ms per event (backlog, median round)")
    cpu.set_title("Throughput and CPU per event")
    cpu.legend(fontsize=8, loc="upper left")
    figure.suptitle(
        f"visionloop bench bus: framework hop vs raw aiokafka on embedded Tansu + PostgreSQL "
        f"({cpu_model()}, {os.cpu_count()} CPUs); ratio {results['raw'].events_per_s / results['framework'].events_per_s:.2f}x",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _table(result: dict[str, Any], arms: dict[str, ArmResult]) -> Table:
    table = Table(title=f"Bus round trip: {result['events']} events x {result['rounds']} rounds per arm")
    table.add_column("arm")
    for column in ("events/s", "rounds", "p50 ms", "p99 ms", "hop CPU ms/ev"):
        table.add_column(column, justify="right", no_wrap=True)
    names = {"framework": "framework", "raw": "raw aiokafka"}
    for arm in ("framework", "raw"):
        r = arms[arm]
        table.add_row(
            names[arm], f"{r.events_per_s:,.0f}", " ".join(f"{x:.0f}" for x in r.rounds_events_per_s),
            f"{r.percentile(50):.1f}", f"{r.percentile(99):.1f}", f"{r.cpu_ms('hop'):.2f}",
        )
    verdict = "[green]within[/]" if result["ratio_vs_raw"] <= TARGET_RATIO else "[red]above[/]"
    table.caption = (
        f"ratio vs raw (raw events/s / framework events/s): [bold]{result['ratio_vs_raw']:.2f}x[/], "
        f"{verdict} the {TARGET_RATIO:g}x target.\n"
        "framework: validation, inbox + outbox in one transaction, publish, offset commit.\n"
        "events/s: median round, a backlog from first produce to last output created; "
        f"p50/p99: hop latency, produce call to output read, one event in flight "
        f"({result['latency_samples']} per arm)."
    )
    return table
