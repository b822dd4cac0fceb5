"""A user's COCO or YOLO dataset as the demo's world: the same stream as a rendered world, the
truth from the labels, a held-out test part, and malformed datasets refused up front."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from visionloop.contracts import Box
from visionloop.demo.dataset import DatasetError, DatasetWorld, load_dataset, world_for
from visionloop.demo.world import ItemKind, World
from visionloop.libs.formats import yolo_line
from visionloop.libs.perceptual import hamming, hash_image
from visionloop.libs.scenes import render_scene

NAMES = ["circle", "square", "triangle"]
RATES = {"exact_dup_rate": 0.125, "near_dup_rate": 0.125, "low_res_rate": 0.125, "corrupt_rate": 0.125}


def _scene(seed: int, width: int = 160, height: int = 120) -> tuple[bytes, list[Box]]:
    scene = render_scene(seed, width=width, height=height, classes=tuple(NAMES), objects=(1, 3), size=(0.2, 0.4))
    boxes = [Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes]
    return scene.encode(quality=90), boxes


def _yolo(root: Path, seeds: dict[str, range], *, extra: str = "") -> Path:
    """A YOLO folder: images/<split>/s<seed>.jpg, labels/<split>/s<seed>.txt, data.yaml."""
    for split, numbers in seeds.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for seed in numbers:
            data, boxes = _scene(seed)
            (root / "images" / split / f"s{seed}.jpg").write_bytes(data)
            lines = [yolo_line(b, NAMES.index(b.class_name), 160, 120) for b in boxes]
            (root / "labels" / split / f"s{seed}.txt").write_text("".join(line + "\n" for line in lines))
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames:\n  0: circle\n  1: square\n  2: triangle\n{extra}")
    return root


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _yolo(tmp_path_factory.mktemp("ds") / "My Parking-Lot", {"train": range(24), "val": range(100, 108)})


def _source_boxes(root: Path, source: str) -> list[Box]:
    """The truth of a YOLO image, read back from its label file."""
    from visionloop.libs.formats import read_yolo_labels

    text = (root / source.replace("images/", "labels/", 1)).with_suffix(".txt").read_text()
    return read_yolo_labels(text, NAMES, 160, 120)


def test_yolo_stream_mix_truth_and_classes(yolo: Path) -> None:
    world = DatasetWorld(yolo, 5, test_images=6)
    assert world.name == "my-parking-lot" and world.classes == tuple(NAMES) and world.new_class is None
    items = world.stream(16, **RATES)
    counts = Counter(i.kind for i in items)
    assert counts == {ItemKind.FRESH: 8, ItemKind.EXACT_DUPLICATE: 2, ItemKind.NEAR_DUPLICATE: 2, ItemKind.LOW_RES: 2,
                      ItemKind.CORRUPT: 2}
    fresh = {i.image_id: i for i in items if i.kind is ItemKind.FRESH}
    for item in fresh.values():
        assert item.data == (yolo / item.source).read_bytes()  # the user's file, as it is
        assert world.truth(item.image_id) == list(item.truth) == pytest.approx(_source_boxes(yolo, item.source))
    for item in items:
        if item.kind in (ItemKind.EXACT_DUPLICATE, ItemKind.NEAR_DUPLICATE):
            assert item.original in fresh and item.expected.code in ("duplicate", "near_duplicate")
            assert world.truth(item.image_id) is not None
        if item.kind is ItemKind.NEAR_DUPLICATE:
            ours, theirs = hash_image(item.data)[0], hash_image(fresh[item.original].data)[0]
            assert hamming(ours.phash, theirs.phash) + hamming(ours.dhash, theirs.dhash) <= world.near_radius
        if item.kind is ItemKind.LOW_RES:
            assert max(item.width, item.height) < world.resolution_floor and item.expected.code == "low_resolution"
        if item.kind is ItemKind.CORRUPT:
            assert item.truth is None and item.expected.code in ("corrupt", "not_an_image")
    assert {b.class_name for i in fresh.values() for b in i.truth} <= set(NAMES)


def test_same_seed_same_items_and_the_test_part_is_apart(yolo: Path) -> None:
    a, b, c = DatasetWorld(yolo, 1, test_fraction=0.25), DatasetWorld(yolo, 1, test_fraction=0.25), DatasetWorld(yolo, 2, test_fraction=0.25)
    first, second, other = a.stream(12, **RATES), b.stream(12, **RATES), c.stream(12, **RATES)
    assert [(i.kind, i.data) for i in first] == [(i.kind, i.data) for i in second]
    assert [i.data for i in first] != [i.data for i in other]
    tests = a.test_set(100, NAMES)
    assert len(tests) == 8 and all(t.kind is ItemKind.FRESH and a.knows(t.image_id) for t in tests)
    assert a.test_set(5, NAMES) == []  # handed out once
    streamed = {i.source for i in first + a.stream(a.fresh_left()) if i.kind is ItemKind.FRESH}
    assert len(streamed) == 24 and not streamed & {t.source for t in tests}
    with pytest.raises(DatasetError, match=r"has 32 images \(8 kept for the test set, 24 streamed.*asks for 1 fresh") as refused:
        a.stream(1)
    assert refused.value.reason == "exhausted"


def test_coco_folder_classes_in_id_order(tmp_path: Path) -> None:
    root = tmp_path / "coco_set"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    ids = {"circle": 9, "square": 3, "triangle": 7}  # not in name order, not contiguous
    doc: dict = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in ids.items()]}
    truth = {}
    for n in range(6):
        data, boxes = _scene(200 + n)
        (root / "images" / f"p{n}.jpg").write_bytes(data)
        doc["images"].append({"id": n + 1, "file_name": f"p{n}.jpg", "width": 160, "height": 120})
        for b in boxes:
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": n + 1, "category_id": ids[b.class_name],
                                       "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1], "iscrowd": 0})
        truth[f"images/p{n}.jpg"] = boxes
    (root / "annotations" / "instances.json").write_text(json.dumps(doc))
    dataset = load_dataset(root)
    assert dataset.classes == ("square", "triangle", "circle") and dataset.format == "coco" and dataset.name == "coco_set"
    assert load_dataset(root / "annotations" / "instances.json").images == dataset.images
    world = world_for(root, style="photo", seed=3, width=99)
    assert isinstance(world, DatasetWorld) and world.classes == ("square", "triangle", "circle")
    held = world.test_set(2, world.classes, offset=0)
    for item in held + world.stream(4):
        assert list(item.truth) == pytest.approx(truth[item.source])
    assert isinstance(world_for(None, style="shapes", seed=3), World)


def test_big_and_turned_images_are_reencoded_to_fit(tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    data, boxes = _scene(300, 640, 480)
    (root / "images" / "big.jpg").write_bytes(data)
    (root / "labels" / "big.txt").write_text(yolo_line(boxes[0], NAMES.index(boxes[0].class_name), 640, 480) + "\n")
    # A picture stored 120x160 whose EXIF says "turn 90 degrees clockwise": shown 160x120.
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.new("RGB", (120, 160), (200, 30, 30)).save(out, format="JPEG", exif=exif)
    (root / "images" / "turned.jpg").write_bytes(out.getvalue())
    (root / "labels" / "turned.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("names: [circle, square, triangle]\n")
    world = DatasetWorld(root, 0, test_images=0, max_item_bytes=12_000)
    items = {i.source: i for i in world.stream(2)}
    big, turned = items["images/big.jpg"], items["images/turned.jpg"]
    assert len(big.data) <= 12_000 and big.width < 640 and big.data != data
    scale = big.width / 640
    assert big.truth[0].x2 == pytest.approx(boxes[0].x2 * scale, abs=0.5)
    with Image.open(io.BytesIO(turned.data)) as shown:
        assert shown.size == (160, 120) == (turned.width, turned.height) and shown.getexif().get(0x0112, 1) == 1
    assert turned.truth[0] == Box(x1=40, y1=30, x2=120, y2=90, class_name="square")


def test_near_duplicates_inside_the_dataset_are_skipped(tmp_path: Path) -> None:
    root = _yolo(tmp_path / "dups", {"train": range(400, 404), "val": range(0)})
    with Image.open(root / "images" / "train" / "s400.jpg") as image:
        image.save(root / "images" / "train" / "copy.jpg", quality=60)  # the same picture, re-encoded
    (root / "labels" / "train" / "copy.txt").write_bytes((root / "labels" / "train" / "s400.txt").read_bytes())
    world = DatasetWorld(root, 0, test_images=0)
    items = world.stream(4)
    assert len(items) == 4 and {"images/train/s400.jpg", "images/train/copy.jpg"} - {i.source for i in items}
    with pytest.raises(DatasetError, match="1 skipped as near duplicates"):
        world.stream(1)


def _refusal(path: Path) -> DatasetError:
    with pytest.raises(DatasetError) as refused:
        load_dataset(path)
    return refused.value


def test_malformed_yolo_datasets_are_refused(tmp_path: Path) -> None:
    root = _yolo(tmp_path / "bad", {"train": range(500, 504), "val": range(504, 505)})
    labels = root / "labels" / "train"
    (labels / "s500.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    (labels / "s501.txt").write_text("0 0.95 0.5 0.5 0.2\n")
    (labels / "s502.txt").write_text("0 0.5 0.5\n")
    (labels / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "images" / "val" / "s504.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    error = _refusal(root)
    assert isinstance(error, ValueError)
    assert str(error).startswith(f"5 problems in {root}: ")
    assert "labels/train/s500.txt line 2: class id 7 is not in data.yaml names (0-2)" in str(error)
    assert "labels/train/s501.txt line 1: box" in str(error) and "outside the 160x120 image" in str(error)
    assert "labels/train/s502.txt line 1: expected `class cx cy w h`" in str(error)
    assert "labels/train/ghost.txt: no image" in str(error) and "images/val/s504.jpg" in str(error)
    assert set(error.reasons) == {"unknown_class", "box_outside_image", "bad_label_line", "missing_image", "unreadable_image"}
    # One problem at a time: the reason code is that problem's.
    for broken, reason in (("0 0.5 0.5\n", "bad_label_line"), ("3 0.5 0.5 0.2 0.2\n", "unknown_class"),
                           ("0 0.5 -0.2 0.2 0.2\n", "box_outside_image")):
        single = _yolo(tmp_path / reason, {"train": range(510, 512), "val": range(0)})
        (single / "labels" / "train" / "s511.txt").write_text(broken)
        error = _refusal(single)
        assert error.reason == reason and "labels/train/s511.txt line 1" in str(error) and str(error).startswith("1 problem in")


def test_empty_and_unlabelled_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    assert _refusal(tmp_path / "nothing").reason == "empty"
    unlabelled = _yolo(tmp_path / "unlabelled", {"train": range(600, 602), "val": range(0)})
    for label in (unlabelled / "labels" / "train").glob("*.txt"):
        label.write_text("")
    error = _refusal(unlabelled)
    assert error.reason == "empty" and "no labelled images" in str(error)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("hi")
    assert _refusal(tmp_path / "other").reason == "not_a_dataset"
    (tmp_path / "nameless" / "labels").mkdir(parents=True)
    (tmp_path / "nameless" / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    assert _refusal(tmp_path / "nameless").reason == "no_classes"


def test_malformed_coco_datasets_are_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    data, _ = _scene(700)
    (tmp_path / "images" / "a.jpg").write_bytes(data)
    doc = {
        "categories": [{"id": 1, "name": "circle"}],
        "images": [{"id": 1, "file_name": "a.jpg", "width": 160, "height": 120},
                   {"id": 2, "file_name": "gone.jpg", "width": 160, "height": 120}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [150, 10, 30, 30]},
                        {"id": 11, "image_id": 1, "category_id": 4, "bbox": [10, 10, 30, 30]}],
    }
    (tmp_path / "set.json").write_text(json.dumps(doc))
    error = _refusal(tmp_path / "set.json")
    assert str(error).startswith(f"3 problems in {tmp_path / 'set.json'}")
    assert "annotation 11: category_id 4 is not in categories (1)" in str(error)
    assert "gone.jpg: no such image file" in str(error) and "a.jpg annotation 10: box" in str(error)
    assert set(error.reasons) == {"unknown_class", "missing_image", "box_outside_image"}
