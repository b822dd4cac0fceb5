"""`visionloop bench ...`: the committed benchmarks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from visionloop.cli.common import (
    DatasetOpt,
    JsonOpt,
    WorldOpt,
    WriteDocsOpt,
    _check_dataset,
    _demo_logging,
    _logging,
    bench_app,
    console,
    out,
)


@bench_app.command("bus")
def bench_bus(
    events: Annotated[int, typer.Option(help="Events per arm.")] = 2000,
    batch: Annotated[int, typer.Option(help="Records each hop takes at a time (1: one by one, the default shape).")] = 1,
    door: Annotated[bool, typer.Option(help="Reach the broker through the front door `up` uses to rotate it.")] = False,
    json_output: JsonOpt = False,
    write_docs: WriteDocsOpt = False,
) -> None:
    """Bus round trip on the embedded stack: the framework hop vs raw aiokafka, same broker, same run."""
    from visionloop.bench import plot_folder
    from visionloop.bench.bus import run_bus_bench

    result = run_bus_bench(events=events, console=console, batch=batch, door=door, plot_dir=plot_folder(write_docs))
    print_json(result, json_output)


@bench_app.command("intake")
def bench_intake(
    max_index: Annotated[int, typer.Option(help="Largest index size for query latency (100k, 1M, 10M).")] = 10_000_000,
    images: Annotated[int, typer.Option(help="Images in the end-to-end backlog.")] = 300,
    json_output: JsonOpt = False,
    write_docs: WriteDocsOpt = False,
) -> None:
    """Hashing, near-duplicate search and precision/recall, and ingest+dedup end to end."""
    from visionloop.bench import plot_folder
    from visionloop.bench.intake import PLOT, run_intake_bench

    sizes = [s for s in (100_000, 1_000_000, 10_000_000) if s <= max_index]
    result = run_intake_bench(sizes=sizes, e2e_images=images, console=console, plot=plot_folder(write_docs) / PLOT.name)
    print_json(result, json_output)


@bench_app.command("gateway")
def bench_gateway(
    tasks: Annotated[int, typer.Option(help="Tasks in the queue the labellers drain.")] = 2000,
    labellers: Annotated[int, typer.Option(help="Concurrent simulated labellers (HTTP clients).")] = 50,
    json_output: JsonOpt = False,
    write_docs: WriteDocsOpt = False,
) -> None:
    """Labelling gateway: next-task + submit round trips over real HTTP with concurrent labellers."""
    from visionloop.bench import plot_folder
    from visionloop.bench.gateway import PLOT, run_gateway_bench

    result = run_gateway_bench(tasks=tasks, labellers=labellers, console=console, plot=plot_folder(write_docs) / PLOT.name)
    print_json(result, json_output)


@bench_app.command("trainer")
def bench_trainer(
    train_images: Annotated[int, typer.Option(help="Verified training images (the N-th triggers the run).")] = 240,
    test_images: Annotated[int, typer.Option(help="Images of the frozen test set.")] = 60,
    epochs: Annotated[int, typer.Option(help="Epochs of the run (both arms).")] = 40,
    imgsz: Annotated[int, typer.Option(help="Training and inference size (both arms).")] = 160,
    quick: Annotated[bool, typer.Option("--quick", help="A small run (80 images, 5 epochs): checks the bench, not the target.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Trainer + evaluator: overhead around raw Ultralytics train + val, evaluator speed, agreement with pycocotools."""
    from visionloop.bench.trainer import run_trainer_bench

    if quick:
        train_images, test_images, epochs = 80, 20, 5
    result = run_trainer_bench(train_images=train_images, test_images=test_images, epochs=epochs, imgsz=imgsz, console=console)
    print_json(result, json_output)


@bench_app.command("release")
def bench_release(
    json_output: JsonOpt = False,
) -> None:
    """Release path: passing model evaluated -> 20 edge agents activated (convert, package, register, propagate); edge FP32 vs INT8."""
    from visionloop.bench.release import run_release_bench

    result = run_release_bench(console=console)
    print_json(result, json_output)


