"""distributor: step 10 of the loop. A signed package enters the model library, then the fleets.

Consumes `model packaged`, `release command` and `device status`; emits `model registered`
(through the model library, whose schema it owns), `release edge` and `release server`, keyed by
fleet; serves packages over HTTP.

- **Library first** (step 5 of the patent: the new model is in the library before it pre-labels
  anything). Each package is checked (its SHA-256, its signature against the trusted keys, its
  manifest) and registered with alias `candidate`. A server package then becomes `production`
  when the project's policy says so (the recognizer switches to it; `previous` keeps the one it
  replaced, for rollback) and is released to the server fleets.
- **Staged rollout** of edge packages per fleet (`rollout.py`): the canary stage first; the next
  starts when enough of the stage's devices report `activated`; too many `failed` stops the
  release and rolls it back (a `rollback` release: devices return to their last-known-good model).
  A completed edge release makes the package the library's edge `production` model.
- **Commands** (`release command`): `promote` (next stage now), `pause`, `resume`, `rollback`.
- **Package server**: `GET /v1/packages/{sha256}` with range requests and `ETag` = the SHA-256,
  only for packages it released; `GET /v1/releases` for dashboards and `visionloop releases`.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI, Header, HTTPException, Request, Response

from visionloop.contracts import (
    Alias,
    DeviceState,
    DeviceStatus,
    EdgeRelease,
    Envelope,
    ModelPackaged,
    ModelRef,
    ModelRegistered,
    ReleaseAction,
    ReleaseCommand,
    ReleaseCommandKind,
    ServerRelease,
    Target,
)
from visionloop.contracts.release import RolloutStage
from visionloop.libs import library
from visionloop.libs.blob import BlobError
from visionloop.libs.bus import PermanentError, Runtime, Unit
from visionloop.libs.db import migrate, quote_ident
from visionloop.libs.package import PackageError, in_stage, open_package
from visionloop.libs.refusals import install_refusals
from visionloop.libs.service import Adapters, ServiceSpec
from visionloop.libs.signing import TrustStore
from visionloop.services.distributor.config import DistributorSettings
from visionloop.services.distributor.rollout import StageView, Step, decide, stage_of

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")
"""One byte range; 18 digits at most (more is no real offset, and `int()` refuses very long numbers)."""


def release_id_for(model: ModelRef, fleet: str, target: Target) -> str:
    """A release's id: one per model version, target and fleet."""
    return f"{model.model_id}-v{model.version}-{target.value}-{fleet}"


def trust_store(config: DistributorSettings, state_dir: Path) -> TrustStore:
    """The keys whose packages may be released: configured, else those under `<state_dir>/keys/`."""
    if config.trusted_keys:
        return TrustStore.load(config.trusted_keys)
    folder = state_dir / "keys"
    return TrustStore.load([folder]) if folder.is_dir() else TrustStore()


