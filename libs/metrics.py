"""Prometheus metrics: every service's counters and gauges in the text exposition format.

A process serves one `/metrics` endpoint (`VL_METRICS_PORT`) for the services it runs: one per
service in production (`visionloop run <service>`), one for all of them in `visionloop up`.
The figures are the ones each service already reports in its heartbeats on the status topic:

- `visionloop_up{service, instance}` 1 while the service runs;
- `visionloop_uptime_seconds{service, instance}`;
- `visionloop_events_total{service, instance, name}`: the service's monotonic counters
  (`received`, `handled`, `dead_lettered`, per-outcome counts such as `runs_failed_crashed`);
- `visionloop_gauge{service, instance, name}`: its current values (queue depth, calibration,
  training epoch...).

Counter and gauge names are label values, not metric names, so any name a service uses is valid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(runtimes: Iterable[Any], *, now: float | None = None) -> str:
    """The exposition text for `runtimes` (objects with service, settings.instance, counters, gauges)."""
    now = time.monotonic() if now is None else now
    families: dict[str, tuple[str, str, list[str]]] = {
        "visionloop_up": ("gauge", "1 while the service runs in this process.", []),
        "visionloop_uptime_seconds": ("gauge", "Seconds since the service started.", []),
        "visionloop_events_total": ("counter", "The service's monotonic counters, by name.", []),
        "visionloop_gauge": ("gauge", "The service's current values, by name.", []),
    }
    for runtime in runtimes:
        base = f'service="{_label(runtime.service)}",instance="{_label(runtime.settings.instance)}"'
        families["visionloop_up"][2].append(f"visionloop_up{{{base}}} 1")
        started = getattr(runtime, "_started_at", now)
        families["visionloop_uptime_seconds"][2].append(f"visionloop_uptime_seconds{{{base}}} {_number(max(0.0, now - started))}")
        for name, value in sorted(dict(runtime.counters).items()):
            families["visionloop_events_total"][2].append(f'visionloop_events_total{{{base},name="{_label(str(name))}"}} {_number(value)}')
        for name, value in sorted(dict(runtime.gauges).items()):
            families["visionloop_gauge"][2].append(f'visionloop_gauge{{{base},name="{_label(str(name))}"}} {_number(float(value))}')
    lines: list[str] = []
    for metric, (kind, help_text, samples) in families.items():
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", *samples]
    return "\n".join(lines) + "\n"


def app(runtimes: list[Any]) -> Any:
    """A small ASGI app serving `GET /metrics` for `runtimes` (the list may grow after creation)."""
    from fastapi import FastAPI, Response

    metrics = FastAPI(title="visionloop metrics", docs_url=None, redoc_url=None, openapi_url=None)

    @metrics.get("/metrics")
    async def scrape() -> Response:
        return Response(render(runtimes), media_type=CONTENT_TYPE)

    return metrics
