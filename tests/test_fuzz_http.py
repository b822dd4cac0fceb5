"""Fuzzing every HTTP endpoint of every OpenAPI document (schemathesis) against the real apps,
wired to the real broker and PostgreSQL: no answer is a 5xx, and every refusal (4xx) carries a
reason code and a sentence (`{"reason": ..., "message": ...}`).

Each app is fuzzed three ways: with a valid token and the path naming objects that exist (so the
fuzz reaches the handlers), with a valid token and everything generated, and without a token.
Both schema-conforming and schema-violating requests are generated (schemathesis' positive and
negative modes). Generation has a fixed seed and few examples, so the run is deterministic and
short; `VL_FUZZ_EXAMPLES` (a multiplier) and `VL_FUZZ_SEED` make a longer or another local hunt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import uvicorn
from helpers import eventually
from labelling import Lab, publish_many, running_lab, stored_image, unrecognized

schemathesis = pytest.importorskip("schemathesis", reason="the HTTP fuzz needs schemathesis (the dev extra)")
from schemathesis import GenerationMode  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    # schemathesis' own strategies draw from `random`; the fixed seed still makes them repeat.
    "ignore::hypothesis.errors.HypothesisDeprecationWarning",
)

SCALE = float(os.environ.get("VL_FUZZ_EXAMPLES", "1"))
SEED = int(os.environ.get("VL_FUZZ_SEED", "9"))
"""Fixed, so CI sends the same requests every run; `VL_FUZZ_SEED` explores others locally."""
PROJECT = "fuzz"
RELEASE_TOKEN = "fuzz-release-token-0123456789"
ENV = {
    "VL_INGEST_PORT": "0",
    "VL_DISTRIBUTOR_PORT": "0",
    "VL_DISTRIBUTOR_RELEASE_TOKEN": RELEASE_TOKEN,
    # No fetch ever leaves the machine: http(s) sources only from a host that does not exist,
    # s3 sources only from a bucket nobody names, file sources refused (no file root).
    "VL_INGEST_ALLOWED_HOSTS": '["images.fuzz.invalid"]',
    "VL_INGEST_S3_BUCKETS": '["fuzz-bucket-nobody-names"]',
    "VL_INGEST_MAX_BYTES": "200000",
    "VL_LABELING_GATEWAY_FETCH_DEADLINE_S": "1",
    "VL_LABELING_GATEWAY_PREDICT_DEADLINE_S": "2",
}


@dataclass
class App:
    """One app under fuzz: where it listens, its OpenAPI document, its credentials and real ids."""

    name: str
    url: str
    doc: dict[str, Any]
    auth: dict[str, str]
    known: dict[str, str]
    """Path parameters naming objects that exist (the deep pass uses them)."""


@dataclass
class Stack:
    lab: Lab
    apps: dict[str, App]


# -- the apps ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _serve(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app on a free loopback port in this event loop."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task


async def _edge_agent(settings: Any, home: Path) -> Any:
    """An edge agent with an active model (installed from a signed package, without a broker)."""
    from detector import onnx_bytes

    from visionloop.contracts import EdgeRelease, ModelRef, RolloutStage, Target
    from visionloop.libs import package, signing
    from visionloop.services.edge_agent.agent import EdgeAgent

    private, public = signing.generate()
    manifest = package.make_manifest(
        model=ModelRef(model_id="fuzz-detector", version=1), project=PROJECT, target="edge", precision="fp32",
        classes=["circle", "square", "triangle"], input_shape=[1, 3, 128, 128], created_at=datetime(2025, 1, 1, tzinfo=UTC),
        dataset_version="ds-1", metrics={"map50_95": 0.5}, fleets=[],
    )
    built = package.build(manifest, {"model.onnx": onnx_bytes(128, dynamic=False)}, signing.load_private(private))
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=built.archive)))
    agent = EdgeAgent(settings, "fuzz-fleet", "fuzz-cam", home, signing.TrustStore.load([public]), http=http)
    release = EdgeRelease(
        release_id="r-fuzz", fleet="fuzz-fleet", target=Target.EDGE, model=ModelRef(model_id="fuzz-detector", version=1),
        package_uri=f"file:///packages/{built.sha256}", package_url="http://distributor/p.tar", package_sha256=built.sha256,
        signature=built.signature, key_id=built.key_id, stage=RolloutStage(index=0, percent=100),
    )
    await agent.handle(release)
    assert agent.active is not None
    return agent


@pytest.fixture(scope="module")
async def stack(kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from visionloop.services.edge_agent.http import create_app, local_token

    folder = tmp_path_factory.mktemp("fuzz-http")
    services = ("labeling-gateway", "ingest", "distributor")
    async with running_lab(kafka_bootstrap, database_url, folder, env=ENV, services=services) as lab:
        await lab.use_project(PROJECT)
        admin = lab.tokens["admin"]
        # A task and its image, so the deep pass names a task and an image that exist.
        image, _ = await stored_image(lab.blobs, seed=7)
        await publish_many(lab.settings, [unrecognized(image)], project=PROJECT)
        await lab.wait_tasks(1)
        task_id = (await lab.tasks())[0]["task_id"]
        # A released package, so the package server answers ranges of something real.
        data = bytes(range(256)) * 40
        ref = await lab.blobs.put(data)
        schema = lab.settings.schema_for("distributor")
        await lab.pool.execute(
            f'INSERT INTO "{schema}".packages (package_sha256, package_uri, project, model_id, version, target, precision,'
            " size_bytes, signature, key_id, manifest) VALUES ($1, $2, $3, 'm', 1, 'edge', 'fp32', $4, 's', 'k', '{}'::jsonb)",
            ref.sha256, ref.uri, PROJECT, len(data),
        )
        from visionloop.services.ingest import store as ingest_store

        async with lab.pool.acquire() as conn:  # ingest's HTTP API takes a token (issue 16, item 1)
            _, ingest_token = await ingest_store.create_token(conn, f'"{lab.settings.schema_for("ingest")}"', name="fuzz", projects=["*"])
        agent = await _edge_agent(lab.settings, folder / "edge-home")
        try:
            edge_token = local_token(folder / "edge-home")
            async with _serve(create_app(agent, token=edge_token)) as edge_url, httpx.AsyncClient(timeout=30) as http:
                endpoints = {**lab.host.endpoints, "edge-agent": edge_url}
                docs = {name: (await http.get(f"{url}/openapi.json")).json() for name, url in endpoints.items()}
                apps = {
                    "labeling-gateway": App(
                        "labeling-gateway", endpoints["labeling-gateway"], docs["labeling-gateway"],
                        {"Authorization": f"Bearer {admin}"},
                        {"project": PROJECT, "task_id": task_id, "image_id": image.image_id},
                    ),
                    "ingest": App("ingest", endpoints["ingest"], docs["ingest"], {"Authorization": f"Bearer {ingest_token}"}, {}),
                    "distributor": App(
                        "distributor", endpoints["distributor"], docs["distributor"],
                        {"authorization": f"Bearer {RELEASE_TOKEN}"}, {"sha256": ref.sha256},
                    ),
                    "edge-agent": App("edge-agent", edge_url, docs["edge-agent"], {"Authorization": f"Bearer {edge_token}"}, {}),
                }
                yield Stack(lab, apps)
        finally:
            await agent.stop()


# -- the fuzz ----------------------------------------------------------------------------------------


def refusal_problem(method: str, response: Any) -> str | None:
    """Why an answer breaks the rules (a 5xx, or a 4xx without a reason code), or None."""
    status = response.status_code
    if status >= 500:
        return f"server error {status}: {response.text[:300]}"
    if status < 400 or method == "HEAD":  # a HEAD answer has no body to carry a reason
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        return f"refusal {status} is not JSON: {response.content[:200]!r}"
    if not isinstance(body, dict) or not isinstance(body.get("reason"), str) or not body["reason"]:
        return f"refusal {status} has no reason code: {response.text[:300]}"
    if not isinstance(body.get("message"), str) or not body["message"]:
        return f"refusal {status} has no message: {response.text[:300]}"
    return None


@dataclass
class Report:
    """What fuzzing did: requests sent, statuses and reason codes seen, problems found (with a
    curl command to replay each)."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def add(self, other: "Report") -> None:
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.reasons.update(other.reasons)
        self.problems.extend(other.problems)