async def releases_report(pool: asyncpg.Pool, schema: str, fleet: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Releases, newest first, with the device states per release (the CLI and dashboards)."""
    s = quote_ident(schema)
    rows = await pool.fetch(
        f"""SELECT r.*, coalesce((SELECT jsonb_object_agg(state, n) FROM (
                    SELECT state, count(*) AS n FROM {s}.release_devices d WHERE d.release_id = r.release_id GROUP BY state) c), '{{}}') AS devices
            FROM {s}.releases r WHERE $1::text IS NULL OR r.fleet = $1 ORDER BY r.created_at DESC LIMIT $2""",
        fleet, limit,
    )
    out = []
    for r in rows:
        row = dict(r)
        row["stages"] = json.loads(row["stages"])
        row["canary_devices"] = json.loads(row["canary_devices"])
        row["devices"] = json.loads(row["devices"]) if isinstance(row["devices"], str) else row["devices"]
        row["created_at"] = row["created_at"].isoformat()
        row["updated_at"] = row["updated_at"].isoformat()
        out.append(row)
    return out


def wire(runtime: Runtime, adapters: Adapters, config: DistributorSettings) -> FastAPI:
    """Register the distributor's handlers; return its package server."""
    blobs = adapters.blobs
    library_schema = runtime.settings.schema_for(library.SERVICE)
    trust = trust_store(config, runtime.settings.state_dir)
    migrated = False

    def trusted(key: str) -> TrustStore:
        """The trust store, read again when a package names a key it does not know yet (a new key pair)."""
        nonlocal trust
        if key not in trust:
            trust = trust_store(config, runtime.settings.state_dir)
        return trust

    def public_url() -> str:
        if config.public_url:
            return config.public_url.rstrip("/")
        return runtime.http_url or f"http://{runtime.settings.http_host}:{config.port}"

    async def library_ready() -> None:
        nonlocal migrated
        if not migrated:
            assert runtime.pool is not None
            await migrate(runtime.pool, library_schema, library.migrations())
            migrated = True

    # -- packages ------------------------------------------------------------------------------------

    async def on_packaged(event: Envelope[ModelPackaged], unit: Unit[Any]) -> None:
        """Check the package, register it in the library, then release it per the project's policy."""
        p, project, s = event.payload, event.project, unit.schema
        policy = config.policy(project)
        try:
            archive = await blobs.get(p.package_uri)
        except BlobError as exc:
            raise PermanentError(f"package_missing: {exc}") from exc
        try:
            opened = open_package(archive, trusted(p.key_id))
        except PackageError as exc:
            raise PermanentError(f"package_refused ({exc.reason}): {exc}") from exc
        manifest = opened.manifest
        model_file = next(f for f in manifest["files"] if f["name"] == opened.spec.model_file)
        if opened.spec.target is not p.target or opened.spec.ref != p.lineage.model:
            raise PermanentError("package_refused (manifest_invalid): the manifest names another model or target than the event")
        artifact_uri = blobs.uri_for(model_file["sha256"])
        if not await blobs.exists(artifact_uri):
            await blobs.put(opened.model, content_type="application/onnx")
        await unit.conn.execute(
            f"""INSERT INTO {s}.packages (package_sha256, package_uri, project, model_id, version, target, precision, size_bytes,
                    signature, key_id, manifest)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb) ON CONFLICT DO NOTHING""",
            p.package_sha256, p.package_uri, project, p.lineage.model.model_id, p.lineage.model.version, p.target.value,
            p.precision.value, p.size_bytes, p.signature, p.key_id, json.dumps(manifest),
        )
        await library_ready()
        new = library.NewEntry(
            model_id=p.lineage.model.model_id, project=project, class_names=p.lineage.class_names,
            input_size=opened.spec.input.width,
            artifact_uri=artifact_uri, artifact_sha256=model_file["sha256"], target=p.target, precision=p.precision,
            version=p.lineage.model.version, artifact_bytes=int(model_file["size"]), metrics=p.metrics,
            parent=p.lineage.parent, dataset_version=p.lineage.dataset_version,
            package_uri=p.package_uri, package_sha256=p.package_sha256,
        )
        try:
            await library.register(unit, new, alias=Alias.CANDIDATE, schema=library_schema)
        except library.LibraryError as exc:
            if exc.reason != "version_exists":
                raise PermanentError(f"library_refused ({exc.reason}): {exc}") from exc
            runtime.counters["already_registered"] += 1
        runtime.counters[f"registered_{p.target.value}"] += 1
        if p.target is Target.SERVER:
            if policy.promote_server:
                await library.set_alias(unit, new.model_id, new.version or 0, Alias.PRODUCTION, target=Target.SERVER, schema=library_schema)
            for fleet in policy.server_fleets:
                await start_release(unit, event, fleet, [100.0], [])
        else:
            for fleet in policy.edge_fleets:
                await start_release(unit, event, fleet, policy.stages, policy.canary_devices)

    async def start_release(unit: Unit[Any], event: Envelope[ModelPackaged], fleet: str, stages: list[float], canary: list[str]) -> None:
        p, s = event.payload, unit.schema
        release_id = release_id_for(p.lineage.model, fleet, p.target)
        if await unit.conn.fetchval(f"SELECT true FROM {s}.releases WHERE release_id = $1", release_id):
            return
        previous = await unit.conn.fetchval(
            f"""SELECT release_id FROM {s}.releases WHERE fleet = $1 AND target = $2 AND status = 'completed'
                ORDER BY updated_at DESC LIMIT 1""",
            fleet, p.target.value,
        )
        await unit.conn.execute(
            f"""UPDATE {s}.releases SET status = 'superseded', updated_at = now()
                WHERE fleet = $1 AND target = $2 AND status IN ('rolling', 'paused')""",
            fleet, p.target.value,
        )
        status = "rolling" if p.target is Target.EDGE else "completed"
        await unit.conn.execute(
            f"""INSERT INTO {s}.releases (release_id, project, fleet, target, model_id, version, package_sha256, stages, canary_devices,
                    status, previous_release)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11)""",
            release_id, event.project, fleet, p.target.value, p.lineage.model.model_id, p.lineage.model.version, p.package_sha256,
            json.dumps(stages), json.dumps(canary), status, previous,
        )
        release = await release_row(unit.conn, s, release_id)
        emit_release(unit, release, ReleaseAction.ACTIVATE, stage_of(0, stages, canary))
        runtime.counters[f"releases_{p.target.value}"] += 1
        if p.target is Target.EDGE:
            await evaluate(unit, release_id)

    async def release_row(conn: asyncpg.Connection, s: str, release_id: str) -> dict[str, Any] | None:
        row = await conn.fetchrow(
            f"""SELECT r.*, p.package_uri, p.signature, p.key_id FROM {s}.releases r
                JOIN {s}.packages p USING (package_sha256) WHERE r.release_id = $1""",
            release_id,
        )
        if row is None:
            return None
        release = dict(row)
        release["stages"] = json.loads(release["stages"])
        release["canary_devices"] = json.loads(release["canary_devices"])
        return release

    def emit_release(unit: Unit[Any], release: dict[str, Any], action: ReleaseAction, stage: RolloutStage,
                     *, rollback_to: ModelRef | None = None, package: dict[str, Any] | None = None) -> None:
        package = package or release
        cls = EdgeRelease if release["target"] == Target.EDGE.value else ServerRelease
        unit.emit(
            cls(
                release_id=release["release_id"],
                fleet=release["fleet"],
                target=Target(release["target"]),
                action=action,
                model=ModelRef(model_id=package["model_id"], version=package["version"]) if action is ReleaseAction.ACTIVATE
                else ModelRef(model_id=release["model_id"], version=release["version"]),
                package_uri=package["package_uri"],
                package_url=f"{public_url()}/v1/packages/{package['package_sha256']}",
                package_sha256=package["package_sha256"],
                signature=package["signature"],
                key_id=package["key_id"],
                stage=stage,
                rollback_to=rollback_to,
            ),
            project=release["project"],
            key=release["fleet"],
        )

    # -- rollout -----------------------------------------------------------------------------------------

    async def evaluate(unit: Unit[Any], release_id: str) -> None:
        """Advance, complete, pause or roll back a rolling release from its devices' reports."""
        s = unit.schema
        await unit.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-release:{release_id}")
        release = await release_row(unit.conn, s, release_id)
        if release is None or release["status"] != "rolling":
            return
        policy = config.policy(release["project"])
        while True:
            index = release["stage_index"]
            stage = stage_of(index, release["stages"], release["canary_devices"])
            view = await stage_view(unit.conn, s, release, stage)
            step = decide(view, last=index == len(release["stages"]) - 1, min_activated_fraction=policy.min_activated_fraction,
                          max_failure_rate=policy.max_failure_rate, auto_rollback=policy.auto_rollback)
            runtime.gauges[f"release.{release_id}.stage"] = float(index)
            if step is Step.WAIT:
                return
            if step is Step.ADVANCE:
                release["stage_index"] = index + 1
                await unit.conn.execute(f"UPDATE {s}.releases SET stage_index = $2, updated_at = now() WHERE release_id = $1", release_id, index + 1)
                emit_release(unit, release, ReleaseAction.ACTIVATE, stage_of(index + 1, release["stages"], release["canary_devices"]))
                runtime.counters["stages_advanced"] += 1
                log.info("release %s: stage %d (%.0f%%) starts", release_id, index + 1, release["stages"][index + 1])
                continue
            if step is Step.COMPLETE:
                await complete(unit, release)
            elif step is Step.PAUSE:
                await set_status(unit, release_id, "paused", f"{view.failed} of {view.addressed} devices failed")
            else:
                await rollback(unit, release, f"{view.failed} of {view.addressed} devices of stage {index} failed")
            return

    async def stage_view(conn: asyncpg.Connection, s: str, release: dict[str, Any], stage: RolloutStage) -> StageView:
        known = await conn.fetch(f"SELECT device_id FROM {s}.devices WHERE fleet = $1", release["fleet"])
        reports = {r["device_id"]: r["state"] for r in await conn.fetch(
            f"SELECT device_id, state FROM {s}.release_devices WHERE release_id = $1", release["release_id"]
        )}
        addressed = {r["device_id"] for r in known if in_stage(r["device_id"], stage)}
        addressed |= {d for d, state in reports.items() if state in (DeviceState.ACTIVATED.value, DeviceState.FAILED.value)}
        return StageView(
            addressed=len(addressed),
            activated=sum(reports.get(d) == DeviceState.ACTIVATED.value for d in addressed),
            failed=sum(reports.get(d) == DeviceState.FAILED.value for d in addressed),
        )

    async def set_status(unit: Unit[Any], release_id: str, status: str, reason: str | None = None) -> None:
        await unit.conn.execute(
            f"UPDATE {unit.schema}.releases SET status = $2, reason = $3, updated_at = now() WHERE release_id = $1", release_id, status, reason
        )
        runtime.counters[f"releases_{status}"] += 1
        log.info("release %s: %s%s", release_id, status, f" ({reason})" if reason else "")

    async def complete(unit: Unit[Any], release: dict[str, Any], reason: str | None = None) -> None:
        await set_status(unit, release["release_id"], "completed", reason)
        await library_ready()
        if release["target"] == Target.EDGE.value:
            await library.set_alias(unit, release["model_id"], release["version"], Alias.PRODUCTION, target=Target.EDGE, schema=library_schema)

    async def rollback(unit: Unit[Any], release: dict[str, Any], reason: str) -> None:
        s = unit.schema
        await set_status(unit, release["release_id"], "rolled_back", reason)
        previous = await release_row(unit.conn, s, release["previous_release"]) if release["previous_release"] else None
        target = Target(release["target"])
        if previous is not None:
            await library_ready()
            await library.set_alias(unit, previous["model_id"], previous["version"], Alias.PRODUCTION, target=target, schema=library_schema)
        emit_release(
            unit, release, ReleaseAction.ROLLBACK, RolloutStage(index=len(release["stages"]) - 1, percent=100.0),
            rollback_to=ModelRef(model_id=previous["model_id"], version=previous["version"]) if previous else None,
            package=previous,
        )

    # -- device reports and commands -----------------------------------------------------------------------

    async def on_device(event: Envelope[DeviceStatus], unit: Unit[Any]) -> None:
        """Record a device's report; a report on a rolling release may move its rollout on."""
        d, s = event.payload, unit.schema
        active = f"{d.active_model.model_id}:v{d.active_model.version}" if d.active_model else None
        await unit.conn.execute(
            f"""INSERT INTO {s}.devices (fleet, device_id, state, release_id, active_model) VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (fleet, device_id) DO UPDATE SET state = EXCLUDED.state, last_seen = now(),
                    release_id = coalesce(EXCLUDED.release_id, {s}.devices.release_id),
                    active_model = coalesce(EXCLUDED.active_model, {s}.devices.active_model)""",
            d.fleet, d.device_id, d.state.value, d.release_id, active,
        )
        runtime.counters[f"device_{d.state.value}"] += 1
        if d.state is DeviceState.HEARTBEAT or d.release_id is None:
            return
        await unit.conn.execute(
            f"INSERT INTO {s}.device_events (fleet, device_id, release_id, state, reason, message) VALUES ($1, $2, $3, $4, $5, $6)",
            d.fleet, d.device_id, d.release_id, d.state.value, d.reason.value if d.reason else None, d.message,
        )
        await unit.conn.execute(
            f"""INSERT INTO {s}.release_devices (release_id, device_id, state, reason, message) VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (release_id, device_id) DO UPDATE SET state = EXCLUDED.state, reason = EXCLUDED.reason,
                    message = EXCLUDED.message, updated_at = now()""",
            d.release_id, d.device_id, d.state.value, d.reason.value if d.reason else None, d.message,
        )
        if d.state in (DeviceState.ACTIVATED, DeviceState.FAILED):
            await evaluate(unit, d.release_id)

    async def on_command(event: Envelope[ReleaseCommand], unit: Unit[Any]) -> None:
        """An operator's promote, pause, resume or rollback."""
        c, s = event.payload, unit.schema
        release_id = c.release_id or await unit.conn.fetchval(
            f"SELECT release_id FROM {s}.releases WHERE fleet = $1 ORDER BY created_at DESC LIMIT 1", c.fleet
        )
        release = await release_row(unit.conn, s, release_id) if release_id else None
        if release is None:
            raise PermanentError(f"unknown_release: no release {c.release_id or 'for fleet ' + str(c.fleet)!r}")
        await unit.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"vl-release:{release['release_id']}")
        release = await release_row(unit.conn, s, release["release_id"])
        assert release is not None
        why = f"{c.command.value} by {c.issued_by}" + (f": {c.reason}" if c.reason else "")
        runtime.counters[f"command_{c.command.value}"] += 1
        if c.command is ReleaseCommandKind.ROLLBACK:
            if release["status"] == "rolled_back":
                return
            await rollback(unit, release, why)
        elif c.command is ReleaseCommandKind.PAUSE:
            if release["status"] == "rolling":
                await set_status(unit, release["release_id"], "paused", why)
        elif c.command is ReleaseCommandKind.RESUME:
            if release["status"] == "paused":
                await set_status(unit, release["release_id"], "rolling", why)
                await evaluate(unit, release["release_id"])
        elif c.command is ReleaseCommandKind.PROMOTE:
            if release["status"] not in ("rolling", "paused"):
                raise PermanentError(f"release_not_active: {release['release_id']} is {release['status']}")
            index = release["stage_index"]
            if index >= len(release["stages"]) - 1:
                await complete(unit, release, why)
                return
            await unit.conn.execute(
                f"UPDATE {s}.releases SET stage_index = $2, status = 'rolling', reason = $3, updated_at = now() WHERE release_id = $1",
                release["release_id"], index + 1, why,
            )
            emit_release(unit, release, ReleaseAction.ACTIVATE, stage_of(index + 1, release["stages"], release["canary_devices"]))

    runtime.consume(ModelPackaged, on_packaged)
    runtime.consume(DeviceStatus, on_device)
    runtime.consume(ReleaseCommand, on_command)
    runtime.produces(ModelRegistered, EdgeRelease, ServerRelease)
    return package_server(runtime, blobs, config)


