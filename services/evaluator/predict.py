"""Candidate inference on the test set: Ultralytics' own predictor on the PyTorch weights.

The gate measures the model exactly as it was trained (the `.pt`), with Ultralytics' letterbox,
decoding and NMS at a low confidence (0.001) so that AP sees the whole precision-recall curve;
the exported artifacts are held to these figures by the converter's parity checks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from visionloop.contracts import Box
from visionloop.libs.yolo import ultralytics

PREDICT_CONF = 0.001
"""Lowest score kept for mAP (as Ultralytics' and COCO's validators do)."""
PREDICT_IOU = 0.7
"""NMS IoU of Ultralytics' validator."""
MAX_DET = 300

_lock = threading.Lock()
"""One inference at a time per process: torch already uses every core for one batch."""


def resolve_device(device: str) -> str:
    """`auto` is the first CUDA GPU when torch sees one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def predict(
    state_dir: Path, weights: Path, images: Sequence[Any], *, imgsz: int, device: str = "auto", batch: int = 16
) -> list[list[Box]]:
    """Boxes (original-image pixels, class names from the model, scores) for each PIL image."""
    ul = ultralytics(state_dir)
    with _lock:
        model = ul.YOLO(str(weights))
        names = model.names
        out: list[list[Box]] = []
        dev = resolve_device(device)
        for start in range(0, len(images), batch):
            chunk = [im.convert("RGB") for im in images[start:start + batch]]
            results = model.predict(
                chunk, imgsz=imgsz, conf=PREDICT_CONF, iou=PREDICT_IOU, max_det=MAX_DET, device=dev, verbose=False,
                half=False, batch=len(chunk),
            )
            for im, result in zip(chunk, results, strict=True):
                w, h = im.size
                boxes = result.boxes
                xyxy = boxes.xyxy.cpu().numpy().tolist()
                scores = boxes.conf.cpu().numpy().tolist()
                classes = boxes.cls.cpu().numpy().astype(int).tolist()
                found = []
                for (x1, y1, x2, y2), score, cls in zip(xyxy, scores, classes, strict=True):
                    x1, x2 = sorted((min(max(x1, 0.0), w), min(max(x2, 0.0), w)))
                    y1, y2 = sorted((min(max(y1, 0.0), h), min(max(y2, 0.0), h)))
                    found.append(Box(x1=x1, y1=y1, x2=x2, y2=y2, class_name=str(names[cls]), score=min(1.0, max(0.0, float(score)))))
                out.append(found)
        return out
