"""`visionloop bench chaos`: runs, reconciles, plots and prints; `summary` for `--json`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from visionloop.bench.chaos.config import PLOT, STATE, ChaosConfig
from visionloop.bench.chaos.reconcile import Reconciliation, Truth, reconcile
from visionloop.bench.chaos.run import ChaosRun


class _Live:
    """Progress on a rich console: a line per milestone above bars for images, labels, kills and training."""

    def __init__(self, console: Console, cfg: ChaosConfig) -> None:
        self.console = console
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(bar_width=32), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=console, refresh_per_second=4, redirect_stdout=False, redirect_stderr=True)
        self.tasks: dict[str, TaskID] = {}
        self.cfg = cfg

    def __enter__(self) -> _Live:
        self.bars.start()
        self.tasks = {
            "decided": self.bars.add_task("images decided", total=self.cfg.submitted),
            "labelled": self.bars.add_task("accepted images labelled", total=None),
            "kills": self.bars.add_task("SIGKILLs sent", total=None),
        }
        if self.cfg.train:
            self.tasks["training"] = self.bars.add_task("training (epochs of the running run)", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def line(self, message: str) -> None:
        """One timestamped line (markup allowed)."""
        self.console.print(f"[bold magenta]chaos[/] {time.strftime('%H:%M:%S')} {message}", soft_wrap=True)

    async def follow(self, run: ChaosRun) -> None:
        """Move the bars twice a second."""
        while True:
            with contextlib.suppress(Exception):
                if run.events is not None:
                    ids = run.items.keys()
                    self.bars.update(self.tasks["decided"], completed=len(ids & run.events.decided.keys()))
                    accepted = set(run.events.accepted.values())
                    self.bars.update(self.tasks["labelled"], completed=len(accepted & run.events.verified), total=len(accepted) or None)
                if run.monkey is not None:
                    self.bars.update(self.tasks["kills"], completed=run.monkey.done, total=run.monkey.planned)
                if run.pool is not None and run.cfg.train:
                    await run.training_in_progress()
                    self.bars.update(self.tasks["training"], completed=run.epochs[0], total=run.epochs[1] or None)
            await asyncio.sleep(0.5)


def run_chaos_bench(cfg: ChaosConfig | None = None, *, state: Path = STATE, console: Console | None = None,
                    database_url: str | None = None, plot: Path | None = PLOT) -> dict[str, Any]:
    """Start the embedded stack, run the scenario under fire, reconcile, print the counts; the results.

    The broker is always this run's own (it is restarted); `database_url` uses an existing
    PostgreSQL instead of the embedded one (each run has its own schemas). The results go to
    `result.json` in the run's folder, the timeline plot to `plot` (and to the run's folder).
    """
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.settings import Settings

    cfg = cfg or ChaosConfig()
    tag = uuid.uuid4().hex[:6]
    folder = (state / f"run-{tag}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    stack = EmbeddedStack(Settings(state_dir=state, database_url=database_url, kafka_bootstrap=None))
    settings = stack.start().model_copy(update={
        "topic_prefix": f"chaos{tag}.", "schema_prefix": f"chaos{tag}_", "state_dir": folder / "state",
        "blob_url": (folder / "blobs").as_uri(), "heartbeat_interval_s": 2.0, "kafka_embedded": True,
        "outbox_relay_interval_s": cfg.relay_interval_s,
    })
    live = _Live(console, cfg) if console is not None else None
    run = ChaosRun(cfg, folder, say=live.line if live else None)

    async def main() -> dict[str, Any]:
        follower = asyncio.create_task(live.follow(run)) if live else None
        try:
            return await run.run(stack, settings)
        finally:
            if follower is not None:
                follower.cancel()

    try:
        with live or contextlib.nullcontext():
            result = asyncio.run(main())
        result["unplanned_restarts"] = {name: w["restarts"] for name, w in stack.watched().items()}  # deaths the watch repaired
    finally:
        stack.stop()
    (folder / "result.json").write_text(json.dumps(result, indent=1, default=str))
    result["plot"] = str(_plot(result, folder / "chaos.png"))
    if plot is not None:
        result["plot"] = str(_plot(result, plot))
    if console is not None:
        _print(console, result)
    return result


def _plot(result: dict[str, Any], path: Path) -> Path:
    """The run on one time axis: images decided and labelled, every SIGKILL, the broker restart,
    training and release phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5))
    if result["timeline"]:
        t, decided, labelled = zip(*result["timeline"], strict=True)
        ax.plot(t, decided, label=f"submissions decided ({result['submitted']:,} submitted)", color="black", linewidth=2.2)
        ax.plot(t, labelled, label=f"accepted images labelled ({result['labelled']:,})", color="black", linewidth=2.2, linestyle="-.")
    top = max(result["submitted"], 1)
    for n, (what, start, end) in enumerate(result["phases"]):
        colour = "tab:orange" if what.startswith("training") else "tab:purple"
        ax.axvspan(start, end if end is not None else result["wall_s"], color=colour, alpha=0.12,
                   label=("training" if what.startswith("training") else "release") if n < 2 else None)
        ax.text(start, top * (1.06 if n % 2 else 1.015), what, fontsize=7, color=colour)
    palette = plt.get_cmap("tab20").colors  # replicas too: up to 20 processes before colours repeat
    colours = {name: palette[i % len(palette)] for i, name in enumerate(sorted({k["service"] for k in result["kill_log"]}))}
    for kill in result["kill_log"]:
        style = "-" if kill["why"] == "random" else "--"
        ax.axvline(kill["at_s"], color=colours[kill["service"]], linestyle=style, linewidth=1.2, alpha=0.75)
    for service, colour in colours.items():
        ax.plot([], [], color=colour, label=f"SIGKILL {service}")
    ax.plot([], [], color="grey", linestyle="--", label="SIGKILL mid-training / mid-release")
    for at in result["broker_restart_at_s"]:
        ax.axvline(at, color="red", linewidth=4, alpha=0.35)
    ax.plot([], [], color="red", linewidth=4, alpha=0.35, label="broker restart (all topics lost)")
    ax.set_xlim(0, result["wall_s"])
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("images")
    verdict = "no discrepancy" if result["ok"] else f"{len(result['discrepancies'])} discrepancies"
    ax.set_title(f"visionloop bench chaos: {result['kills']} SIGKILLs, {result['broker_restarts']} broker restart; "
                 f"lost {result['lost']}, duplicated {result['duplicated']} ({verdict})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _print(console: Console, r: dict[str, Any]) -> None:
    table = Table(title="visionloop bench chaos")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("images submitted", f"{r['submitted']:,}")
    table.add_row("  rejected with a reason", f"{r['rejected']:,}  ({', '.join(f'{k} {v}' for k, v in sorted(r['rejected_by_reason'].items()))})")
    table.add_row("  labelled (verified)", f"{r['labelled']:,}")
    table.add_row("  pending a person", f"{r['pending_person']:,}")
    table.add_row("terminal / lost / duplicated", f"{r['terminal']:,} / {r['lost']} / {r['duplicated']}")
    table.add_row("dead letters", str(r["dead_letters"]))
    table.add_row("SIGKILLs", f"{r['kills']} ({', '.join(f'{k} {v}' for k, v in r['kills_by_service'].items())})")
    table.add_row("  mid-training / mid-release", f"{r['kills_mid_training']} / {', '.join(r['kills_mid_release']) or '-'}")
    table.add_row("broker restarts", f"{r['broker_restarts']} (at {', '.join(f'{t:.0f} s' for t in r['broker_restart_at_s']) or '-'})")
    if r["recovery_s"]:
        table.add_row("back to serving after a kill", f"median {r['recovery_s']['median']} s, max {r['recovery_s']['max']} s")
    table.add_row("submissions resent by upstream", str(r["resent_submissions"]))
    table.add_row("events (copies re-read)", f"{r['events']:,} ({r['event_copies_read']:,})")
    table.add_row("models", ", ".join(f"v{m['version']} {'passed' if m['passed'] else 'failed'} {m['map50_95']:.3f}" for m in r["models"]) or "-")
    table.add_row("releases", ", ".join(f"{v} {n}" for v, n in sorted(Counter(r["releases"].values()).items())) or "-")
    table.add_row("devices", ", ".join(f"{d} v{s['version']}" for d, s in r["devices"].items()) or "-")
    table.add_row("wall time", f"{r['wall_s']:.0f} s")
    table.add_row("plot", r.get("plot", "-"))
    console.print(table)
    if r["discrepancies"]:
        console.print(f"[red bold]{len(r['discrepancies'])} discrepancies[/]:")
        for line in r["discrepancies"][:40]:
            console.print(f"  - {escape(line)}", soft_wrap=True)
    else:
        console.print("[green bold]no discrepancy[/]: every image has exactly one terminal decision, nothing happened twice, "
                      "every release ended in a known state on every device")


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON line: the counts first, the detail after."""
    keys = ("submitted", "terminal", "lost", "duplicated", "kills", "broker_restarts", "ok", "rejected", "labelled", "pending_person",
            "rejected_by_reason", "duplicated_by_kind", "dead_letters", "kills_by_service", "kills_mid_training", "kills_mid_release", "recovery_s",
            "supervisor_restarts", "resent_submissions", "event_copies_read", "models", "releases", "devices", "discrepancies",
            "stuck_groups", "ahead_groups", "slow_groups", "partitions", "wall_s", "machine", "folder", "plot")
    return {k: result[k] for k in keys} | {"replicas": dict(result["size"]["replicas"]),
                                          "unplanned_restarts": result.get("unplanned_restarts")}


__all__ = ["ChaosConfig", "ChaosRun", "Reconciliation", "Truth", "reconcile", "run_chaos_bench", "summary"]
