"""Detection metrics as COCO computes them (mAP50-95, mAP50, per-class AP), plus the operating
point a deployed model is judged at (precision, recall, per-image agreement at `conf`).

Pure numpy, no pycocotools at run time; the tests hold every number to pycocotools' `COCOeval`
(bbox, area range `all`) on random data. What is COCO's, and kept exactly:

- IoU on (x, y, w, h) without the +1 pixel convention; thresholds 0.50:0.05:0.95;
- per image and class, detections sorted by score (stable), the first `max_dets` kept;
- each detection, best first, takes the unmatched ground-truth box of its class with the highest
  IoU at or above the threshold (the last one on ties, as `evaluateImg` loops);
- per class, detections of all images (in image-id order) sorted by score (stable), precision
  made monotone, sampled at 101 recall points with `searchsorted(..., side="left")`;
- a class without ground-truth boxes has no AP and is left out of the means (0.0 when no
  class has any). Boxes are never crowd; a box over 1e10 px² is ignored, as area range `all` does.

The operating point is what a user sees: only detections scoring at least `conf`, matched per
image and class the same greedy way at `match_iou`. A detection of a class outside
`class_names` has no AP, but it is a false positive there; a ground-truth box of such a class
is a miss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from visionloop.contracts import Box, Metrics

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
"""The ten IoU thresholds of mAP50-95, exactly as COCOeval builds them."""
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
"""The 101 recall points AP is sampled at."""
_AREA_MAX = 1e5**2  # COCO's area range 'all' is [0, 1e10]
_EPS = np.spacing(1)


@dataclass(frozen=True)
class Evaluation:
    """One model measured on one labelled image set."""

    map50_95: float
    map50: float
    per_class_ap: dict[str, float]
    """AP50-95 of each class with at least one ground-truth box."""
    per_class_ap50: dict[str, float]
    """AP at IoU 0.5 of the same classes."""
    precision: float | None
    """Matched / all detections at `conf` (None when there are none)."""
    recall: float | None
    """Matched / all ground-truth boxes at `conf` (None when there are none)."""
    image_agreement: float | None
    """Fraction of images where, at `conf`, every label is found and nothing extra (None: no images)."""
    images: int
    pr_curves: dict[str, tuple[list[float], list[float]]]
    """Per class at IoU 0.5: the 101 recall points and the precision COCO samples there."""
    conf: float = 0.25
    """Operating threshold of precision, recall and agreement."""
    match_iou: float = 0.5
    """IoU a detection needs to match a label at the operating point."""

    def metrics(self) -> Metrics:
        """The contract's `Metrics`: values clipped to [0, 1] and rounded to 4 decimals."""

        def clean(value: float | None) -> float | None:
            return None if value is None else round(min(max(float(value), 0.0), 1.0), 4)

        return Metrics(
            map50_95=clean(self.map50_95),
            map50=clean(self.map50),
            precision=clean(self.precision),
            recall=clean(self.recall),
            per_class_ap={name: clean(ap) for name, ap in self.per_class_ap.items()},
            image_agreement=clean(self.image_agreement),
            images=self.images,
        )

    def to_json(self) -> dict:
        """Everything, JSON-ready: scalars to 6 decimals, curves to 4."""

        def r6(value: float | None) -> float | None:
            return None if value is None else round(float(value), 6)

        return {
            "map50_95": r6(self.map50_95),
            "map50": r6(self.map50),
            "precision": r6(self.precision),
            "recall": r6(self.recall),
            "image_agreement": r6(self.image_agreement),
            "images": self.images,
            "conf": self.conf,
            "match_iou": self.match_iou,
            "per_class_ap": {name: r6(ap) for name, ap in self.per_class_ap.items()},
            "per_class_ap50": {name: r6(ap) for name, ap in self.per_class_ap50.items()},
            "pr_curves": {
                name: {"recall": [round(x, 4) for x in rc], "precision": [round(y, 4) for y in pr]}
                for name, (rc, pr) in self.pr_curves.items()
            },
        }


def _xywh(boxes: Sequence[Box]) -> np.ndarray:
    """(N, 4) float64 x, y, w, h: the form COCO's IoU works on."""
    out = np.empty((len(boxes), 4), dtype=np.float64)
    for i, b in enumerate(boxes):
        out[i] = (b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1)
    return out