def fuzz(
    app: App, *, examples: int, headers: dict[str, str], path_parameters: dict[str, str] | None = None,
    modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
) -> Report:
    """Send generated requests to every operation of `app`'s OpenAPI document (blocking)."""
    schema = schemathesis.openapi.from_dict(app.doc)
    report = Report()
    examples = max(1, round(examples * SCALE))
    for result in schema.get_all_operations():
        operation = result.ok()
        names = {p.name for p in operation.path_parameters}
        fixed = {k: v for k, v in (path_parameters or {}).items() if k in names} or None
        for mode in modes:
            try:
                strategy = operation.as_strategy(generation_mode=mode, headers=headers or None, path_parameters=fixed)
            except Exception:  # nothing to violate (no parameters, no body): negative mode has no cases
                continue
            run = _runner(app, operation, strategy, report, examples)
            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                continue
    return report


def _runner(app: App, operation: Any, strategy: Any, report: Report, examples: int) -> Callable[[], None]:
    @hypothesis.settings(
        max_examples=examples, database=None, deadline=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.seed(SEED)
    @hypothesis.given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=app.url, timeout=30)
        report.requests += 1
        report.statuses[response.status_code] += 1
        problem = refusal_problem(case.method.upper(), response)
        if problem is not None:
            report.problems.append(f"{case.method.upper()} {operation.path}: {problem}\n    {case.as_curl_command()}")
        elif response.status_code >= 400 and case.method.upper() != "HEAD":
            report.reasons[response.json()["reason"]] += 1

    return run


