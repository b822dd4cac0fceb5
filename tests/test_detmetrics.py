"""Detection metrics held to pycocotools' COCOeval on random data, and the operating point by hand."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest

from visionloop.contracts import Box, Metrics
from visionloop.libs.detmetrics import RECALL_THRESHOLDS, evaluate, iou_matrix

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

CLASSES = ["car", "bus", "person", "bike", "unseen"]  # "unseen" never has a label


def box(x1: float, y1: float, x2: float, y2: float, cls: str = "car", score: float | None = None) -> Box:
    return Box(x1=x1, y1=y1, x2=x2, y2=y2, class_name=cls, score=score)


def scene(seed: int, images: int = 150, *, per_image: int = 6, tie_scores: bool = False):
    """Random labels and noisy predictions: jittered, misclassified, missed and invented boxes."""
    rng = np.random.default_rng(seed)
    truth: dict[str, list[Box]] = {}
    preds: dict[str, list[Box]] = {}
    labelled = CLASSES[:-1]

    def score() -> float:
        s = float(rng.uniform(0.01, 1.0))
        return round(s, 1) if tie_scores else s

    def random_box(cls: str, s: float | None = None) -> Box:
        x, y = rng.uniform(0, 600, 2)
        w, h = rng.uniform(2, 200, 2)
        return box(float(x), float(y), float(x + w), float(y + h), cls, s)

    for i in range(images):
        image_id = f"img-{i:05d}"
        n = int(rng.integers(0, per_image + 1)) if i % 7 else 0  # every 7th image has no labels
        truth[image_id] = [random_box(str(rng.choice(labelled))) for _ in range(n)]
        if i % 11 == 5:
            continue  # no predictions at all for this image
        out = []
        for g in truth[image_id]:
            if rng.random() < 0.15:
                continue  # missed
            j = rng.normal(0, 0.08, 4) * np.array([g.width, g.height, g.width, g.height])
            x1, y1 = g.x1 + j[0], g.y1 + j[1]
            x2, y2 = max(x1, g.x2 + j[2]), max(y1, g.y2 + j[3])
            cls = g.class_name if rng.random() > 0.1 else str(rng.choice(labelled))
            out.append(box(float(x1), float(y1), float(x2), float(y2), cls, score()))
            if rng.random() < 0.1:  # a duplicate of the same object
                out.append(box(float(x1) + 1, float(y1), float(x2) + 1, float(y2), cls, score()))
        for _ in range(int(rng.integers(0, 4))):
            out.append(random_box(str(rng.choice(labelled + ["ghost", "unseen"])), score()))  # invented
        rng.shuffle(out)
        preds[image_id] = out
    preds["not-in-test-set"] = [random_box("car", 0.9)]
    return truth, preds


def coco_eval(truth, preds, class_names, max_dets: int = 100) -> COCOeval:
    """pycocotools' own evaluation of the same boxes."""
    image_ids = {image_id: n + 1 for n, image_id in enumerate(sorted(truth))}
    category = {name: n + 1 for n, name in enumerate(class_names)}

    def xywh(b: Box) -> list[float]:
        return [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1]

    annotations = []
    for image_id, boxes in truth.items():
        for b in boxes:
            bb = xywh(b)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_ids[image_id], "category_id": category[b.class_name],
                "bbox": bb, "area": bb[2] * bb[3], "iscrowd": 0,
            })
    results = [
        {"image_id": image_ids[image_id], "category_id": category[b.class_name], "bbox": xywh(b), "score": b.score}
        for image_id, boxes in preds.items() if image_id in image_ids
        for b in boxes if b.class_name in category
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": n, "width": 1000, "height": 1000} for n in image_ids.values()],
            "annotations": annotations,
            "categories": [{"id": n, "name": name} for name, n in category.items()],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [max_dets] * 3  # summarize reads maxDets[2]; sorting keeps them equal
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def assert_same_as_coco(truth, preds, class_names, max_dets: int = 100) -> float:
    ours = evaluate(truth, preds, class_names, max_dets=max_dets)
    ev = coco_eval(truth, preds, class_names, max_dets)
    precision = ev.eval["precision"][:, :, :, 0, -1]  # T, R, K at area 'all', maxDets max_dets
    if max_dets == 100:
        diffs = [abs(ours.map50_95 - ev.stats[0]), abs(ours.map50 - ev.stats[1])]
    else:  # summarize's stats[0] reads maxDets=100 literally; take the same mean from the array
        diffs = [abs(ours.map50_95 - np.mean(precision[precision > -1]))]
        diffs.append(abs(ours.map50 - np.mean(precision[0][precision[0] > -1])))
    for k, name in enumerate(class_names):
        cell = precision[:, :, k]
        if (cell > -1).any():
            assert name in ours.per_class_ap
            diffs.append(abs(ours.per_class_ap[name] - np.mean(cell[cell > -1])))
            diffs.append(abs(ours.per_class_ap50[name] - np.mean(cell[0])))
            np.testing.assert_allclose(ours.pr_curves[name][1], cell[0], atol=1e-9)
        else:
            assert name not in ours.per_class_ap and name not in ours.pr_curves
    assert max(diffs) < 0.005, diffs
    return max(diffs)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_pycocotools(seed: int) -> None:
    truth, preds = scene(seed)
    assert assert_same_as_coco(truth, preds, CLASSES) < 1e-9


@pytest.mark.parametrize("seed", [10, 11])
def test_matches_pycocotools_with_tied_scores(seed: int) -> None:
    truth, preds = scene(seed, tie_scores=True)  # ties broken by input order and image id order
    assert assert_same_as_coco(truth, preds, CLASSES) < 1e-9


@pytest.mark.parametrize("max_dets", [1, 2, 5])
def test_matches_pycocotools_when_max_dets_truncates(max_dets: int) -> None:
    truth, preds = scene(20 + max_dets, per_image=12)
    assert assert_same_as_coco(truth, preds, CLASSES, max_dets) < 1e-9


def test_matches_pycocotools_with_oversized_labels_ignored() -> None:
    truth, preds = scene(30, images=40)
    huge = box(0, 0, 200_000, 100_000, "car")  # 2e10 px², outside COCO's area range 'all'
    truth["img-00001"] = [*truth["img-00001"], huge]
    preds["img-00001"] = [*preds.get("img-00001", []), box(0, 0, 200_000, 100_000, "car", 0.99)]
    truth["img-00002"] = [huge]  # the only label of an image
    assert assert_same_as_coco(truth, preds, CLASSES) < 1e-9


def test_iou_matches_pycocotools() -> None:
    from pycocotools import mask

    rng = np.random.default_rng(5)
    dt = np.column_stack([rng.uniform(0, 100, (40, 2)), rng.uniform(0, 60, (40, 2))])
    gt = np.column_stack([rng.uniform(0, 100, (30, 2)), rng.uniform(0, 60, (30, 2))])
    expected = mask.iou(dt.tolist(), gt.tolist(), [0] * 30)
    np.testing.assert_array_equal(iou_matrix(dt, gt), expected)


def test_perfect_predictions() -> None:
    truth = {"a": [box(0, 0, 10, 10), box(20, 20, 40, 40, "bus")], "b": [], "c": [box(5, 5, 50, 50, "person")]}
    preds = {k: [b.model_copy(update={"score": 0.9}) for b in v] for k, v in truth.items()}
    ev = evaluate(truth, preds, CLASSES)
    assert ev.map50_95 == pytest.approx(1.0) and ev.map50 == pytest.approx(1.0)
    assert ev.precision == 1.0 and ev.recall == 1.0 and ev.image_agreement == 1.0 and ev.images == 3
    assert set(ev.per_class_ap) == {"car", "bus", "person"}  # classes without labels have no AP
    rc, pr = ev.pr_curves["car"]
    assert rc == RECALL_THRESHOLDS.tolist() and len(pr) == 101 and min(pr) == pytest.approx(1.0)


def test_empty_predictions() -> None:
    truth = {"a": [box(0, 0, 10, 10)], "b": [box(0, 0, 10, 10, "bus")]}
    ev = evaluate(truth, {}, CLASSES)
    assert ev.map50_95 == 0.0 and ev.map50 == 0.0 and ev.recall == 0.0
    assert ev.precision is None and ev.image_agreement == 0.0 and ev.images == 2
    assert ev.per_class_ap == {"car": 0.0, "bus": 0.0}


def test_nothing_labelled() -> None:
    ev = evaluate({"a": []}, {"a": [box(0, 0, 5, 5, score=0.9)]}, CLASSES)
    assert ev.map50_95 == 0.0 and ev.per_class_ap == {} and ev.recall is None
    assert ev.precision == 0.0 and ev.image_agreement == 0.0
    empty = evaluate({"a": [], "b": []}, {}, CLASSES)
    assert empty.image_agreement == 1.0 and empty.precision is None  # nothing to find, nothing found
    none = evaluate({}, {}, CLASSES)
    assert none.images == 0 and none.image_agreement is None
    assert none.metrics() == Metrics(map50_95=0.0, map50=0.0, images=0)


def test_operating_point_by_hand() -> None:
    truth = {
        "exact": [box(0, 0, 10, 10), box(20, 0, 30, 10, "bus")],
        "extra": [box(0, 0, 10, 10)],
        "wrong-class": [box(0, 0, 10, 10)],
        "missed": [box(0, 0, 10, 10), box(50, 50, 60, 60)],
        "weak": [box(0, 0, 10, 10)],
    }
    preds = {
        "exact": [box(0, 0, 10, 10, score=0.9), box(20, 0, 30, 10, "bus", 0.8)],
        "extra": [box(0, 0, 10, 10, score=0.9), box(40, 40, 50, 50, "ghost", 0.9)],  # outside the taxonomy
        "wrong-class": [box(0, 0, 10, 10, "bus", 0.9)],
        "missed": [box(1, 1, 10, 10, score=0.7)],  # IoU 0.81: matched
        "weak": [box(0, 0, 10, 10, score=0.2)],  # below conf: not counted at the operating point
    }
    ev = evaluate(truth, preds, CLASSES, conf=0.25)
    # detections at conf: 2 + 2 + 1 + 1 = 6, matched: 2 + 1 + 0 + 1 = 4; labels 7
    assert ev.precision == pytest.approx(4 / 6) and ev.recall == pytest.approx(4 / 7)
    assert ev.image_agreement == pytest.approx(1 / 5)  # only "exact"
    assert "ghost" not in ev.per_class_ap
    looser = evaluate(truth, preds, CLASSES, conf=0.1)
    assert looser.image_agreement == pytest.approx(2 / 5) and looser.recall == pytest.approx(5 / 7)
    strict = evaluate(truth, preds, CLASSES, match_iou=0.9)
    assert strict.recall == pytest.approx(3 / 7)  # the 0.81 box no longer matches


def test_one_detection_matches_one_label() -> None:
    truth = {"a": [box(0, 0, 10, 10), box(0, 0, 10, 10)]}  # two labels on the same spot
    ev = evaluate(truth, {"a": [box(0, 0, 10, 10, score=0.9)]}, CLASSES)
    assert ev.recall == 0.5 and ev.precision == 1.0 and ev.image_agreement == 0.0
    dup = evaluate({"a": [box(0, 0, 10, 10)]}, {"a": [box(0, 0, 10, 10, score=0.9)] * 2}, CLASSES)
    assert dup.precision == 0.5 and dup.recall == 1.0 and dup.image_agreement == 0.0


def test_unknown_label_class_is_a_miss_without_ap() -> None:
    ev = evaluate({"a": [box(0, 0, 10, 10, "ghost")]}, {"a": [box(0, 0, 10, 10, "ghost", 0.9)]}, ["car"])
    assert ev.per_class_ap == {} and ev.recall == 1.0  # matched at the operating point by name
    missed = evaluate({"a": [box(0, 0, 10, 10, "ghost")]}, {}, ["car"])
    assert missed.recall == 0.0 and missed.image_agreement == 0.0


def test_metrics_and_json() -> None:
    truth, preds = scene(3, images=60)
    ev = evaluate(truth, preds, CLASSES)
    m = ev.metrics()
    assert m.images == 60 and m.map50_95 == round(ev.map50_95, 4)
    assert set(m.per_class_ap) == set(ev.per_class_ap)
    data = ev.to_json()
    assert data["images"] == 60 and len(data["pr_curves"]["car"]["precision"]) == 101
    import json

    assert json.loads(json.dumps(data)) == data


def test_a_thousand_images_is_quick() -> None:
    truth, preds = scene(7, images=1000, per_image=10)
    start = time.perf_counter()
    evaluate(truth, preds, CLASSES)
    assert time.perf_counter() - start < 10.0  # about half a second on a laptop
