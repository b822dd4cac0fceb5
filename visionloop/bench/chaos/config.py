"""The chaos bench's world and settings: `ChaosConfig` (shares its world sizes with the demo), the constants."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionloop.bench import PLOTS
from visionloop.demo.sizes import WorldSize

STATE = Path(".visionloop") / "bench" / "chaos"
PLOT = PLOTS / "chaos.png"
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
class ChaosConfig(WorldSize):
    """The scenario's size (`WorldSize`, with smaller defaults than the demo's) and the monkey's plan;
    `ci()` is the reduced run of the test suite."""

    seed: int = 11
    rounds: tuple[int, ...] = (420, 300, 300)
    test_images: int = 20
    new_class_test_images: int = 8
    width: int = 160
    height: int = 120
    size: tuple[float, float] | None = (0.22, 0.45)
    imgsz: int = 128
    epochs: int = 8
    finetune_epochs: int = 3
    batch: int = 8
    agents: int = 3
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