@bench_app.command("loop")
def bench_loop(
    quick: Annotated[bool, typer.Option("--quick", help="The quick demo's scenario, every arm, one seed unless --seeds.")] = False,
    rounds: Annotated[str | None, typer.Option(help="Images per round: bootstrap,review,new-class (default 100,400,120).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per arm (default 3; --quick: 1).", min=1)] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of the first model (default 30); another budget is another row.", min=1)] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Epochs of each later model (default 8).", min=1)] = None,
    dataset: DatasetOpt = None,
    world: WorldOpt = "photo",
    miss_rate: Annotated[float, typer.Option(help="Annotator: share of objects not drawn.")] = 0.05,
    jitter_frac: Annotated[float, typer.Option(help="Annotator: sd of each drawn edge, as a share of the box's side.")] = 0.04,
    confusion_rate: Annotated[float, typer.Option(help="Annotator: share of drawn boxes given a wrong class.")] = 0.03,
    rubber_stamp_rate: Annotated[float, typer.Option(help="Reviewer: share of wrong pre-label sets accepted as they are.")] = 0.10,
    review_miss_rate: Annotated[float, typer.Option(help="Reviewer: share of objects missing from pre-labels not noticed.")] = 0.10,
    draw_box_s: Annotated[float, typer.Option(help="Seconds per box drawn by hand.")] = 35.0,
    review_image_s: Annotated[float, typer.Option(help="Seconds per image shown with boxes to check.")] = 4.0,
    review_box_s: Annotated[float, typer.Option(help="Seconds per box shown to a person.")] = 1.6,
    correct_box_s: Annotated[float, typer.Option(help="Seconds per box moved, relabelled or deleted.")] = 8.0,
    json_output: JsonOpt = False,
) -> None:
    """Human time for model quality: manual, assisted (review) and the loop (review + auto-accept), several seeds."""
    from visionloop.bench.loop import run_loop_bench
    from visionloop.demo.effort import Costs
    from visionloop.demo.people import PersonErrors

    shape = None
    if rounds is not None:
        parts = [p.strip() for p in rounds.split(",")]
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            console.print(f"[red]--rounds must be three positive counts, e.g. 100,400,120 (got {rounds!r})[/]")
            raise typer.Exit(2)
        shape = (int(parts[0]), int(parts[1]), int(parts[2]))
    try:
        errors = PersonErrors(miss_rate=miss_rate, jitter_frac=jitter_frac, confusion_rate=confusion_rate,
                              rubber_stamp_rate=rubber_stamp_rate, review_miss_rate=review_miss_rate)
        costs = Costs(draw_box_s=draw_box_s, review_image_s=review_image_s, review_box_s=review_box_s, correct_box_s=correct_box_s)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    _check_dataset(dataset)
    _logging("WARNING")
    budget = None if epochs is None and finetune_epochs is None else (epochs, finetune_epochs)
    result = run_loop_bench(quick=quick, rounds=shape, seeds=seeds if seeds is not None else (1 if quick else None), world=world,
                            dataset=str(dataset) if dataset else None, errors=errors, costs=costs, epochs=budget, console=console)
    print_json(result, json_output)


@bench_app.command("chaos")
def bench_chaos(
    seed: Annotated[int, typer.Option(help="Seed of the scenario and of the kill schedule.")] = 11,
    ci: Annotated[bool, typer.Option("--ci", help="The test suite's reduced run: 150 images, intake and labelling, 5 kills, the broker restart.")] = False,
    replicas: Annotated[str | None, typer.Option(help="More processes of a service, e.g. dedup=2,recognizer=2 (each replica is killed too).")] = None,
    json_output: JsonOpt = False,
    write_docs: WriteDocsOpt = False,
) -> None:
    """The quick-demo scenario (1,020 images) while services are SIGKILLed and the broker restarts; reconciles; exit 1 on any discrepancy."""
    from dataclasses import replace

    from visionloop import services as registry
    from visionloop.bench import plot_folder
    from visionloop.bench.chaos import PLOT, ChaosConfig, run_chaos_bench, summary
    from visionloop.supervisor import parse_replicas

    try:
        counts = parse_replicas(replicas, list(registry.available()))
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None

    _demo_logging()
    for expected in ("aiokafka", "asyncio"):  # connection errors while the broker restarts are the point
        logging.getLogger(expected).setLevel(logging.CRITICAL)
    cfg = replace(ChaosConfig.ci() if ci else ChaosConfig(), seed=seed, replicas=tuple(sorted(counts.items())))
    result = run_chaos_bench(cfg, console=console, plot=plot_folder(write_docs) / PLOT.name)
    print_json(summary(result), json_output)
    if not result["ok"]:
        raise typer.Exit(1)


