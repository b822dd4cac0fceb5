"""The in-memory bus itself (libs/bus/fake.py): what it keeps of the consumer policy, without a
broker or a database."""

from __future__ import annotations

import pytest

from visionloop.contracts import (
    Envelope,
    ImageAccepted,
    ImageHashes,
    ImageIngested,
    ImageRef,
    ImageRejected,
    ImageSource,
)
from visionloop.libs.bus import PermanentError, Unit
from visionloop.libs.bus.fake import FakeBus, of_type

IMAGE = ImageRef(image_id="b" * 64, blob_uri="file:///b/" + "b" * 64, width=640, height=480, format="JPEG", byte_size=1000)


def ingested() -> Envelope[ImageIngested]:
    return Envelope.of(ImageIngested(submission_id="s1", image=IMAGE, source=ImageSource()), producer="ingest/test", project="p")


def accepted_of(event: Envelope[ImageIngested]) -> ImageAccepted:
    return ImageAccepted(submission_id="s1", image=event.payload.image, source=ImageSource(), hashes=ImageHashes(phash="0" * 16))


async def test_what_a_handler_emits_is_delivered_to_the_next_handler_once() -> None:
    bus = FakeBus()
    got: list[str] = []

    async def accept(event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
        unit.emit(accepted_of(event))

    async def note(event: Envelope[ImageAccepted], unit: Unit[ImageAccepted]) -> None:
        got.append(event.payload.image.image_id)

    dedup = bus.runtime("dedup")
    dedup.consume(ImageIngested, accept)
    dedup.produces(ImageAccepted)
    bus.runtime("recognizer").consume(ImageAccepted, note)
    event = ingested()
    seen = await bus.deliver(event)
    assert [e.event_type for e in seen] == ["image.ingested", "image.accepted"]
    (accepted,) = of_type(seen, ImageAccepted)
    assert accepted.image == IMAGE and got == [IMAGE.image_id]
    assert seen[1].causation_id == event.event_id and seen[1].project == "p"
    assert await bus.deliver(event) == [event] and got == [IMAGE.image_id]  # the inbox


async def test_an_undeclared_contract_is_refused_and_a_permanent_error_is_dead_lettered() -> None:
    bus = FakeBus()

    async def undeclared(event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
        unit.emit(ImageRejected.model_construct(image=event.payload.image))

    runtime = bus.runtime("dedup")
    runtime.consume(ImageIngested, undeclared)
    with pytest.raises(ValueError, match="without declaring it"):
        await bus.deliver(ingested())
    assert runtime.emitted == []

    async def refuse(event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
        unit.emit(accepted_of(event))
        raise PermanentError("never")

    other = bus.runtime("other")
    other.consume(ImageIngested, refuse)
    other.produces(ImageAccepted)
    runtime.consumers.clear()
    assert len(await bus.deliver(ingested())) == 1  # nothing emitted by a failed handler
    assert len(other.dead_letters) == 1 and other.counters["dead_lettered"] == 1


async def test_deliveries_side_by_side_each_carry_on_only_what_their_own_handler_emitted() -> None:
    """Several tasks may deliver at once (HTTP requests of a served app, a relay): a delivery's
    output is its own unit's events, never those of a handler that ran beside it."""
    import asyncio

    bus = FakeBus()
    gate = asyncio.Event()

    async def accept(event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
        if event.payload.submission_id == "slow":
            await gate.wait()  # the other delivery runs and emits meanwhile
        unit.emit(accepted_of(event))

    dedup = bus.runtime("dedup")
    dedup.consume(ImageIngested, accept)
    dedup.produces(ImageAccepted)
    slow = Envelope.of(ImageIngested(submission_id="slow", image=IMAGE, source=ImageSource()), producer="ingest/test", project="p")
    waiting = asyncio.create_task(bus.deliver(slow))
    await asyncio.sleep(0)
    fast = await bus.deliver(ingested())
    gate.set()
    seen = await waiting
    assert [e.event_type for e in fast] == [e.event_type for e in seen] == ["image.ingested", "image.accepted"]
    assert seen[1].causation_id == slow.event_id and fast[1].causation_id == fast[0].event_id
