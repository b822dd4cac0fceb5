"""The dashboard: one page that shows the loop at work, refreshed every 2 s.

Five panels, each from what the gateway may know without talking to another service:

- **services**: the latest `pipeline.status` of every instance (state, uptime, handled, dead
  letters), its throughput — the growth of the monotonic `handled` counter between its last two
  heartbeats, divided by the growth of its uptime — and the consumer lag of each service's
  consumer groups, read from the broker by `observe.snapshot` (cached for `LAG_TTL_S`);
- **queue**: the gateway's own open tasks by project, kind and state;
- **models**: the model library (a shared read model: `ModelLibrary.entries`), with metrics and aliases;
- **releases**: `release.edge` and `release.server` events (the latest stage of each release)
  and the latest `device.status` of each device per release, counted by state;
- **economy** (per project, as inline SVG plots): test mAP50-95, human seconds, auto-accept rate
  and precision per model version, and queue depth over time (economy.py says how each is
  measured). It follows `model.evaluated` here; service.py's `label.verified` handler records
  how each label set was verified (`economy_store.record_verified`).

Heartbeats, releases and device reports are kept in tables (`0002_dashboard.sql`), not in
memory: gateway replicas share one consumer group per topic, so each sees only part of them.

Routes: `GET /dashboard` (the page) and `GET /dashboard/static/{name}` are public and carry no
data; the page asks for a token (or takes `?token=` once), keeps it in sessionStorage and polls
`GET /v1/dashboard`, which needs any valid token (annotator and up). A project token sees its
project's queue and models; an all-projects token sees every project's. Services and releases
are operational facts shared by every project and shown to every token. The economy is read
per project, less often: `GET /v1/projects/{project}/economy` (the numbers, JSON) and
`GET /v1/projects/{project}/economy/plots` (the same as SVG), with a token of that project.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from visionloop.contracts import (
    TOPICS,
    DeviceStatus,
    EdgeRelease,
    Envelope,
    ModelEvaluated,
    PipelineStatus,
    ServerRelease,
)
from visionloop.contracts.release import DeviceState, Release, ReleaseAction
from visionloop.contracts.status import StatusKind
from visionloop.libs.bus import Runtime, Unit
from visionloop.libs.kafka import client_kwargs
from visionloop.libs.library import ModelLibrary
from visionloop.libs.settings import Settings
from visionloop.services.labeling_gateway import economy_store, store
from visionloop.services.labeling_gateway.api import ProjectPath
from visionloop.services.labeling_gateway.auth import Principal, Role
from visionloop.services.labeling_gateway.decide import Refusal
from visionloop.services.labeling_gateway.economy import EconomyOut, assemble
from visionloop.services.labeling_gateway.http import Gateway, RefusalAnswer, guard, role_extra
from visionloop.services.labeling_gateway.svg import economy_plots

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
LAG_TTL_S = 5.0
"""Consumer lag is read from the broker at most this often (it costs a client per group)."""
SHOWN_FOR_S = 900.0
"""Instances silent for longer than this leave the services panel."""
RELEASES_SHOWN = 50
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"


# -- decisions ----------------------------------------------------------------------------------------


def handled_per_s(previous: tuple[float, int] | None, uptime_s: float, handled: int) -> float | None:
    """Events handled per second between two statuses of one instance, as (uptime, handled).

    None for the first status, or when uptime or the counter went backwards (a restart under
    the same instance name: its counters started again from zero).
    """
    if previous is None:
        return None
    dt, dn = uptime_s - previous[0], handled - previous[1]
    if dt <= 0 or dn < 0:
        return None
    return dn / dt


def dead_lettered(counters: dict[str, int]) -> int:
    """Messages an instance sent to the dead-letter topic (every reason)."""
    return sum(v for k, v in counters.items() if k.startswith("dead_lettered"))


def instance_state(kind: str, seen_s_ago: float, heartbeat_s: float) -> str:
    """`running`, `stopped`, `failed`, or `silent` when three heartbeats (at least 15 s) are missing."""
    if kind in ("stopped", "failed"):
        return kind
    return "silent" if seen_s_ago > max(3 * heartbeat_s, 15.0) else "running"


def release_status(action: str, stage_index: int, stage_percent: float) -> str:
    """What the latest event of a release says: `rollback`, `complete` (the whole fleet),
    `canary` (stage 0) or `rolling out`."""
    if action == ReleaseAction.ROLLBACK.value:
        return "rollback"
    if stage_percent >= 100.0:
        return "complete"
    return "canary" if stage_index == 0 else "rolling out"


def group_owner(group: str, topic_prefix: str) -> tuple[str, str] | None:
    """(service, topic) of a consumer group named as the bus names them,
    `<topic prefix><service>.<event type>[.<suffix>]`; None for anyone else's group."""
    if not group.startswith(topic_prefix):
        return None
    service, _, rest = group[len(topic_prefix):].partition(".")
    if not service or not rest:
        return None
    # The longest event type that fits (`release.edge` before `release`).
    for spec in sorted(TOPICS.values(), key=lambda s: -len(s.payload.event_type)):
        event_type = spec.payload.event_type
        if rest == event_type or rest.startswith(event_type + "."):
            return service, topic_prefix + spec.name
    return None


