"""The Prometheus endpoint: every service's counters and gauges, in a format Prometheus parses."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import httpx
from helpers import eventually, produce
from prometheus_client.parser import text_string_to_metric_families

from visionloop.app import ServiceHost
from visionloop.contracts import LabelSubmitted, topic_of
from visionloop.libs.metrics import render


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_counters_and_gauges_of_every_runtime_are_exposed_with_escaped_labels() -> None:
    runtime = SimpleNamespace(
        service="verifier", settings=SimpleNamespace(instance='host "a"\\b'), _started_at=90.0,
        counters=Counter({"handled": 7, "calibration.p.m.circle": 2}), gauges={"queue.depth": 3.5, "big": float("inf")},
    )
    other = SimpleNamespace(service="dedup", settings=SimpleNamespace(instance="h"), _started_at=99.0, counters=Counter(), gauges={})
    samples = _samples(render([runtime, other], now=100.0))
    base = (("instance", 'host "a"\\b'), ("service", "verifier"))
    assert samples[("visionloop_up", base)] == 1
    assert samples[("visionloop_uptime_seconds", base)] == 10.0
    assert samples[("visionloop_events_total", tuple(sorted(base + (("name", "handled"),))))] == 7
    assert samples[("visionloop_events_total", tuple(sorted(base + (("name", "calibration.p.m.circle"),))))] == 2
    assert samples[("visionloop_gauge", tuple(sorted(base + (("name", "queue.depth"),))))] == 3.5
    assert samples[("visionloop_gauge", tuple(sorted(base + (("name", "big"),))))] == float("inf")
    assert samples[("visionloop_up", (("instance", "h"), ("service", "dedup")))] == 1


async def test_a_process_serves_metrics_of_the_services_it_runs(settings) -> None:  # noqa: ANN001
    host = ServiceHost(settings.model_copy(update={"metrics_port": 0}), ["verifier"])
    await host.start()
    try:
        url = host.endpoints["metrics"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        await produce(settings, topic_of(LabelSubmitted, settings.topic_prefix), b"not json")  # received, dead-lettered

        async def scraped() -> dict | None:
            async with httpx.AsyncClient() as http:
                response = await http.get(url)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
            found = _samples(response.text)
            key = ("visionloop_events_total", (("instance", settings.instance), ("name", "received"), ("service", "verifier")))
            return found if found.get(key, 0) >= 1 else None

        found = await eventually(scraped, timeout=30)
        assert found[("visionloop_up", (("instance", settings.instance), ("service", "verifier")))] == 1
    finally:
        await host.stop()
