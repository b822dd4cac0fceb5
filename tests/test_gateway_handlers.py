"""The gateway's handlers on the in-memory bus (libs/bus/fake.py): its own wiring, its SQL on
PostgreSQL, its HTTP app in process, no Kafka. Why each task is for people (issue 18, item 6)."""

from __future__ import annotations

from pathlib import Path

import httpx
from labelling import fake_image, recognized, unrecognized

from visionloop.contracts import (
    Detection,
    Envelope,
    LabelRejected,
    LabelRejectReason,
    LabelSubmitted,
    UnrecognizedReason,
)
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus, FakeRuntime, of_type
from visionloop.libs.db import quote_ident
from visionloop.libs.service import Adapters
from visionloop.services.labeling_gateway import dashboard, store
from visionloop.services.labeling_gateway.auth import Role
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.service import SPEC

CAR = Detection(x1=100, y1=100, x2=200, y2=180, class_name="car", score=0.9)


async def gateway(bus: FakeBus, tmp_path: Path) -> tuple[FakeRuntime, object]:
    runtime = bus.runtime("labeling-gateway", pool=bus.pool)  # type: ignore[attr-defined]
    app = SPEC.wire(runtime, Adapters(blobs=LocalBlobStore(tmp_path / "blobs")), GatewaySettings())  # type: ignore[arg-type]
    await runtime.migrate(SPEC.migrations)
    return runtime, app


async def test_each_task_says_why_it_is_for_people_in_the_list_and_on_the_dashboard(fake_bus: FakeBus, tmp_path: Path) -> None:
    runtime, app = await gateway(fake_bus, tmp_path)
    s = quote_ident(runtime.schema)
    no_model = unrecognized(fake_image(1)).model_copy(update={"reason": UnrecognizedReason.NO_MODEL, "recognition": None})
    await fake_bus.publish(no_model, project="yard")
    await fake_bus.publish(unrecognized(fake_image(2)), project="yard")  # uncertain
    seen = await fake_bus.publish(recognized(fake_image(3), [CAR]), project="yard")
    (offer,) = of_type(seen, LabelSubmitted)  # the pre-labels go to the verifier first
    rejected = LabelRejected(submission_id=offer.submission_id, task_id=offer.task_id, image=offer.image,
                             reason=LabelRejectReason.NEEDS_REVIEW, message="not calibrated yet")
    await fake_bus.deliver(Envelope.of(rejected, producer="verifier/test", project="yard"))

    async with fake_bus.pool.acquire() as conn:  # type: ignore[attr-defined]
        _, token = await store.create_token(conn, s, project="yard", role=Role.REVIEWER, user_id="rita", created_by="test")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:  # type: ignore[arg-type]
        auth = {"Authorization": f"Bearer {token}"}
        listed = (await http.get("/v1/projects/yard/tasks", headers=auth)).json()
        assert sorted((t["kind"], t["state"], t["reason"]) for t in listed["tasks"]) == [
            ("annotate", "queued", "no_model"), ("annotate", "queued", "uncertain"), ("review", "queued", "needs_review"),
        ]
        only = (await http.get("/v1/projects/yard/tasks", headers=auth, params={"reason": "no_model", "state": "queued"})).json()
        assert [t["image_id"] for t in only["tasks"]] == [no_model.image.image_id] and only["next_offset"] is None
        page = (await http.get("/v1/projects/yard/tasks", headers=auth, params={"limit": 2})).json()
        assert len(page["tasks"]) == 2 and page["next_offset"] == 2
        assert (await http.get("/v1/projects/yard/tasks", headers=auth, params={"limit": 0})).status_code == 422
    queue = {q.kind: q.reasons for q in await dashboard._queue(fake_bus.pool, s, "yard")}  # type: ignore[attr-defined]
    assert queue == {"annotate": {"no_model": 1, "uncertain": 1}, "review": {"needs_review": 1}}
