"""The demo's simulated annotator against the gateway and verifier (on the in-memory bus,
`fake_lab`) over loopback HTTP: it
draws the world's truth (within its noise) on unrecognised images, accepts right pre-labels,
corrects wrong ones, rejects hopeless ones, skips images the world does not know, and its
counters add up."""

from __future__ import annotations

import pytest
from helpers import eventually
from labelling import Lab, fake_lab, recognition, stored_image

from visionloop.contracts import (
    Box,
    Detection,
    ImageRecognized,
    ImageRef,
    ImageSource,
    ImageUnrecognized,
    ReviewDecision,
    UnrecognizedReason,
)
from visionloop.demo.annotator import Annotator
from visionloop.demo.people import PERFECT
from visionloop.demo.world import Item, World
from visionloop.libs.boxes import iou

ENV = {"VL_VERIFIER_PROJECTS": '{"demo-review": {"auto_accept": false}}'}
NOISE = 2.0


@pytest.fixture(scope="module")
async def lab(database_url: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    async with fake_lab(database_url, tmp_path_factory.mktemp("demo-annotator"), env=ENV) as running:
        yield running


async def _stored(lab: Lab, item: Item) -> ImageRef:
    ref = await lab.blobs.put(item.data)
    assert ref.sha256 == item.image_id
    return ImageRef(image_id=item.image_id, blob_uri=ref.uri, width=item.width, height=item.height, format="JPEG", byte_size=len(item.data))


def _unrecognized(image: ImageRef, classes: list[str], detections: list[Detection] | None = None) -> ImageUnrecognized:
    return ImageUnrecognized(
        image=image, source=ImageSource(), reason=UnrecognizedReason.UNCERTAIN, message="uncertain", uncertainty=0.6,
        recognition=recognition(0.6), detections=detections or [], class_names=classes,
    )


def _recognized(image: ImageRef, prelabels: list[Box], classes: list[str]) -> ImageRecognized:
    detections = [Detection(**b.model_dump(exclude={"score"}), score=0.9) for b in prelabels]
    return ImageRecognized(image=image, source=ImageSource(), prelabels=detections, recognition=recognition(0.1), class_names=classes)


async def _verified(lab: Lab, count: int) -> dict[str, dict]:
    """The project's verified label sets by image id, once there are `count`."""

    def ours() -> dict[str, dict]:
        return {m["payload"]["image"]["image_id"]: m["payload"] for m in lab.messages("label.verified") if m["project"] == lab.project}

    await eventually(lambda: len(ours()) >= count, timeout=30)
    return ours()


def _rounded(boxes: list) -> list[tuple]:
    boxes = [b if isinstance(b, Box) else Box.model_validate(b) for b in boxes]
    return sorted((b.class_name, round(b.x1, 2), round(b.y1, 2), round(b.x2, 2), round(b.y2, 2)) for b in boxes)


def _close(drawn: Box, true: Box, px: float) -> bool:
    return drawn.class_name == true.class_name and max(
        abs(drawn.x1 - true.x1), abs(drawn.y1 - true.y1), abs(drawn.x2 - true.x2), abs(drawn.y2 - true.y2)
    ) <= px


async def test_annotator_draws_the_truth_and_skips_strangers(lab: Lab) -> None:
    world = World(31, objects=(1, 4))
    classes = list(world.classes)
    await lab.use_project("demo-draw", classes)
    items = world.stream(10)
    refs = [await _stored(lab, item) for item in items]
    # One task starts from the model's guesses: one right box (kept) and one over nothing (deleted).
    guess_truth = items[0].truth[0]
    guesses = [
        Detection(**guess_truth.model_dump(exclude={"score"}), score=0.3),
        Detection(x1=0, y1=0, x2=8, y2=8, class_name=classes[0], score=0.2),
    ]
    stranger, _ = await stored_image(lab.blobs, seed=5)
    events = [_unrecognized(refs[0], classes, guesses), *(_unrecognized(r, classes) for r in refs[1:]), _unrecognized(stranger, classes)]
    await lab.publish(events, project=lab.project)
    await lab.wait_tasks(11, where=f"project = '{lab.project}'")

    async with Annotator(lab.base_url, await lab.token("annotator", "sim-ann"), lab.project, world, user_id="sim-ann",
                         errors=PERFECT, noise_px=NOISE, miss_rate=0.15, rng_seed=3) as annotator:
        outcomes = await annotator.drain()
        tally = annotator.tally
        assert await annotator.run_once() is None  # the skipped task is never handed back to it

    done = [o for o in outcomes if o.action == "submitted"]
    assert len(done) == 10 and len({o.task_id for o in done}) == 10 and len({o.submission_id for o in done}) == 10
    assert {o.image_id for o in done} == {i.image_id for i in items}
    assert [o.image_id for o in outcomes if o.action == "skipped"] == [stranger.image_id]
    rows = await lab.tasks(f"project = '{lab.project}' AND image_id <> '{stranger.image_id}'")
    assert {r["task_id"] for r in rows} == {o.task_id for o in done}
    assert all(r["state"] in ("submitted", "done") for r in rows)

    truth_boxes = sum(len(i.truth) for i in items)
    assert tally.tasks == {"annotate": 10} and tally.skipped == 1
    assert (tally.boxes_kept, tally.boxes_deleted) == (1, 1)
    assert tally.boxes_drawn == truth_boxes - tally.boxes_missed - tally.boxes_kept
    assert tally.boxes_missed == sum(o.missed for o in done) and tally.boxes_missed > 0
    # The task that starts from the model's two guesses is charged their review (4 s + 1.6 s a box).
    assert tally.seconds == pytest.approx(tally.boxes_drawn * 35.0 + tally.boxes_deleted * 8.0 + 4.0 + 2 * 1.6)
    assert sum(o.seconds for o in done) == pytest.approx(tally.seconds)
    assert tally.accepts == tally.corrections == tally.rejects == 0

    # The verifier passes every answer on; its boxes are the truth within the noise.
    verified = await _verified(lab, 10)
    assert set(verified) == {i.image_id for i in items}
    by_image = {o.image_id: o for o in done}
    for item in items:
        boxes = [Box.model_validate(b) for b in verified[item.image_id]["boxes"]]
        assert len(boxes) == len(item.truth) - by_image[item.image_id].missed
        for box in boxes:
            assert any(_close(box, true, 5 * NOISE) for true in item.truth), (box, item.truth)
        assert verified[item.image_id]["provenance"]["labellers"][0]["user_id"] == "sim-ann"


async def test_reviewer_accepts_corrects_and_rejects_by_the_truth(lab: Lab) -> None:
    world = World(41, objects=(2, 4))
    classes = list(world.classes)
    await lab.use_project("demo-review", classes)
    items = world.stream(8)
    refs = [await _stored(lab, item) for item in items]
    truth = [list(i.truth) for i in items]
    other = {c: next(o for o in classes if o != c) for c in classes}
    first = truth[5][0]
    shift = 0.15 * first.width * (1 if first.x2 + 0.15 * first.width <= items[5].width else -1)
    loose = first.model_copy(update={"x1": first.x1 + shift, "x2": first.x2 + shift})
    assert 0.5 <= iou(loose, first) < 0.75
    prelabels = [
        truth[0], truth[1], truth[2],                                                    # right: accept
        [truth[3][0].model_copy(update={"class_name": other[truth[3][0].class_name]}), *truth[3][1:]],  # a wrong class
        truth[4][1:],                                                                    # a box missing
        [loose, *truth[5][1:]],                                                          # loose but right: accept
        [*truth[6], Box(x1=0, y1=0, x2=10, y2=10, class_name=classes[0])],               # a box over nothing
        [Box(x1=0, y1=0, x2=10, y2=10, class_name=classes[1])],                          # all wrong: reject
    ]
    await lab.publish([_recognized(r, p, classes) for r, p in zip(refs, prelabels, strict=True)], project=lab.project)
    await lab.wait_tasks(8, where=f"project = '{lab.project}' AND kind = 'review' AND state = 'queued'")

    async with Annotator(lab.base_url, await lab.token("reviewer", "sim-rev"), lab.project, world, user_id="sim-rev",
                         errors=PERFECT, noise_px=NOISE, rng_seed=4, http=lab.http, kinds=["review"]) as reviewer:
        outcomes = await reviewer.drain()
        decisions = {o.image_id: o.decision for o in outcomes}
        expected = [ReviewDecision.ACCEPT] * 3 + [ReviewDecision.CORRECT] * 2 + [ReviewDecision.ACCEPT, ReviewDecision.CORRECT, ReviewDecision.REJECT]
        assert [decisions[i.image_id] for i in items] == expected
        t = reviewer.tally
        assert t.tasks == {"review": 8}
        assert (t.accepts, t.corrections, t.rejects) == (4, 3, 1)
        assert (t.boxes_relabelled, t.boxes_added, t.boxes_deleted, t.boxes_moved) == (1, 1, 1, 0)
        assert t.boxes_corrected == 3 and t.boxes_drawn == 0
        shown = sum(len(p) for p in prelabels)
        assert t.actions.boxes_shown == shown and t.actions.images_reviewed == 8
        assert t.seconds == pytest.approx(8 * 4.0 + shown * 1.6 + 2 * 8.0 + 1 * 35.0)

        # accepted and corrected label sets are verified; the rejected image comes back to be drawn
        verified = await _verified(lab, 7)
        # (the verifier's `needs_review` on each pre-label offer comes first: auto-accept is off here)
        people = lambda: [m for m in lab.messages("label.rejected") if m["project"] == lab.project  # noqa: E731
                          and m["payload"]["reason"] != "needs_review"]
        await eventually(people)
        assert set(verified) == {i.image_id for i in items[:7]}
        assert _rounded(verified[items[3].image_id]["boxes"]) == _rounded(truth[3])  # relabelled in place
        assert len(verified[items[4].image_id]["boxes"]) == len(truth[4])
        assert len(verified[items[6].image_id]["boxes"]) == len(truth[6])
        assert [m["payload"]["reason"] for m in people()] == ["reviewer_rejected"]

        await lab.wait_tasks(1, where=f"project = '{lab.project}' AND kind = 'reannotate' AND state = 'queued'")
        reviewer.kinds = None
        again = await reviewer.drain()
        assert [(o.kind, o.image_id, o.drawn) for o in again] == [("reannotate", items[7].image_id, len(truth[7]))]
        assert reviewer.tally.boxes_drawn == len(truth[7])
        assert reviewer.tally.tasks == {"review": 8, "reannotate": 1}
        assert len(reviewer.records) == 9
        assert await reviewer.drain(idle_s=0.3) == []  # waits a little for more, then gives up
