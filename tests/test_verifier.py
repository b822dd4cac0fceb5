"""The verifier with the gateway on the in-memory bus (libs/bus/fake.py): both services' own
wiring, their SQL on PostgreSQL, the gateway's HTTP app in process, no Kafka. Pre-labels go to
people until calibration vouches for their class, then are auto-accepted (with spot checks still
sent to people); consensus of several labellers; the calibration report (CLI and gauges).
Delivery over the real broker is proven in test_bus.py, test_broker_restart.py and test_chaos.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from labelling import CLASSES, fake_image, recognition, recognized, unrecognized

from visionloop.contracts import (
    Detection,
    Envelope,
    ImageRecognized,
    LabelRejected,
    LabelVerified,
    ModelRef,
    Payload,
)
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus, FakeRuntime
from visionloop.libs.db import quote_ident
from visionloop.libs.service import Adapters
from visionloop.services.labeling_gateway import store as gateway_store
from visionloop.services.labeling_gateway.auth import Role
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.service import SPEC as GATEWAY
from visionloop.services.verifier.config import VerifierSettings
from visionloop.services.verifier.service import SPEC as VERIFIER

VERIFIER_SETTINGS = {
    "min_samples": 6, "min_support": 4, "spot_check_rate": 0.0,
    "projects": {"spot": {"spot_check_rate": 1.0, "min_samples": 1, "min_support": 1}},
}
GATEWAY_SETTINGS = {"projects": {"vote": {"consensus_labellers": 3}}}

CAR = Detection(x1=100, y1=100, x2=200, y2=180, class_name="car", score=0.9)
GHOST = Detection(x1=400, y1=300, x2=450, y2=380, class_name="person", score=0.3)


def cars(n: int) -> list[Detection]:
    """`n` cars apart from each other (rows of ten), scoring 0.9."""
    return [Detection(x1=10 + 60 * (i % 10), y1=10 + 70 * (i // 10), x2=50 + 60 * (i % 10), y2=40 + 70 * (i // 10), class_name="car", score=0.9)
            for i in range(n)]


CARS = cars(10)
"""Six images of ten cars are 60 verified boxes: enough evidence for a lower bound of
0.05 ** (1 / 60) = 0.951 at target 0.95 (six single boxes would bound at 0.61)."""


def by_model(payload: ImageRecognized, model: ModelRef) -> ImageRecognized:
    """The same recognition, pre-labelled by another model version."""
    return payload.model_copy(update={"recognition": recognition(0.1).model_copy(update={"model": model})})


@dataclass
class Loop:
    """The gateway and the verifier on one fake bus, and a client of the gateway's app."""

    bus: FakeBus
    gateway: FakeRuntime
    verifier: FakeRuntime
    http: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def s(self) -> str:
        return quote_ident(self.gateway.schema)

    async def project(self, project: str) -> None:
        """Create `project` with the test taxonomy and a token of each role (kept by role)."""
        async with self.bus.pool.acquire() as conn:  # type: ignore[attr-defined]
            await gateway_store.create_project(conn, self.s, project, CLASSES, created_by="test")
        for role in ("annotator", "reviewer"):
            self.tokens[role] = await self.token(role, f"{role}-{project}", project)

    async def token(self, role: str, user: str, project: str) -> str:
        async with self.bus.pool.acquire() as conn:  # type: ignore[attr-defined]
            _, token = await gateway_store.create_token(conn, self.s, project=project, role=Role.parse(role), user_id=user, created_by="test")
        return token

    def auth(self, role_or_token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens.get(role_or_token, role_or_token)}"}

    async def publish(self, project: str, *payloads: Payload) -> None:
        """Deliver the events (and all they cause: offers, verdicts, tasks)."""
        await self.bus.deliver(*(Envelope.of(p, producer="test", project=project) for p in payloads))

    async def tasks(self, where: str) -> list[Any]:
        return await self.bus.pool.fetch(f"SELECT * FROM {self.s}.tasks WHERE {where}")  # type: ignore[attr-defined]

    def outcome(self, image_id: str) -> list[tuple[str, str]]:
        """Every verdict on the image so far: ("verified", method) or ("rejected", reason)."""
        found = []
        for event in self.bus.log:
            p = event.payload
            if isinstance(p, LabelVerified) and p.image.image_id == image_id:
                found.append(("verified", p.provenance.method.value))
            elif isinstance(p, LabelRejected) and p.image.image_id == image_id:
                found.append(("rejected", p.reason.value))
        return found

    def verified(self, image_id: str) -> list[LabelVerified]:
        return [e.payload for e in self.bus.log if isinstance(e.payload, LabelVerified) and e.payload.image.image_id == image_id]

    def rejection(self, image_id: str) -> str:
        return next(e.payload.message for e in self.bus.log if isinstance(e.payload, LabelRejected) and e.payload.image.image_id == image_id)

    async def review_all(self, project: str, answer: Any) -> list[str]:
        """A reviewer answers every queued review task of the project; the submission ids."""
        done = []
        while True:
            got = await self.http.post(f"/v1/projects/{project}/tasks/next", headers=self.auth("reviewer"), params={"kind": "review"})
            if got.status_code == 204:
                return done
            task = got.json()
            body = {"lease_id": task["lease"]["lease_id"], **answer(task)}
            sent = await self.http.post(f"/v1/projects/{project}/tasks/{task['task_id']}/submit", headers=self.auth("reviewer"), json=body)
            assert sent.status_code == 201, sent.text
            await self.bus.flush()  # the submission goes to the verifier, its verdict back to the gateway
            done.append(sent.json()["submission_id"])

    async def annotate(self, project: str, token: str, boxes: list[tuple[str, float, float, float, float]]) -> dict[str, Any]:
        got = await self.http.post(f"/v1/projects/{project}/tasks/next", headers=self.auth(token))
        assert got.status_code == 200, got.text
        task = got.json()
        body = {"lease_id": task["lease"]["lease_id"],
                "boxes": [{"class_name": c, "x1": x1, "y1": y1, "x2": x2, "y2": y2} for c, x1, y1, x2, y2 in boxes]}
        sent = await self.http.post(f"/v1/projects/{project}/tasks/{task['task_id']}/submit", headers=self.auth(token), json=body)
        assert sent.status_code == 201, sent.text
        await self.bus.flush()
        return task


