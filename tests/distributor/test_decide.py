"""Staged rollout decisions, as a pure function."""

from __future__ import annotations

import pytest

from visionloop.services.distributor.config import DistributorSettings, Policy
from visionloop.services.distributor.decide import StageView, Step, stage_of
from visionloop.services.distributor.decide import next_step as decide

RULES = {"min_activated_fraction": 0.9, "max_failure_rate": 0.2, "auto_rollback": True}


def test_a_stage_waits_until_enough_devices_activated() -> None:
    assert decide(StageView(addressed=10, activated=8, failed=0), last=False, **RULES) is Step.WAIT
    assert decide(StageView(addressed=10, activated=9, failed=0), last=False, **RULES) is Step.ADVANCE
    assert decide(StageView(addressed=10, activated=10, failed=0), last=True, **RULES) is Step.COMPLETE


def test_failures_above_the_rate_roll_back_or_pause() -> None:
    assert decide(StageView(addressed=10, activated=8, failed=2), last=False, **RULES) is Step.WAIT  # 20 % is not above 20 %
    assert decide(StageView(addressed=10, activated=0, failed=3), last=False, **RULES) is Step.ROLLBACK
    assert decide(StageView(addressed=2, activated=1, failed=1), last=False, **RULES) is Step.ROLLBACK
    paused = RULES | {"auto_rollback": False}
    assert decide(StageView(addressed=2, activated=0, failed=2), last=False, **paused) is Step.PAUSE


def test_a_stage_that_addresses_no_known_device_moves_on() -> None:
    assert decide(StageView(addressed=0, activated=0, failed=0, fleet=5), last=False, **RULES) is Step.ADVANCE
    assert decide(StageView(addressed=0, activated=0, failed=0, fleet=5), last=True, **RULES) is Step.COMPLETE


def test_a_release_to_a_fleet_without_devices_waits_for_the_first() -> None:
    """Issue 18, item 7: never "completed 3/3 (100%)" on nobody."""
    assert decide(StageView(addressed=0, activated=0, failed=0, fleet=0), last=False, **RULES) is Step.WAIT
    assert decide(StageView(addressed=0, activated=0, failed=0, fleet=0), last=True, **RULES) is Step.WAIT


def test_the_canary_group_is_the_first_stage_only() -> None:
    assert stage_of(0, [10.0, 100.0], ["a", "b"]).devices == ["a", "b"]
    assert stage_of(1, [10.0, 100.0], ["a", "b"]).devices == []
    assert stage_of(1, [10.0, 100.0], ["a", "b"]).percent == 100.0


def test_stages_must_grow_to_the_whole_fleet() -> None:
    with pytest.raises(ValueError):
        Policy(stages=[10.0, 50.0])
    with pytest.raises(ValueError):
        Policy(stages=[50.0, 10.0, 100.0])
    assert DistributorSettings(projects={"p": {"stages": [100.0]}}).policy("p").stages == [100.0]


def test_a_release_id_is_one_per_model_version_target_and_fleet() -> None:
    from visionloop.contracts import ModelRef, Target
    from visionloop.services.distributor.decide import release_id_for

    model = ModelRef(model_id="yard-detector", version=3)
    assert release_id_for(model, "edge-eu", Target.EDGE) == "yard-detector-v3-edge-edge-eu"
    assert len({release_id_for(model, f, t) for f in ("a", "b") for t in (Target.EDGE, Target.SERVER)}) == 4
