"""Training, releases, signing keys and the model library."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from visionloop.cli.common import (
    ConfigOpt,
    _attach,
    _read_report,
    _settings,
    app,
    console,
    keys_app,
    library_app,
    out,
    release_app,
    show_rows,
    trainer_app,
    unknown_name_hint,
)

# -- the trainer ------------------------------------------------------------------------------------


def _hyperparameter(pair: str) -> tuple[str, Any]:
    """One `--set NAME=VALUE`, typed as the gateway's import types it (numbers, booleans)."""
    from visionloop.services.labeling_gateway.decide import Refusal, training_arguments

    if "=" not in pair:
        raise typer.BadParameter(f"{pair!r}: use NAME=VALUE, e.g. epochs=20")
    try:
        ((name, value),) = training_arguments([pair]).items()
    except Refusal as exc:
        raise typer.BadParameter(exc.message) from None
    return name, value


@trainer_app.command("request")
def trainer_request(
    project: Annotated[str, typer.Argument(help="The project to train.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Ultralytics argument for this run only, NAME=VALUE (repeatable).")] = None,
    requested_by: Annotated[str, typer.Option(help="Who asks (recorded with the run).")] = "cli",
    config: ConfigOpt = None,
) -> None:
    """Ask the trainer to train PROJECT's next model now (`training requested`; coalesced with a queued run)."""
    from visionloop.contracts import TrainingRequested
    from visionloop.libs.kafka import publish_once
    from visionloop.services.trainer.config import TUNABLE

    overrides = dict(_hyperparameter(p) for p in set_ or [])
    unknown = sorted(set(overrides) - TUNABLE)
    if unknown:
        for name in unknown:
            console.print(f"[red]refused (unknown_hyperparameter)[/]: {name!r} is not a training argument; "
                          f"{unknown_name_hint(name, sorted(TUNABLE))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    settings = _attach(_settings(config))
    envelope = asyncio.run(publish_once(
        settings, TrainingRequested(requested_by=requested_by, hyperparameters=overrides), project=project, producer="cli", key=project,
    ))
    out.print(f"training requested for {project} (event {envelope.event_id}); follow it with `visionloop trainer runs --project {project}`")


@trainer_app.command("cancel")
def trainer_cancel(
    run_id: Annotated[str, typer.Argument(help="The run (`visionloop trainer runs`).")],
    by: Annotated[str, typer.Option(help="Who cancels it (recorded with the run).")] = "cli",
    config: ConfigOpt = None,
) -> None:
    """Cancel a queued run, or stop a running one (its trainer kills the training within seconds)."""
    from visionloop.libs.db import service_schema
    from visionloop.services.trainer import store
    from visionloop.services.trainer.service import SPEC

    settings = _attach(_settings(config))

    async def cancel() -> Any:
        async with service_schema(settings, "trainer", SPEC.migrations) as (pool, schema):
            return await store.cancel(pool, schema, run_id, by)

    row = asyncio.run(cancel())
    if row is None:
        console.print(f"[red]refused (not_cancellable)[/]: no queued or running run {run_id!r}; see `visionloop trainer runs`",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    what = "its trainer stops the training within seconds" if row["was"] == "running" else "it will not start"
    out.print(f"run {run_id} of {row['project']} cancelled ({row['was']}): {what}")


@trainer_app.command("runs")
def trainer_runs(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    limit: Annotated[int, typer.Option(help="Newest runs shown.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON array instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Training runs, newest first: status (and reason of a failure), epoch, dataset version and what
    it left out, the model, its test-set mAP50-95 and the gate's verdict with its reasons."""
    from visionloop.services.trainer.store import runs_report

    settings = _attach(_settings(config))
    rows = _read_report(settings, "trainer", "runs", lambda pool, schema: runs_report(pool, schema, project, limit))
    show_rows(
        rows, json_output=json_output, title=f"training runs{f' — {project}' if project else ''}",
        columns=("run", "project", "status", "epoch", "dataset", "left out", "model", "test mAP50-95", "gate", "started", "finished"),
        cells=_run_cells,
        empty="no runs yet: they start when enough labels are verified, or with `visionloop trainer request PROJECT`",
    )


def _run_cells(r: dict[str, Any]) -> tuple[str, ...]:
    status = r["status"] + (f" ({r['reason']})" if r["reason"] else "")
    dataset = "-" if not r["dataset_version"] else f"{r['dataset_version'][:15]} ({r['train_images']} train, {r['val_images']} val)"
    left_out = "-" if not r["dataset_version"] else (_left_out(r["excluded"]) if r["excluded"] else "none")
    return (
        r["run_id"], r["project"], status, str(r["epoch"] or "-"), dataset, left_out,
        f"{r['model_id']} v{r['version']}" if r["model_id"] else "-",
        f"{r['map50_95']:.3f}" if r["map50_95"] is not None else "-", gate_cell(r),
        (r["started_at"] or "-")[:19], (r["finished_at"] or "-")[:19],
    )


def _left_out(excluded: list[dict[str, Any]]) -> str:
    n = len(excluded)
    return f"{n} near-duplicate{'' if n == 1 else 's'} of test images"


def gate_cell(r: dict[str, Any]) -> str:
    """The gate's verdict on a run's model: passed, failed with each reason's numbers, or pending."""
    if not r["model_id"]:
        return "-"
    if r["gate_passed"] is None:
        return "not judged yet"
    if r["gate_passed"]:
        return "passed"
    reasons = []
    for f in r["gate_failures"]:
        figures = f" {f['value']:.3f} vs {f['threshold']:.3f}" if f.get("value") is not None and f.get("threshold") is not None else ""
        reasons.append(f"{f['reason']}{f' ({figures.strip()})' if figures else ''}")
    return "FAILED: " + ("; ".join(reasons) or "no reason given")


# -- releases and keys ------------------------------------------------------------------------------


@app.command()
def releases(
    fleet: Annotated[str | None, typer.Option(help="Only this fleet.")] = None,
    limit: Annotated[int, typer.Option(help="Newest releases shown.")] = 20,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON array instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Releases per fleet: model, stage, status, and how many devices downloaded, activated or failed."""
    from visionloop.services.distributor.store import releases_report

    settings = _attach(_settings(config))
    rows = _read_report(settings, "distributor", "releases", lambda pool, schema: releases_report(pool, schema, fleet, limit))
    show_rows(
        rows, json_output=json_output, title=f"releases{f' — fleet {fleet}' if fleet else ''}",
        columns=("release", "fleet", "target", "model", "stage", "status", "devices", "reason", "updated"),
        cells=_release_cells,
        empty="no releases yet: a model that passes the gate is converted, packaged and released by the loop",
    )


def _release_cells(r: dict[str, Any]) -> tuple[str, ...]:
    stages = r["stages"]
    stage = f"{r['stage_index'] + 1}/{len(stages)} ({stages[r['stage_index']]:.0f}%)"
    devices = ", ".join(f"{k} {v}" for k, v in sorted(r["devices"].items())) or "-"
    return (r["release_id"], r["fleet"], r["target"], f"{r['model_id']} v{r['version']}", stage, r["status"], devices,
            r["reason"] or "-", r["updated_at"][:19])


@app.command()
def report(
    project: Annotated[str, typer.Argument(help="The project.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for report.md and the plots (default ./visionloop-report-PROJECT/).")] = None,
    config: ConfigOpt = None,
) -> None:
    """The labelling economy of PROJECT per model version (test mAP50-95, human seconds, auto-accept rate and precision) and its queue depth, as Markdown with PNG plots."""
    from visionloop.report import run_report

    raise typer.Exit(run_report(_attach(_settings(config)), project, out_dir))


def _release_command(kind: str, release_id: str | None, fleet: str | None, reason: str | None, config: Path | None) -> None:
    from visionloop.contracts import SYSTEM_PROJECT, ReleaseCommand, ReleaseCommandKind
    from visionloop.libs.kafka import publish_once

    if not release_id and not fleet:
        console.print("[red]refused (no_release)[/]: name a release id or --fleet (its latest release)")
        raise typer.Exit(2)
    settings = _attach(_settings(config))
    command = ReleaseCommand(command=ReleaseCommandKind(kind), release_id=release_id, fleet=fleet, issued_by="cli", reason=reason)
    envelope = asyncio.run(publish_once(settings, command, project=SYSTEM_PROJECT, producer="cli", key=fleet or release_id))
    out.print(f"{kind} sent for {release_id or 'the latest release of ' + str(fleet)} (event {envelope.event_id}); see `visionloop releases`")


def _command(kind: str, doc: str) -> None:
    def command(
        release_id: Annotated[str | None, typer.Argument(help="The release (default: the fleet's latest).")] = None,
        fleet: Annotated[str | None, typer.Option(help="The fleet whose latest release is meant.")] = None,
        reason: Annotated[str | None, typer.Option(help="Why (recorded with the release).")] = None,
        config: ConfigOpt = None,
    ) -> None:
        _release_command(kind, release_id, fleet, reason, config)

    command.__doc__ = doc
    release_app.command(kind)(command)


_command("promote", "Start the release's next stage now (or complete it).")
_command("pause", "Stop the release's rollout where it is.")
_command("resume", "Let a paused release roll on.")
_command("rollback", "Roll the release back: devices return to their last-known-good model; the library's previous model is production again.")


@keys_app.command("create")
def keys_create(
    folder: Annotated[Path | None, typer.Option(help="Where to write the pair (default: <state_dir>/keys).")] = None,
    name: Annotated[str, typer.Option(help="File name stem: <name>.key (private, mode 600) and <name>.pub.")] = "packager-ed25519",
    config: ConfigOpt = None,
) -> None:
    """Create an Ed25519 key pair: the private key signs packages (packager), the public one verifies them (distributor, devices)."""
    from visionloop.libs.signing import key_id, load_public, write_key_pair

    settings = _settings(config)
    folder = folder or settings.state_dir / "keys"
    try:
        private, public = write_key_pair(folder, name=name)
    except FileExistsError:
        console.print(f"[red]refused (key_exists)[/]: {folder / (name + '.key')} exists; choose another --name or folder")
        raise typer.Exit(1) from None
    out.print(f"private key {private} (mode 600: for the packager only)\npublic key  {public} (key id {key_id(load_public(public))})")


# -- the model library ------------------------------------------------------------------------------


def _domain_tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            console.print(f"[red]--domain {pair!r}[/]: write tags as KEY=VALUE, e.g. --domain site=plant-3")
            raise typer.Exit(2)
        tags[key.strip()] = value.strip()
    return tags


@library_app.command("add")
def library_add(
    path: Annotated[Path, typer.Argument(help="The ONNX detector (Ultralytics export, task=detect).", exists=True, dir_okay=False)],
    project: Annotated[str, typer.Option(help="Project the model serves.")],
    classes: Annotated[str | None, typer.Option(help="Class names in head order, comma-separated (default: the file's metadata).")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Square input size (default: the file's metadata).")] = None,
    domain: Annotated[list[str] | None, typer.Option(help="Domain tag the model serves, KEY=VALUE; repeatable. None: the whole project.")] = None,
    alias: Annotated[str | None, typer.Option(help="Give it an alias now: production or candidate.")] = None,
    target: Annotated[str, typer.Option(help="Where it runs: server or edge.")] = "server",
    model_id: Annotated[str | None, typer.Option(help="Model line (default: <project>-detector).")] = None,
    version: Annotated[int | None, typer.Option(help="Version within the line (default: the next).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8.")] = "fp32",
    dataset_version: Annotated[str, typer.Option(help="Dataset version it was trained on.")] = "manual",
    parent: Annotated[str | None, typer.Option(help="The model it was fine-tuned from, MODEL_ID:VERSION.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="JSON file of its test-set metrics (map50_95, map50, ...).", exists=True, dir_okay=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Register an ONNX detector in the model library (stored in the blob store; emits `model registered`)."""
    from visionloop.contracts import Alias, Metrics, ModelRef, Precision, Target
    from visionloop.libs.library import LibraryError, LibraryWriter

    settings = _attach(_settings(config))
    try:
        chosen_alias = Alias(alias) if alias else None
        chosen_target, chosen_precision = Target(target), Precision(precision)
        parent_ref = None
        if parent:
            parent_id, _, parent_version = parent.rpartition(":")
            parent_ref = ModelRef(model_id=parent_id, version=int(parent_version))
        measured = Metrics.model_validate_json(metrics.read_text()) if metrics else None
    except ValueError as exc:
        console.print(f"[red]invalid option[/]: {exc}")
        raise typer.Exit(2) from None

    async def main() -> Any:
        async with LibraryWriter(settings) as library:
            return await library.add(
                path.read_bytes(), project=project, model_id=model_id,
                class_names=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                input_size=imgsz, domain=_domain_tags(domain or []), alias=chosen_alias,
                target=chosen_target, precision=chosen_precision, version=version,
                dataset_version=dataset_version, parent=parent_ref, metrics=measured,
            )

    try:
        entry = asyncio.run(main())
    except LibraryError as exc:
        console.print(f"[red]refused ({exc.reason})[/]: {exc}")
        raise typer.Exit(1) from None
    aliases = ", ".join(sorted(entry.aliases)) or "no alias"
    out.print(
        f"registered {entry.model_id} v{entry.version} ({entry.target.value}, {aliases}) for project "
        f"{entry.project}: {len(entry.class_names)} classes, {entry.input_size}px, sha256 {entry.artifact_sha256[:16]}…"
    )


@library_app.command("promote")
def library_promote(
    model_id: Annotated[str, typer.Argument(help="The model line.")],
    version: Annotated[int, typer.Argument(help="The version to point the alias at.")],
    alias: Annotated[str, typer.Option(help="production (the old one becomes previous) or candidate.")] = "production",
    target: Annotated[str, typer.Option(help="server or edge.")] = "server",
    config: ConfigOpt = None,
) -> None:
    """Point an alias at a registered version (emits `model registered`; recognizers reload)."""
    from visionloop.contracts import Alias, Target
    from visionloop.libs.library import LibraryError, LibraryWriter

    settings = _attach(_settings(config))

    async def main() -> Any:
        async with LibraryWriter(settings) as library:
            return await library.promote(model_id, version, Alias(alias), target=Target(target))

    try:
        entry = asyncio.run(main())
    except (LibraryError, ValueError) as exc:
        console.print(f"[red]refused ({getattr(exc, 'reason', 'invalid')})[/]: {exc}")
        raise typer.Exit(1) from None
    out.print(f"{entry.model_id} v{entry.version} ({entry.target.value}) is now {alias}")


@library_app.command("list")
def library_list(
    project: Annotated[str | None, typer.Option(help="Only this project's models.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON array instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Every model version in the library, with its aliases."""
    from visionloop.libs.db import create_pool
    from visionloop.libs.library import SERVICE, ModelLibrary

    settings = _attach(_settings(config))

    async def main() -> Any:
        pool = await create_pool(settings, min_size=1, max_size=1)
        try:
            return await ModelLibrary(pool, settings.schema_for(SERVICE)).entries(project)
        finally:
            await pool.close()

    entries = asyncio.run(main())
    show_rows(
        entries, json_output=json_output, title=f"model library{f' — project {project}' if project else ''}",
        columns=("project", "model", "version", "target", "domain", "aliases", "classes", "input", "precision", "mAP50-95",
                 "sha256", "registered"),
        cells=lambda e: (
            e.project, e.model_id, str(e.version), e.target.value,
            ", ".join(f"{k}={v}" for k, v in e.domain.items()) or "(all)",
            ", ".join(sorted(e.aliases)) or "-", ", ".join(e.class_names), str(e.input_size), e.precision.value,
            f"{e.metrics.map50_95:.3f}" if e.metrics else "-", e.artifact_sha256[:12],
            e.registered_at.strftime("%Y-%m-%d %H:%M"),
        ),
        as_json=lambda e: {
            "model_id": e.model_id, "version": e.version, "target": e.target.value, "project": e.project,
            "domain": e.domain, "class_names": e.class_names, "input_size": e.input_size,
            "precision": e.precision.value, "aliases": sorted(e.aliases), "artifact_uri": e.artifact_uri,
            "artifact_sha256": e.artifact_sha256, "dataset_version": e.dataset_version,
            "parent": e.parent.model_dump() if e.parent else None,
            "metrics": e.metrics.model_dump() if e.metrics else None,
            "registered_at": e.registered_at.isoformat(),
        },
        empty="the library is empty: `visionloop library add MODEL.onnx --project P --alias production`",
    )