@contextlib.asynccontextmanager
async def running(bus: FakeBus, tmp_path: Path) -> AsyncIterator[Loop]:
    gateway = bus.runtime("labeling-gateway", pool=bus.pool)  # type: ignore[attr-defined]
    verifier = bus.runtime("verifier", pool=bus.pool, settings=gateway.settings)  # type: ignore[attr-defined]
    app = GATEWAY.wire(gateway, Adapters(blobs=LocalBlobStore(tmp_path / "blobs")), GatewaySettings(**GATEWAY_SETTINGS))  # type: ignore[arg-type]
    VERIFIER.wire(verifier, None, VerifierSettings(**VERIFIER_SETTINGS))  # type: ignore[arg-type]
    await gateway.migrate(GATEWAY.migrations)
    await verifier.migrate(VERIFIER.migrations)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:  # type: ignore[arg-type]
        yield Loop(bus, gateway, verifier, http)


async def test_prelabels_are_auto_accepted_once_calibrated(fake_bus: FakeBus, tmp_path: Path, database_url: str) -> None:
    async with running(fake_bus, tmp_path) as loop:
        await loop.project("auto")
        first = [fake_image(n) for n in range(6)]
        await loop.publish("auto", *(recognized(image, [*CARS, GHOST]) for image in first))
        assert len(await loop.tasks("project = 'auto' AND state = 'queued'")) == 6
        assert all(loop.outcome(i.image_id) == [("rejected", "needs_review")] for i in first)  # nothing calibrated yet
        # People keep the cars (a pixel off) and delete the ghost, six times.
        keep_car = {"decision": "correct", "boxes": [{"class_name": "car", "x1": c.x1 + 1, "y1": c.y1 - 1, "x2": c.x2, "y2": c.y2 + 1} for c in CARS]}
        assert len(await loop.review_all("auto", lambda task: keep_car)) == 6
        assert all(("verified", "human") in loop.outcome(i.image_id) for i in first)

        sure, unsure_class, low_score = fake_image(100), fake_image(101), fake_image(102)
        await loop.publish("auto",
                           recognized(sure, [CAR.model_copy(update={"score": 0.95})]),
                           recognized(unsure_class, [CAR.model_copy(update={"score": 0.95}), GHOST.model_copy(update={"score": 0.99})]),
                           recognized(low_score, [CAR.model_copy(update={"score": 0.85})]))
        assert loop.outcome(sure.image_id) == [("verified", "auto")]
        assert loop.outcome(unsure_class.image_id) == [("rejected", "needs_review")]
        assert loop.outcome(low_score.image_id) == [("rejected", "needs_review")]
        (auto,) = loop.verified(sure.image_id)
        assert auto.provenance.labellers[0].role == "model" and auto.provenance.prelabel_model.model_id == "demo-detector"
        assert auto.provenance.actions.prelabels_accepted == 1 and auto.boxes[0].score is None
        assert "0.850 < threshold 0.900" in loop.rejection(low_score.image_id)
        # A new version of the model starts uncalibrated: v3's evidence does not vouch for v4's boxes.
        newer = fake_image(104)
        await loop.publish("auto", by_model(recognized(newer, [CAR.model_copy(update={"score": 0.99})]), ModelRef(model_id="demo-detector", version=4)))
        assert loop.outcome(newer.image_id) == [("rejected", "needs_review")]
        assert "demo-detector@v4" in loop.rejection(newer.image_id)
        # A model that predates a class of the taxonomy vouches for nothing: it cannot see objects of that class.
        predates = fake_image(103)
        await loop.publish("auto", recognized(predates, [CAR.model_copy(update={"score": 0.95})]).model_copy(update={"class_names": ["car"]}))
        assert loop.outcome(predates.image_id) == [("rejected", "needs_review")]
        assert "does not know 'person'" in loop.rejection(predates.image_id)
        # Auto-accepted: no task for anyone; the others wait for a reviewer.
        assert len(await loop.tasks(f"image_id = '{sure.image_id}' AND state = 'done'")) == 1
        states = {r["image_id"]: r["state"] for r in await loop.tasks("project = 'auto'")}
        assert {states.get(unsure_class.image_id), states.get(low_score.image_id)} == {"queued"}

        await _the_calibration_report(loop, database_url)

        # A person's verdict on v4's pre-labels is evidence for v4 (and for no other version).
        await loop.review_all("auto", lambda task: {"decision": "accept"})
        assert ("verified", "human") in loop.outcome(newer.image_id)
        [row] = await fake_bus.pool.fetch(  # type: ignore[attr-defined]
            f"SELECT * FROM {quote_ident(loop.verifier.schema)}.calibration WHERE project = 'auto' AND model_version = 4")
        assert (row["class_name"], row["samples"], row["correct"], row["status"], row["threshold"]) == ("car", 1, 1, "too_few_samples", None)