# -- the read model: handlers of the topics the dashboard follows ---------------------------------------


async def on_status(event: Envelope[PipelineStatus], unit: Unit[Any]) -> None:
    """Keep each instance's latest status and its throughput since the one before."""
    p, s = event.payload, unit.schema
    if p.kind is StatusKind.PROGRESS:
        return  # progress reports carry counters too, but say nothing new about the instance
    prev = await unit.conn.fetchrow(
        f"""SELECT uptime_s, coalesce((counters->>'handled')::bigint, 0) AS handled, handled_per_s, occurred_at
            FROM {s}.dash_instances WHERE service = $1 AND instance = $2 FOR UPDATE""",
        p.service, p.instance,
    )
    if prev is not None and prev["occurred_at"] > event.occurred_at:
        return  # an older status, redelivered
    handled = int(p.counters.get("handled", 0))
    rate = handled_per_s((prev["uptime_s"], prev["handled"]) if prev else None, p.uptime_s, handled)
    if rate is None and prev is not None and p.uptime_s >= prev["uptime_s"] and handled >= prev["handled"]:
        rate = prev["handled_per_s"]  # the same instant twice: keep the last rate
    await unit.conn.execute(
        f"""INSERT INTO {s}.dash_instances (service, instance, kind, uptime_s, counters, gauges, handled_per_s, occurred_at)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8)
            ON CONFLICT (service, instance) DO UPDATE SET kind = excluded.kind, uptime_s = excluded.uptime_s,
                counters = excluded.counters, gauges = excluded.gauges, handled_per_s = excluded.handled_per_s,
                occurred_at = excluded.occurred_at""",
        p.service, p.instance, p.kind.value, p.uptime_s, _json(p.counters), _json(p.gauges), rate, event.occurred_at,
    )


async def on_release(event: Envelope[Release], unit: Unit[Any]) -> None:
    """Keep the latest stage of each release."""
    p, s = event.payload, unit.schema
    kind = "edge" if isinstance(p, EdgeRelease) else "server"
    rollback_to = f"{p.rollback_to.model_id} v{p.rollback_to.version}" if p.rollback_to else None
    await unit.conn.execute(
        f"""INSERT INTO {s}.dash_releases (release_id, kind, fleet, target, action, model_id, model_version, rollback_to,
                                           stage_index, stage_percent, first_at, occurred_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)
            ON CONFLICT (release_id) DO UPDATE SET action = excluded.action, rollback_to = excluded.rollback_to,
                stage_index = excluded.stage_index, stage_percent = excluded.stage_percent,
                first_at = least(dash_releases.first_at, excluded.first_at), occurred_at = excluded.occurred_at
            WHERE dash_releases.occurred_at <= excluded.occurred_at""",
        p.release_id, kind, p.fleet, p.target.value, p.action.value, p.model.model_id, p.model.version, rollback_to,
        p.stage.index, p.stage.percent, event.occurred_at,
    )


