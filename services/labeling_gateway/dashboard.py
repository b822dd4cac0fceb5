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
  measured).

The read model behind the panels is kept by the gateway's handlers (handlers.py: `on_status`,
`on_release`, `on_device`, `on_evaluated`, and `on_verified` for the economy) in tables of its
own (dashboard_store.py, `0002_dashboard.sql`), not in memory: gateway replicas share one
consumer group per topic, so each sees only part of them. The decisions (throughput, states,
which service owns a consumer group) are in decide.py.

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

from visionloop.libs.bus import Runtime
from visionloop.libs.lag import consumer_groups as broker_groups
from visionloop.libs.library import ModelLibrary
from visionloop.libs.settings import Settings
from visionloop.services.labeling_gateway import dashboard_store, economy_store, store
from visionloop.services.labeling_gateway.api import ProjectPath
from visionloop.services.labeling_gateway.auth import Principal, Role
from visionloop.services.labeling_gateway.decide import (
    Refusal,
    dead_lettered,
    group_owner,
    instance_state,
    release_status,
)
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


# -- consumer lag, from the broker ----------------------------------------------------------------------


async def consumer_groups(settings: Settings) -> list[tuple[str, str, str]]:
    """(service, topic, group) of every consumer group of this deployment the broker knows."""
    found = []
    for group in await broker_groups(settings):
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
    rows = await dashboard_store.recent_instances(pool, s, SHOWN_FOR_S)
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
    rows = await dashboard_store.open_tasks(pool, s, project)
    found: dict[tuple[str, str], QueueOut] = {}
    for r in rows:
        item = found.setdefault((r["project"], r["kind"]), QueueOut(project=r["project"], kind=r["kind"]))
        setattr(item, r["state"], int(r["n"]))
        item.total += int(r["n"])
    for r in await dashboard_store.queued_by_reason(pool, s, project):
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
    rows = await dashboard_store.latest_releases(pool, s, RELEASES_SHOWN)
    counts = await dashboard_store.device_counts(pool, s, [r["release_id"] for r in rows])
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
    """Serve the page and its JSON (service.py wires the handlers that keep its read model), and
    read the consumer lag in the background while someone looks."""
    runtime: Runtime = gw.runtime
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
