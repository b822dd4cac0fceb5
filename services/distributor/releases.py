"""Releases: starting one per fleet, emitting its `release edge` / `release server` events, and
moving a staged rollout on (advance, complete, pause, roll back) from its devices' reports."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from visionloop.contracts import (
    Alias,
    DeviceState,
    EdgeRelease,
    Envelope,
    ModelPackaged,
    ModelRef,
    ReleaseAction,
    ServerRelease,
    Target,
)
from visionloop.contracts.release import RolloutStage
from visionloop.libs import library
from visionloop.libs.bus import Runtime, Unit
from visionloop.libs.db import migrate
from visionloop.libs.package import in_stage
from visionloop.libs.signing import TrustStore
from visionloop.services.distributor import store
from visionloop.services.distributor.config import DistributorSettings
from visionloop.services.distributor.decide import (
    NO_DEVICES,
    StageView,
    Step,
    next_step,
    release_id_for,
    stage_of,
)

log = logging.getLogger("visionloop.services.distributor.service")


def trust_store(config: DistributorSettings, state_dir: Path) -> TrustStore:
    """The keys whose packages may be released: configured, else those under `<state_dir>/keys/`."""
    if config.trusted_keys:
        return TrustStore.load(config.trusted_keys)
    folder = state_dir / "keys"
    return TrustStore.load([folder]) if folder.is_dir() else TrustStore()


class Releases:
    """The distributor's release work for one runtime (its handlers' context)."""

    def __init__(self, runtime: Runtime, config: DistributorSettings, blobs: Any) -> None:
        self.runtime, self.config, self.blobs = runtime, config, blobs
        self.counters: Counter[str] = runtime.counters
        self.trust = trust_store(config, runtime.settings.state_dir)
        self.library_schema = runtime.settings.schema_for(library.SERVICE)
        self.migrated = False

    def trusted(self, key: str) -> TrustStore:
        """The trust store, read again when a package names a key it does not know yet (a new key pair)."""
        if key not in self.trust:
            self.trust = trust_store(self.config, self.runtime.settings.state_dir)
        return self.trust

    def public_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        return self.runtime.http_url or f"http://{self.runtime.settings.http_host}:{self.config.port}"

    async def library_ready(self) -> None:
        if not self.migrated:
            assert self.runtime.pool is not None
            await migrate(self.runtime.pool, self.library_schema, library.migrations())
            self.migrated = True

    async def start(self, unit: Unit[Any], event: Envelope[ModelPackaged], fleet: str, stages: list[float], canary: list[str]) -> None:
        """A release of the package to `fleet` (once), superseding the fleet's active one."""
        p, s = event.payload, unit.schema
        release_id = release_id_for(p.lineage.model, fleet, p.target)
        if await store.release_exists(unit.conn, s, release_id):
            return
        previous = await store.supersede(unit.conn, s, fleet, p.target.value)
        status = "rolling" if p.target is Target.EDGE else "completed"
        await store.add_release(unit.conn, s, release_id=release_id, project=event.project, fleet=fleet, p=p, stages=stages,
                                canary=canary, status=status, previous=previous)
        release = await store.release(unit.conn, s, release_id)
        assert release is not None
        self.emit(unit, release, ReleaseAction.ACTIVATE, stage_of(0, stages, canary))
        self.counters[f"releases_{p.target.value}"] += 1
        log.info("release %s to %s: stage 1 of %d (%s) starts", release_id, fleet, len(stages),
                 f"canary {', '.join(canary)}" if canary else f"{stages[0]:.0f}%")
        if p.target is Target.EDGE:
            await self.evaluate(unit, release_id)

    def emit(self, unit: Unit[Any], release: dict[str, Any], action: ReleaseAction, stage: RolloutStage,
             *, rollback_to: ModelRef | None = None, package: dict[str, Any] | None = None) -> None:
        package = package or release
        cls = EdgeRelease if release["target"] == Target.EDGE.value else ServerRelease
        model = (ModelRef(model_id=package["model_id"], version=package["version"]) if action is ReleaseAction.ACTIVATE
                 else ModelRef(model_id=release["model_id"], version=release["version"]))
        unit.emit(
            cls(release_id=release["release_id"], fleet=release["fleet"], target=Target(release["target"]), action=action, model=model,
                package_uri=package["package_uri"], package_url=f"{self.public_url()}/v1/packages/{package['package_sha256']}",
                package_sha256=package["package_sha256"], signature=package["signature"], key_id=package["key_id"], stage=stage,
                rollback_to=rollback_to),
            project=release["project"], key=release["fleet"],
        )

    async def evaluate(self, unit: Unit[Any], release_id: str) -> None:
        """Advance, complete, pause or roll back a rolling release from its devices' reports."""
        s = unit.schema
        await store.lock_release(unit.conn, release_id)
        release = await store.release(unit.conn, s, release_id)
        if release is None or release["status"] != "rolling":
            return
        policy = self.config.policy(release["project"])
        while True:
            index = release["stage_index"]
            stage = stage_of(index, release["stages"], release["canary_devices"])
            view = await self.stage_view(unit, release, stage)
            step = next_step(view, last=index == len(release["stages"]) - 1, min_activated_fraction=policy.min_activated_fraction,
                             max_failure_rate=policy.max_failure_rate, auto_rollback=policy.auto_rollback)
            self.runtime.gauges[f"release.{release_id}.stage"] = float(index)
            if view.fleet and release["reason"] == NO_DEVICES:  # the first device has come
                await store.set_status(unit.conn, unit.schema, release_id, "rolling", None)
                release["reason"] = None
            if step is Step.WAIT:
                if view.fleet == 0 and release["reason"] != NO_DEVICES:
                    await store.set_status(unit.conn, unit.schema, release_id, "rolling", NO_DEVICES)
                    log.info("release %s: %s", release_id, NO_DEVICES)
                return
            if step is Step.ADVANCE:
                await self.advance(unit, release, index)
                continue
            if step is Step.COMPLETE:
                await self.complete(unit, release)
            elif step is Step.PAUSE:
                await self.set_status(unit, release_id, "paused", f"{view.failed} of {view.addressed} devices failed")
            else:
                await self.rollback(unit, release, f"{view.failed} of {view.addressed} devices of stage {index} failed")
            return

    async def advance(self, unit: Unit[Any], release: dict[str, Any], index: int, *, reason: str | None = None,
                      resume: bool = False) -> None:
        """The next stage starts now."""
        release["stage_index"] = index + 1
        await store.set_stage(unit.conn, unit.schema, release["release_id"], index + 1, reason=reason, resume=resume)
        self.emit(unit, release, ReleaseAction.ACTIVATE, stage_of(index + 1, release["stages"], release["canary_devices"]))
        if not resume:
            self.counters["stages_advanced"] += 1
            log.info("release %s: stage %d (%.0f%%) starts", release["release_id"], index + 1, release["stages"][index + 1])

    async def stage_view(self, unit: Unit[Any], release: dict[str, Any], stage: RolloutStage) -> StageView:
        known = await store.fleet_devices(unit.conn, unit.schema, release["fleet"])
        reports = await store.device_reports(unit.conn, unit.schema, release["release_id"])
        addressed = {d for d in known if in_stage(d, stage)}
        addressed |= {d for d, state in reports.items() if state in (DeviceState.ACTIVATED.value, DeviceState.FAILED.value)}
        return StageView(
            fleet=len(set(known) | set(reports)),
            addressed=len(addressed),
            activated=sum(reports.get(d) == DeviceState.ACTIVATED.value for d in addressed),
            failed=sum(reports.get(d) == DeviceState.FAILED.value for d in addressed),
        )

    async def set_status(self, unit: Unit[Any], release_id: str, status: str, reason: str | None = None) -> None:
        await store.set_status(unit.conn, unit.schema, release_id, status, reason)
        self.counters[f"releases_{status}"] += 1
        log.info("release %s: %s%s", release_id, status, f" ({reason})" if reason else "")

    async def complete(self, unit: Unit[Any], release: dict[str, Any], reason: str | None = None) -> None:
        await self.set_status(unit, release["release_id"], "completed", reason)
        await self.library_ready()
        if release["target"] == Target.EDGE.value:
            await library.set_alias(unit, release["model_id"], release["version"], Alias.PRODUCTION, target=Target.EDGE,
                                    schema=self.library_schema)

    async def rollback(self, unit: Unit[Any], release: dict[str, Any], reason: str) -> None:
        await self.set_status(unit, release["release_id"], "rolled_back", reason)
        previous = await store.release(unit.conn, unit.schema, release["previous_release"]) if release["previous_release"] else None
        target = Target(release["target"])
        if previous is not None:
            await self.library_ready()
            await library.set_alias(unit, previous["model_id"], previous["version"], Alias.PRODUCTION, target=target,
                                    schema=self.library_schema)
        self.emit(
            unit, release, ReleaseAction.ROLLBACK, RolloutStage(index=len(release["stages"]) - 1, percent=100.0),
            rollback_to=ModelRef(model_id=previous["model_id"], version=previous["version"]) if previous else None,
            package=previous,
        )