async def on_device(event: Envelope[DeviceStatus], unit: Unit[Any]) -> None:
    """Keep each device's latest state per release (a heartbeat only says it is alive)."""
    p, s = event.payload, unit.schema
    active = f"{p.active_model.model_id} v{p.active_model.version}" if p.active_model else None
    heartbeat = p.state is DeviceState.HEARTBEAT
    await unit.conn.execute(
        f"""INSERT INTO {s}.dash_devices AS d (release_id, device_id, fleet, state, reason, active_model, occurred_at, last_seen)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
            ON CONFLICT (release_id, device_id) DO UPDATE SET
                last_seen = greatest(d.last_seen, excluded.last_seen),
                active_model = CASE WHEN excluded.occurred_at >= d.occurred_at THEN coalesce(excluded.active_model, d.active_model) ELSE d.active_model END,
                state = CASE WHEN NOT $8 AND excluded.occurred_at >= d.occurred_at THEN excluded.state ELSE d.state END,
                reason = CASE WHEN NOT $8 AND excluded.occurred_at >= d.occurred_at THEN excluded.reason ELSE d.reason END,
                occurred_at = CASE WHEN NOT $8 AND excluded.occurred_at >= d.occurred_at THEN excluded.occurred_at ELSE d.occurred_at END""",
        p.release_id or "", p.device_id, p.fleet, p.state.value, p.reason.value if p.reason else None, active,
        event.occurred_at, heartbeat,
    )


async def on_evaluated(event: Envelope[ModelEvaluated], unit: Unit[Any]) -> None:
    """Keep each model version's latest test-set metrics (the economy's mAP)."""
    await economy_store.record_evaluation(unit.conn, unit.schema, event.project, event.payload, event.occurred_at)


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True)


# -- consumer lag, from the broker ----------------------------------------------------------------------


