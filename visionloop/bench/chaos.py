"""The chaos benchmark (`visionloop bench chaos`): the quick-demo scenario while the platform is shot at.

Every service runs as its own OS process under the `Supervisor` (as `visionloop up --processes`
runs them) on the embedded stack. The scenario is the demo's (`visionloop/demo/scenario.py`): an
upstream publisher streams synthetic scenes with duplicates, low-resolution and corrupt images in
waves; simulated people label and review over the gateway's HTTP API; each round asks for
training; passing models are converted, packaged, registered and rolled out to simulated edge
agents; a later round adds a class. Sizes are the quick demo's scenes and training, with at least
1,000 submitted images.

Meanwhile the monkey (`Monkey`, seeded):

- SIGKILLs every service `kills_per_service` times at random moments (a shuffled plan, spread over
  the rounds by their size, random gaps between kills), only ever a process that is serving;
- SIGKILLs the trainer while a training run is in progress (its `runs` row is `running` and past
  its first epoch), and the converter, packager or distributor while a release is in progress
  (between a passing `model evaluated` and the last edge agent running the model);
- restarts the embedded broker once, mid-stream (right after a wave's originals went out): every
  topic, record and committed offset is gone, and the stack must re-derive what was in flight from
  PostgreSQL (the outboxes' replay).

The bench's own side lives in this process and survives all of it, as outsiders would: the
upstream publisher resends what got no answer (same submission id and bytes: ingest answers a
replay once), the people retry the gateway while it is down, the edge agents reconnect, and the
event reader reconnects after the broker restart and keeps every event once by its event id (the
replay re-publishes events already read).

At the end it reconciles PostgreSQL (ingest's submissions, dedup's decisions, the recognizer's
recognitions, the gateway's tasks and labels, the trainer's samples, runs and models, the model
library, the distributor's releases) with the event log (`reconcile`):

- every submitted image has exactly one terminal decision: rejected with a reason (by ingest or
  dedup/quality), labelled (a verified label the gateway keeps and the trainer holds), or pending
  a person (a task in the queue). Anything else is `lost`, with where it stopped;
- nothing happened twice (`duplicated`): one ingest answer and one decision per submission, one
  recognition per accepted image, one verdict per label submission, one verified label set per
  image, one trained model per run and per version, one evaluation, conversion and package per
  model, one library registration per model version and target, one event per release step;
- every release ends in a known state (completed, superseded or rolled back: none left rolling or
  paused) and every edge agent runs the model of the fleet's last completed release.

It prints the counts and exits non-zero on any discrepancy; `--json` ends with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import random
import signal
import statistics
import time
import uuid
import zipfile
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from visionloop.bench import machine
from visionloop.demo.wait import wait_until
from visionloop.libs.lag import Progress as LagProgress
from visionloop.libs.lag import progress, read_partitions

log = logging.getLogger(__name__)

STATE = Path(".visionloop") / "bench" / "chaos"
PLOT = Path("docs") / "benchmarks" / "chaos.png"
PROJECT = "shapes"
CLASSES = ("circle", "square", "triangle")
NEW_CLASS = "diamond"
FLEET = "chaos-edge"
SOURCE = "chaos-upstream"
"""The upstream system's name: submission ids are `chaos-upstream-<item name>`."""
RELEASE_SERVICES = ("converter", "packager", "distributor")
"""In the order they work on a release."""
RELEASE_KILL_ORDER = ("distributor", "converter", "packager")
"""Which of them the mid-release kills aim at, release after release (the rollout's window is the longest)."""
KNOWN_RELEASE_STATES = ("completed", "superseded", "rolled_back")
PENDING_PERSON = ("queued",)
"""Task states that wait for a person (the gateway's queue)."""


HEARTBEAT_TOPICS = ("vl.pipeline.status.v1", "vl.device.status.v1")
"""Topics fed for as long as anything runs (heartbeats): their groups are never quite caught up."""


class ChaosStalled(Exception):
    """The scenario did not get somewhere in time: reported as a discrepancy, then reconciled anyway."""


@dataclass(frozen=True)
class ChaosConfig:
    """The scenario's size and the monkey's plan; `ci()` is the reduced run of the test suite."""

    seed: int = 11
    rounds: tuple[int, ...] = (420, 300, 300)
    """Images submitted per round (the third, if any, adds a class)."""
    waves: int = 3
    test_images: int = 20
    new_class_test_images: int = 8
    width: int = 160
    height: int = 120
    objects: tuple[int, int] = (1, 3)
    size: tuple[float, float] = (0.22, 0.45)
    imgsz: int = 128
    epochs: int = 8
    finetune_epochs: int = 3
    batch: int = 8
    agents: int = 3
    exact_dup_rate: float = 0.05
    near_dup_rate: float = 0.05
    low_res_rate: float = 0.03
    corrupt_rate: float = 0.03
    noise_px: float = 2.0
    run_services: tuple[str, ...] | None = None
    """Services started (None: all ten)."""
    services: tuple[str, ...] | None = None
    """Services the monkey kills at random (None: every service started)."""
    train: bool = True
    """Ask for training after each round (and release what passes the gate)."""
    kills_per_service: int = 2
    training_kills: int = 1
    """Trainer kills while a run is in progress (each in another run)."""
    release_kills: int = 2
    """Converter, packager or distributor kills while a release is in progress (each in another release)."""
    broker_restarts: int = 1
    """0 or 1."""
    broker_restart_at: tuple[int, int] = (1, 0)
    """(round, wave), from 0: the broker restarts right after that wave's originals are published."""
    kill_gap_s: tuple[float, float] = (4.0, 12.0)
    """Random pause between two random kills."""
    resend_after_s: float = 20.0
    """Upstream resends its unanswered submissions after this long without any answer."""
    stall_s: float = 120.0
    """People stop waiting for a wave's labels after this long without a new one (the rest stay pending)."""
    timeout_s: float = 600.0
    """Longest wait for one step (a wave decided, a model evaluated, a release on every agent)."""
    relay_interval_s: float = 1.0
    """The services' outbox relay tick (`VL_OUTBOX_RELAY_INTERVAL_S`): they check the broker's epoch every 30 ticks."""
    trainer_lease_s: float = 12.0
    """The trainer's run lease: how soon a killed trainer's run is queued again."""
    replicas: tuple[tuple[str, int], ...] = ()
    """Processes per service where more than one (`up --processes --replicas`); the monkey kills each
    replica `kills_per_service` times."""

    def processes(self, services: Iterable[str]) -> list[str]:
        """The supervisor's process names of `services` (replicas after their first)."""
        from visionloop.supervisor import replica_names

        counts = dict(self.replicas)
        return [n for s in services for n in replica_names(s, counts.get(s, 1))]

    @classmethod
    def ci(cls) -> ChaosConfig:
        """The test suite's run: 150 images in one round through intake and labelling (ingest, dedup,
        recognizer, gateway, verifier and the trainer's dataset; no training, no release), each of the
        first five SIGKILLed once, and the broker restart."""
        return cls(rounds=(150,), waves=3, test_images=0, agents=0, train=False,
                   run_services=("ingest", "dedup", "recognizer", "labeling-gateway", "verifier", "trainer"),
                   services=("ingest", "dedup", "recognizer", "labeling-gateway", "verifier"), kills_per_service=1,
                   training_kills=0, release_kills=0, broker_restart_at=(0, 1), kill_gap_s=(2.0, 6.0),
                   resend_after_s=12.0, stall_s=60.0, timeout_s=120.0, relay_interval_s=0.5)

    @property
    def submitted(self) -> int:
        """Images the upstream publisher submits."""
        return sum(self.rounds)


