"""`visionloop edge-agent`: run one device's agent, or print the active model's boxes on an image.

    visionloop edge-agent --fleet lab --device cam-1 --trust keys/packager-ed25519.pub --port 8090
    visionloop edge-agent --fleet lab --device cam-1 predict photo.jpg

Infrastructure comes from the platform settings (`VL_KAFKA_BOOTSTRAP`, `VL_STATE_DIR`, ...; a
running `visionloop up` is found through `<state_dir>/run.json`). Without `--trust` the agent
trusts the keys in `<state_dir>/keys/` (where the embedded stack's packager creates its key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

edge_app = typer.Typer(
    help="The edge agent: installs signed model packages released to its fleet and serves predictions.",
)


@dataclass
class _Options:
    fleet: str | None
    device: str | None
    home: Path | None
    trust: list[Path] = field(default_factory=list)
    max_input_size: int = 640
    target: str = "edge"


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def _settings():  # noqa: ANN202 - Settings, imported lazily (the CLI starts fast)
    from visionloop.libs.settings import Settings

    settings = Settings()
    if settings.kafka_bootstrap:
        return settings
    run = settings.state_dir / "run.json"
    if run.exists():
        found = json.loads(run.read_text())
        return settings.model_copy(
            update={"kafka_bootstrap": found["kafka_bootstrap"], "kafka_embedded": found.get("kafka_embedded", False)}
        )
    return settings


def _home(options: _Options, settings) -> Path:  # noqa: ANN001
    if options.home is not None:
        return options.home
    if not options.fleet or not options.device:
        raise _fail("give --home, or --fleet and --device (the home is <state_dir>/edge/<fleet>/<device>)")
    return settings.state_dir / "edge" / options.fleet / options.device


def _trust(options: _Options, settings):  # noqa: ANN001, ANN202
    from visionloop.libs.signing import SigningError, TrustStore

    sources = options.trust or [settings.state_dir / "keys"]
    try:
        store = TrustStore.load([p for p in sources if p.exists() or options.trust])
    except SigningError as exc:
        raise _fail(f"cannot load the trusted keys: {exc}") from None
    if not len(store):
        typer.echo(f"warning: no trusted keys (looked in {', '.join(map(str, sources))}); every package will be refused", err=True)
    return store


@edge_app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    fleet: Annotated[str | None, typer.Option("--fleet", help="The fleet this device belongs to.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="This device's id (unique in its fleet).")] = None,
    home: Annotated[Path | None, typer.Option("--home", help="Where the A/B model slots live; default <state_dir>/edge/<fleet>/<device>.")] = None,
    trust: Annotated[list[Path] | None, typer.Option("--trust", help="A trusted public key file or a folder of them (repeatable); default <state_dir>/keys.")] = None,
    port: Annotated[int, typer.Option("--port", help="HTTP port of /healthz, /v1/model, /v1/predict; 0: no HTTP.")] = 0,
    max_input_size: Annotated[int, typer.Option("--max-input-size", help="Largest model input side this device runs.")] = 640,
    target: Annotated[str, typer.Option("--target", help="The kind of models this device runs (edge or server).")] = "edge",
) -> None:
    """Run the agent until Ctrl-C / SIGTERM (with a subcommand: run that instead)."""
    options = _Options(fleet, device, home, list(trust or []), max_input_size, target)
    ctx.obj = options
    if ctx.invoked_subcommand is not None:
        return
    if not fleet or not device:
        raise _fail("give --fleet and --device (see --help)")
    settings = _settings()
    if not settings.kafka_bootstrap:
        raise _fail("no Kafka configured: set VL_KAFKA_BOOTSTRAP, or start `visionloop up` in this folder")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("aiokafka", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from visionloop.libs import logthrottle

    logthrottle.install()  # a broker down is said once per 10 s, not on every retry
    asyncio.run(_serve(settings, options, _home(options, settings), port))


async def _serve(settings, options: _Options, home: Path, port: int) -> None:  # noqa: ANN001
    import uvicorn

    from visionloop.services.edge_agent.agent import EdgeAgent
    from visionloop.services.edge_agent.http import TOKEN_FILE, create_app, local_token

    assert options.fleet and options.device
    agent = EdgeAgent(
        settings, options.fleet, options.device, home, _trust(options, settings),
        target=options.target, max_input_size=options.max_input_size,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    server = task = None
    try:
        where = ""
        if port > 0:
            app = create_app(agent, token=local_token(home))
            server = uvicorn.Server(uvicorn.Config(app, host=settings.http_host, port=port, log_level="warning", lifespan="off"))
            task = asyncio.create_task(server.serve())
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if task.done():
                task.result()
            where = f"; HTTP on http://{settings.http_host}:{port} (token in {home / TOKEN_FILE})"
        active = agent.active
        running = f"{active.model.model_id} v{active.model.version}" if active else "no model yet"
        typer.echo(f"edge agent {options.device} of fleet {options.fleet} running ({running}){where} — Ctrl-C to stop", err=True)
        await stop.wait()
    finally:
        if server is not None and task is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await task
        await agent.stop()


@edge_app.command()
def predict(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="An image file.", exists=True, dir_okay=False)],
    home: Annotated[Path | None, typer.Option("--home", help="The agent's home (default from --fleet and --device).")] = None,
) -> None:
    """Print the boxes of the device's active model on IMAGE as JSON."""
    from visionloop.libs.inference import InferenceError
    from visionloop.services.edge_agent.agent import EdgeAgent, EdgeError

    options: _Options = ctx.obj or _Options(None, None, None)
    if home is not None:
        options.home = home
    settings = _settings()
    agent = EdgeAgent(
        settings, options.fleet or "-", options.device or "-", _home(options, settings), _trust(options, settings),
        target=options.target, max_input_size=options.max_input_size,
    )
    if agent.load() is None:
        raise _fail(f"no_model: no verified model is installed under {agent.home}", 1)
    try:
        model, boxes = agent.predict_with_model(image.read_bytes())
    except (EdgeError, InferenceError) as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(json.dumps({"model": model.model_dump(), "boxes": [b.model_dump() for b in boxes]}, indent=1))