async def consumer_groups(settings: Settings) -> list[tuple[str, str, str]]:
    """(service, topic, group) of every consumer group of this deployment the broker knows."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_kwargs(settings))  # type: ignore[arg-type]
    await admin.start()
    try:
        listed = await admin.list_consumer_groups()
    finally:
        await admin.close()
    found = []
    for group, *_ in listed:
        owner = group_owner(group, settings.topic_prefix)
        if owner is not None:
            found.append((owner[0], owner[1], group))
    return sorted(found)


class LagCache:
    """Consumer lag per group, refreshed by a background worker at most every `ttl_s`, and only
    while someone looks at the dashboard."""

    def __init__(self, settings: Settings, ttl_s: float = LAG_TTL_S) -> None:
        self.settings = settings
        self.ttl_s = ttl_s
        self.lags: list[dict[str, Any]] = []
        self.read_at: datetime | None = None
        self.error: str | None = None
        self._checked = 0.0
        self._wanted = asyncio.Event()
        self._fresh = asyncio.Event()

    async def current(self, wait_s: float = 8.0) -> None:
        """Ask for a refresh when the lag is older than `ttl_s`; the first call waits for it."""
        if time.monotonic() - self._checked >= self.ttl_s:
            self._wanted.set()
        if self.read_at is None and self.error is None:
            try:
                await asyncio.wait_for(self._fresh.wait(), wait_s)
            except TimeoutError:
                pass

    async def work(self) -> None:
        """The background worker (`runtime.background`)."""
        from visionloop.libs.observe import snapshot

        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                groups = await asyncio.wait_for(consumer_groups(self.settings), 10)
                owners = {group: service for service, _, group in groups}
                snap = await asyncio.wait_for(snapshot(self.settings, [(topic, group) for _, topic, group in groups]), 30)
                self.lags = [
                    {"service": owners[g.group], "group": g.group, "topic": g.topic, "committed": g.committed, "end": g.end, "lag": g.lag}
                    for g in snap.lags
                ]
                self.read_at, self.error = datetime.now(UTC), None
            except Exception as exc:  # the broker is advisory here: show the last lag and why it is old
                log.warning("labeling-gateway: dashboard lag not read: %r", exc)
                self.error = f"{type(exc).__name__}: {exc}"[:300]
            self._checked = time.monotonic()
            self._fresh.set()
            await asyncio.sleep(self.ttl_s)


# -- the answer ---------------------------------------------------------------------------------------


class GroupLagOut(BaseModel):
    """How far one consumer group is behind."""

    service: str
    group: str
    topic: str
    committed: int
    end: int
    lag: int = Field(description="Messages on the topic the group has not handled and committed yet.")


class ServiceOut(BaseModel):
    """One service instance, from its latest status event."""

    service: str
    instance: str
    state: str = Field(description="running, silent (three heartbeats missing), stopped or failed.")
    seen_s_ago: float
    uptime_s: float
    handled: int = Field(description="Events handled since the instance started.")
    received: int
    handled_per_s: float | None = Field(description="Throughput between its last two heartbeats.")
    dead_lettered: int
    lag: int | None = Field(description="Sum of the lag of the service's consumer groups (null: not read yet).")


class QueueOut(BaseModel):
    """Open tasks of one kind in one project, by state."""

    project: str
    kind: str
    verifying: int = Field(0, description="Pre-labels with the verifier (not handed out).")
    queued: int = Field(0, description="Waiting for a labeller.")
    leased: int = Field(0, description="Held by a labeller now.")
    submitted: int = Field(0, description="Answered, with the verifier.")
    total: int = 0
    reasons: dict[str, int] = Field(default_factory=dict, description=(
        "Queued and leased tasks by why they are for people (the task's `reason`; `unknown` for tasks made before reasons were kept)."))


class ModelOut(BaseModel):
    """One entry of the model library."""

    project: str
    model_id: str
    version: int
    target: str
    precision: str
    aliases: list[str]
    map50_95: float | None
    map50: float | None
    registered_at: datetime


class ReleaseOut(BaseModel):
    """One release, as its latest event and the devices' reports describe it."""

    release_id: str
    kind: str = Field(description="edge or server.")
    fleet: str
    target: str
    model_id: str
    model_version: int
    action: str
    status: str = Field(description="canary, rolling out, complete or rollback.")
    stage_index: int
    stage_percent: float
    rollback_to: str | None
    first_at: datetime
    updated_at: datetime
    devices: dict[str, int] = Field(description="Devices by their latest state for this release.")


class DashboardOut(BaseModel):
    """Everything the dashboard page shows."""

    generated_at: datetime
    heartbeat_interval_s: float
    services: list[ServiceOut]
    lags: list[GroupLagOut]
    lag_read_at: datetime | None = Field(description="When the lag was read from the broker.")
    lag_error: str | None = Field(description="Why the lag could not be read last time, if it could not.")
    projects: list[str] = Field(description="Projects the token may see (the economy panel reads them one at a time).")
    queue: list[QueueOut]
    models: list[ModelOut]
    releases: list[ReleaseOut]


class EconomyPlotsOut(BaseModel):
    """The economy of one project as SVG plots (inline SVG, for the dashboard)."""

    project: str
    generated_at: datetime
    plots: dict[str, str] = Field(description="SVG documents by name: map50_95, human_seconds, seconds_per_task, auto_accept, queue.")


