"""The distributor's decisions, pure: staged rollout, as a function of what a stage's devices
reported, and a release's id.

A release addresses a fleet in stages: the first is the canary (named devices, or a share of
the fleet by a hash of the device id), each later one a larger share, the last all of it. The
next stage starts when enough of the current stage's devices report `activated`; the release
stops and rolls back when too many report `failed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from visionloop.contracts import ModelRef, Target
from visionloop.contracts.release import RolloutStage


class Step(StrEnum):
    """What the distributor does next with a rolling release."""

    WAIT = "wait"
    ADVANCE = "advance"
    COMPLETE = "complete"
    ROLLBACK = "rollback"
    PAUSE = "pause"


@dataclass(frozen=True)
class StageView:
    """One stage's devices, as the distributor knows them."""

    addressed: int
    """Known devices of the fleet the stage addresses (and any other device that reported on the release)."""
    activated: int
    failed: int
    fleet: int = 1
    """Devices the fleet has at all (0: none has ever reported)."""


NO_DEVICES = "no devices in the fleet: waiting for the first"
"""The reason a rolling release shows while its fleet has no device."""


def stage_of(index: int, stages: list[float], canary_devices: list[str]) -> RolloutStage:
    """Stage `index` of a release: the canary group first when there is one, then percentages."""
    devices = list(canary_devices) if index == 0 and canary_devices else []
    return RolloutStage(index=index, percent=stages[index], devices=devices)


def next_step(view: StageView, *, last: bool, min_activated_fraction: float, max_failure_rate: float, auto_rollback: bool) -> Step:
    """The next step for a rolling release whose current stage looks like `view`."""
    done = Step.COMPLETE if last else Step.ADVANCE
    if view.addressed == 0 and view.fleet == 0:
        return Step.WAIT  # no device at all: a release is not "completed" on nobody (NO_DEVICES)
    if view.addressed == 0:
        return done  # nobody to wait for in this stage: the next one is larger
    if view.failed and view.failed / view.addressed > max_failure_rate:
        return Step.ROLLBACK if auto_rollback else Step.PAUSE
    if view.activated >= math.ceil(min_activated_fraction * view.addressed - 1e-9):
        return done
    return Step.WAIT


def release_id_for(model: ModelRef, fleet: str, target: Target) -> str:
    """A release's id: one per model version, target and fleet."""
    return f"{model.model_id}-v{model.version}-{target.value}-{fleet}"
