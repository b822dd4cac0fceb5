"""The non-learning baseline the loop benchmark reports: what a detector scores without training.

A world a colour threshold can solve shows nothing about learning, so the bench measures this
detector on the same test images as the trained model. It is the obvious hand-made detector,
given a fair effort:

1. smooth the image lightly (sensor noise) and measure each pixel's colour distance from the
   image's median colour (the background, when objects are a minority of the pixels);
2. threshold that distance at several levels around Otsu's threshold (0.7x to 4x, never below
   a floor, so a plain image yields nothing): a high level separates an object from a background
   patch it touches at a low one; open each mask with a 3x3 square to drop specks;
3. label the connected components (scipy.ndimage.label) and box each one of at least
   `min_area` pixels and at most half the image;
4. score a component by the edge strength along its boundary (mean Sobel gradient magnitude,
   mapped into (0, 1)): objects have crisp edges, background patches soft ones; of components
   whose boxes overlap by IoU > 0.7 (the same thing found at two levels) keep the best scored;
5. classify a component by its shape: fill ratio (pixels / box area), solidity (pixels / convex
   hull area), whether it has a hole, and how far its centroid sits from its box's centre,
   matched to the nearest hand-set prototype among the requested classes whose shapes it knows
   (circle, square, triangle, diamond, cross, ring, star); when it knows none of them, the
   first class.

On the `shapes` world (192x144, 100 scenes) it scores mAP50-95 about 0.7; on the `photo` world
under 0.1. mAP is computed with the project's evaluator (`libs/detmetrics.py`), as the evaluator
service does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from visionloop.contracts import Box
from visionloop.libs.detmetrics import evaluate, iou_matrix

PROTOTYPES: dict[str, tuple[float, float, float, float]] = {
    "circle": (0.785, 1.0, 0.0, 0.0),
    "square": (1.0, 1.0, 0.0, 0.0),
    "triangle": (0.5, 1.0, 0.0, 0.16),
    "diamond": (0.5, 1.0, 0.0, 0.0),
    "cross": (0.52, 0.7, 0.0, 0.0),
    "ring": (0.45, 0.75, 1.0, 0.0),
    "star": (0.4, 0.6, 0.0, 0.0),
}
"""Shape features of each class the baseline knows: (fill ratio, solidity, has a hole, centroid
offset from the box centre as a fraction of the box), for an upright, unoccluded object."""

_WEIGHTS = np.array([1.0, 1.5, 2.0, 2.0])
_LEVELS = (0.7, 1.0, 1.4, 2.0, 2.8, 4.0)  # thresholds, as multiples of Otsu's
_MIN_THRESHOLD = 18.0  # colour distance below which nothing counts as an object
_SAME_IOU = 0.7  # boxes overlapping more than this are one component found at two levels
_EDGE_SCALE = 200.0  # boundary gradient that scores 0.5


def _cues(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel colour distance from the image's median colour, and gradient magnitude (Sobel
    over the three channels), both on a lightly smoothed copy."""
    pixels = ndimage.uniform_filter(np.asarray(image.convert("RGB"), dtype=np.float32), size=(3, 3, 1))
    distance = np.linalg.norm(pixels - np.median(pixels.reshape(-1, 3), axis=0), axis=2)
    gradient = np.sqrt(sum(ndimage.sobel(pixels[:, :, c], axis=a) ** 2 for c in range(3) for a in (0, 1)))
    return distance, gradient


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of `values` (64 bins): the cut that best separates two classes."""
    counts, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres) / np.maximum(w0, 1)
    m1 = (np.sum(counts * centres) - np.cumsum(counts * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


Candidate = tuple[float, tuple[slice, slice], np.ndarray]
"""A component found: its score, its box as (rows, columns) slices, its pixels cut to the box."""


def _candidates(distance: np.ndarray, gradient: np.ndarray, floor: int) -> list[Candidate]:
    """(score, box slices, component cut to its box) of every component at every level."""
    base = max(_otsu(distance), _MIN_THRESHOLD)
    found = []
    for level in _LEVELS:
        mask = ndimage.binary_opening(distance > base * level, structure=np.ones((3, 3), dtype=bool))
        labels, _ = ndimage.label(mask)
        for index, where in enumerate(ndimage.find_objects(labels), start=1):
            if where is None:
                continue
            component = labels[where] == index
            area = int(component.sum())
            if area < floor or area > 0.5 * distance.size:
                continue
            edge = float(gradient[where][component & ~ndimage.binary_erosion(component)].mean())
            found.append((edge / (edge + _EDGE_SCALE), where, component))
    return found


def _distinct(found: list[Candidate]) -> list[Candidate]:
    """The best-scored of each group of near-identical boxes (greedy, best first)."""
    kept: list[Candidate] = []
    boxes = np.empty((0, 4))
    for item in sorted(found, key=lambda c: -c[0]):
        ys, xs = item[1]
        box = np.array([[xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start]], dtype=np.float64)
        if len(boxes) and iou_matrix(box, boxes).max() > _SAME_IOU:
            continue
        kept.append(item)
        boxes = np.vstack([boxes, box])
    return kept


def _features(component: np.ndarray) -> np.ndarray:
    """(fill ratio, solidity, has a hole, centroid offset) of a boolean component cut to its box."""
    h, w = component.shape
    area = float(component.sum())
    ys, xs = np.nonzero(component)
    try:
        hull = ConvexHull(np.stack([xs, ys], axis=1).astype(np.float64))
        hull_area = hull.volume + hull.area / 2 + 1  # pixel centres' hull grown by half a pixel
    except (QhullError, ValueError):  # a line of pixels
        hull_area = area
    holes = float(ndimage.binary_fill_holes(component).sum()) - area
    offset = abs(ys.mean() + 0.5 - h / 2) / h + abs(xs.mean() + 0.5 - w / 2) / w
    return np.array([area / (h * w), min(1.0, area / hull_area), float(holes > 0.05 * area), offset])


def _classify(features: np.ndarray, classes: Sequence[str]) -> str:
    """The requested class whose prototype is nearest; the first class when it knows none."""
    known = [name for name in classes if name in PROTOTYPES]
    if not known:
        return classes[0]
    return min(known, key=lambda name: float(np.sum(_WEIGHTS * (features - PROTOTYPES[name]) ** 2)))


def baseline_detections(
    image: Image.Image, classes: Sequence[str], *, min_area: int | None = None
) -> list[Box]:
    """Boxes, classes and scores the colour-threshold detector finds in `image`.

    `min_area` (pixels) defaults to 0.15% of the image, at least 20.
    """
    if not classes:
        raise ValueError("baseline_detections needs at least one class name")
    width, height = image.size
    floor = min_area if min_area is not None else max(20, int(0.0015 * width * height))
    distance, gradient = _cues(image)
    return [
        Box(x1=float(xs.start), y1=float(ys.start), x2=float(xs.stop), y2=float(ys.stop),
            class_name=_classify(_features(component), classes), score=round(score, 6))
        for score, (ys, xs), component in _distinct(_candidates(distance, gradient, floor))
    ]


def baseline_map(samples: Iterable[tuple[Image.Image, Sequence[Box]]], classes: Sequence[str]) -> dict:
    """The baseline measured on labelled images: COCO mAP50-95 and mAP50 over `classes` (the
    evaluator's metric), per-class AP50-95, precision and recall at score 0.25, and the count."""
    truth: dict[str, list[Box]] = {}
    predictions: dict[str, list[Box]] = {}
    for i, (image, boxes) in enumerate(samples):
        key = f"{i:06d}"
        truth[key] = list(boxes)
        predictions[key] = baseline_detections(image, classes)
    result = evaluate(truth, predictions, list(classes))
    return {
        "map50_95": round(result.map50_95, 4),
        "map50": round(result.map50, 4),
        "per_class_ap": {name: round(ap, 4) for name, ap in result.per_class_ap.items()},
        "precision": None if result.precision is None else round(result.precision, 4),
        "recall": None if result.recall is None else round(result.recall, 4),
        "images": result.images,
    }