async def _services(pool: asyncpg.Pool, s: str, heartbeat_s: float, lags: list[dict[str, Any]], lag_known: bool) -> list[ServiceOut]:
    rows = await pool.fetch(
        f"""SELECT *, extract(epoch FROM now() - occurred_at) AS ago FROM {s}.dash_instances
            WHERE occurred_at > now() - make_interval(secs => $1) ORDER BY service, instance""",
        SHOWN_FOR_S,
    )
    by_service: dict[str, int] = {}
    for lag in lags:
        by_service[lag["service"]] = by_service.get(lag["service"], 0) + lag["lag"]
    out = []
    for r in rows:
        counters = _counters(r["counters"])
        seen = max(float(r["ago"]), 0.0)
        out.append(ServiceOut(
            service=r["service"], instance=r["instance"], state=instance_state(r["kind"], seen, heartbeat_s),
            seen_s_ago=round(seen, 1), uptime_s=round(r["uptime_s"], 1), handled=counters.get("handled", 0),
            received=counters.get("received", 0), dead_lettered=dead_lettered(counters),
            handled_per_s=None if r["handled_per_s"] is None else round(r["handled_per_s"], 2),
            lag=by_service.get(r["service"], 0) if lag_known else None,
        ))
    return out


def _counters(raw: Any) -> dict[str, int]:
    data = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    return {str(k): int(v) for k, v in data.items()}


async def _queue(pool: asyncpg.Pool, s: str, project: str | None) -> list[QueueOut]:
    rows = await pool.fetch(
        f"""SELECT project, kind,
                   CASE WHEN state = 'queued' AND held_until > now() THEN 'leased' ELSE state END AS state, count(*) AS n
            FROM {s}.tasks WHERE state IN ('verifying', 'queued', 'submitted') AND ($1::text IS NULL OR project = $1)
            GROUP BY 1, 2, 3 ORDER BY 1, 2""",
        project,
    )
    found: dict[tuple[str, str], QueueOut] = {}
    for r in rows:
        item = found.setdefault((r["project"], r["kind"]), QueueOut(project=r["project"], kind=r["kind"]))
        setattr(item, r["state"], int(r["n"]))
        item.total += int(r["n"])
    for r in await store.queued_by_reason(pool, s, project):
        if (r["project"], r["kind"]) in found:
            found[(r["project"], r["kind"])].reasons[r["reason"]] = int(r["n"])
    return list(found.values())


async def _models(pool: asyncpg.Pool, settings: Settings, project: str | None) -> list[ModelOut]:
    entries = await ModelLibrary(pool, settings.schema_for("library")).entries(project)
    return [
        ModelOut(
            project=e.project, model_id=e.model_id, version=e.version, target=e.target.value, precision=e.precision.value,
            aliases=sorted(a.value for a in e.aliases), map50_95=e.metrics.map50_95 if e.metrics else None,
            map50=e.metrics.map50 if e.metrics else None, registered_at=e.registered_at,
        )
        for e in sorted(entries, key=lambda e: (e.project, e.model_id, -e.version, e.target.value))
    ]


async def _releases(pool: asyncpg.Pool, s: str) -> list[ReleaseOut]:
    rows = await pool.fetch(f"SELECT * FROM {s}.dash_releases ORDER BY occurred_at DESC LIMIT {RELEASES_SHOWN}")
    counts = await pool.fetch(
        f"SELECT release_id, state, count(*) AS n FROM {s}.dash_devices WHERE release_id = ANY($1::text[]) GROUP BY 1, 2 ORDER BY 1, 2",
        [r["release_id"] for r in rows],
    )
    devices: dict[str, dict[str, int]] = {}
    for c in counts:
        devices.setdefault(c["release_id"], {})[c["state"]] = int(c["n"])
    return [
        ReleaseOut(
            release_id=r["release_id"], kind=r["kind"], fleet=r["fleet"], target=r["target"], model_id=r["model_id"],
            model_version=r["model_version"], action=r["action"],
            status=release_status(r["action"], r["stage_index"], r["stage_percent"]), stage_index=r["stage_index"],
            stage_percent=r["stage_percent"], rollback_to=r["rollback_to"], first_at=r["first_at"], updated_at=r["occurred_at"],
            devices=devices.get(r["release_id"], {}),
        )
        for r in rows
    ]


# -- wiring -------------------------------------------------------------------------------------------


