"""libs/inference.py: letterbox, decoding, NMS, validation, and parity with Ultralytics `predict`."""

from __future__ import annotations

import io

import numpy as np
import pytest
from detector import not_a_detector, onnx_bytes, trained, wrong_head
from PIL import Image

from visionloop.libs.inference import (
    Detector,
    InferenceError,
    SessionCache,
    _resize_numpy,
    decode_image,
    letterbox,
    nms,
    postprocess,
)
from visionloop.libs.scenes import render_scene


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("shape", [(240, 320), (480, 640), (100, 77), (31, 470), (128, 128), (1, 900)])
@pytest.mark.parametrize("auto", [False, True])
def test_letterbox_matches_ultralytics(shape: tuple[int, int], auto: bool) -> None:
    from visionloop.libs.yolo import ultralytics

    from detector import TEST_STATE

    ultralytics(TEST_STATE / "ultralytics")
    from ultralytics.data.augment import LetterBox

    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, placement = letterbox(image, 128, auto=auto, stride=32)
    theirs = LetterBox(128, auto=auto, stride=32)(image=image)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    # a box covering the whole image maps back onto the whole image
    full = np.array([[placement.left, placement.top, placement.left + placement.new_unpad[0], placement.top + placement.new_unpad[1]]], np.float32)
    np.testing.assert_allclose(placement.to_original(full)[0], [0, 0, shape[1], shape[0]], atol=1e-3)


