"""One chaos run: the embedded stack, the services as processes, the scenario, the monkey, the drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from visionloop.bench import machine
from visionloop.bench.chaos.config import (
    CLASSES,
    FLEET,
    HEARTBEAT_TOPICS,
    NEW_CLASS,
    PROJECT,
    SOURCE,
    ChaosConfig,
    ChaosStalled,
    sid,
)
from visionloop.bench.chaos.events import EventLog
from visionloop.bench.chaos.monkey import Kill, Monkey
from visionloop.bench.chaos.reconcile import Reconciliation, load_truth, reconcile
from visionloop.demo.wait import wait_until
from visionloop.libs.lag import Progress as LagProgress
from visionloop.libs.lag import progress, read_partitions

log = logging.getLogger(__name__)


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
        self.monkey_task: asyncio.Task[None] | None = None
        """The monkey's loop, from the first round until the run stops."""

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

        from visionloop.demo.world import ItemKind, World, frozen_test_zip

        world = World(self.cfg.seed + 1000 + offset, classes, width=self.cfg.width, height=self.cfg.height,
                      objects=self.cfg.objects, size=self.cfg.size)
        items = [i for i in world.stream(n) if i.kind is ItemKind.FRESH]
        archive = frozen_test_zip(items, classes)
        schema = self.settings.schema_for("labeling-gateway")
        before = await self.pool.fetchval(f'SELECT count(*) FROM "{schema}".imports WHERE project = $1', PROJECT)
        for _ in range(60):
            try:
                response = await http.post(f"/v1/projects/{PROJECT}/import", params={"format": "coco", "test_set": "true"},
                                           content=archive,
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
        from visionloop.libs.db import create_pool
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
        self.monkey_task = None
        problems: list[str] = []
        try:
            tokens = await self._start(settings)
            await self._scenario(tokens, problems)
            outcome = await self._settle(settings)
        finally:
            await self._stop(reader, sampler)
        return self.result(outcome, problems)

    async def _start(self, settings: Any) -> tuple[str, str, str]:
        """Start the services, the project and the edge agents; the tokens of alice (annotator), bob (reviewer), carol (admin)."""
        from visionloop.libs.signing import TrustStore, ensure_key_pair
        from visionloop.services.edge_agent.agent import EdgeAgent
        from visionloop.services.labeling_gateway.admin import create_project, create_token

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
        return alice_token, bob_token, admin_token

    async def _scenario(self, tokens: tuple[str, str, str], problems: list[str]) -> None:
        """The test set, then the monkey let loose and the rounds, alice and bob labelling; a stall goes in `problems`."""
        import httpx

        from visionloop.demo.annotator import Annotator

        alice_token, bob_token, admin_token = tokens
        base = self.sup.endpoints()["labeling-gateway"]
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            alice = Annotator(base, alice_token, PROJECT, self.world, user_id="alice", noise_px=self.cfg.noise_px, rng_seed=1)
            bob = Annotator(base, bob_token, PROJECT, self.world, user_id="bob", noise_px=self.cfg.noise_px, rng_seed=2)
            async with alice, bob:
                try:
                    if self.cfg.test_images:
                        await self.import_test_set(http, admin_token, CLASSES, self.cfg.test_images, offset=0)
                    self.monkey_task = asyncio.create_task(self.monkey.loop(), name="chaos-monkey")
                    for n, size in enumerate(self.cfg.rounds):
                        classes = CLASSES
                        if n == 2:
                            await self._new_class(http, admin_token)
                            classes = (*CLASSES, NEW_CLASS)
                        await self.round(n, size, classes, [alice, bob])
                except ChaosStalled as exc:
                    problems.append(f"scenario stalled: {exc}")
                    self.say(f"[red]scenario stalled[/]: {exc}")

    async def _settle(self, settings: Any) -> Reconciliation:
        """Every killed service back and the pipeline quiet; the lag, the partitions, and the end state reconciled."""
        self.say("settling: every killed service back, the pipeline quiet")
        await self.monkey.settle()
        if self.monkey_task is not None:
            self.monkey_task.cancel()
        await self.quiet()
        self.lag = await self.settle_lag()
        with contextlib.suppress(Exception):
            self.partitions = (await read_partitions(settings, self.groups())).as_dict()
        truth = await load_truth(self.pool, settings)
        devices = {a.device_id: (a.active.model.version if a.active else None) for a in self.agents}
        return reconcile(self.items, self.events.events.values(), truth, devices)

    async def _stop(self, reader: asyncio.Task[None], sampler: asyncio.Task[None]) -> None:
        """Stop the monkey, the edge agents, the services, the event reader and the sampler; close the pool."""
        if self.monkey_task is not None:
            self.monkey_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.monkey_task
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
        problems = problems + self.stalls + self.monkey.failures + outcome.discrepancies + self._plan_and_lag_problems(kills, by_service)
        return {
            "machine": machine(),
            "size": asdict(self.cfg) | {"submitted": self.cfg.submitted},
            **_counts(outcome),
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

    def _plan_and_lag_problems(self, kills: list[Kill], by_service: Counter[str]) -> list[str]:
        """Each part of the kill plan not carried out, then each consumer group stuck or committed past the log."""
        problems: list[str] = []
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
        return problems


def _counts(outcome: Reconciliation) -> dict[str, Any]:
    """The reconciliation's counts, as the run's figures name them."""
    return {
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
    }
