"""The labelling helpers, pure: format conversions, box geometry, action counters, settings, auth,
Label Studio shapes, verification, calibration and consensus. No broker, no database. The
gateway's own decisions (tasks, the `LabelSubmitted` builder, submission checks) are in
labeling_gateway/test_decide.py."""

from __future__ import annotations

import base64
import io
import math
import random
import uuid
from datetime import UTC, datetime

import pytest
from helpers import box, det
from PIL import Image

from visionloop.contracts import (
    Box,
    ImageRef,
    LabelActions,
    Labeller,
    LabelRejectReason,
    LabelSourceKind,
    LabelSubmitted,
    ReviewDecision,
    TaskKind,
    VerificationMethod,
)
from visionloop.libs import formats
from visionloop.libs.boxes import (
    clip,
    duplicate_problems,
    geometry_problem,
    iou,
    match,
    taxonomy_problems,
)
from visionloop.services.labeling_gateway import auth
from visionloop.services.labeling_gateway.actions import count_actions, same_boxes
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.decide import (
    Refusal,
)
from visionloop.services.labeling_gateway.labelstudio import ls_project_id, rectangle_names
from visionloop.services.verifier.calibrate import (
    Calibration,
    Sample,
    calibrate,
    decide,
    score_samples,
    spot_checked,
)
from visionloop.services.verifier.config import Policy as VerifierPolicy
from visionloop.services.verifier.config import VerifierSettings
from visionloop.services.verifier.consensus import needed, vote
from visionloop.services.verifier.verify import check_boxes, verify

# -- formats -----------------------------------------------------------------------------------------------


def test_every_format_converts_back_to_the_same_box() -> None:
    rng = random.Random(1)
    names = ["car", "person"]
    for _ in range(500):
        width, height = rng.randint(1, 5000), rng.randint(1, 5000)
        x1, y1 = rng.uniform(0, width), rng.uniform(0, height)
        original = box(x1, y1, rng.uniform(x1, width), rng.uniform(y1, height), rng.choice(names))
        coco = formats.from_coco_bbox(formats.coco_bbox(original), original.class_name)
        yolo = formats.from_yolo_line(formats.yolo_line(original, names.index(original.class_name), width, height), names, width, height)
        value = formats.percent_value(original, width, height)
        ls = formats.from_percent(value["x"], value["y"], value["width"], value["height"], width, height, original.class_name)
        for back, tolerance in ((coco, 1e-9), (yolo, 1e-6 * max(width, height)), (ls, 1e-9 * max(width, height))):
            assert back.class_name == original.class_name
            assert [back.x1, back.y1, back.x2, back.y2] == pytest.approx([original.x1, original.y1, original.x2, original.y2], abs=tolerance)


def test_conversion_examples() -> None:
    b = box(10, 20, 110, 70)
    assert formats.coco_bbox(b) == [10, 20, 100, 50]
    assert formats.yolo_line(b, 2, 200, 100) == "2 0.300000 0.450000 0.500000 0.500000"
    assert formats.percent_value(b, 200, 100) == {"x": 5.0, "y": 20.0, "width": 50.0, "height": 50.0, "rotation": 0.0}
    # Label Studio turns around the top-left corner; the box becomes the enclosing axis-aligned one.
    turned = formats.from_percent(10, 10, 20, 10, 100, 100, "car", rotation=90)
    assert [turned.x1, turned.y1, turned.x2, turned.y2] == pytest.approx([0, 10, 10, 30])
    with pytest.raises(formats.FormatError, match="negative"):
        formats.from_coco_bbox([0, 0, -1, 5], "car")
    with pytest.raises(formats.FormatError, match="finite"):
        formats.from_percent(math.nan, 0, 1, 1, 10, 10, "car")
    with pytest.raises(formats.FormatError) as err:
        formats.from_yolo_line("7 0.5 0.5 0.1 0.1", ["car"], 10, 10)
    assert err.value.reason == "unknown_class"
    with pytest.raises(formats.FormatError):
        formats.from_yolo_line("0 0.5 0.5 0.1", ["car"], 10, 10)