def sid(item: Any) -> str:
    """The submission id the upstream publisher gives an item."""
    return f"{SOURCE}-{item.name}"


# -- the event log ------------------------------------------------------------------------------------


class EventLog:
    """Every event on the loop's topics, once per event id, across broker restarts.

    After a broker restart `reconnect()` makes the reader start over on the fresh broker (its
    positions mean nothing there); events the stack re-publishes are recognised by their id.
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.events: dict[str, dict[str, Any]] = {}
        self.by_type: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.copies = 0
        """Records of events already read (the relay's and the replay's re-publications)."""
        self.reconnects = 0
        self.decided: dict[str, str] = {}
        """Submission id -> `accepted` or the reject reason (from the first decision read)."""
        self.accepted: dict[str, str] = {}
        """Submission id -> image id."""
        self.verified: set[str] = set()
        """Image ids with a verified label (not the test set's)."""
        self.test_verified = 0
        self.last_change = time.monotonic()
        self._reconnect = asyncio.Event()

    def reconnect(self) -> None:
        """Start over on the (fresh) broker."""
        self._reconnect.set()

    def of(self, event_type: str) -> list[dict[str, Any]]:
        """Events of one type read so far."""
        return self.by_type.get(event_type, [])

    def add(self, raw: bytes | None) -> None:
        """One record: kept when its event id is new."""
        try:
            event = json.loads(raw or b"")
            event_id = str(event["event_id"])
        except (ValueError, KeyError, TypeError):
            return
        if event_id in self.events:
            self.copies += 1
            return
        self.events[event_id] = event
        kind = str(event.get("event_type"))
        self.by_type[kind].append(event)
        if kind not in ("pipeline.status", "device.status"):
            self.last_change = time.monotonic()
        with contextlib.suppress(KeyError, TypeError, AttributeError):
            payload = event["payload"]
            if kind in ("image.accepted", "image.rejected") and event.get("project") == PROJECT:
                self.decided.setdefault(payload["submission_id"], "accepted" if kind == "image.accepted" else payload["reason"])
                if kind == "image.accepted":
                    self.accepted.setdefault(payload["submission_id"], payload["image"]["image_id"])
            elif kind == "label.verified" and event.get("project") == PROJECT:
                if payload.get("for_test_set"):
                    self.test_verified += 1
                else:
                    self.verified.add(payload["image"]["image_id"])

    async def run(self) -> None:
        """Read every registry topic from the beginning until cancelled, reconnecting when asked or broken."""
        from aiokafka import AIOKafkaConsumer

        from visionloop.contracts import TOPICS
        from visionloop.libs.kafka import consumer_kwargs, ensure_topics

        topics = [self.settings.topic(spec.name) for spec in TOPICS.values()]
        while True:
            self._reconnect.clear()
            with contextlib.suppress(Exception):  # a broker still restarting: the reader's start retries
                await ensure_topics(self.settings, TOPICS.values())
            reader = AIOKafkaConsumer(*topics, **(consumer_kwargs(self.settings) | {"fetch_max_wait_ms": 20}),
                                      auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
            try:
                await reader.start()
                while not self._reconnect.is_set():
                    batch = await reader.getmany(timeout_ms=200)
                    for records in batch.values():
                        for record in records:
                            self.add(record.value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away under the reader: start over
                log.warning("chaos: event reader: %s; reconnecting", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await reader.stop()
            self.reconnects += 1


# -- the monkey -------------------------------------------------------------------------------------


@dataclass
class Kill:
    """One SIGKILL the monkey sent."""

    service: str
    pid: int
    at_s: float
    why: str
    """`random`, `mid-training` or `mid-release`."""
    round: int
    recovered_s: float | None = None
    """Seconds until the successor process served again (None: it never did)."""


class Monkey:
    """Kills services and restarts the broker as `ChaosConfig` plans (see the module docstring)."""

    def __init__(self, run: ChaosRun) -> None:
        self.run = run
        cfg = run.cfg
        self.rng = random.Random(cfg.seed)
        names = cfg.processes(cfg.services or run.services)
        plan = names * cfg.kills_per_service
        self.rng.shuffle(plan)
        # Each round takes its share of the plan, by its number of images; leftovers carry over.
        self.slices: list[list[str]] = []
        start = 0
        for n, size in enumerate(cfg.rounds):
            end = len(plan) if n == len(cfg.rounds) - 1 else start + round(len(plan) * size / cfg.submitted)
            self.slices.append(plan[start:end])
            start = end
        self.planned = len(plan) + cfg.training_kills + cfg.release_kills
        self.queue: deque[str] = deque()
        self.kills: list[Kill] = []
        self.broker_restarts: list[float] = []
        self.training_kills_left = cfg.training_kills
        self.release_kills_left = cfg.release_kills
        self.killed_runs: set[str] = set()
        self.releasing: int | None = None
        """The model version being released (set by the scenario), None between releases."""
        self.killed_releases: set[int] = set()
        self.round = -1
        self.failures: list[str] = []
        self._restart_broker = asyncio.Event()
        self._next_at = 0.0
        self._recoveries: set[asyncio.Task[None]] = set()

    def enter_round(self, n: int) -> None:
        """The scenario starts round `n`: its share of the random kills joins the queue."""
        self.round = n
        self.queue.extend(self.slices[n])
        self._next_at = time.monotonic() + self.rng.uniform(*self.run.cfg.kill_gap_s)

    def restart_broker_soon(self) -> None:
        """Ask for the broker restart (done by the monkey's loop at once)."""
        if len(self.broker_restarts) < self.run.cfg.broker_restarts:
            self._restart_broker.set()

    @property
    def done(self) -> int:
        """Kills sent so far."""
        return len(self.kills)

    def serving(self, name: str) -> int | None:
        """The pid of `name` when it is up and has said it serves, else None."""
        child = self.run.sup.children[name]
        pid = child.pid
        return pid if pid is not None and child.ready is not None and child.ready.get("pid") == pid else None

    async def loop(self) -> None:
        """Until cancelled: restart the broker when asked, kill mid-training and mid-release, kill at random."""
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the monkey must not die of a bad moment (a database restart, say)
                log.warning("chaos: monkey: %s", exc)
            await asyncio.sleep(0.25)

    async def _tick(self) -> None:
        if self._restart_broker.is_set():
            self._restart_broker.clear()
            await self._broker()
        if self.training_kills_left > 0:
            run_id = await self.run.training_in_progress()
            if run_id is not None and run_id not in self.killed_runs and self.serving("trainer"):
                self.killed_runs.add(run_id)
                self.training_kills_left -= 1
                self.kill("trainer", "mid-training")
        if self.release_kills_left > 0 and self.releasing is not None and self.releasing not in self.killed_releases:
            phase = self.run.release_phase(self.releasing)
            aim = RELEASE_KILL_ORDER[len(self.killed_releases) % len(RELEASE_KILL_ORDER)]
            # Wait for the service aimed at; one already past is not waited for (its window was missed).
            if phase is not None and RELEASE_SERVICES.index(phase) >= RELEASE_SERVICES.index(aim) and self.serving(phase):
                self.killed_releases.add(self.releasing)
                self.release_kills_left -= 1
                self.kill(phase, "mid-release")
        if self.queue and time.monotonic() >= self._next_at:
            for _ in range(len(self.queue)):
                name = self.queue[0]
                if self.serving(name):
                    self.queue.popleft()
                    self.kill(name, "random")
                    break
                self.queue.rotate(-1)  # still coming back from its last kill: another first
            self._next_at = time.monotonic() + self.rng.uniform(*self.run.cfg.kill_gap_s)

    def kill(self, name: str, why: str) -> None:
        """SIGKILL the serving process of `name`; note when its successor serves."""
        pid = self.serving(name)
        if pid is None:
            return
        self.run.sup.kill(name, signal.SIGKILL)
        kill = Kill(service=name, pid=pid, at_s=round(self.run.elapsed(), 1), why=why, round=self.round + 1)
        self.kills.append(kill)
        self.run.say(f"[red]SIGKILL[/] {name} (pid {pid}, {why})")
        task = asyncio.create_task(self._recovery(kill), name=f"chaos-recover-{name}")
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    async def _recovery(self, kill: Kill) -> None:
        started = time.monotonic()
        try:
            await self.run.sup.wait_ready(kill.service, after_pid=kill.pid, timeout_s=240)
        except TimeoutError:
            self.failures.append(f"{kill.service} did not serve again within 240 s of its SIGKILL at {kill.at_s} s")
            return
        kill.recovered_s = round(time.monotonic() - started, 1)

    async def _broker(self) -> None:
        self.run.say("[red]broker restart[/]: every topic, record and committed offset is lost")
        stack = self.run.stack
        await asyncio.to_thread(stack.restart_broker)
        self.broker_restarts.append(round(self.run.elapsed(), 1))
        self.run.events.reconnect()

    async def settle(self, timeout_s: float = 240.0) -> None:
        """Wait until every killed service serves again."""
        if self._recoveries:
            await asyncio.wait(set(self._recoveries), timeout=timeout_s)


# -- the run ------------------------------------------------------------------------------------------


def _config_file(folder: Path, cfg: ChaosConfig) -> Path:
    """The services' settings (the quick demo's, plus a short trainer lease and more attempts per run)."""
    doc = {
        "ingest": {"port": 0},
        "labeling_gateway": {"port": 0},
        "distributor": {"port": 0, "edge_fleets": [FLEET], "stages": [34.0, 100.0], "min_activated_fraction": 1.0},
        "trainer": {
            "trigger": "both", "test_fraction": 0.0, "min_train_images": 8, "imgsz": cfg.imgsz, "epochs": cfg.epochs,
            "finetune_epochs": cfg.finetune_epochs, "batch": cfg.batch, "patience": 100, "device": "auto", "poll_interval_s": 0.5,
            "min_new_images": 100_000, "lease_s": cfg.trainer_lease_s, "max_attempts": 10,
            "train_args": {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0},
        },
        "evaluator": {"map50_95_floor": 0.0, "agreement_floor": 0.0, "champion_tolerance": 0.05, "class_tolerance": 0.15},
        "verifier": {"min_samples": 20, "min_support": 8, "target_precision": 0.9, "spot_check_rate": 0.1},
    }
    path = folder / "chaos-config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class ChaosRun:
    """One chaos run (see the module docstring)."""

    def __init__(self, cfg: ChaosConfig, folder: Path, say: Callable[[str], None] | None = None) -> None:
        from visionloop import services
        from visionloop.demo.world import World

        self.cfg = cfg
        self.folder = folder
        self.say = say or (lambda message: log.info(message))
        self.services = list(cfg.run_services or services.available())
        self.world = World(cfg.seed, CLASSES, width=cfg.width, height=cfg.height, objects=cfg.objects, size=cfg.size)
        self.items: dict[str, Any] = {}
        """Submission id -> the item submitted."""
        self.resent = 0
        self.publish_retries = 0
        self.gateway_errors = 0
        self.stalls: list[str] = []
        self.models: list[dict[str, Any]] = []
        self.timeline: list[tuple[float, int, int]] = []
        """(seconds, submissions decided, accepted images labelled), once a second, for the plot."""
        self.phases: list[tuple[str, float, float | None]] = []
        """(what, from, to) in seconds: each round's training and release."""
        self.started = time.monotonic()
        self.sup: Any = None
        self.stack: Any = None
        self.events: EventLog = None  # type: ignore[assignment]
        self.monkey: Monkey = None  # type: ignore[assignment]
        self.agents: list[Any] = []
        self.pool: Any = None
        self.settings: Any = None
        self.epochs: tuple[int, int] = (0, 0)
        """(epoch, epochs) of the run in training, for the progress bar."""
        self.lag: LagProgress | None = None
        """Consumer groups with lag at the end, stuck or slow (`settle_lag`)."""
        self.partitions: dict[str, Any] | None = None
        """Per topic and consumer group, the end and the committed offset of every partition."""

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    # -- what the monkey watches ------------------------------------------------------------------
    async def training_in_progress(self) -> str | None:
        """The run the trainer is training now (past its first epoch), from its `runs` table."""
        schema = self.settings.schema_for("trainer")
        with contextlib.suppress(Exception):
            row = await self.pool.fetchrow(
                f"""SELECT run_id, epoch, EXISTS (SELECT 1 FROM "{schema}".models) AS fine_tuning FROM "{schema}".runs
                    WHERE status = 'running' AND epoch >= 1 ORDER BY started_at DESC LIMIT 1"""
            )
            if row is not None:
                self.epochs = (int(row["epoch"]), self.cfg.finetune_epochs if row["fine_tuning"] else self.cfg.epochs)
                return str(row["run_id"])
        return None

    def release_phase(self, version: int) -> str | None:
        """The service working on the release of `version` now (None when it is done)."""
        def mine(event: dict[str, Any]) -> bool:
            return int(event["payload"]["lineage"]["model"]["version"]) == version and event.get("project") == PROJECT

        if not any(mine(e) for e in self.events.of("model.converted")):
            return "converter"
        if not any(mine(e) for e in self.events.of("model.packaged")):
            return "packager"
        if not all(a.active is not None and a.active.model.version == version for a in self.agents):
            return "distributor"
        return None

    # -- plumbing ---------------------------------------------------------------------------------------
    async def until(self, what: str, predicate: Callable[[], Any], timeout_s: float | None = None) -> Any:
        """Poll `predicate` until it is truthy; `ChaosStalled` after the timeout."""
        limit = timeout_s or self.cfg.timeout_s
        return await wait_until(predicate, limit, 0.3, lambda: ChaosStalled(f"{what} did not happen within {limit:.0f} s"))

    async def publish(self, items: list[Any]) -> None:
        """Send items on the submit topic as the upstream system does; retry while the broker is down."""
        from visionloop.demo.world import publish

        for item in items:
            self.items[sid(item)] = item
        for attempt in range(60):
            try:
                await publish(self.settings, items, PROJECT, source=SOURCE)
                return
            except Exception as exc:  # the broker is restarting: an upstream system tries again
                self.publish_retries += 1
                log.warning("chaos: publishing %d items failed (%s); retrying", len(items), exc)
                await asyncio.sleep(min(5.0, 0.5 * (attempt + 1)))
        raise ChaosStalled(f"could not publish {len(items)} items for a minute")

    async def submit(self, items: list[Any], what: str) -> None:
        """Publish `items` and wait until each has its decision; resend what goes unanswered."""
        if not items:
            return
        await self.publish(items)
        ids = {sid(i) for i in items}
        started = last_progress = time.monotonic()
        answered = 0
        while True:
            now_answered = len(ids & self.events.decided.keys())
            if now_answered == len(ids):
                return
            now = time.monotonic()
            if now_answered > answered:
                answered, last_progress = now_answered, now
            elif now - last_progress > self.cfg.resend_after_s:
                missing = [i for i in items if sid(i) not in self.events.decided]
                self.resent += len(missing)
                self.say(f"upstream: {len(missing)} submissions unanswered for {self.cfg.resend_after_s:.0f} s; resending them")
                await self.publish(missing)
                last_progress = time.monotonic()
            if now - started > self.cfg.timeout_s:
                raise ChaosStalled(f"{what}: {len(ids) - now_answered} of {len(ids)} submissions never decided")
            await asyncio.sleep(0.3)

    async def work(self, people: list[Any], images: set[str], what: str) -> None:
        """People work the queue until every image has a verified label, or nothing moves for `stall_s`."""
        import httpx

        from visionloop.demo.annotator import GatewayError

        last = len(images & self.events.verified)
        last_progress = time.monotonic()
        while not images <= self.events.verified:
            worked = 0
            for person in people:
                try:
                    worked += len(await person.drain(idle_s=0.5))
                except (httpx.HTTPError, GatewayError) as exc:  # the gateway is down or restarting: try again
                    self.gateway_errors += 1
                    log.info("chaos: %s at the gateway: %s", person.user_id, exc)
                    await asyncio.sleep(1.0)
            done = len(images & self.events.verified)
            if done > last:
                last, last_progress = done, time.monotonic()
            elif time.monotonic() - last_progress > self.cfg.stall_s:
                self.stalls.append(f"{what}: {len(images) - done} accepted images without a verified label after "
                                   f"{self.cfg.stall_s:.0f} s without progress")
                self.say(f"[yellow]{self.stalls[-1]}[/]")
                return
            if not worked:
                await asyncio.sleep(0.3)

    async def import_test_set(self, http: Any, token: str, classes: tuple[str, ...], n: int, *, offset: int) -> None:
        """The frozen test set, imported by an admin as a COCO zip (retried while the gateway is down)."""
        import httpx

        from visionloop.demo.world import ItemKind, World
        from visionloop.libs.formats import LabelledImage, coco_document

        world = World(self.cfg.seed + 1000 + offset, classes, width=self.cfg.width, height=self.cfg.height,
                      objects=self.cfg.objects, size=self.cfg.size)
        items = [i for i in world.stream(n) if i.kind is ItemKind.FRESH]
        images = [LabelledImage(file_name=f"{i.image_id}.jpg", width=i.width, height=i.height, boxes=tuple(i.truth or ()),
                                split="test", image_id=i.image_id) for i in items]
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("annotations/test.json", json.dumps(coco_document(images, list(classes))))
            for item in items:
                z.writestr(f"images/{item.image_id}.jpg", item.data)
        schema = self.settings.schema_for("labeling-gateway")
        before = await self.pool.fetchval(f'SELECT count(*) FROM "{schema}".imports WHERE project = $1', PROJECT)
        for _ in range(60):
            try:
                response = await http.post(f"/v1/projects/{PROJECT}/import", params={"format": "coco", "test_set": "true"},
                                           content=archive.getvalue(),
                                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/zip"})
                if response.status_code < 500:
                    response.raise_for_status()
                    break
            except httpx.TransportError:
                pass
            self.gateway_errors += 1
            await asyncio.sleep(1.0)
            # The import may have been stored before the gateway died: never import it twice.
            if await self.pool.fetchval(f'SELECT count(*) FROM "{schema}".imports WHERE project = $1', PROJECT) > before:
                break
        else:
            raise ChaosStalled("the test set could not be imported for a minute")
        expected = self.events.test_verified + len(items)
        await self.until("the test set verified", lambda: self.events.test_verified >= expected)
        self.say(f"imported {len(items)} test images ({', '.join(classes)})")

    async def request_training(self, version: int) -> None:
        """Ask for the round's training run, again if the request was lost (no new run row)."""
        from visionloop.contracts import TrainingRequested
        from visionloop.libs.kafka import publish_once

        schema = self.settings.schema_for("trainer")
        count = f'SELECT count(*) FROM "{schema}".runs WHERE project = $1'
        before = await self.pool.fetchval(count, PROJECT)
        for _ in range(20):
            try:
                await publish_once(self.settings, TrainingRequested(requested_by="chaos"), project=PROJECT, producer="chaos", key=PROJECT)
            except Exception as exc:
                log.warning("chaos: training request not sent (%s); retrying", exc)
                await asyncio.sleep(2.0)
                continue
            with contextlib.suppress(ChaosStalled):
                await self.until(f"a run for model v{version}", lambda: self._more_runs(count, before), timeout_s=45)
                return
            self.say(f"no training run for model v{version} yet; asking again")
        raise ChaosStalled(f"no training run started for model v{version}")

    async def _more_runs(self, query: str, before: int) -> bool:
        with contextlib.suppress(Exception):
            return int(await self.pool.fetchval(query, PROJECT)) > before
        return False

    # -- the scenario --------------------------------------------------------------------------------------
    async def run(self, stack: Any, settings: Any) -> dict[str, Any]:
        """Start every service as a process, run the rounds under fire, settle, reconcile."""
        import httpx

        from visionloop.demo.annotator import Annotator
        from visionloop.libs.db import create_pool
        from visionloop.libs.signing import TrustStore, ensure_key_pair
        from visionloop.services.edge_agent.agent import EdgeAgent
        from visionloop.services.labeling_gateway.admin import create_project, create_token
        from visionloop.supervisor import Supervisor

        self.stack, self.settings = stack, settings
        config = _config_file(self.folder, self.cfg)
        self.sup = Supervisor(settings, self.services, extra_env={"VL_CONFIG": str(config)}, backoff_s=(0.5, 5.0),
                              replicas=dict(self.cfg.replicas))
        self.events = EventLog(settings)
        self.monkey = Monkey(self)
        self.pool = await create_pool(settings, min_size=1, max_size=4)
        reader = asyncio.create_task(self.events.run(), name="chaos-events")
        sampler = asyncio.create_task(self.sample(), name="chaos-sampler")
        monkey: asyncio.Task[None] | None = None
        problems: list[str] = []
        try:
            self.say(f"starting {len(self.services)} services, each its own process"
                     + (f" (replicas: {', '.join(f'{s}={n}' for s, n in self.cfg.replicas)})" if self.cfg.replicas else ""))
            await self.sup.start(timeout_s=300)
            await create_project(settings, PROJECT, list(CLASSES), created_by="chaos")
            _, alice_token = await create_token(settings, project=PROJECT, role="annotator", user_id="alice", created_by="chaos")
            _, bob_token = await create_token(settings, project=PROJECT, role="reviewer", user_id="bob", created_by="chaos")
            _, admin_token = await create_token(settings, project=PROJECT, role="admin", user_id="carol", created_by="chaos")
            ensure_key_pair(settings.state_dir / "keys")
            trust = TrustStore.load([settings.state_dir / "keys"])
            for n in range(self.cfg.agents):
                device = f"edge-{n:02d}"
                agent = EdgeAgent(settings, FLEET, device, settings.state_dir / "edge" / device, trust, heartbeat_s=2.0)
                await agent.start()
                self.agents.append(agent)
            base = self.sup.endpoints()["labeling-gateway"]
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                alice = Annotator(base, alice_token, PROJECT, self.world, user_id="alice", noise_px=self.cfg.noise_px, rng_seed=1)
                bob = Annotator(base, bob_token, PROJECT, self.world, user_id="bob", noise_px=self.cfg.noise_px, rng_seed=2)
                async with alice, bob:
                    try:
                        if self.cfg.test_images:
                            await self.import_test_set(http, admin_token, CLASSES, self.cfg.test_images, offset=0)
                        monkey = asyncio.create_task(self.monkey.loop(), name="chaos-monkey")
                        for n, size in enumerate(self.cfg.rounds):
                            classes = CLASSES
                            if n == 2:
                                await self._new_class(http, admin_token)
                                classes = (*CLASSES, NEW_CLASS)
                            await self.round(n, size, classes, [alice, bob])
                    except ChaosStalled as exc:
                        problems.append(f"scenario stalled: {exc}")
                        self.say(f"[red]scenario stalled[/]: {exc}")
            self.say("settling: every killed service back, the pipeline quiet")
            await self.monkey.settle()
            if monkey is not None:
                monkey.cancel()
            await self.quiet()
            self.lag = await self.settle_lag()
            with contextlib.suppress(Exception):
                self.partitions = (await read_partitions(settings, self.groups())).as_dict()
            truth = await load_truth(self.pool, settings)
            devices = {a.device_id: (a.active.model.version if a.active else None) for a in self.agents}
            outcome = reconcile(self.items, self.events.events.values(), truth, devices)
        finally:
            if monkey is not None:
                monkey.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await monkey
            for agent in self.agents:
                with contextlib.suppress(Exception):
                    await agent.stop()
            with contextlib.suppress(Exception):
                await self.sup.stop()
            for task in (reader, sampler):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await self.pool.close()
        return self.result(outcome, problems)

    async def _new_class(self, http: Any, token: str) -> None:
        import httpx

        for _ in range(60):
            with contextlib.suppress(httpx.TransportError):
                response = await http.post(f"/v1/projects/{PROJECT}/classes", json={"classes": [NEW_CLASS]},
                                           headers={"Authorization": f"Bearer {token}"})
                if response.status_code < 500:
                    response.raise_for_status()
                    break
            self.gateway_errors += 1
            await asyncio.sleep(1.0)
        if self.cfg.new_class_test_images:
            await self.import_test_set(http, token, (*CLASSES, NEW_CLASS), self.cfg.new_class_test_images, offset=1)

    async def round(self, n: int, size: int, classes: tuple[str, ...], people: list[Any]) -> None:
        """One round: stream in waves (people label each), train, gate, release."""
        from visionloop.demo.world import ItemKind

        version = n + 1
        self.monkey.enter_round(n)
        self.say(f"[bold]round {version}[/]: {size} images" + (f", new class {NEW_CLASS}" if NEW_CLASS in classes else ""))
        items = self.world.stream(size, exact_dup_rate=self.cfg.exact_dup_rate, near_dup_rate=self.cfg.near_dup_rate,
                                  low_res_rate=self.cfg.low_res_rate, corrupt_rate=self.cfg.corrupt_rate, classes=classes)
        waves = max(1, self.cfg.waves)
        duplicates = (ItemKind.EXACT_DUPLICATE, ItemKind.NEAR_DUPLICATE)
        for w in range(waves):
            wave = items[w * len(items) // waves:(w + 1) * len(items) // waves]
            # Originals first: a duplicate must not overtake the image it duplicates.
            first = [i for i in wave if i.kind not in duplicates]
            later = [i for i in wave if i.kind in duplicates]
            if (n, w) == tuple(self.cfg.broker_restart_at):
                await self.publish(first)
                self.monkey.restart_broker_soon()
                first_what = f"round {version} wave {w + 1} originals (broker restarted under them)"
            else:
                first_what = f"round {version} wave {w + 1} originals"
            await self.submit(first, first_what)
            await self.submit(later, f"round {version} wave {w + 1} duplicates")
            accepted = {self.events.accepted[sid(i)] for i in wave if sid(i) in self.events.accepted}
            await self.work(people, accepted, f"round {version} wave {w + 1}")
        accepted = {self.events.accepted[sid(i)] for i in items if sid(i) in self.events.accepted}
        self.say(f"round {version}: {len(accepted & self.events.verified)} of {len(accepted)} accepted images labelled")
        if not self.cfg.train:
            return
        self.say(f"round {version}: training v{version}")
        training = self._phase(f"training v{version}")
        await self.request_training(version)
        evaluated = await self.until(f"model v{version} evaluated", lambda: next(
            (e for e in self.events.of("model.evaluated")
             if e.get("project") == PROJECT and e["payload"]["lineage"]["model"]["version"] == version), None))
        self._phase_done(training)
        payload = evaluated["payload"]
        model = {"version": version, "passed": payload["passed"], "map50_95": round(payload["candidate"]["map50_95"], 4),
                 "failures": [f["reason"] for f in payload["failures"]]}
        self.models.append(model)
        if not payload["passed"]:
            self.say(f"round {version}: v{version} failed the gate ({', '.join(model['failures'])})")
            return
        self.say(f"round {version}: v{version} passed the gate (mAP50-95 {model['map50_95']:.3f}); releasing")
        self.monkey.releasing = version
        release = self._phase(f"release v{version}")
        try:
            await self.until(f"v{version} on every edge agent", lambda: all(
                a.active is not None and a.active.model.version == version for a in self.agents))
            await self.until(f"v{version} released to the server fleet", lambda: any(
                e["payload"]["model"]["version"] == version and e.get("project") == PROJECT for e in self.events.of("release.server")))
        finally:
            self.monkey.releasing = None
        self._phase_done(release)
        self.say(f"round {version}: v{version} runs on every edge agent")

    def _phase(self, what: str) -> int:
        self.phases.append((what, round(self.elapsed(), 1), None))
        return len(self.phases) - 1

    def _phase_done(self, index: int) -> None:
        what, start, _ = self.phases[index]
        self.phases[index] = (what, start, round(self.elapsed(), 1))

    async def sample(self) -> None:
        """Note progress once a second (the plot's lines)."""
        while True:
            if self.events is not None:
                accepted = set(self.events.accepted.values())
                self.timeline.append((round(self.elapsed(), 1), len(self.items.keys() & self.events.decided.keys()),
                                      len(accepted & self.events.verified)))
            await asyncio.sleep(1.0)

    async def quiet(self, timeout_s: float = 90.0) -> None:
        """Wait until no event but heartbeats has come for a few seconds and nothing is with the verifier."""
        schema = self.settings.schema_for("labeling-gateway")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            busy = 1
            with contextlib.suppress(Exception):
                busy = int(await self.pool.fetchval(
                    f"""SELECT count(*) FROM "{schema}".tasks WHERE project = $1 AND state IN ('verifying', 'submitted')""", PROJECT))
            if busy == 0 and time.monotonic() - self.events.last_change > 5.0:
                return
            await asyncio.sleep(0.5)

    def groups(self) -> list[tuple[str, str]]:
        """(topic, consumer group) of every handler of the services this run started."""
        from visionloop.app import consumer_groups

        return consumer_groups(self.settings, list(self.services))

    async def settle_lag(self, patience_s: float = 300.0) -> LagProgress | None:
        """Read every consumer group's lag until no committed offset moves any more: groups that
        still have lag then are stuck (a consumer not reading some partitions), not slow."""
        deadline = time.monotonic() + patience_s
        seen: LagProgress | None = None
        try:
            while True:
                seen = await progress(self.settings, self.groups(), interval_s=10.0)
                # Heartbeats keep a little lag on the status topics for as long as anything runs.
                working = {k: v for k, v in seen.slow.items() if not k.split(" ")[0].endswith(HEARTBEAT_TOPICS)}
                if not working or time.monotonic() > deadline:
                    break
                self.say(f"consumer groups still catching up: {working}")
        except Exception as exc:  # a reading that failed is reported, never fatal
            self.say(f"[red]consumer lag not read[/]: {exc}")
        if seen is not None and (seen.stuck or seen.ahead):
            self.say(f"[red]stuck consumer groups[/]: {seen.stuck or ''} {seen.ahead or ''}")
        return seen

    def result(self, outcome: Reconciliation, problems: list[str]) -> dict[str, Any]:
        """The run's figures, with every discrepancy."""
        kills = self.monkey.kills
        by_service = Counter(k.service for k in kills)
        recovered = [k.recovered_s for k in kills if k.recovered_s is not None]
        problems = problems + self.stalls + self.monkey.failures + outcome.discrepancies
        wanted = self.cfg.kills_per_service
        for name in self.cfg.processes(self.cfg.services or self.services):
            if by_service[name] < wanted:
                problems.append(f"kill plan not carried out: {name} was killed {by_service[name]} time(s), {wanted} planned")
        if self.cfg.training_kills and not any(k.why == "mid-training" for k in kills):
            problems.append("kill plan not carried out: the trainer was never killed during a training run")
        if self.cfg.release_kills and not any(k.why == "mid-release" for k in kills):
            problems.append("kill plan not carried out: no converter, packager or distributor kill during a release")
        if len(self.monkey.broker_restarts) < self.cfg.broker_restarts:
            problems.append("kill plan not carried out: the broker was not restarted")
        if self.lag is None:
            problems.append("consumer lag could not be read before the reconciliation")
        else:
            problems += [f"consumer group stuck: {key} (lag per partition {parts})" for key, parts in self.lag.stuck.items()]
            problems += [f"consumer group committed past the log: {key} (by {parts})" for key, parts in self.lag.ahead.items()]
        return {
            "machine": machine(),
            "size": asdict(self.cfg) | {"submitted": self.cfg.submitted},
            "submitted": outcome.submitted,
            "terminal": outcome.terminal,
            "rejected": outcome.rejected,
            "rejected_by_reason": dict(outcome.reasons),
            "labelled": outcome.labelled,
            "pending_person": outcome.pending,
            "lost": outcome.lost,
            "duplicated": outcome.duplicated,
            "duplicated_by_kind": dict(outcome.duplicated_by_kind),
            "dead_letters": outcome.dead_letters,
            "kills": len(kills),
            "kills_by_service": dict(sorted(by_service.items())),
            "kills_mid_training": sum(k.why == "mid-training" for k in kills),
            "kills_mid_release": [k.service for k in kills if k.why == "mid-release"],
            "broker_restarts": len(self.monkey.broker_restarts),
            "broker_restart_at_s": self.monkey.broker_restarts,
            "recovery_s": {"median": round(statistics.median(recovered), 1), "max": max(recovered)} if recovered else None,
            "supervisor_restarts": dict(sorted(self.sup.restarts.items())),
            "resent_submissions": self.resent,
            "publish_retries": self.publish_retries,
            "gateway_errors": self.gateway_errors,
            "events": len(self.events.events),
            "event_copies_read": self.events.copies,
            "reader_reconnects": self.events.reconnects,
            "models": self.models,
            "releases": outcome.releases,
            "devices": outcome.devices,
            "stuck_groups": self.lag.stuck if self.lag else None,
            "ahead_groups": self.lag.ahead if self.lag else None,
            "slow_groups": self.lag.slow if self.lag else None,
            "partitions": self.partitions,
            "discrepancies": problems,
            "ok": not problems,
            "kill_log": [asdict(k) for k in kills],
            "phases": self.phases,
            "timeline": self.timeline,
            "wall_s": round(self.elapsed(), 1),
            "folder": str(self.folder),
        }


# -- reconciliation -------------------------------------------------------------------------------------


@dataclass
class Truth:
    """What PostgreSQL holds at the end, per service (the rows `reconcile` needs)."""

    submissions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """ingest: submission id -> outcome, reason, image id."""
    images: dict[str, str] = field(default_factory=dict)
    """ingest: image id -> its first submission."""
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """dedup: image id -> outcome, reason."""
    recognitions: Counter[str] = field(default_factory=Counter)
    """recognizer: image id -> decisions recorded."""
    tasks: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    """gateway: image id -> task states."""
    labels: set[str] = field(default_factory=set)
    """gateway: image ids with a verified label set kept for training."""
    samples: dict[str, str] = field(default_factory=dict)
    """trainer: image id -> role (train, test)."""
    runs: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    """trainer: model id, version, run id."""
    library: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    """model library: (model id, version, target) -> entries."""
    releases: list[dict[str, Any]] = field(default_factory=list)
    release_devices: defaultdict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    """distributor: release id -> device id -> state."""


async def load_truth(pool: Any, settings: Any) -> Truth:
    """Read every table `reconcile` needs (a service that never ran has no tables: nothing from it)."""
    def q(service: str, table: str) -> str:
        return f'"{settings.schema_for(service)}".{table}'

    async def rows(sql: str, *args: Any) -> list[Any]:
        try:
            return list(await pool.fetch(sql, *args))
        except Exception as exc:  # asyncpg.UndefinedTableError: the service never started
            log.warning("chaos: %s", exc)
            return []

    t = Truth()
    for r in await rows(f"SELECT submission_id, outcome, reason, image_id FROM {q('ingest', 'submissions')} WHERE project = $1", PROJECT):
        t.submissions[r["submission_id"]] = dict(r)
    for r in await rows(f"SELECT image_id, first_submission FROM {q('ingest', 'images')}"):
        t.images[r["image_id"]] = r["first_submission"]
    for r in await rows(f"SELECT image_id, outcome, reason FROM {q('dedup', 'decisions')} WHERE project = $1", PROJECT):
        t.decisions[r["image_id"]] = dict(r)
    for r in await rows(f"SELECT image_id, count(*) AS n FROM {q('recognizer', 'recognitions')} WHERE project = $1 GROUP BY image_id", PROJECT):
        t.recognitions[r["image_id"]] = int(r["n"])
    for r in await rows(f"SELECT image_id, state FROM {q('labeling-gateway', 'tasks')} WHERE project = $1", PROJECT):
        t.tasks[r["image_id"]].append(r["state"])
    for r in await rows(f"SELECT image_id FROM {q('labeling-gateway', 'labels')} WHERE project = $1 AND NOT for_test_set", PROJECT):
        t.labels.add(r["image_id"])
    for r in await rows(f"SELECT image_id, role FROM {q('trainer', 'samples')} WHERE project = $1", PROJECT):
        t.samples[r["image_id"]] = r["role"]
    t.runs = [dict(r) for r in await rows(
        f"SELECT run_id, status, reason, attempts, version FROM {q('trainer', 'runs')} WHERE project = $1 ORDER BY created_at", PROJECT)]
    t.models = [dict(r) for r in await rows(
        f"SELECT model_id, version, run_id FROM {q('trainer', 'models')} WHERE project = $1 ORDER BY version", PROJECT)]
    for r in await rows(f"SELECT model_id, version, target, count(*) AS n FROM {q('library', 'entries')} WHERE project = $1 "
                        "GROUP BY model_id, version, target", PROJECT):
        t.library[(r["model_id"], int(r["version"]), r["target"])] = int(r["n"])
    t.releases = [dict(r) for r in await rows(
        f"SELECT release_id, fleet, target, version, status, updated_at FROM {q('distributor', 'releases')} WHERE project = $1 "
        "ORDER BY created_at", PROJECT)]
    for r in await rows(f"SELECT release_id, device_id, state FROM {q('distributor', 'release_devices')}"):
        t.release_devices[r["release_id"]][r["device_id"]] = r["state"]
    return t


@dataclass
class Reconciliation:
    """The counts of `reconcile`, and every discrepancy as a sentence with its ids."""

    submitted: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    labelled: int = 0
    pending: int = 0
    lost: int = 0
    duplicated: int = 0
    duplicated_by_kind: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    """Messages a service gave up on (a discrepancy: under chaos nothing may be refused for good)."""
    releases: dict[str, str] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    discrepancies: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> int:
        """Submissions with exactly one terminal decision."""
        return self.rejected + self.labelled + self.pending


DUPLICATE_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "image.ingested": lambda e: ("ingest answer", e["payload"]["submission_id"]),
    "image.accepted": lambda e: ("decision", e["payload"]["submission_id"]),
    "image.rejected": lambda e: ("decision", e["payload"]["submission_id"]),
    "image.recognized": lambda e: ("recognition", e["causation_id"]),
    "image.unrecognized": lambda e: ("recognition", e["causation_id"]),
    "label.submitted": lambda e: ("label submission", e["payload"]["submission_id"]),
    "label.verified": lambda e: ("verified label", e["payload"]["label_id"]),
    "label.rejected": lambda e: ("label verdict", e["payload"]["submission_id"]),
    "model.trained": lambda e: ("trained model", e["payload"]["lineage"]["model"]["model_id"], e["payload"]["lineage"]["model"]["version"]),
    "model.evaluated": lambda e: ("evaluation", e["payload"]["lineage"]["model"]["model_id"], e["payload"]["lineage"]["model"]["version"]),
    "model.converted": lambda e: ("conversion", e["payload"]["lineage"]["model"]["model_id"], e["payload"]["lineage"]["model"]["version"]),
    "model.packaged": lambda e: ("package", e["payload"]["lineage"]["model"]["model_id"], e["payload"]["lineage"]["model"]["version"],
                                 e["payload"]["target"]),
    "release.edge": lambda e: ("release step", e["payload"]["release_id"], e["payload"]["action"], e["payload"]["stage"]["index"]),
    "release.server": lambda e: ("release step", e["payload"]["release_id"], e["payload"]["action"], e["payload"]["stage"]["index"]),
}
"""Per event type, the effect it records: two events (two event ids) with one key are one effect twice."""


def reconcile(items: dict[str, Any], events: Iterable[dict[str, Any]], truth: Truth, devices: dict[str, int | None]) -> Reconciliation:
    """Check the end state against the invariants of the module docstring; count and name every discrepancy.

    `items`: what upstream submitted, by submission id; `events`: the event log (one per event id);
    `devices`: each edge agent's active model version at the end.
    """
    out = Reconciliation(submitted=len(items))
    project_events = [e for e in events if e.get("project") == PROJECT]
    by_key: defaultdict[Any, set[str]] = defaultdict(set)
    decisions: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    registrations: defaultdict[tuple[str, int, str], set[str]] = defaultdict(set)
    verified_images: defaultdict[str, set[str]] = defaultdict(set)
    verified_event_images: set[str] = set()
    for e in events:
        if e.get("event_type") == "message.deadlettered":
            p = e.get("payload") or {}
            out.dead_letters += 1
            out.discrepancies.append(f"dead letter: {p.get('service')} gave up on {p.get('original', {}).get('topic')} "
                                     f"({p.get('reason')}: {str(p.get('message'))[:200]})")
    for e in project_events:
        kind = e.get("event_type")
        with contextlib.suppress(KeyError, TypeError):
            if kind in DUPLICATE_KEYS:
                by_key[DUPLICATE_KEYS[kind](e)].add(str(e["event_id"]))
            if kind in ("image.accepted", "image.rejected"):
                decisions[e["payload"]["submission_id"]].append(e)
            elif kind == "model.registered":
                p = e["payload"]
                ref = p["lineage"]["model"]
                registrations[(ref["model_id"], int(ref["version"]), p["target"])].add(str(p["registered_at"]))
            elif kind == "label.verified" and not e["payload"].get("for_test_set"):
                image = e["payload"]["image"]["image_id"]
                verified_images[image].add(e["payload"]["label_id"])
                verified_event_images.add(image)

    def duplicate(kind: str, extra: int, message: str) -> None:
        out.duplicated += extra
        out.duplicated_by_kind[kind] += extra
        out.discrepancies.append(f"duplicated: {message}")

    for key, ids in by_key.items():
        if len(ids) > 1:
            duplicate(key[0], len(ids) - 1, f"{key[0]} {key[1:]} recorded by {len(ids)} events ({', '.join(sorted(ids)[:4])})")
    for ref, stamps in registrations.items():
        if len(stamps) > 1:
            duplicate("library registration", len(stamps) - 1, f"model {ref} registered {len(stamps)} times")
    for ref, n in truth.library.items():
        if n > 1:
            duplicate("library registration", n - 1, f"model {ref} has {n} library entries")
    for image, labels in verified_images.items():
        if len(labels) > 1:
            duplicate("verified image", len(labels) - 1, f"image {image[:16]} verified {len(labels)} times ({', '.join(sorted(labels))})")
    runs = Counter(m["run_id"] for m in truth.models)
    for run_id, n in runs.items():
        if n > 1:
            duplicate("model per run", n - 1, f"run {run_id} produced {n} model versions")

    def lost(submission: str, where: str) -> None:
        out.lost += 1
        out.discrepancies.append(f"lost: {submission}: {where}")

    for submission in sorted(items):
        row = truth.submissions.get(submission)
        decided = decisions.get(submission, [])
        if row is None:
            lost(submission, "ingest has no record of it")
            continue
        if not decided:
            lost(submission, f"ingest {row['outcome']} it but no decision was ever published")
            continue
        event = decided[0]
        if event["event_type"] == "image.rejected":
            reason = event["payload"]["reason"]
            stage = event["payload"].get("stage")
            if stage == "ingest" and (row["outcome"] != "rejected" or row["reason"] != reason):
                out.discrepancies.append(f"mismatch: {submission}: rejected by ingest ({reason}) but ingest's table says {row['outcome']} {row['reason']}")
            elif stage == "dedup":
                db = truth.decisions.get(row["image_id"] or "")
                if db is None:
                    out.discrepancies.append(f"mismatch: {submission}: rejected by dedup ({reason}) but dedup has no decision on its image")
                elif reason not in ("duplicate",) and (db["outcome"] != "rejected" or db["reason"] != reason):
                    out.discrepancies.append(f"mismatch: {submission}: rejected by dedup ({reason}), dedup's table says {db['outcome']} {db['reason']}")
            out.rejected += 1
            out.reasons[reason] += 1
            continue
        image = event["payload"]["image"]["image_id"]
        db = truth.decisions.get(image)
        if db is None or db["outcome"] != "accepted":
            out.discrepancies.append(f"mismatch: {submission}: accepted, but dedup's table says {db['outcome'] if db else 'nothing'}")
        states = truth.tasks.get(image, [])
        if image in truth.labels and image in verified_event_images:
            out.labelled += 1
            if image not in truth.samples:
                out.discrepancies.append(f"mismatch: {submission}: image {image[:16]} is labelled but not in the trainer's dataset")
        elif any(s in PENDING_PERSON for s in states):
            out.pending += 1
        elif not truth.recognitions.get(image):
            lost(submission, f"accepted (image {image[:16]}) but never recognised or refused by the recognizer")
        elif not states:
            lost(submission, f"recognised (image {image[:16]}) but no labelling task was made")
        else:
            lost(submission, f"image {image[:16]} is neither labelled nor waiting for a person (tasks: {', '.join(states)})")
    for image, role in truth.samples.items():
        if role == "train" and image not in truth.labels:
            out.discrepancies.append(f"mismatch: the trainer trains on image {image[:16]}, which has no verified label at the gateway")

    for release in truth.releases:
        out.releases[release["release_id"]] = release["status"]
        if release["status"] not in KNOWN_RELEASE_STATES:
            out.discrepancies.append(f"release {release['release_id']} ended {release['status']}, not completed, superseded or rolled back")
    edge = [r for r in truth.releases if r["target"] == "edge" and r["fleet"] == FLEET and r["status"] == "completed"]
    last = max(edge, key=lambda r: r["updated_at"]) if edge else None
    for device, version in sorted(devices.items()):
        expected = last["version"] if last else None
        reported = truth.release_devices.get(last["release_id"], {}).get(device) if last else None
        out.devices[device] = {"version": version, "expected": expected, "reported": reported}
        if version != expected:
            out.discrepancies.append(f"device {device} runs v{version}, the fleet's last completed release is v{expected}")
        elif last is not None and reported != "activated":
            out.discrepancies.append(f"device {device} runs v{version} but the distributor has it {reported} for {last['release_id']}")
    for run in truth.runs:
        if run["status"] in ("queued", "running"):
            out.discrepancies.append(f"training run {run['run_id']} ended {run['status']}")
    return out


# -- the command ------------------------------------------------------------------------------------------


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