def package_server(runtime: Runtime, blobs: Any, config: DistributorSettings) -> FastAPI:
    """The HTTP face: packages by SHA-256 (ranges, ETag) and releases."""
    app = FastAPI(title="visionloop distributor", version="1", docs_url=None, redoc_url=None)
    install_refusals(app)
    token = config.release_token.get_secret_value() if config.release_token else None

    def authorise(authorization: str | None) -> None:
        # Compared in constant time, so the answer's timing says nothing about the token.
        if token is not None and not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, detail={"reason": "unauthorised", "message": "a valid bearer token is required"},
                                headers={"WWW-Authenticate": 'Bearer realm="visionloop"'})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def package(sha256: str, request: Request, authorization: str | None = Header(default=None),
                      range_: str | None = Header(default=None, alias="Range"),
                      if_none_match: str | None = Header(default=None, alias="If-None-Match")) -> Response:
        authorise(authorization)
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HTTPException(400, detail={"reason": "invalid_sha256", "message": "packages are addressed by 64 lowercase hex digits"})
        assert runtime.pool is not None
        known = await runtime.pool.fetchval(f"SELECT true FROM {quote_ident(runtime.schema)}.packages WHERE package_sha256 = $1", sha256)
        if not known:
            raise HTTPException(404, detail={"reason": "unknown_package", "message": "no released package has this SHA-256"})
        stat = await blobs.stat(sha256)
        etag = f'"{sha256}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/x-tar"}
        if if_none_match == etag:
            return Response(status_code=304, headers=headers)
        start, end, status = 0, stat.size, 200
        if range_:
            match = _RANGE.match(range_.strip())
            if not match or (not match.group(1) and not match.group(2)):
                raise HTTPException(416, detail={"reason": "bad_range", "message": "use a single range: bytes=START-END"},
                                    headers={"Content-Range": f"bytes */{stat.size}"})
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)) + 1, stat.size) if match.group(2) else stat.size
            else:
                start = max(0, stat.size - int(match.group(2)))
            if start >= stat.size or end <= start:
                raise HTTPException(416, detail={"reason": "range_not_satisfiable", "message": f"the package has {stat.size} bytes"},
                                    headers={"Content-Range": f"bytes */{stat.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{stat.size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        body = await blobs.get(sha256) if status == 200 else await blobs.open_range(sha256, start, end)
        return Response(content=body, status_code=status, headers=headers)

    # One route per method, so each has its own operation id in the OpenAPI document.
    app.add_api_route("/v1/packages/{sha256}", package, methods=["GET"], operation_id="get_package")
    app.add_api_route("/v1/packages/{sha256}", package, methods=["HEAD"], operation_id="head_package")

    @app.get("/v1/releases")
    async def releases(fleet: str | None = None, authorization: str | None = Header(default=None)) -> list[dict[str, Any]]:
        authorise(authorization)
        assert runtime.pool is not None
        return await releases_report(runtime.pool, runtime.schema, fleet)

    return app


SPEC = ServiceSpec(
    name="distributor",
    description="Registers signed packages in the model library and releases them to fleets with staged rollout and rollback.",
    wire=wire,
    settings=DistributorSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