def test_coco_document_reads_back() -> None:
    images = [
        formats.LabelledImage("a.jpg", 100, 50, (box(1, 2, 3, 4), box(5, 6, 50, 40, "person")), image_id="a" * 64),
        formats.LabelledImage("b.jpg", 10, 10, ()),
    ]
    doc = formats.coco_document(images, ["car", "person"])
    assert [c["id"] for c in doc["categories"]] == [1, 2]
    assert doc["annotations"][1] == {"id": 2, "image_id": 1, "category_id": 2, "bbox": [5, 6, 45, 34], "area": 45 * 34, "iscrowd": 0}
    names, back = formats.read_coco(doc)
    assert names == ["car", "person"] and back[0].boxes == images[0].boxes and back[1].boxes == () and back[0].image_id == "a" * 64
    with pytest.raises(formats.FormatError):
        formats.read_coco({"images": []})
    broken = {**doc, "annotations": [{**doc["annotations"][0], "category_id": 9}]}
    with pytest.raises(formats.FormatError, match="category 9"):
        formats.read_coco(broken)


def test_yolo_files_and_data_yaml() -> None:
    images = [
        formats.LabelledImage("x.png", 200, 100, (box(10, 20, 110, 70, "person"),), split="train"),
        formats.LabelledImage("y.png", 200, 100, (), split="test"),
    ]
    files = formats.yolo_files(images, ["car", "person"])
    assert files["labels/train/x.txt"] == "1 0.300000 0.450000 0.500000 0.500000\n"
    assert files["labels/test/y.txt"] == ""
    names, splits = formats.read_data_yaml(files["data.yaml"])
    assert names == ["car", "person"] and splits == {"train": "images/train", "val": "images/val", "test": "images/test"}
    assert "path:" not in files["data.yaml"]
    assert formats.read_data_yaml("names: [a, b]\ntrain: t\n") == (["a", "b"], {"train": "t"})
    with pytest.raises(formats.FormatError):
        formats.read_data_yaml("names: {0: a, 2: b}")


def test_write_yolo_lays_out_a_dataset(tmp_path) -> None:  # noqa: ANN001
    images = [formats.LabelledImage("x.png", 20, 10, (box(1, 1, 5, 5),))]
    data_yaml = formats.write_yolo(tmp_path / "ds", images, ["car"], image_bytes=lambda image: b"png")
    assert data_yaml.read_text().startswith("train: images/train")
    assert (tmp_path / "ds/images/train/x.png").read_bytes() == b"png"
    assert (tmp_path / "ds/images/val").is_dir() and (tmp_path / "ds/labels/train/x.txt").exists()


def test_label_studio_tasks_read_back() -> None:
    image = formats.LabelledImage("a.png", 400, 200, (box(40, 20, 120, 100),), split="test", image_id="c" * 64,
                                  predictions=(box(40, 20, 120, 100, score=0.8),), prediction_model="m@v1")
    [task] = formats.ls_tasks([image], lambda i: f"http://gw/{i.image_id}")
    assert task["annotations"][0]["ground_truth"] is True and task["predictions"][0]["model_version"] == "m@v1"
    assert task["annotations"][0]["result"][0]["value"]["x"] == 10.0
    [back] = formats.read_ls_tasks([task, {"data": {"image": "u"}, "annotations": []}])
    assert (back.image_id, back.split, back.width, back.height) == ("c" * 64, "test", 400, 200)
    assert back.boxes[0] == box(40, 20, 120, 100)
    cancelled = {"data": {"image": "u"}, "annotations": [{"result": [], "was_cancelled": True}]}
    assert formats.read_ls_tasks([cancelled]) == []
    with pytest.raises(formats.FormatError):
        formats.read_ls_tasks([{"annotations": []}])


