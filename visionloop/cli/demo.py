"""`visionloop demo` and its built-in world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from visionloop.cli.common import (
    DatasetOpt,
    WorldOpt,
    _check_dataset,
    _demo_logging,
    app,
    console,
    out,
)

demo_app = typer.Typer(help="The whole loop in three rounds on the embedded stack; the built-in world.")
app.add_typer(demo_app, name="demo")
world_app = typer.Typer(help="The demo's built-in world.", no_args_is_help=True)
demo_app.add_typer(world_app, name="world")


@demo_app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="A small run (3 to 11 minutes on two cores, by machine); its models learn little.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="End with one JSON line summarising the report.")] = False,
    dataset: DatasetOpt = None,
    world: WorldOpt = "photo",
) -> None:
    """The whole loop in three rounds on the embedded stack, every service as in production; writes a report."""
    if ctx.invoked_subcommand is not None:
        return
    from dataclasses import replace

    from visionloop.demo.report import write_report
    from visionloop.demo.scenario import DemoConfig, run_demo

    _demo_logging()
    _check_dataset(dataset)
    cfg = replace(DemoConfig.quick() if quick else DemoConfig(), world=world, dataset=str(dataset) if dataset else None)
    result = run_demo(cfg, state=Path(".visionloop") / "demo", console=console)
    report = write_report(result, Path(result["folder"]) / "report")
    console.print(f"[green]report[/]: {report}")
    if json_output:
        out.print(json.dumps(_demo_summary(result, report)), highlight=False, soft_wrap=True, markup=False)


@world_app.command("export")
def demo_world_export(
    out_dir: Annotated[Path, typer.Option("--out", help="A new (or empty) folder to write the dataset into.")],
    format_: Annotated[str, typer.Option("--format", help="coco (annotations/instances.json + images/) or yolo (data.yaml, images/, labels/).")] = "coco",
    images: Annotated[int, typer.Option(help="Scenes to write.")] = 600,
    seed: Annotated[int, typer.Option(help="The world's seed.")] = 7,
    world: WorldOpt = "photo",
) -> None:
    """Write the built-in world as a labelled dataset folder (check `--dataset` against it)."""
    from visionloop.demo.export import export_world

    try:
        folder = export_world(out_dir, fmt=format_, images=images, style=world, seed=seed)
    except (ValueError, FileExistsError) as exc:
        console.print(f"[red]{exc}[/]", soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"wrote the {world} world ({images} scenes, {format_}) to {folder}", soft_wrap=True)


def _demo_summary(result: dict[str, Any], report: Path) -> dict[str, Any]:
    from collections import Counter

    rounds = result["rounds"]
    return {
        "map50_95": [r["model"]["metrics"]["map50_95"] if r["model"] else None for r in rounds],
        "human_actions_per_image": [r["human_actions_per_image"] for r in rounds],
        "labelling_seconds": [r["labelling_seconds"] for r in rounds],
        "auto_accept_rate": [r["auto_accept_rate"] for r in rounds],
        "auto_accept_precision": result["auto_accept_precision"],
        "rejections": dict(sum((Counter(r["rejected"]) for r in rounds), Counter())),
        "passed": [bool(r["model"] and r["model"]["passed"]) for r in rounds],
        "devices": result["devices"],
        "wall_s": result["wall_s"],
        "report": str(report),
    }