async def _the_calibration_report(loop: Loop, database_url: str) -> None:
    """`visionloop verifier calibration --json` on the verifier's schema, and its gauges."""
    from typer.testing import CliRunner

    from visionloop.cli import app

    env = {"VL_DATABASE_URL": database_url, "VL_KAFKA_BOOTSTRAP": "127.0.0.1:9", "VL_SCHEMA_PREFIX": loop.verifier.settings.schema_prefix,
           "VL_STATE_DIR": str(loop.verifier.settings.state_dir)}
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["verifier", "calibration", "--project", "auto", "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    report = {r["class_name"]: r for r in json.loads(shown.stdout.strip().splitlines()[-1])["classes"]}
    car, person = report["car"], report["person"]
    assert car["status"] == "calibrated" and car["threshold"] == pytest.approx(0.9) and (car["model_id"], car["model_version"]) == ("demo-detector", 3)
    assert (car["correct"], car["samples"], car["support_correct"], car["support"]) == (60, 60, 60, 60)
    assert car["precision"] == 1.0 and car["lower_bound"] == pytest.approx(0.05 ** (1 / 60)) and (car["target"], car["confidence"]) == (0.95, 0.95)
    assert person["status"] == "bound_below_target" and person["threshold"] is None and (person["correct"], person["samples"]) == (0, 6)
    assert person["lower_bound"] == 0.0
    assert loop.verifier.gauges["calibration.auto.demo-detector@v3.car.threshold"] == pytest.approx(0.9)
    assert loop.verifier.gauges["calibration.auto.demo-detector@v3.car.lower_bound"] == pytest.approx(0.05 ** (1 / 60))


async def test_spot_checks_still_go_to_people(fake_bus: FakeBus, tmp_path: Path) -> None:
    async with running(fake_bus, tmp_path) as loop:
        await loop.project("spot")
        seed = fake_image(200)
        await loop.publish("spot", recognized(seed, cars(60)))
        assert len(await loop.tasks("project = 'spot' AND state = 'queued'")) == 1
        await loop.review_all("spot", lambda task: {"decision": "accept"})
        assert ("verified", "human") in loop.outcome(seed.image_id)
        checked = fake_image(201)
        await loop.publish("spot", recognized(checked, [CAR.model_copy(update={"score": 0.97})]))
        assert loop.outcome(checked.image_id) == [("rejected", "spot_check")]
        assert len(await loop.tasks(f"project = 'spot' AND image_id = '{checked.image_id}' AND state = 'queued' AND spot_check")) == 1
        await loop.review_all("spot", lambda task: {"decision": "accept"})
        (label,) = loop.verified(checked.image_id)
        assert label.provenance.spot_check is True
        # the spot check's verdict is more evidence for the version that drew the pre-labels
        row = await fake_bus.pool.fetchrow(  # type: ignore[attr-defined]
            f"SELECT * FROM {quote_ident(loop.verifier.schema)}.calibration WHERE project = 'spot' AND class_name = 'car'")
        assert (row["model_id"], row["model_version"], row["samples"], row["correct"], row["status"]) == ("demo-detector", 3, 61, 61, "calibrated")


async def test_consensus_keeps_what_a_quorum_drew(fake_bus: FakeBus, tmp_path: Path) -> None:
    async with running(fake_bus, tmp_path) as loop:
        await loop.project("vote")
        image = fake_image(300)
        await loop.publish("vote", unrecognized(image, 0.7))
        assert len(await loop.tasks("project = 'vote'")) == 3
        people = [await loop.token("annotator", name, "vote") for name in ("ann", "bea", "cid")]
        shared = [("car", 10, 10, 60, 50), ("car", 100, 100, 150, 160), ("person", 300, 50, 340, 200)]
        a = await loop.annotate("vote", people[0], [*shared, ("bicycle", 400, 400, 460, 440)])
        # one person never gets a second slot of the same image
        assert (await loop.http.post("/v1/projects/vote/tasks/next", headers=loop.auth(people[0]))).status_code == 204
        b = await loop.annotate("vote", people[1], [(c, x1 + 2, y1 - 1, x2 + 1, y2 + 2) for c, x1, y1, x2, y2 in shared]
                                + [("bicycle", 402, 401, 459, 442), ("car", 500, 10, 520, 30)])
        assert not loop.outcome(image.image_id)  # waiting for the third labeller
        c = await loop.annotate("vote", people[2], shared)
        assert a["group_size"] == 3 and len({a["task_id"], b["task_id"], c["task_id"]}) == 3
        assert loop.outcome(image.image_id) == [("verified", "consensus")]
        (label,) = loop.verified(image.image_id)
        assert sorted(b.class_name for b in label.boxes) == ["bicycle", "car", "car", "person"]  # the lone car is out
        assert {p.user_id for p in label.provenance.labellers} == {"ann", "bea", "cid"}
        assert len(label.provenance.submission_ids) == 3 and label.provenance.actions.boxes_drawn == 12

        split = fake_image(301)
        await loop.publish("vote", unrecognized(split, 0.7))
        assert len(await loop.tasks(f"project = 'vote' AND image_id = '{split.image_id}'")) == 3
        for n, token in enumerate(people):
            await loop.annotate("vote", token, [("car", 10 + 200 * n, 10, 60 + 200 * n, 50)])
        assert loop.outcome(split.image_id) == [("rejected", "no_consensus")]
        assert len(await loop.tasks(f"project = 'vote' AND image_id = '{split.image_id}' AND kind = 'reannotate'")) == 3
