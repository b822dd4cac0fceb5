"""`visionloop demo`: the whole loop, three rounds, on the embedded stack, every service as in production.

1. An upstream publisher (`world.py`) streams synthetic scenes with exact and near duplicates,
   low-resolution and corrupt images mixed in; the frozen test set is imported through the
   gateway (admin, `test_set=true`).
2. **Round 1**: the library is empty, every accepted image is unrecognised; a simulated annotator
   (`annotator.py`) labels them over the gateway's HTTP API. The N-th verified label triggers
   training; the model is evaluated, converted, packaged, registered and released; simulated
   edge agents activate it.
3. **Round 2**: new images are pre-labelled by the released model; a simulated reviewer accepts,
   corrects or rejects; once calibrated, confident pre-labels are auto-accepted (with spot
   checks). The next model fine-tunes, is gated against the champion, and is released.
4. **Round 3**: a new class appears; the images the model cannot handle go to people; the next
   model adds the class and is released.

Nothing is shortcut: the scenario only publishes what an upstream system would, calls the
gateway as people would, and reads the topics. Its report (`report.py`) is computed from the
events of the run and the annotators' counters.

While it runs, `progress(message)` receives a line per milestone and `on_steps(steps)`, twice a
second, each round's steps so far (`Step`: images decided, labels verified, training epochs from
the trainer's `progress` statuses, edge agents on the new model); `progress.py` shows both with
rich. `on_ready(endpoints, tokens)` is called once the services run and the demo's people have
their tokens, so an observer (the CLI's dashboard link, a test with a browser) can watch the
gateway's dashboard during the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from visionloop.demo.annotator import Annotator
from visionloop.demo.dataset import fit_rounds, world_for
from visionloop.demo.effort import Actions
from visionloop.demo.wait import wait_until
from visionloop.demo.progress import Step
from visionloop.demo.sizes import WorldSize
from visionloop.demo.world import Item, ItemKind, frozen_test_zip, publish

log = logging.getLogger(__name__)

FLEET = "demo-edge"
ARMS = ("manual", "assisted", "loop")
"""`visionloop bench loop`'s arms: every box drawn by hand; pre-labels reviewed by people (no
auto-accept); pre-labels reviewed, and auto-accepted where calibration allows (the loop as it is)."""


@dataclass(frozen=True)
class DemoConfig(WorldSize):
    """The scenario's size (`WorldSize`, the demo's defaults) and its arm; `quick()` is the small one."""

    timeout_s: float = 900.0
    arm: str = "loop"
    """`loop`: the loop as it is. `manual` (an arm of `visionloop bench loop`): released models never
    serve the recognizer (no server promotion), so every image is labelled by hand. `assisted`:
    pre-labels are reviewed by people, never auto-accepted. Everything else is the same."""
    world: str = "photo"
    """The built-in world's style (`libs.scenes.STYLE_CLASSES`: `photo`, `shapes`); ignored with `dataset`."""
    dataset: str | None = None
    """A COCO or YOLO dataset folder to draw the images, the test set, the truth and the classes from."""
    errors: Any = None
    """The simulated people's error rates (`annotator.PersonErrors`); None: the published defaults."""
    costs: Any = None
    """Seconds per action (`effort.Costs`); None: the published defaults."""
    verifier: tuple[tuple[str, Any], ...] = ()
    """Verifier settings beyond the product defaults (none by default: the bench runs the product's)."""

    @property
    def object_size(self) -> tuple[float, float]:
        """`size`, or the world style's default (photo: `libs.scenes.PHOTO_SIZE`; shapes: 0.22-0.45)."""
        from visionloop.libs.scenes import PHOTO_SIZE

        return self.size or (PHOTO_SIZE if self.world == "photo" else (0.22, 0.45))

    @property
    def assist(self) -> bool:
        """Whether released models pre-label (every arm but `manual`)."""
        return self.arm != "manual"

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A small run (3 to 11 minutes on two cores, by machine); its models learn little.

        Every wait has the full demo's limit (`timeout_s`): on a slow two-core machine round 1's
        training alone took 5 minutes, and a 300 s limit gave up at epoch 28 of 30."""
        return cls(rounds=(150, 60, 60), test_images=20, new_class_test_images=8, width=160, height=120, imgsz=128, epochs=30,
                   finetune_epochs=8, batch=8, agents=3)


@dataclass
class RoundLog:
    """What one round did and measured."""

    name: str
    submitted: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    tasks: Counter[str] = field(default_factory=Counter)
    boxes_drawn: int = 0
    boxes_corrected: int = 0
    accepts: int = 0
    rejects: int = 0
    seconds: float = 0.0
    actions: Actions = field(default_factory=Actions)
    """What people did in the round (`effort.Actions`): priced by any `effort.Costs` after the run."""
    verified: Counter[str] = field(default_factory=Counter)
    model: dict[str, Any] | None = None
    started: float = 0.0
    ended: float = 0.0
    version: int = 0
    """The model the round trains."""
    ids: set[str] = field(default_factory=set, repr=False)
    """The submission ids of the round's images."""
    training_from: int | None = None
    """How many training runs the demo had seen when it asked for this round's (None: not asked yet)."""
    releasing: bool = False


