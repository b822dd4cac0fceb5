"""The verifier's handler on the in-memory bus (libs/bus/fake.py): its own wiring, its SQL on
PostgreSQL, no Kafka. The flows with the gateway over the real broker are in test_verifier.py."""

from __future__ import annotations

from datetime import UTC, datetime

from visionloop.contracts import (
    Box,
    Envelope,
    ImageRef,
    Labeller,
    LabelRejected,
    LabelRejectReason,
    LabelSourceKind,
    LabelSubmitted,
    LabelVerified,
    ModelRef,
    TaskKind,
)
from visionloop.libs.bus.fake import FakeBus, of_type
from visionloop.services.verifier.config import VerifierSettings
from visionloop.services.verifier.service import SPEC

IMAGE = ImageRef(image_id="a" * 64, blob_uri="file:///b/" + "a" * 64, width=640, height=480, format="JPEG", byte_size=1000)
CAR = Box(x1=100, y1=100, x2=200, y2=180, class_name="car")
MODEL = ModelRef(model_id="yard-detector", version=2)


def submitted(n: int, *boxes: Box, source: LabelSourceKind = LabelSourceKind.GATEWAY, role: str = "annotator") -> Envelope[LabelSubmitted]:
    payload = LabelSubmitted(
        submission_id=f"s{n}", task_id=f"t{n}", task_kind=TaskKind.ANNOTATE if role != "model" else TaskKind.REVIEW,
        image=IMAGE, boxes=list(boxes), labeller=Labeller(user_id="ann" if role != "model" else "model:yard-detector@v2", role=role),
        source=source, submitted_at=datetime.now(UTC), class_names=["car", "person"],
        prelabel_model=MODEL if role == "model" else None, prelabel_classes=["car", "person"] if role == "model" else None,
    )
    return Envelope.of(payload, producer="labeling-gateway/test", project="yard")


async def verifier(bus: FakeBus, **settings: object) -> None:
    runtime = bus.runtime("verifier", pool=bus.pool)  # type: ignore[attr-defined]
    SPEC.wire(runtime, None, VerifierSettings(**settings))  # type: ignore[arg-type]
    await runtime.migrate(SPEC.migrations)


async def test_a_person_s_boxes_are_verified_once_and_a_redelivery_does_nothing(fake_bus: FakeBus) -> None:
    await verifier(fake_bus)
    event = submitted(1, CAR)
    seen = await fake_bus.deliver(event)
    (verified,) = of_type(seen, LabelVerified)
    assert verified.image == IMAGE and [b.class_name for b in verified.boxes] == ["car"]
    assert await fake_bus.deliver(event) == [event]  # the inbox: nothing again


async def test_a_box_outside_the_taxonomy_or_the_image_is_rejected_with_its_reason(fake_bus: FakeBus) -> None:
    await verifier(fake_bus)
    seen = await fake_bus.deliver(submitted(2, CAR.model_copy(update={"class_name": "boat"})))
    (rejected,) = of_type(seen, LabelRejected)
    assert rejected.reason == LabelRejectReason.UNKNOWN_CLASS, rejected
    seen = await fake_bus.deliver(submitted(3, CAR.model_copy(update={"x2": 900})))
    assert [r.reason for r in of_type(seen, LabelRejected)] == [LabelRejectReason.OUT_OF_BOUNDS]


async def test_uncalibrated_pre_labels_go_to_people(fake_bus: FakeBus) -> None:
    await verifier(fake_bus, spot_check_rate=0.0)
    seen = await fake_bus.deliver(submitted(4, CAR, source=LabelSourceKind.PRELABEL, role="model"))
    (rejected,) = of_type(seen, LabelRejected)
    assert rejected.reason == LabelRejectReason.NEEDS_REVIEW
    assert not of_type(seen, LabelVerified)