async def _fuzz_all_ways(app: App, deep: int, wide: int, bare: int) -> Report:
    total = Report()
    for headers, path_parameters, examples in (
        (app.auth, app.known, deep),  # a valid token, objects that exist: the handlers' own checks
        (app.auth, None, wide),  # a valid token, everything generated
        ({}, None, bare),  # no credentials at all
    ):
        if examples == 0:
            continue
        total.add(await asyncio.to_thread(fuzz, app, examples=examples, headers=headers, path_parameters=path_parameters))
    return total


# -- the tests ----------------------------------------------------------------------------------------


def _assert_clean(report: Report) -> None:
    problems = report.problems
    print(f"{report.requests} requests, statuses {dict(sorted(report.statuses.items()))}, reasons {dict(report.reasons.most_common())}")
    assert not problems, f"{len(problems)} of {report.requests} requests broke the rules:\n" + "\n".join(problems[:20])


async def test_fuzz_gateway_http(stack: Stack) -> None:
    report = await _fuzz_all_ways(stack.apps["labeling-gateway"], deep=6, wide=3, bare=2)
    _assert_clean(report)
    assert report.requests >= 100 and any(200 <= s < 300 for s in report.statuses)
    assert report.statuses[401], "the pass without credentials is refused for want of a token"


async def test_fuzz_ingest_http(stack: Stack) -> None:
    report = await _fuzz_all_ways(stack.apps["ingest"], deep=40, wide=0, bare=0)
    _assert_clean(report)
    assert report.requests >= 20


async def test_fuzz_distributor_http(stack: Stack) -> None:
    app = stack.apps["distributor"]
    report = await _fuzz_all_ways(app, deep=8, wide=4, bare=3)
    _assert_clean(report)
    statuses = report.statuses
    assert statuses[401] and statuses[200] + statuses[206], statuses
    # Only packages it released, and only with the token.
    async with httpx.AsyncClient(base_url=app.url) as http:
        unknown = await http.get("/v1/packages/" + "0" * 64, headers=app.auth)
        assert (unknown.status_code, unknown.json()["reason"]) == (404, "unknown_package")
        released = f"/v1/packages/{app.known['sha256']}"
        assert (await http.get(released, headers=app.auth)).status_code == 200
        assert (await http.get(released, headers={"Authorization": f"Bearer {RELEASE_TOKEN}x"})).json()["reason"] == "unauthorised"


async def test_fuzz_edge_agent_http(stack: Stack) -> None:
    report = await _fuzz_all_ways(stack.apps["edge-agent"], deep=20, wide=0, bare=0)
    _assert_clean(report)
    assert report.requests >= 20