def test_numpy_resize_is_within_one_grey_level_of_opencv() -> None:
    import cv2

    rng = np.random.default_rng(0)
    for h, w, nh, nw in ((240, 320, 96, 128), (100, 77, 128, 98), (31, 47, 128, 194)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(int)
        assert np.abs(_resize_numpy(image, nw, nh).astype(int) - ref).max() <= 1


def test_nms_matches_torchvision() -> None:
    import torch
    import torchvision

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, (300, 2)).astype(np.float32)
    wh = rng.uniform(5, 60, (300, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    for iou in (0.3, 0.5, 0.7):
        ours = nms(boxes, scores, iou)
        theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        assert ours.tolist() == theirs.tolist()


def test_postprocess_decodes_a_yolo_head_per_class() -> None:
    # two anchors on the same spot with different classes survive; a weaker same-class one does not
    pred = np.zeros((4 + 2, 5), np.float32)
    pred[:4, 0] = [50, 50, 20, 20]
    pred[4:, 0] = [0.9, 0.1]
    pred[:4, 1] = [50, 50, 20, 20]
    pred[4:, 1] = [0.1, 0.8]
    pred[:4, 2] = [51, 50, 20, 20]
    pred[4:, 2] = [0.6, 0.0]
    pred[:4, 3] = [10, 10, 4, 4]
    pred[4:, 3] = [0.2, 0.0]  # below conf
    _, placement = letterbox(np.zeros((64, 128, 3), np.uint8), 128)  # scaled 1:1, padded 32 above
    found = postprocess(pred, placement, conf=0.25, iou=0.7)
    assert found.classes.tolist() == [0, 1]
    np.testing.assert_allclose(found.scores, [0.9, 0.8])
    np.testing.assert_allclose(found.boxes[0], [40, 8, 60, 28])  # y shifted by the 32 px pad
    assert len(postprocess(pred, placement, conf=0.95, iou=0.7)) == 0


def test_decode_image_applies_exif_orientation_and_refuses_garbage() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    assert decode_image(out.getvalue()).shape == (40, 20, 3)
    with pytest.raises(InferenceError) as caught:
        decode_image(b"\x89PNG\r\n\x1a\n truncated")
    assert caught.value.reason == "image_undecodable"


def test_files_that_are_not_detectors_are_refused_with_a_reason() -> None:
    with pytest.raises(InferenceError) as caught:
        Detector(not_a_detector(), class_names=["a"], imgsz=64)
    assert caught.value.reason == "not_a_detector"
    with pytest.raises(InferenceError) as caught:
        Detector(wrong_head(9), class_names=["a", "b", "c"], imgsz=64)
    assert caught.value.reason == "class_count_mismatch" and "4 + 5 classes" in str(caught.value)
    with pytest.raises(InferenceError) as caught:
        Detector(b"definitely not onnx", class_names=["a"], imgsz=64)
    assert caught.value.reason == "model_unloadable"
    with pytest.raises(InferenceError) as caught:
        Detector(onnx_bytes(), class_names=["circle", "square"])
    assert caught.value.reason == "class_count_mismatch"


def test_detector_reads_ultralytics_metadata_and_caches_sessions() -> None:
    detector = Detector(onnx_bytes())
    assert detector.class_names == list(trained().class_names)
    assert detector.input_hw == (128, 128) and detector.max_batch is None
    cache = SessionCache(capacity=1)
    loads = []
    first = cache.get("a" * 64, lambda: loads.append(1) or detector)
    assert cache.get("a" * 64, lambda: loads.append(1) or detector) is first and loads == [1]
    cache.get("b" * 64, lambda: detector)
    assert "a" * 64 not in cache and len(cache) == 1


def test_static_batch_graphs_run_in_chunks() -> None:
    static = Detector(onnx_bytes(128, dynamic=False))
    dynamic = Detector(onnx_bytes(128))
    images = [np.asarray(render_scene(seed=500 + i).image) for i in range(3)]
    assert static.max_batch == 1
    for a, b in zip(static.predict(images), dynamic.predict(images), strict=True):
        assert a.classes.tolist() == b.classes.tolist()
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.05)


@pytest.mark.parametrize("rect", [False, True])
def test_parity_with_ultralytics_predict(rect: bool) -> None:
    """Our ONNX Runtime path vs Ultralytics `predict` on the PyTorch weights, same images and thresholds.

    `rect=False` is the recognizer's batch path (a fixed square input); `rect=True` is
    Ultralytics' default for one image (padding only to the stride), which `letterbox(auto=True)`
    reproduces on the dynamic-shape export.
    """
    from visionloop.libs.yolo import ultralytics

    model = ultralytics(trained().state_dir).YOLO(str(trained().weights))
    detector = Detector(onnx_bytes(128))
    conf, iou = 0.25, 0.7
    ious, compared, theirs_total, ours_total = [], 0, 0, 0
    for i in range(10):
        scene = render_scene(seed=77_000 + i, width=320 + 24 * i, height=240, classes=trained().class_names, objects=(1, 3), size=(0.25, 0.5))
        rgb = np.asarray(scene.image)
        result = model.predict(rgb[:, :, ::-1].copy(), imgsz=128, conf=conf, iou=iou, rect=rect, verbose=False, device="cpu")[0]
        if rect:
            boxed, placement = letterbox(rgb, 128, auto=True, stride=detector.stride)
            from visionloop.libs.inference import to_tensor

            raw = detector.session.run(None, {detector.info.input_name: to_tensor([boxed])})[0][0]
            ours = postprocess(raw, placement, conf=conf, iou=iou)
        else:
            ours = detector.predict([rgb], conf=conf, iou=iou)[0]
        theirs_boxes = result.boxes.xyxy.numpy()
        theirs_classes = result.boxes.cls.numpy().astype(int)
        theirs_total += len(theirs_boxes)
        ours_total += len(ours)
        assert len(ours) == len(theirs_boxes), f"image {i}: {len(ours)} boxes vs Ultralytics {len(theirs_boxes)}"
        for box, cls in zip(theirs_boxes, theirs_classes, strict=True):
            best = int(np.argmax([_iou(box, o) for o in ours.boxes]))
            assert ours.classes[best] == cls
            ious.append(_iou(box, ours.boxes[best]))
            compared += 1
    assert compared >= 10 and theirs_total == ours_total
    assert float(np.mean(ious)) >= 0.99, f"mean IoU {np.mean(ious):.4f}"


def test_images_in_parallel_give_the_same_answers() -> None:
    images = [np.asarray(render_scene(seed=600 + i, classes=trained().class_names).image) for i in range(5)]
    serial = Detector(onnx_bytes(), threads=1).predict(images, conf=[0.25, 0.3, 0.25, 0.5, 0.25])
    parallel = Detector.parallel(onnx_bytes(), threads=3)
    assert parallel.workers == 3
    found = parallel.predict(images, conf=[0.25, 0.3, 0.25, 0.5, 0.25], chunk=1)
    for a, b in zip(serial, found, strict=True):
        assert a.classes.tolist() == b.classes.tolist()
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.05)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