def iou_matrix(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xywh boxes, computed as pycocotools' `bbIou` does (same float operations)."""
    w = np.minimum((dt[:, 2] + dt[:, 0])[:, None], (gt[:, 2] + gt[:, 0])[None, :]) - np.maximum(
        dt[:, 0][:, None], gt[:, 0][None, :]
    )
    h = np.minimum((dt[:, 3] + dt[:, 1])[:, None], (gt[:, 3] + gt[:, 1])[None, :]) - np.maximum(
        dt[:, 1][:, None], gt[:, 1][None, :]
    )
    overlap = (w > 0) & (h > 0)
    inter = w * h
    union = (dt[:, 2] * dt[:, 3])[:, None] + (gt[:, 2] * gt[:, 3])[None, :] - inter
    out = np.zeros(inter.shape, dtype=np.float64)
    np.divide(inter, union, out=out, where=overlap)
    return out


def greedy_match(
    ious: np.ndarray, thresholds: np.ndarray, gt_ignore: np.ndarray | None = None
) -> np.ndarray:
    """(T, D) index of the ground-truth box each detection matches per threshold, -1 for none.

    Detections are rows of `ious` in score order; COCO's `evaluateImg` loop, one threshold per
    row of the result: a detection takes the free box with the highest IoU at or above the
    threshold, the last such box on ties; ignored boxes (sorted last) only when no other fits.
    """
    n_dt, n_gt = ious.shape
    n_t = len(thresholds)
    matches = np.full((n_t, n_dt), -1, dtype=np.int64)
    if n_dt == 0 or n_gt == 0:
        return matches
    floor = np.minimum(thresholds, 1 - 1e-10)[:, None]
    taken = np.zeros((n_t, n_gt), dtype=bool)
    rows = np.arange(n_t)
    ignore = gt_ignore if gt_ignore is not None and gt_ignore.any() else None
    for d in range(n_dt):
        row = ious[d]
        fits = (row[None, :] >= floor) & ~taken
        if not fits.any():
            continue
        if ignore is not None:
            regular = fits & ~ignore
            fits = np.where(regular.any(axis=1, keepdims=True), regular, fits)
        values = np.where(fits, row[None, :], -1.0)
        best = n_gt - 1 - np.argmax(values[:, ::-1], axis=1)  # last index of the max
        hit = fits[rows, best]
        matches[rows[hit], d] = best[hit]
        taken[rows[hit], best[hit]] = True
    return matches


@dataclass
class _Class:
    """One class's detections across images, in image order, for COCO's accumulate."""

    scores: list[np.ndarray] = field(default_factory=list)
    matched: list[np.ndarray] = field(default_factory=list)  # (T, D) bool
    ignored: list[np.ndarray] = field(default_factory=list)  # (T, D) bool
    labels: int = 0  # ground-truth boxes that are not ignored


def _by_class(boxes: Sequence[Box]) -> dict[str, list[Box]]:
    grouped: dict[str, list[Box]] = {}
    for b in boxes:
        grouped.setdefault(b.class_name, []).append(b)
    return grouped


def _score(b: Box) -> float:
    return 1.0 if b.score is None else float(b.score)  # a box without a score is certain


def _sorted_by_score(boxes: Sequence[Box]) -> list[Box]:
    order = np.argsort(-np.array([_score(b) for b in boxes], dtype=np.float64), kind="mergesort")
    return [boxes[i] for i in order]


def _ap_image(acc: _Class, gt_boxes: list[Box], dt_boxes: list[Box], max_dets: int) -> None:
    """COCO's computeIoU + evaluateImg for one image and class, appended to the class's pile."""
    gt = _xywh(gt_boxes)
    gt_ignore = gt[:, 2] * gt[:, 3] > _AREA_MAX
    order = np.argsort(gt_ignore, kind="mergesort")  # ignored boxes last, as COCO sorts them
    gt, gt_ignore = gt[order], gt_ignore[order]
    acc.labels += int((~gt_ignore).sum())
    dts = _sorted_by_score(dt_boxes)[:max_dets]
    if not dts:
        return
    dt = _xywh(dts)
    n_t = len(IOU_THRESHOLDS)
    matches = greedy_match(iou_matrix(dt, gt), IOU_THRESHOLDS, gt_ignore)
    matched = matches >= 0
    ignored = np.zeros_like(matched)
    ignored[matched] = gt_ignore[matches[matched]]
    area = dt[:, 2] * dt[:, 3]
    out_of_range = (area < 0) | (area > _AREA_MAX)
    ignored |= ~matched & np.repeat(out_of_range[None, :], n_t, axis=0)
    acc.scores.append(np.array([_score(b) for b in dts], dtype=np.float64))
    acc.matched.append(matched)
    acc.ignored.append(ignored)


def _accumulate(acc: _Class) -> np.ndarray | None:
    """(T, R) precision at the recall points, or None for a class without ground truth."""
    if acc.labels == 0:
        return None
    n_t, n_r = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    if not acc.scores:
        return np.zeros((n_t, n_r))
    scores = np.concatenate(acc.scores)
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate(acc.matched, axis=1)[:, order]
    ignored = np.concatenate(acc.ignored, axis=1)[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    n_dt = tp.shape[1]
    out = np.zeros((n_t, n_r))
    for t in range(n_t):
        rc = tp[t] / acc.labels
        pr = tp[t] / (fp[t] + tp[t] + _EPS)
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # monotone, as COCO's backward loop
        at = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        inside = at < n_dt
        out[t, inside] = pr[at[inside]]
    return out


def _operating_point(
    gt_boxes: Sequence[Box], dt_boxes: Sequence[Box], conf: float, match_iou: float
) -> int:
    """Detections scoring at least `conf` that match a label of their class at `match_iou`."""
    kept = _by_class([b for b in dt_boxes if _score(b) >= conf])
    labels = _by_class(gt_boxes)
    found = 0
    threshold = np.array([match_iou], dtype=np.float64)
    for name, dts in kept.items():
        gts = labels.get(name)
        if not gts:
            continue
        ious = iou_matrix(_xywh(_sorted_by_score(dts)), _xywh(gts))
        found += int((greedy_match(ious, threshold)[0] >= 0).sum())
    return found


def _per_class(classes: Mapping[str, _Class], names: Sequence[str]) -> tuple[
        dict[str, float], dict[str, float], dict[str, tuple[list[float], list[float]]], list[np.ndarray]]:
    """AP50-95, AP50 and the PR curve (IoU 0.5) of each class with labels or detections; the
    precision tables for the overall mean."""
    per_class_ap: dict[str, float] = {}
    per_class_ap50: dict[str, float] = {}
    pr_curves: dict[str, tuple[list[float], list[float]]] = {}
    sampled = []
    for name in names:
        precision = _accumulate(classes[name])
        if precision is None:
            continue
        sampled.append(precision)
        per_class_ap[name] = float(np.mean(precision))
        per_class_ap50[name] = float(np.mean(precision[0]))
        pr_curves[name] = (RECALL_THRESHOLDS.tolist(), precision[0].tolist())
    return per_class_ap, per_class_ap50, pr_curves, sampled


def evaluate(
    ground_truth: Mapping[str, Sequence[Box]],
    predictions: Mapping[str, Sequence[Box]],
    class_names: Sequence[str],
    *,
    conf: float = 0.25,
    match_iou: float = 0.5,
    max_dets: int = 100,
) -> Evaluation:
    """Measure `predictions` against `ground_truth`, both keyed by image id.

    Every image of `ground_truth` counts, with or without boxes; an image missing from
    `predictions` had no detections, and predictions for images outside `ground_truth` are
    ignored. AP is computed for `class_names` only; `max_dets` caps detections per image and
    class for AP (as COCO's maxDets), not at the operating point.
    """
    names = list(dict.fromkeys(class_names))
    classes = {name: _Class() for name in names}
    image_ids = sorted(ground_truth)  # COCO accumulates images in id order; it breaks score ties
    n_labels = n_dets = n_found = agreeing = 0
    for image_id in image_ids:
        gts = list(ground_truth[image_id])
        dts = list(predictions.get(image_id, ()))
        gt_by_class, dt_by_class = _by_class(gts), _by_class(dts)
        for name in set(gt_by_class) | set(dt_by_class):
            if name in classes:
                _ap_image(classes[name], gt_by_class.get(name, []), dt_by_class.get(name, []), max_dets)
        found = _operating_point(gts, dts, conf, match_iou)
        above = sum(1 for b in dts if _score(b) >= conf)
        n_labels += len(gts)
        n_dets += above
        n_found += found
        agreeing += found == len(gts) == above

    per_class_ap, per_class_ap50, pr_curves, sampled = _per_class(classes, names)
    # COCO's summarize: one mean over every (threshold, recall point, class) cell
    stacked = np.stack(sampled, axis=2) if sampled else np.zeros((len(IOU_THRESHOLDS), 0, 0))
    return Evaluation(
        map50_95=float(np.mean(stacked.reshape(-1))) if sampled else 0.0,
        map50=float(np.mean(stacked[0].reshape(-1))) if sampled else 0.0,
        per_class_ap=per_class_ap,
        per_class_ap50=per_class_ap50,
        precision=n_found / n_dets if n_dets else None,
        recall=n_found / n_labels if n_labels else None,
        image_agreement=agreeing / len(image_ids) if image_ids else None,
        images=len(image_ids),
        pr_curves=pr_curves,
        conf=conf,
        match_iou=match_iou,
    )