def _asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def register(app: FastAPI, gw: Gateway) -> None:
    """Follow the topics the dashboard shows and serve the page and its JSON."""
    runtime: Runtime = gw.runtime
    runtime.consume(PipelineStatus, on_status)
    runtime.consume(EdgeRelease, on_release)
    runtime.consume(ServerRelease, on_release)
    runtime.consume(DeviceStatus, on_device)
    runtime.consume(ModelEvaluated, on_evaluated)
    lag = LagCache(runtime.settings)
    runtime.background("dashboard-lag", lag.work)
    reader = Depends(guard(gw, Role.ANNOTATOR))
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

    @app.get("/dashboard", include_in_schema=False)
    async def page() -> HTMLResponse:
        # Read per request, not at import: an edited page shows on reload (files are tiny).
        return HTMLResponse(_asset("dashboard.html"), headers={**headers, "Cache-Control": "no-cache"})

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            return Response(status_code=404)
        return Response(_asset(name), media_type=ASSETS[name], headers={**headers, "Cache-Control": "no-cache"})

    @app.get("/v1/dashboard", summary="The dashboard's numbers", tags=["dashboard"],
             description=(
                 "Services (state, throughput, dead letters, consumer lag), the labelling queue by kind and state, "
                 "the model library, and releases with device states. Any valid token; a project token sees its "
                 "project's queue and models only."
             ),
             response_model=DashboardOut, responses={401: {"model": RefusalAnswer}},
             openapi_extra=role_extra(Role.ANNOTATOR))
    async def numbers(principal: Principal = reader) -> DashboardOut:
        await lag.current()
        pool, s, settings = gw.pool, gw.s, runtime.settings
        project = principal.project
        async with pool.acquire() as conn:
            projects = [project] if project is not None else await store.projects(conn, s)
        return DashboardOut(
            generated_at=datetime.now(UTC),
            heartbeat_interval_s=settings.heartbeat_interval_s,
            services=await _services(pool, s, settings.heartbeat_interval_s, lag.lags, lag.read_at is not None),
            lags=[GroupLagOut(**g) for g in lag.lags],
            lag_read_at=lag.read_at,
            lag_error=lag.error,
            projects=projects,
            queue=await _queue(pool, s, project),
            models=await _models(pool, settings, project),
            releases=await _releases(pool, s),
        )

    _register_economy(app, gw, reader)


def _register_economy(app: FastAPI, gw: Gateway, reader: Any) -> None:
    """The economy's JSON and plots, per project."""
    refusals: dict[int | str, dict[str, Any]] = {code: {"model": RefusalAnswer} for code in (401, 403, 404)}

    async def economy(project: str) -> EconomyOut:
        async with gw.pool.acquire() as conn:
            if not await store.project_exists(conn, gw.s, project):
                raise Refusal(404, "unknown_project", f"project {project!r} does not exist; an admin creates it with POST /v1/projects")
            rows = await economy_store.economy_rows(conn, gw.s, project)
        return assemble(project, rows, datetime.now(UTC))

    @app.get("/v1/projects/{project}/economy", summary="The labelling economy per model version", tags=["dashboard"],
             description=(
                 "Per model version: test mAP50-95, human seconds (lease to submit) and tasks, auto-accept rate and "
                 "precision (from spot checks) with their counts; and the queue depth by kind over time. `rules` says "
                 "how each number is measured and attributed. A token of the project (any role)."
             ),
             response_model=EconomyOut, responses=refusals,
             openapi_extra=role_extra(Role.ANNOTATOR))
    async def economy_numbers(project: ProjectPath, principal: Principal = reader) -> EconomyOut:
        return await economy(project)

    @app.get("/v1/projects/{project}/economy/plots", summary="The labelling economy as SVG plots", tags=["dashboard"],
             description="The economy's numbers drawn as inline SVG documents (what the dashboard shows).",
             response_model=EconomyPlotsOut, responses=refusals,
             openapi_extra=role_extra(Role.ANNOTATOR))
    async def economy_svg(project: ProjectPath, principal: Principal = reader) -> EconomyPlotsOut:
        numbers = await economy(project)
        return EconomyPlotsOut(project=project, generated_at=numbers.generated_at, plots=economy_plots(numbers))
