"""The monkey: a seeded plan of SIGKILLs of the services (and the broker restart), carried out while the scenario runs."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from visionloop.bench.chaos.config import RELEASE_KILL_ORDER, RELEASE_SERVICES

if TYPE_CHECKING:
    from visionloop.bench.chaos.run import ChaosRun

log = logging.getLogger(__name__)


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
