"""The distributor's handlers, one per consumed topic: `model packaged` (check, register in the
model library, release per the project's policy), `device status` (a report may move a rollout
on) and `release command` (an operator's promote, pause, resume or rollback). The context (the
release work, `releases.Releases`) comes first; the wiring binds it."""

from __future__ import annotations

from typing import Any

from visionloop.contracts import (
    Alias,
    DeviceState,
    DeviceStatus,
    Envelope,
    ModelPackaged,
    ReleaseCommand,
    ReleaseCommandKind,
    Target,
)
from visionloop.libs import library
from visionloop.libs.blob import BlobError
from visionloop.libs.bus import PermanentError, Unit
from visionloop.libs.package import PackageError, open_package
from visionloop.services.distributor import store
from visionloop.services.distributor.releases import Releases


async def on_packaged(ctx: Releases, event: Envelope[ModelPackaged], unit: Unit[Any]) -> None:
    """Check the package, register it in the library, then release it per the project's policy."""
    p, project = event.payload, event.project
    policy = ctx.config.policy(project)
    new = await _checked_entry(ctx, event, unit)
    try:
        await library.register(unit, new, alias=Alias.CANDIDATE, schema=ctx.library_schema)
    except library.LibraryError as exc:
        if exc.reason != "version_exists":
            raise PermanentError(f"library_refused ({exc.reason}): {exc}") from exc
        ctx.counters["already_registered"] += 1
    ctx.counters[f"registered_{p.target.value}"] += 1
    if p.target is Target.SERVER:
        if policy.promote_server:
            await library.set_alias(unit, new.model_id, new.version or 0, Alias.PRODUCTION, target=Target.SERVER, schema=ctx.library_schema)
        for fleet in policy.server_fleets:
            await ctx.start(unit, event, fleet, [100.0], [])
    else:
        for fleet in policy.edge_fleets:
            await ctx.start(unit, event, fleet, policy.stages, policy.canary_devices)


async def _checked_entry(ctx: Releases, event: Envelope[ModelPackaged], unit: Unit[Any]) -> library.NewEntry:
    """The package opened against the trusted keys, its model stored, the package recorded; its library entry."""
    p, project = event.payload, event.project
    try:
        archive = await ctx.blobs.get(p.package_uri)
    except BlobError as exc:
        raise PermanentError(f"package_missing: {exc}") from exc
    try:
        opened = open_package(archive, ctx.trusted(p.key_id))
    except PackageError as exc:
        raise PermanentError(f"package_refused ({exc.reason}): {exc}") from exc
    model_file = next(f for f in opened.manifest["files"] if f["name"] == opened.spec.model_file)
    if opened.spec.target is not p.target or opened.spec.ref != p.lineage.model:
        raise PermanentError("package_refused (manifest_invalid): the manifest names another model or target than the event")
    artifact_uri = ctx.blobs.uri_for(model_file["sha256"])
    if not await ctx.blobs.exists(artifact_uri):
        await ctx.blobs.put(opened.model, content_type="application/onnx")
    await store.record_package(unit.conn, unit.schema, p, project, opened.manifest)
    await ctx.library_ready()
    return library.NewEntry(
        model_id=p.lineage.model.model_id, project=project, class_names=p.lineage.class_names, input_size=opened.spec.input.width,
        artifact_uri=artifact_uri, artifact_sha256=model_file["sha256"], target=p.target, precision=p.precision,
        version=p.lineage.model.version, artifact_bytes=int(model_file["size"]), metrics=p.metrics,
        parent=p.lineage.parent, dataset_version=p.lineage.dataset_version, package_uri=p.package_uri, package_sha256=p.package_sha256,
    )


async def on_device(ctx: Releases, event: Envelope[DeviceStatus], unit: Unit[Any]) -> None:
    """Record a device's report; a report on a rolling release, or the first word of a device new to
    the fleet, may move a rollout on."""
    d = event.payload
    new = await store.record_device(unit.conn, unit.schema, d)
    ctx.counters[f"device_{d.state.value}"] += 1
    if new:  # a release that waited for a device in this fleet may go on
        for release_id in await store.rolling_releases(unit.conn, unit.schema, d.fleet):
            await ctx.evaluate(unit, release_id)
    if d.state is DeviceState.HEARTBEAT or d.release_id is None:
        return
    await store.record_release_report(unit.conn, unit.schema, d)
    if d.state in (DeviceState.ACTIVATED, DeviceState.FAILED):
        await ctx.evaluate(unit, d.release_id)


async def on_command(ctx: Releases, event: Envelope[ReleaseCommand], unit: Unit[Any]) -> None:
    """An operator's promote, pause, resume or rollback."""
    c, s = event.payload, unit.schema
    release_id = c.release_id or await store.latest_release(unit.conn, s, c.fleet)
    release = await store.release(unit.conn, s, release_id) if release_id else None
    if release is None:
        raise PermanentError(f"unknown_release: no release {c.release_id or 'for fleet ' + str(c.fleet)!r}")
    await store.lock_release(unit.conn, release["release_id"])
    release = await store.release(unit.conn, s, release["release_id"])
    assert release is not None
    why = f"{c.command.value} by {c.issued_by}" + (f": {c.reason}" if c.reason else "")
    ctx.counters[f"command_{c.command.value}"] += 1
    if c.command is ReleaseCommandKind.ROLLBACK:
        if release["status"] != "rolled_back":
            await ctx.rollback(unit, release, why)
    elif c.command is ReleaseCommandKind.PAUSE:
        if release["status"] == "rolling":
            await ctx.set_status(unit, release["release_id"], "paused", why)
    elif c.command is ReleaseCommandKind.RESUME:
        if release["status"] == "paused":
            await ctx.set_status(unit, release["release_id"], "rolling", why)
            await ctx.evaluate(unit, release["release_id"])
    elif c.command is ReleaseCommandKind.PROMOTE:
        if release["status"] not in ("rolling", "paused"):
            raise PermanentError(f"release_not_active: {release['release_id']} is {release['status']}")
        index = release["stage_index"]
        if index >= len(release["stages"]) - 1:
            await ctx.complete(unit, release, why)
        else:
            await ctx.advance(unit, release, index, reason=why, resume=True)