def test_image_facts_apply_exif_orientation() -> None:
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed 20 x 40
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    assert formats.image_facts(out.getvalue()) == (20, 40, "JPEG")
    with pytest.raises(formats.FormatError):
        formats.image_facts(b"not an image")


def test_split_is_fixed_by_image_id() -> None:
    ids = [uuid.uuid4().hex * 2 for _ in range(2000)]
    splits = [formats.split_for(i, 0.1) for i in ids]
    assert splits == [formats.split_for(i, 0.1) for i in ids]
    assert 0.07 < splits.count("val") / len(ids) < 0.13


# -- boxes ---------------------------------------------------------------------------------------------------


def test_iou_and_matching() -> None:
    assert iou(box(0, 0, 10, 10), box(0, 0, 10, 10)) == 1
    assert iou(box(0, 0, 10, 10), box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(box(0, 0, 10, 10), box(20, 20, 30, 30)) == 0
    assert iou(box(0, 0, 0, 10), box(0, 0, 0, 10)) == 0
    first = [box(0, 0, 10, 10), box(100, 100, 110, 110, "person")]
    second = [box(101, 100, 111, 110, "person"), box(1, 0, 11, 10), box(1, 0, 11, 10)]
    pairs = match(first, second, min_iou=0.5)
    assert [(p.left, p.right) for p in pairs] == [(0, 1), (1, 0)]
    assert match(first, [box(101, 100, 111, 110, "car")], min_iou=0.5) == []
    assert len(match(first, [box(101, 100, 111, 110, "car")], min_iou=0.5, same_class=False)) == 1


def test_geometry_and_taxonomy_problems() -> None:
    assert geometry_problem(box(0, 0, 10, 10), 10, 10) is None
    assert geometry_problem(box(-1.5, 0, 11, 10), 10, 10) is None  # within the tolerance
    assert geometry_problem(box(-3, 0, 5, 5), 10, 10)[0] is LabelRejectReason.OUT_OF_BOUNDS  # type: ignore[index]
    assert geometry_problem(box(3, 3, 3, 8), 10, 10)[0] is LabelRejectReason.DEGENERATE_BOX  # type: ignore[index]
    assert geometry_problem(box(3, 3, 4, 8), 10, 10, min_size_px=2)[0] is LabelRejectReason.BOX_TOO_SMALL  # type: ignore[index]
    assert geometry_problem(box(11, 0, 12, 5), 10, 10)[0] is LabelRejectReason.DEGENERATE_BOX  # type: ignore[index]  # all outside, within tolerance
    assert clip(box(-1, -1, 11, 11), 10, 10) == box(0, 0, 10, 10)
    assert [p.index for p in taxonomy_problems([box(0, 0, 1, 1), box(0, 0, 1, 1, "cow")], ["car"])] == [1]
    dups = duplicate_problems([box(0, 0, 10, 10), box(0, 0, 10, 10.5), box(0, 0, 10, 10, "person")], min_iou=0.9)
    assert [(p.index, p.reason) for p in dups] == [(1, LabelRejectReason.DUPLICATE_BOX)]


# -- the gateway's decisions ---------------------------------------------------------------------------------


def test_action_counters() -> None:
    start = [det(0, 0, 10, 10), det(20, 20, 30, 30, "person"), det(50, 50, 60, 60), det(80, 80, 90, 90)]
    final = [box(0, 0, 10, 10), box(21, 20, 31, 30, "person"), box(50, 50, 60, 60, "person"), box(200, 200, 210, 210)]
    assert count_actions(start, final) == LabelActions(boxes_drawn=1, boxes_moved=1, boxes_relabelled=1, boxes_deleted=1, prelabels_accepted=1)
    assert count_actions([], [box(0, 0, 1, 1)]) == LabelActions(boxes_drawn=1)
    assert same_boxes(start[:1], [box(0.2, 0, 10, 10)]) and not same_boxes(start[:1], [box(2, 0, 10, 10)])



def test_settings_per_project() -> None:
    gateway = GatewaySettings(projects={"p": {"lease_s": 10, "consensus_labellers": 2}})
    assert gateway.policy("p").lease_s == 10 and gateway.policy("q").lease_s == 300 and gateway.port == 8080
    verifier = VerifierSettings(projects={"p": {"target_precision": 0.99}})
    assert verifier.policy("p").target_precision == 0.99 and verifier.policy("q").target_precision == 0.95
    assert verifier.spot_check_rate == 0.05 and verifier.match_iou == 0.5


# -- auth --------------------------------------------------------------------------------------------------


def test_tokens_and_credentials() -> None:
    token_id, token, hashed = auth.new_token()
    assert auth.token_id_of(token) == token_id and auth.matches(token, hashed) and not auth.matches(token + "x", hashed)
    assert len(token) > 40 and token not in hashed.hex()
    assert auth.token_id_of("vl_short_x") is None and auth.token_id_of("Bearer") is None
    assert auth.credentials(f"Bearer {token}") == token and auth.credentials(f"Token {token}") == token
    basic = base64.b64encode(f"labelstudio:{token}".encode()).decode()
    assert auth.credentials(f"Basic {basic}") == token
    assert auth.credentials("Basic !!!") is None and auth.credentials(None) is None and auth.credentials("Digest x") is None


def test_authorize() -> None:
    alice = auth.Principal("t", "alice", auth.Role.REVIEWER, "p")
    root = auth.Principal("r", "root", auth.Role.ADMIN, None)
    assert auth.authorize(alice, "p", auth.Role.ANNOTATOR) is None
    assert auth.authorize(None, "p", auth.Role.ANNOTATOR).reason == "unauthenticated"  # type: ignore[union-attr]
    assert auth.authorize(alice, "q", auth.Role.ANNOTATOR).reason == "wrong_project"  # type: ignore[union-attr]
    assert auth.authorize(alice, "q", auth.Role.ADMIN).reason == "wrong_project"  # type: ignore[union-attr]  # project first
    assert auth.authorize(alice, "p", auth.Role.ADMIN).reason == "insufficient_role"  # type: ignore[union-attr]
    assert auth.authorize(root, "anything", auth.Role.ADMIN) is None
    key = b"k" * 32
    sig = auth.sign(key, "p", "i", 2_000_000_000)
    assert auth.signature_valid(key, "p", "i", 2_000_000_000, sig)
    assert not auth.signature_valid(key, "q", "i", 2_000_000_000, sig) and not auth.signature_valid(key, "p", "i", 1, auth.sign(key, "p", "i", 1))


def test_label_studio_shapes() -> None:
    assert ls_project_id("7.1714557600") == "7" and ls_project_id({"id": 12}) == "12" and ls_project_id(3) == "3"
    with pytest.raises(Refusal):
        ls_project_id(None)
    config = '<View><Image name="img" value="$image"/><RectangleLabels name="boxes" toName="img"><Label value="car"/></RectangleLabels></View>'
    assert rectangle_names(config) == ("boxes", "img")
    assert rectangle_names("<broken") == ("label", "image") and rectangle_names(None) == ("label", "image")


# -- the verifier's decisions --------------------------------------------------------------------------------


IMAGE = ImageRef(image_id="f" * 64, blob_uri="file:///x", width=200, height=100, format="PNG", byte_size=1)


def submission(boxes: list[Box], **fields: object) -> LabelSubmitted:
    return LabelSubmitted.model_validate({
        "submission_id": "s", "task_id": "t", "task_kind": TaskKind.ANNOTATE, "image": IMAGE, "boxes": boxes,
        "labeller": Labeller(user_id="u"), "submitted_at": datetime.now(UTC), **fields,
    })


def test_verify_checks_in_order() -> None:
    policy = VerifierPolicy(min_box_px=2, max_boxes=3)
    ok = verify(submission([box(0, 0, 50, 50), box(100, 10, 201, 60, "person")]), ["car", "person"], policy)
    assert ok.accepted and ok.method is VerificationMethod.HUMAN and ok.boxes[1].x2 == 200
    cases = {
        LabelRejectReason.OUT_OF_BOUNDS: submission([box(0, 0, 250, 50)]),
        LabelRejectReason.BOX_TOO_SMALL: submission([box(0, 0, 1, 50)]),
        LabelRejectReason.DEGENERATE_BOX: submission([box(5, 5, 5, 50)]),
        LabelRejectReason.UNKNOWN_CLASS: submission([box(0, 0, 50, 50, "cow")]),
        LabelRejectReason.DUPLICATE_BOX: submission([box(0, 0, 50, 50), box(0, 0, 50, 51)]),
        LabelRejectReason.TOO_MANY_BOXES: submission([box(0, 0, 50, 50)] * 4),
        LabelRejectReason.MISSING_DECISION: submission([], task_kind=TaskKind.REVIEW),
        LabelRejectReason.REVIEWER_REJECTED: submission([], task_kind=TaskKind.REVIEW, decision=ReviewDecision.REJECT),
    }
    for reason, sub in cases.items():
        verdict = verify(sub, ["car", "person"], policy)
        assert not verdict.accepted and verdict.reason is reason, reason
    bad = verify(submission([box(0, 0, 50, 50, "cow"), box(0, 0, 250, 50)]), ["car"], policy)
    assert [(i.index, i.reason) for i in bad.issues] == [(0, LabelRejectReason.UNKNOWN_CLASS), (1, LabelRejectReason.OUT_OF_BOUNDS)]
    # no taxonomy known: classes are not checked
    assert verify(submission([box(0, 0, 50, 50, "cow")]), None, policy).accepted
    accepted = verify(submission([], task_kind=TaskKind.REVIEW, decision=ReviewDecision.ACCEPT, prelabels=[det(0, 0, 50, 50)]), ["car"], policy)
    assert accepted.accepted and accepted.boxes == [box(0, 0, 50, 50)]
    assert verify(submission([box(0, 0, 5, 5)], source=LabelSourceKind.IMPORT), ["car"], policy).method is VerificationMethod.IMPORT
    assert not check_boxes([box(0, 0, 5, 5)] * 5, 100, 100, None, policy).accepted


def test_calibration_picks_the_lowest_threshold_that_reaches_the_target() -> None:
    """The lower confidence bound of the precision (not the raw precision) must reach the target (see test_calibration_bound.py)."""
    samples = [Sample(0.95, True)] * 100 + [Sample(0.8, True)] * 60 + [Sample(0.8, False)] + [Sample(0.5, False)] * 10 + [Sample(0.4, True)] * 5
    cal = calibrate("car", samples, target=0.95, min_samples=50, min_support=20)
    assert cal.status == "calibrated" and cal.threshold == 0.8 and cal.support == 161 and cal.precision == pytest.approx(160 / 161)
    assert cal.lower_bound is not None and 0.95 <= cal.lower_bound < cal.precision
    assert calibrate("car", samples[:40], target=0.95, min_samples=50, min_support=20).status == "too_few_samples"
    bad = calibrate("car", [Sample(0.9, False)] * 60, target=0.95, min_samples=50, min_support=20)
    assert (bad.status, bad.threshold, bad.precision, bad.lower_bound) == ("bound_below_target", None, 0.0, 0.0)
    # a threshold resting on too few boxes is not trusted
    thin = calibrate("car", [Sample(0.99, True)] * 5 + [Sample(0.5, False)] * 60, target=0.95, min_samples=50, min_support=20)
    assert thin.threshold is None
    # ties: a cut keeps every box of equal score
    tied = calibrate("car", [Sample(0.9, True)] * 19 + [Sample(0.9, False)] * 2, target=0.95, min_samples=1, min_support=1)
    assert tied.threshold is None and tied.support == 21


def test_score_samples_and_auto_accept() -> None:
    prelabels = [det(0, 0, 10, 10, score=0.9), det(50, 50, 60, 60, "person", 0.4), box(70, 70, 80, 80)]
    samples = score_samples(prelabels, [box(1, 0, 10, 10), box(50, 50, 60, 60, "car")], match_iou=0.5)
    assert samples == [("car", Sample(0.9, True)), ("person", Sample(0.4, False))]
    cal = {"car": Calibration("car", 60, 0.8, 0.97, 50, "calibrated"), "person": Calibration("person", 10, None, None, 0, "too_few_samples")}
    yes = decide([det(0, 0, 10, 10, score=0.85)], cal, image_id="a" * 64, spot_check_rate=0)
    assert yes.accepted
    low = decide([det(0, 0, 10, 10, score=0.7)], cal, image_id="a" * 64, spot_check_rate=0)
    assert low.reason is LabelRejectReason.NEEDS_REVIEW and "0.700 < threshold 0.800" in low.message
    other = decide([det(0, 0, 10, 10, score=0.99), det(0, 0, 10, 10, "person", 0.99)], cal, image_id="a" * 64, spot_check_rate=0)
    assert other.reason is LabelRejectReason.NEEDS_REVIEW and "too few samples" in other.message
    assert decide([], cal, image_id="a" * 64, spot_check_rate=0).reason is LabelRejectReason.NEEDS_REVIEW
    assert decide([det(0, 0, 10, 10, score=0.85)], cal, image_id="a" * 64, spot_check_rate=1).reason is LabelRejectReason.SPOT_CHECK


def test_a_model_that_predates_a_class_is_never_auto_accepted() -> None:
    """Calibration vouches for the boxes a model draws, not for objects of a class it never learnt."""
    cal = {"car": Calibration("car", 60, 0.8, 0.97, 50, "calibrated")}
    sure = [det(0, 0, 10, 10, score=0.95)]
    old = decide(sure, cal, image_id="a" * 64, spot_check_rate=0, taxonomy=["car", "bike"], model_classes=["car"])
    assert not old.accepted and old.reason is LabelRejectReason.NEEDS_REVIEW and "does not know 'bike'" in old.message
    assert decide(sure, cal, image_id="a" * 64, spot_check_rate=0, taxonomy=["car", "bike"], model_classes=["car", "bike"]).accepted
    assert decide(sure, cal, image_id="a" * 64, spot_check_rate=0, taxonomy=["car", "bike"], model_classes=None).accepted  # unknown: as calibrated


def test_spot_checks_are_fixed_per_image_and_about_the_rate() -> None:
    ids = [uuid.uuid4().hex * 2 for _ in range(4000)]
    chosen = [spot_checked(i, 0.05) for i in ids]
    assert chosen == [spot_checked(i, 0.05) for i in ids]
    assert 0.035 < sum(chosen) / len(ids) < 0.065
    assert not any(spot_checked(i, 0) for i in ids[:100])


def test_consensus_vote() -> None:
    assert [needed(n, 0.5) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    a = [box(0, 0, 10, 10), box(50, 50, 60, 60, "person")]
    b = [box(1, 0, 11, 10), box(51, 50, 61, 60, "person"), box(90, 90, 99, 99)]
    c = [box(0, 1, 10, 11), box(52, 50, 62, 60, "car")]
    result = vote([a, b, c], labellers=3, iou=0.5, quorum=0.5, max_disputed=0.5)
    assert result.agreed and result.objects == 4 and result.disputed == 2
    assert sorted(bx.class_name for bx in result.boxes) == ["car", "person"]
    car = next(bx for bx in result.boxes if bx.class_name == "car")
    assert (car.x1, car.y1) == pytest.approx((1 / 3, 1 / 3))
    assert not vote([a, b, c], labellers=3, iou=0.5, quorum=0.5, max_disputed=0.25).agreed
    assert vote([[], [], []], labellers=3, iou=0.5, quorum=0.5, max_disputed=0.25).agreed  # all agree: nothing there
    short = vote([a], labellers=3, iou=0.5, quorum=0.5, max_disputed=0.25)
    assert not short.agreed and short.reason is LabelRejectReason.NO_CONSENSUS


