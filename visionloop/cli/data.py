"""`visionloop import`: a labelled COCO or YOLO folder, as it sits on disk, into a project of the
running loop (visionloop/dataimport.py says what happens to it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from visionloop.cli.common import (
    ConfigOpt,
    _attach,
    _settings,
    app,
    console,
    out,
    unknown_name_hint,
)


@app.command("import")
def import_dataset(
    dataset: Annotated[Path, typer.Argument(help="A COCO .json file (or a folder with one) or a YOLO folder (data.yaml).", exists=True)],
    project: Annotated[str, typer.Option(help="The project (created with the dataset's classes when missing).")],
    test_fraction: Annotated[float | None, typer.Option(help="Share of the images that becomes the frozen test set (chosen by their bytes).")] = None,
    test_split: Annotated[str | None, typer.Option(help="The images under a folder of this name become the frozen test set (e.g. test).")] = None,
    classes: Annotated[str | None, typer.Option(help="The taxonomy, comma-separated, in order; boxes of other classes are left out.")] = None,
    train: Annotated[bool, typer.Option("--train/--no-train", help="One training run once the import's labels are verified.")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="A training argument for that run, NAME=VALUE (repeatable).")] = None,
    floor: Annotated[float | None, typer.Option(help="The project's gate floor (mAP50-95) from now on, e.g. 0.05 for a first model from scratch.")] = None,
    gateway_url: Annotated[str | None, typer.Option(help="The labelling gateway (default: from `visionloop up`'s run file).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Import a labelled dataset from disk: its test set, its classes, one training run after it."""
    from visionloop.cli.stack import _run_endpoint
    from visionloop.dataimport import FIRST_MODEL_GUIDANCE, pack
    from visionloop.demo.datasetfiles import DatasetError
    from visionloop.services.trainer.config import TUNABLE

    arguments = _training_arguments(set_ or [], TUNABLE) if train else []
    settings = _attach(_settings(config))
    url = gateway_url or _run_endpoint(settings, "labeling-gateway")
    if url is None:
        _refuse("no_gateway", "no labelling gateway: start `visionloop up`, or pass --gateway-url")
    try:
        packed = pack(dataset, classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                      test_split=test_split, test_fraction=test_fraction)
    except DatasetError as exc:
        _refuse(exc.reason, str(exc))
    except ValueError as exc:
        _refuse("invalid_option", str(exc))
    console.print(f"{dataset}: {packed.train} training and {packed.test} test images, {packed.boxes} boxes; "
                  f"test set: {packed.test_rule}", highlight=False, soft_wrap=True)
    if packed.left_out:
        console.print("left out, not in --classes: " + ", ".join(f"{n} {c}" for c, n in packed.left_out.most_common()), highlight=False)
    answer = asyncio.run(_upload(settings, url, project, packed, train=train, arguments=arguments))
    out.print(_summary(project, answer), highlight=False, soft_wrap=True, markup=False)
    say_or_set_floor(settings, project, floor)
    if train:
        console.print(FIRST_MODEL_GUIDANCE, highlight=False, soft_wrap=True)


def _refuse(reason: str, message: str) -> None:
    console.print(f"[red]refused ({reason})[/]: {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _training_arguments(pairs: list[str], allowed: frozenset[str]) -> list[str]:
    for pair in pairs:
        name = pair.partition("=")[0].strip()
        if "=" not in pair or name not in allowed:
            _refuse("unknown_hyperparameter", f"{pair!r} is not a training argument NAME=VALUE; {unknown_name_hint(name, list(allowed))}")
    return pairs


async def _upload(settings: Any, url: str, project: str, packed: Any, *, train: bool, arguments: list[str]) -> dict[str, Any]:
    """The project (created when missing), a short-lived admin token, the import; the gateway's answer."""
    import httpx

    from visionloop.services.labeling_gateway.admin import (
        create_project,
        create_token,
        revoke_token,
    )

    await create_project(settings, project, packed.classes, created_by="visionloop-import")
    token_id, token = await create_token(settings, project=project, role="admin", user_id="visionloop-import", created_by="cli")
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            response = await http.post(
                f"/v1/projects/{project}/import", content=packed.zip_bytes,
                params=[("format", "yolo"), ("train", str(train).lower()), *[("set", a) for a in arguments]],
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/zip"},
            )
    finally:
        await revoke_token(settings, token_id)
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code != 202:
        _refuse(body.get("reason", f"http_{response.status_code}"), body.get("message", response.text[:300]))
    return body


def _summary(project: str, answer: dict[str, Any]) -> str:
    added = f"; classes added: {', '.join(answer['classes_added'])}" if answer.get("classes_added") else ""
    again = f"; {answer['already_imported']} imported before (skipped)" if answer.get("already_imported") else ""
    return (f"imported into {project} as {answer['import_id']}: {answer['images']} images, {answer['boxes']} boxes, "
            f"{answer['test_set']} in the frozen test set{added}{again}\ntraining: {answer['training']}\n"
            f"follow it: visionloop trainer runs --project {project}")


def say_or_set_floor(settings: Any, project: str, floor: float | None) -> None:
    """Set the project's gate floor (`--floor`), or say which applies and how to change it."""
    from visionloop.cli.evaluator import _with_schema
    from visionloop.services.evaluator import decide, store
    from visionloop.services.evaluator.config import EvaluatorSettings

    base = EvaluatorSettings().policy(project)

    async def apply(pool: Any, schema: str) -> float:
        async with pool.acquire() as conn, conn.transaction():
            stored = await store.gate_overrides(conn, schema, project)
            if floor is not None:
                stored = decide.changed_overrides(base, stored, {"map50_95_floor": str(floor)})
                await store.set_gate_overrides(conn, schema, project, stored, "visionloop-import")
            return decide.with_overrides(base, stored).map50_95_floor

    try:
        in_force = asyncio.run(_with_schema(settings, apply))
    except decide.SettingRefused as exc:
        _refuse(exc.reason, str(exc))
    how = "set now (--floor)" if floor is not None else "configured; change it with --floor or `visionloop evaluator set`"
    console.print(f"gate: a model of {project} needs mAP50-95 >= {in_force:.3f} on the test set to be released ({how})",
                  highlight=False, soft_wrap=True)