def _config_file(folder: Path, cfg: DemoConfig) -> Path:
    """The services' settings for the demo (what an operator would put in a config file)."""
    doc = {
        "ingest": {"port": 0},
        "labeling_gateway": {"port": 0},
        "distributor": {"port": 0, "edge_fleets": [FLEET], "stages": [34.0, 100.0], "min_activated_fraction": 1.0,
                        "promote_server": cfg.assist},
        "trainer": {
            "trigger": "both", "test_fraction": 0.0, "min_train_images": 8, "imgsz": cfg.imgsz, "epochs": cfg.epochs,
            "finetune_epochs": cfg.finetune_epochs, "batch": cfg.batch, "patience": 100, "device": "auto", "poll_interval_s": 0.5,
            "min_new_images": 10_000,
            # The shapes world's class is its colour: colour augmentation would teach the model to ignore it.
            "train_args": {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0} if cfg.world == "shapes" and not cfg.dataset else {},
        },
        "evaluator": {"map50_95_floor": 0.0, "agreement_floor": 0.0, "champion_tolerance": 0.05, "class_tolerance": 0.15},
        "verifier": {**dict(cfg.verifier), **({"auto_accept": False} if cfg.arm == "assisted" else {})},
    }
    path = folder / "demo-config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Demo:
    """One run of the scenario (see the module docstring)."""

    def __init__(self, cfg: DemoConfig, state: Path, progress: Callable[[str], None] | None = None, *,
                 on_steps: Callable[[list[Step]], None] | None = None,
                 on_ready: Callable[[Mapping[str, str], Mapping[str, str]], None] | None = None) -> None:
        """`progress(message)`: one line per milestone; `on_steps(steps)`: the rounds' steps, every
        half second; `on_ready(endpoints, tokens)`: once, with the services' base URLs by name and
        the demo's API tokens by user (`alice` annotator, `bob` reviewer, `carol` admin of the
        project, and `dashboard`, an annotator token for watching `/dashboard`)."""
        self.cfg = cfg
        self.state = state
        self.progress = progress or (lambda message: log.info(message))
        self.on_steps = on_steps
        self.on_ready = on_ready
        self.world = world_for(Path(cfg.dataset) if cfg.dataset else None, style=cfg.world, seed=cfg.seed, width=cfg.width,
                               height=cfg.height, objects=cfg.objects, size=cfg.object_size, test_images=cfg.test_images)
        self.project = self.world.name
        fresh_share = 1.0 - cfg.exact_dup_rate - cfg.near_dup_rate - cfg.low_res_rate - cfg.corrupt_rate
        self.plan = fit_rounds(cfg.rounds, fresh_share, getattr(self.world, "fresh_left", lambda: None)())
        """Images submitted per round: `cfg.rounds`, scaled down to what a dataset holds."""
        self.rounds: list[RoundLog] = []
        self.events: list[dict[str, Any]] = []
        self.event_times: list[float] = []
        self.agents: list[Any] = []
        self.people: list[Annotator] = []
        self.test_items: list[Item] = []
        self.started = time.monotonic()
        # What the steps are counted from, kept up to date as events arrive (see `_index`).
        self._decided_ids: set[str] = set()
        self._accepted_ids: dict[str, str] = {}
        self._verified_ids: set[str] = set()
        self._runs: list[str] = []
        self._run_epochs: dict[str, tuple[int, int | None]] = {}
        self._activated: dict[int, set[str]] = {}

    # -- plumbing ---------------------------------------------------------------------------------
    async def _read_events(self, settings: Any) -> None:
        from aiokafka import AIOKafkaConsumer

        from visionloop.contracts import TOPICS
        from visionloop.libs.kafka import consumer_kwargs, ensure_topics

        topics = [settings.topic(spec.name) for spec in TOPICS.values()]
        await ensure_topics(settings, TOPICS.values())
        reader = AIOKafkaConsumer(*topics, **(consumer_kwargs(settings) | {"fetch_max_wait_ms": 20}),
                                  auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
        await reader.start()
        try:
            while True:
                batch = await reader.getmany(timeout_ms=200)
                now = time.monotonic()
                for records in batch.values():
                    for record in records:
                        with contextlib.suppress(ValueError):
                            self.events.append(json.loads(record.value))
                            self.event_times.append(now)
                            self._index(self.events[-1])
        finally:
            await reader.stop()

    def _index(self, event: Any) -> None:
        """Note what the steps count: decided and accepted submissions, verified images, training
        epochs, the devices that activated each model version."""
        with contextlib.suppress(KeyError, TypeError, AttributeError):
            kind, payload = event.get("event_type"), event["payload"]
            if kind in ("image.accepted", "image.rejected") and event.get("project") == self.project and payload.get("submission_id"):
                self._decided_ids.add(payload["submission_id"])
                if kind == "image.accepted":
                    self._accepted_ids[payload["submission_id"]] = payload["image"]["image_id"]
            elif kind == "label.verified" and event.get("project") == self.project:
                self._verified_ids.add(payload["image"]["image_id"])
            elif kind == "device.status" and event.get("project") == self.project and payload.get("state") == "activated":
                self._activated.setdefault(int(payload["model"]["version"]), set()).add(payload["device_id"])
            elif kind == "pipeline.status" and (payload.get("progress") or {}).get("task") == "training":
                # The trainer's progress: step = epochs done, total = the run's epochs; its message names the project.
                progress = payload["progress"]
                if str(progress.get("message") or "").split(":")[0] != self.project:
                    return
                run = str(progress["task_id"])
                if run not in self._run_epochs:
                    self._runs.append(run)
                done, total = self._run_epochs.get(run, (0, None))
                self._run_epochs[run] = (max(done, int(progress.get("step") or 0)), progress.get("total") or total)

    def steps(self) -> list[Step]:
        """Every round's steps so far, in order."""
        out = []
        for r in self.rounds:
            tag = f"round {r.version}"
            out.append(Step(f"{tag}.decided", f"{tag} · images decided", len(r.ids & self._decided_ids), len(r.ids)))
            accepted = {self._accepted_ids[i] for i in r.ids if i in self._accepted_ids}
            if accepted:
                out.append(Step(f"{tag}.labelled", f"{tag} · labels verified", len(accepted & self._verified_ids), len(accepted)))
            if r.training_from is not None:
                run = self._runs[r.training_from] if len(self._runs) > r.training_from else None
                done, total = self._run_epochs.get(run, (0, None)) if run else (0, None)
                out.append(Step(f"{tag}.training", f"{tag} · training v{r.version} (epochs)", done, total))
            if r.releasing:
                on = len(self._activated.get(r.version, ()))
                out.append(Step(f"{tag}.release", f"{tag} · edge agents activated v{r.version}", on, self.cfg.agents))
        return out

    async def _follow_steps(self) -> None:
        assert self.on_steps is not None
        while True:
            try:
                self.on_steps(self.steps())
            except Exception:  # progress is for people; never fail the run for it
                log.debug("demo: steps not shown", exc_info=True)
            await asyncio.sleep(0.5)

    def of(self, event_type: str, project: str | None = "") -> list[dict[str, Any]]:
        """Events of one type seen so far (of the demo's project unless `project` is None)."""
        project = self.project if project == "" else project
        return [e for e in self.events if e.get("event_type") == event_type and (project is None or e.get("project") == project)]

    async def until(self, what: str, predicate: Any, timeout: float | None = None) -> Any:
        limit = timeout or self.cfg.timeout_s
        return await wait_until(predicate, limit, 0.2, lambda: TimeoutError(f"demo: {what} did not happen within {limit:.0f} s"))

    # -- the run ------------------------------------------------------------------------------------
    async def run(self, settings: Any) -> dict[str, Any]:
        from visionloop.app import ServiceHost
        from visionloop.libs.signing import TrustStore, ensure_key_pair
        from visionloop.services.edge_agent.agent import EdgeAgent
        from visionloop.services.labeling_gateway.admin import create_project, create_token

        reader = asyncio.create_task(self._read_events(settings))
        follower = asyncio.create_task(self._follow_steps()) if self.on_steps else None
        host = ServiceHost(settings, _all_services())
        agents: list[Any] = []
        self.progress("starting every service")
        await host.start()
        try:
            project, classes = self.project, tuple(self.world.classes)
            await create_project(settings, project, list(classes), created_by="demo")
            _, annotator_token = await create_token(settings, project=project, role="annotator", user_id="alice", created_by="demo")
            _, reviewer_token = await create_token(settings, project=project, role="reviewer", user_id="bob", created_by="demo")
            _, admin_token = await create_token(settings, project=project, role="admin", user_id="carol", created_by="demo")
            _, dashboard_token = await create_token(settings, project=project, role="annotator", user_id="dashboard", created_by="demo")
            base = host.endpoints["labeling-gateway"]
            ensure_key_pair(settings.state_dir / "keys")
            trust = TrustStore.load([settings.state_dir / "keys"])
            for n in range(self.cfg.agents):
                device = f"edge-{n:02d}"
                agent = EdgeAgent(settings, FLEET, device, settings.state_dir / "edge" / device, trust, heartbeat_s=2.0)
                await agent.start()
                agents.append(agent)
            self.agents = agents
            if self.on_ready is not None:
                self.on_ready(dict(host.endpoints), {"alice": annotator_token, "bob": reviewer_token, "carol": admin_token,
                                                     "dashboard": dashboard_token})
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                await self._import_test_set(http, admin_token, classes, self.cfg.test_images, offset=0)
                await self._people_work(http, base, admin_token, {"alice": annotator_token, "bob": reviewer_token})
            await asyncio.sleep(1.0)
            self.final_devices = {a.device_id: (f"v{a.active.model.version}" if a.active else "none") for a in agents}
        finally:
            for agent in agents:
                with contextlib.suppress(Exception):
                    await agent.stop()
            await host.stop()
            for task in (reader, follower):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if self.on_steps is not None:
                with contextlib.suppress(Exception):
                    self.on_steps(self.steps())
        return self.summary()

    async def _people_work(self, http: httpx.AsyncClient, base: str, admin_token: str, tokens: Mapping[str, str]) -> None:
        """The three rounds, worked by alice (annotator) and bob (reviewer); round 3 adds the world's new class, if it has one."""
        classes, new_class = tuple(self.world.classes), self.world.new_class
        people = {"errors": self.cfg.errors, "costs": self.cfg.costs}
        alice = Annotator(base, tokens["alice"], self.project, self.world, user_id="alice", rng_seed=self.cfg.seed * 10 + 1, **people)
        bob = Annotator(base, tokens["bob"], self.project, self.world, user_id="bob", rng_seed=self.cfg.seed * 10 + 2, **people)
        self.people = [alice, bob]
        async with alice, bob:
            await self._round("round 1: empty library, people label", self.plan[0], classes, [alice, bob], version=1)
            await self._round("round 2: pre-labels, review, auto-accept", self.plan[1], classes, [alice, bob], version=2)
            if new_class is None:
                await self._round("round 3: more images", self.plan[2], classes, [alice, bob], version=3)
                return
            await http.post(f"/v1/projects/{self.project}/classes", json={"classes": [new_class]},
                            headers={"Authorization": f"Bearer {admin_token}"})
            await self._import_test_set(http, admin_token, (*classes, new_class), self.cfg.new_class_test_images, offset=1)
            await self._round(f"round 3: a new class ({new_class}) appears", self.plan[2], (*classes, new_class), [alice, bob], version=3)

    async def _import_test_set(self, http: httpx.AsyncClient, token: str, classes: tuple[str, ...], n: int, *, offset: int) -> None:
        """Import `n` labelled scenes as the frozen test set, as an admin would (a COCO zip)."""
        items = [i for i in self.world.test_set(n, classes, offset=offset) if i.kind is ItemKind.FRESH]
        self.test_items.extend(items)
        response = await http.post(f"/v1/projects/{self.project}/import", params={"format": "coco", "test_set": "true"},
                                   content=frozen_test_zip(items, classes), headers={"Authorization": f"Bearer {token}", "Content-Type": "application/zip"})
        response.raise_for_status()
        self.progress(f"imported {len(items)} test images ({', '.join(classes)})")
        await self.until("the test set verified", lambda: len([e for e in self.of("label.verified") if e["payload"].get("for_test_set")])
                         >= len(items) + (self.cfg.test_images if offset else 0))

    async def _round(self, name: str, n: int, classes: tuple[str, ...], people: list[Annotator], *, version: int) -> None:
        from visionloop.contracts import TrainingRequested
        from visionloop.libs.kafka import publish_once

        log_ = RoundLog(name=name, started=time.monotonic(), version=version)
        self.progress(name)
        before = {id(p): _snapshot(p) for p in people}
        items = self.world.stream(n, exact_dup_rate=self.cfg.exact_dup_rate, near_dup_rate=self.cfg.near_dup_rate,
                                  low_res_rate=self.cfg.low_res_rate, corrupt_rate=self.cfg.corrupt_rate, classes=classes)
        settings = self.settings
        ids = {f"demo-upstream-{i.name}" for i in items}
        log_.ids = ids
        self.rounds.append(log_)
        log_.submitted = len(items)
        waves = max(1, self.cfg.waves)
        for w in range(waves):
            wave = items[w * len(items) // waves:(w + 1) * len(items) // waves]
            # Originals first: a duplicate must not overtake the image it duplicates (they travel on different partitions).
            first = [i for i in wave if i.kind not in (ItemKind.EXACT_DUPLICATE, ItemKind.NEAR_DUPLICATE)]
            later = [i for i in wave if i.kind in (ItemKind.EXACT_DUPLICATE, ItemKind.NEAR_DUPLICATE)]
            await publish(settings, first, self.project)
            await self.until("ingest and dedup decided the wave's originals", lambda first=first: self._decided(first))
            await publish(settings, later, self.project)
            await self.until("ingest and dedup decided the wave's duplicates", lambda wave=wave: self._decided(wave))
            wave_ids = {f"demo-upstream-{i.name}" for i in wave}
            accepted = {e["payload"]["image"]["image_id"] for e in self.of("image.accepted") if e["payload"].get("submission_id") in wave_ids}
            await self._work(people, accepted, name, log_)
        accepted = {e["payload"]["image"]["image_id"] for e in self.of("image.accepted") if e["payload"].get("submission_id") in ids}
        log_.accepted = len(accepted)
        for e in self.of("image.rejected"):
            if e["payload"].get("submission_id") in ids:
                log_.rejected[e["payload"]["reason"]] += 1
        fresh = accepted
        for p in people:
            _add(log_, before[id(p)], _snapshot(p))
        for e in self.of("label.verified"):
            if e["payload"]["image"]["image_id"] in fresh:
                log_.verified[e["payload"]["provenance"]["method"]] += 1
        # Training: the round's labels are in; ask for the run (the count trigger also works; a command is deterministic).
        log_.training_from = len(self._runs)
        await publish_once(settings, TrainingRequested(requested_by="demo"), project=self.project, producer="demo", key=self.project)
        self.progress(f"{name}: {len(fresh)} images labelled; training model v{version}")
        evaluated = await self.until(f"model v{version} evaluated", lambda: next(
            (e for e in self.of("model.evaluated") if e["payload"]["lineage"]["model"]["version"] == version), None))
        log_.model = {"version": version, "passed": evaluated["payload"]["passed"], "metrics": evaluated["payload"]["candidate"],
                      "champion": evaluated["payload"].get("champion"), "failures": evaluated["payload"]["failures"],
                      "classes": evaluated["payload"]["lineage"]["class_names"]}
        if evaluated["payload"]["passed"]:
            self.progress(f"{name}: v{version} passed the gate (mAP50-95 {evaluated['payload']['candidate']['map50_95']:.3f}); releasing")
            log_.releasing = True
            await self._released(name, version)
        else:
            reasons = ", ".join(f["reason"] for f in evaluated["payload"]["failures"])
            self.progress(f"{name}: v{version} failed the gate ({reasons})")
        log_.ended = time.monotonic()

    async def _released(self, name: str, version: int) -> None:
        """Until v`version` runs on every edge agent (unless its edge artifact was refused) and, when
        the scenario pre-labels, is released to the server fleet."""
        converted = await self.until(f"model v{version} converted", lambda: next(
            (e for e in self.of("model.converted") if e["payload"]["lineage"]["model"]["version"] == version), None))
        refused = [r for r in converted["payload"]["refused"] if r["target"] == "edge"]
        if refused:  # nothing for the edge agents this round; the server release goes on
            self.progress(f"{name}: v{version}'s edge artifact was refused ({refused[0]['reason']}: {refused[0]['message']})")
        else:
            await self.until(f"v{version} on every edge agent", lambda: all(
                a.active is not None and a.active.model.version == version for a in self.agents))
        if self.cfg.assist:
            await self.until(f"v{version} released to the server fleet", lambda: any(
                e["payload"]["model"]["version"] == version for e in self.of("release.server")))

    async def _work(self, people: list[Annotator], images: set[str], name: str, log_: RoundLog) -> None:
        """People work the queue until every one of `images` has a verified label."""
        alice, bob = people
        while not images <= {e["payload"]["image"]["image_id"] for e in self.of("label.verified")}:
            worked = await alice.drain(idle_s=0.5) + await bob.drain(idle_s=0.5)
            if not worked:
                await asyncio.sleep(0.3)
            if time.monotonic() - log_.started > self.cfg.timeout_s:
                missing = images - {e["payload"]["image"]["image_id"] for e in self.of("label.verified")}
                raise TimeoutError(f"demo: {name}: {len(missing)} accepted images still unlabelled")

    def _decided(self, items: list[Item]) -> bool:
        return all(f"demo-upstream-{i.name}" in self._decided_ids for i in items)

    # -- the summary ------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        rounds = []
        for r in self.rounds:
            per_image = (r.boxes_drawn + r.boxes_corrected + r.accepts + r.rejects) / r.accepted if r.accepted else 0.0
            auto = r.verified.get("auto", 0)
            rounds.append({
                "round": r.name, "submitted": r.submitted, "accepted": r.accepted, "rejected": dict(r.rejected),
                "tasks": dict(r.tasks), "boxes_drawn": r.boxes_drawn, "boxes_corrected": r.boxes_corrected, "accept_clicks": r.accepts,
                "rejects": r.rejects, "human_actions_per_image": round(per_image, 3), "labelling_seconds": round(r.seconds, 1),
                "actions": asdict(r.actions),
                "verified_by_method": dict(r.verified), "auto_accept_rate": round(auto / r.accepted, 3) if r.accepted else 0.0,
                "model": r.model, "seconds": round(r.ended - r.started, 1),
            })
        return {"rounds": rounds, "auto_accept_precision": self.auto_accept_precision(), "auto_accepted": self.auto_accepted(),
                "world": self.world.name, "classes": list(self.world.classes) + ([self.world.new_class] if self.world.new_class else []), "wall_s": round(time.monotonic() - self.started, 1),
                "releases": self.release_timeline(), "devices": self.device_states()}

    def auto_accepted(self) -> dict[str, int]:
        """The auto-accepted label sets against the world's truth (IoU 0.5, right class, one to one):
        `images`, `boxes` and the `right` ones among them, the true `objects` in those images."""
        from visionloop.contracts import Box
        from visionloop.libs.boxes import match

        counts = {"images": 0, "boxes": 0, "right": 0, "objects": 0}
        for e in self.of("label.verified"):
            if e["payload"]["provenance"]["method"] != "auto":
                continue
            truth = self.world.truth(e["payload"]["image"]["image_id"]) or []
            boxes = [Box.model_validate(b) for b in e["payload"]["boxes"]]
            counts["images"] += 1
            counts["boxes"] += len(boxes)
            counts["objects"] += len(truth)
            counts["right"] += _matched(match, boxes, truth)
        return counts

    def auto_accept_precision(self) -> float | None:
        """Box precision (IoU 0.5, right class) of the auto-accepted label sets against the world's truth."""
        counts = self.auto_accepted()
        return round(counts["right"] / counts["boxes"], 4) if counts["boxes"] else None

    def release_timeline(self) -> list[dict[str, Any]]:
        out = []
        for e, t in zip(self.events, self.event_times, strict=True):
            if e.get("event_type") in ("release.edge", "release.server") and e.get("project") == self.project:
                p = e["payload"]
                out.append({"at_s": round(t - self.started, 1), "type": e["event_type"], "fleet": p["fleet"], "action": p["action"],
                            "model": f"{p['model']['model_id']} v{p['model']['version']}", "stage": p["stage"]["index"]})
        return out

    def device_states(self) -> dict[str, str]:
        return dict(getattr(self, "final_devices", {}))


def _matched(match: Any, boxes: list[Any], truth: list[Any]) -> int:
    return len(match(boxes, truth, min_iou=0.5)) if boxes and truth else 0


def _snapshot(person: Annotator) -> dict[str, Any]:
    t = person.tally
    return {"tasks": Counter(t.tasks), "drawn": t.boxes_drawn, "corrected": t.boxes_corrected, "accepts": t.accepts, "rejects": t.rejects,
            "seconds": t.seconds, "actions": t.actions}


def _add(log_: RoundLog, before: dict[str, Any], after: dict[str, Any]) -> None:
    log_.tasks.update(after["tasks"] - before["tasks"])
    log_.boxes_drawn += after["drawn"] - before["drawn"]
    log_.boxes_corrected += after["corrected"] - before["corrected"]
    log_.accepts += after["accepts"] - before["accepts"]
    log_.rejects += after["rejects"] - before["rejects"]
    log_.seconds += after["seconds"] - before["seconds"]
    log_.actions = log_.actions + (after["actions"] - before["actions"])


def _all_services() -> list[str]:
    from visionloop import services

    return list(services.available())


def run_demo(cfg: DemoConfig, *, state: Path, console: Any = None,
             on_ready: Callable[[Mapping[str, str], Mapping[str, str]], None] | None = None) -> dict[str, Any]:
    """Start the embedded stack, run the scenario, stop everything; the summary.

    With a rich `console`, the run's progress is shown on it (`progress.LiveProgress`: the line log,
    the steps as bars, and a link to the gateway's dashboard). `on_ready` is `Demo`'s."""
    from visionloop.demo.progress import LiveProgress
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.settings import Settings

    tag = uuid.uuid4().hex[:6]
    folder = (state / f"run-{tag}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["VL_CONFIG"] = str(_config_file(folder, cfg))
    stack = EmbeddedStack(Settings(state_dir=state))
    settings = stack.start().model_copy(update={
        "topic_prefix": f"demo{tag}.", "schema_prefix": f"demo{tag}_", "state_dir": folder / "state",
        "blob_url": (folder / "blobs").as_uri(), "heartbeat_interval_s": 2.0,
    })
    live = LiveProgress(console) if console is not None else None

    def ready(endpoints: Mapping[str, str], tokens: Mapping[str, str]) -> None:
        if live is not None:
            live.line(f"dashboard: {endpoints['labeling-gateway']}/dashboard?token={tokens['dashboard']}")
        if on_ready is not None:
            on_ready(endpoints, tokens)

    demo = Demo(cfg, folder, progress=live.line if live else (lambda message: None), on_steps=live.update if live else None,
                on_ready=ready)
    demo.settings = settings
    try:
        with live or contextlib.nullcontext():
            result = asyncio.run(demo.run(settings))
    finally:
        watched = stack.watched()
        stack.stop()
    result["folder"] = str(folder)
    result["embedded_restarts"] = {name: w["restarts"] for name, w in watched.items()}  # the watch's repairs
    return result