@bench_app.command("soak")
def bench_soak(
    minutes: Annotated[float, typer.Option(help="How long images are submitted.")] = 10.0,
    rate: Annotated[float | None, typer.Option(help="Images submitted per second (default: one the reference machine holds).")] = None,
    services: Annotated[str | None, typer.Option(help="Comma-separated services to run (default: all ten).")] = None,
    sample: Annotated[float, typer.Option(help="Seconds between samples of memory, lag and database size.")] = 5.0,
    warmup: Annotated[float | None, typer.Option(help="Seconds left out of the growth fit (default: a fifth of the run, at most 120).")] = None,
    drain: Annotated[float, typer.Option(help="Most seconds to wait after the last submission for every decision.")] = 180.0,
    json_output: JsonOpt = False,
) -> None:
    """Sustained submissions through every service (each its own process): memory growth per hour, consumer lag, database growth."""
    from visionloop.bench.soak import RATE_PER_S, run_soak_bench

    _logging("WARNING")
    names = [n.strip() for n in services.split(",")] if services else None
    result = run_soak_bench(minutes=minutes, rate=rate or RATE_PER_S, services=names, sample_s=sample, warmup_s=warmup,
                            drain_s=drain, console=console)
    print_json(result, json_output)


@bench_app.command("recognizer")
def bench_recognizer(
    images: Annotated[int, typer.Option(help="Images in the throughput backlog.")] = 400,
    imgsz: Annotated[int, typer.Option(help="Model input size (640 is the usual production size).")] = 640,
    batch: Annotated[int, typer.Option(help="The recognizer's batch_max (N).")] = 8,
    infer_batch: Annotated[int, typer.Option(help="Images per session.run in both arms (the recognizer's inference_batch; 1 is fastest on CPU).")] = 1,
    wait_ms: Annotated[int, typer.Option(help="The recognizer's batch_wait_ms (T).")] = 0,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads in both arms (0 = one per core).")] = 0,
    parallelism: Annotated[str, typer.Option(help="The recognizer's cpu_parallelism: images or operators.")] = "images",
    json_output: JsonOpt = False,
    write_docs: WriteDocsOpt = False,
) -> None:
    """Recognizer throughput through the real broker with micro-batching vs raw ONNX Runtime, same run."""
    from visionloop.bench import plot_folder
    from visionloop.bench.recognizer import PLOT, run_recognizer_bench

    result = run_recognizer_bench(images=images, imgsz=imgsz, batch=batch, infer_batch=infer_batch, wait_ms=wait_ms,
                                  threads=threads, parallelism=parallelism, console=console, plot=plot_folder(write_docs) / PLOT.name)
    print_json(result, json_output)


@bench_app.command("scale")
def bench_scale(
    intake_images: Annotated[int, typer.Option(help="Images in each intake arm's backlog (ingest + dedup).", min=1)] = 1000,
    recognizer_images: Annotated[int, typer.Option(help="Images in each recognizer arm's backlog.", min=1)] = 400,
    imgsz: Annotated[int, typer.Option(help="The recognizer model's input size (a multiple of 32).")] = 640,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads per arm, split between the replicas (0 = one per core).", min=0)] = 0,
    model: Annotated[Path | None, typer.Option(help="An ONNX detector for the recognizer arms (default: the bench's synthetic-scene detector).")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Scale-out: intake and recognizer throughput with 1 and 2 processes per service, arms 1,2,2,1 in one run."""
    from visionloop.bench.scale import check_options, run_scale_bench

    try:
        check_options(intake_images=intake_images, recognizer_images=recognizer_images, imgsz=imgsz, model=model)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    _logging("WARNING")
    result = run_scale_bench(intake_images=intake_images, recognizer_images=recognizer_images, imgsz=imgsz,
                             threads=threads, model=model, console=console)
    print_json(result, json_output)


def print_json(result: Any, wanted: bool) -> None:
    """End a bench's output with its results as one JSON line (`--json`)."""
    if wanted:
        out.print(json.dumps(result), highlight=False, soft_wrap=True, markup=False)
