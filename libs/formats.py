"""Dataset formats at the edges of the loop: COCO, Ultralytics YOLO and Label Studio.

Inside the loop a box has one form, `Box` (pixel corners x1, y1, x2, y2 of the original image,
after EXIF orientation). Every other form is converted here and only here:

| format | box | where |
|---|---|---|
| COCO | `bbox: [x, y, w, h]`, pixels, top-left corner | `coco_bbox` / `from_coco_bbox` |
| YOLO | `class cx cy w h`, normalised to the image size | `yolo_line` / `from_yolo_line` |
| Label Studio | `x, y, width, height` in percent of the image, `rotation` in degrees | `percent_value` / `from_percent` |

Whole datasets are lists of `LabelledImage`: `coco_document` / `read_coco`, `write_yolo` /
`read_yolo` (data.yaml + labels/<split>/*.txt, the layout `ultralytics.data.utils.
check_det_dataset` accepts) and `ls_tasks` / `read_ls_tasks` (Label Studio JSON tasks with
annotations and predictions). The labelling gateway exports and imports with them; the trainer
writes its training folder with `write_yolo`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visionloop.contracts import Box

SPLITS = ("train", "val", "test")
"""Dataset splits in the order they are written."""

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "MPO": "jpg"}
"""File extension of each image format (as Pillow names it)."""

YOLO_DECIMALS = 6
"""Digits after the point of normalised YOLO values: under a thousandth of a pixel at 4K."""


class FormatError(ValueError):
    """A dataset file that cannot be read; `reason` is a code, the message says where and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- one box --------------------------------------------------------------------------------------


def coco_bbox(box: Box) -> list[float]:
    """COCO `[x, y, width, height]` in pixels."""
    return [box.x1, box.y1, box.x2 - box.x1, box.y2 - box.y1]


def from_coco_bbox(bbox: Sequence[float], class_name: str, score: float | None = None) -> Box:
    """A canonical box from COCO `[x, y, width, height]`."""
    if len(bbox) != 4:
        raise FormatError("invalid_box", f"a COCO bbox has 4 numbers, not {len(bbox)}")
    x, y, w, h = (float(v) for v in bbox)
    _finite_and_positive(w, h, x, y)
    return Box(x1=x, y1=y, x2=x + w, y2=y + h, class_name=class_name, score=score)


def yolo_line(box: Box, class_index: int, width: int, height: int) -> str:
    """One line of a YOLO label file: `class cx cy w h`, normalised to the image size."""
    cx = (box.x1 + box.x2) / 2 / width
    cy = (box.y1 + box.y2) / 2 / height
    w = (box.x2 - box.x1) / width
    h = (box.y2 - box.y1) / height
    values = " ".join(f"{_unit(v):.{YOLO_DECIMALS}f}" for v in (cx, cy, w, h))
    return f"{class_index} {values}"


def from_yolo_line(line: str, class_names: Sequence[str], width: int, height: int) -> Box:
    """A canonical box from one YOLO label line (extra columns, e.g. a score, are refused)."""
    parts = line.split()
    if len(parts) != 5:
        raise FormatError("invalid_box", f"a YOLO label line has 5 columns, not {len(parts)}: {line[:80]!r}")
    try:
        index = int(parts[0])
        cx, cy, w, h = (float(p) for p in parts[1:])
    except ValueError:
        raise FormatError("invalid_box", f"a YOLO label line holds numbers only: {line[:80]!r}") from None
    if not 0 <= index < len(class_names):
        raise FormatError("unknown_class", f"class index {index} is not in data.yaml's {len(class_names)} names")
    _finite_and_positive(w, h, cx, cy)
    return Box(
        x1=(cx - w / 2) * width,
        y1=(cy - h / 2) * height,
        x2=(cx + w / 2) * width,
        y2=(cy + h / 2) * height,
        class_name=class_names[index],
    )


def percent_value(box: Box, width: int, height: int) -> dict[str, float]:
    """Label Studio's `x, y, width, height` (percent of the image) and `rotation` (0)."""
    return {
        "x": box.x1 / width * 100,
        "y": box.y1 / height * 100,
        "width": (box.x2 - box.x1) / width * 100,
        "height": (box.y2 - box.y1) / height * 100,
        "rotation": 0.0,
    }


def from_percent(
    x: float,
    y: float,
    w: float,
    h: float,
    width: int,
    height: int,
    class_name: str,
    *,
    rotation: float = 0.0,
    score: float | None = None,
) -> Box:
    """A canonical box from Label Studio percent values.

    Label Studio turns a rectangle by `rotation` degrees clockwise around its top-left corner;
    a turned rectangle becomes the axis-aligned box that encloses it.
    """
    _finite_and_positive(w, h, x, y, rotation)
    px, py = x / 100 * width, y / 100 * height
    pw, ph = w / 100 * width, h / 100 * height
    if rotation % 360 == 0:
        return Box(x1=px, y1=py, x2=px + pw, y2=py + ph, class_name=class_name, score=score)
    theta = math.radians(rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    corners = [(px + dx * cos - dy * sin, py + dx * sin + dy * cos) for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return Box(x1=min(xs), y1=min(ys), x2=max(xs), y2=max(ys), class_name=class_name, score=score)


def _unit(value: float) -> float:
    # -0.0 prints as "-0.000000"; keep the files clean.
    return 0.0 if value == 0 else value


def _finite_and_positive(w: float, h: float, *others: float) -> None:
    if not all(math.isfinite(v) for v in (w, h, *others)):
        raise FormatError("invalid_box", "a box value is not a finite number")
    if w < 0 or h < 0:
        raise FormatError("invalid_box", f"a box has a negative size ({w:g} x {h:g})")


# -- datasets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImage:
    """One image of a dataset with its boxes (canonical pixels)."""

    file_name: str
    """Name of the image file inside the dataset, e.g. `<image_id>.jpg`."""
    width: int
    height: int
    boxes: tuple[Box, ...] = ()
    split: str = "train"
    image_id: str | None = None
    """SHA-256 of the image bytes, when known."""
    predictions: tuple[Box, ...] = ()
    """A model's boxes (with scores), exported as Label Studio predictions."""
    prediction_model: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def file_name_for(image_id: str, image_format: str) -> str:
    """The dataset file name of an image: its SHA-256 and the extension of its format."""
    return f"{image_id}.{EXTENSIONS.get(image_format.upper(), 'jpg')}"


def split_for(image_id: str, val_fraction: float) -> str:
    """`train` or `val`, fixed by the image id so an image never changes split between exports."""
    bucket = int(image_id[:8], 16) / 0xFFFFFFFF if _hex(image_id[:8]) else 0.0
    return "val" if bucket < val_fraction else "train"


def _hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return bool(text)


def coco_document(images: Iterable[LabelledImage], class_names: Sequence[str], *, description: str = "") -> dict[str, Any]:
    """A COCO detection document (categories numbered from 1 in taxonomy order)."""
    category = {name: i + 1 for i, name in enumerate(class_names)}
    doc: dict[str, Any] = {
        "info": {"description": description or "visionloop export", "version": "1.0"},
        "licenses": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(class_names)],
        "images": [],
        "annotations": [],
    }
    annotation_id = 0
    for image_number, image in enumerate(images, start=1):
        entry: dict[str, Any] = {"id": image_number, "file_name": image.file_name, "width": image.width, "height": image.height}
        if image.image_id:
            entry["visionloop_image_id"] = image.image_id
        doc["images"].append(entry)
        for box in image.boxes:
            annotation_id += 1
            x, y, w, h = coco_bbox(box)
            annotation: dict[str, Any] = {
                "id": annotation_id,
                "image_id": image_number,
                "category_id": category[box.class_name],
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
            if box.score is not None:
                annotation["score"] = box.score
            doc["annotations"].append(annotation)
    return doc


def read_coco(doc: Any, *, split: str = "train") -> tuple[list[str], list[LabelledImage]]:
    """Class names (in category id order) and images of a COCO detection document."""
    if not isinstance(doc, dict):
        raise FormatError("invalid_format", "a COCO document is a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise FormatError("invalid_format", f"a COCO document has a list {key!r}")
    try:
        categories = sorted(((int(c["id"]), str(c["name"])) for c in doc["categories"]), key=lambda c: c[0])
        names_by_id = dict(categories)
        boxes: dict[Any, list[Box]] = {}
        for ann in doc["annotations"]:
            if ann.get("iscrowd"):
                continue  # crowd regions are not boxes of single objects
            category_id = int(ann["category_id"])
            if category_id not in names_by_id:
                raise FormatError("unknown_class", f"annotation {ann.get('id')} names category {category_id}, which is not declared")
            box = from_coco_bbox(ann["bbox"], names_by_id[category_id], ann.get("score"))
            boxes.setdefault(ann["image_id"], []).append(box)
        images = [
            LabelledImage(
                file_name=str(img["file_name"]),
                width=int(img["width"]),
                height=int(img["height"]),
                boxes=tuple(boxes.get(img["id"], ())),
                split=split,
                image_id=img.get("visionloop_image_id"),
            )
            for img in doc["images"]
        ]
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # any shape JSON can take
        raise FormatError("invalid_format", f"the COCO document is malformed: {type(exc).__name__}: {exc}") from None
    return [name for _, name in categories], images


def yolo_image_path(image: LabelledImage) -> str:
    """Where an image goes inside a YOLO dataset: `images/<split>/<file name>`."""
    return f"images/{image.split}/{image.file_name}"


def yolo_label_path(image: LabelledImage) -> str:
    """Where an image's labels go: `labels/<split>/<stem>.txt` (Ultralytics' convention)."""
    return f"labels/{image.split}/{Path(image.file_name).stem}.txt"


def yolo_files(images: Iterable[LabelledImage], class_names: Sequence[str]) -> dict[str, str]:
    """Every text file of a YOLO dataset by relative path: data.yaml and one label file per image.

    An image without boxes gets an empty label file (a background image). Splits with no image
    still appear in data.yaml when they are `train` or `val`, which Ultralytics requires; the
    caller creates their (empty) image folders.
    """
    index = {name: i for i, name in enumerate(class_names)}
    files: dict[str, str] = {}
    splits = {"train", "val"}
    for image in images:
        splits.add(image.split)
        lines = [yolo_line(box, index[box.class_name], image.width, image.height) for box in image.boxes]
        files[yolo_label_path(image)] = "".join(line + "\n" for line in lines)
    files["data.yaml"] = data_yaml(class_names, [s for s in SPLITS if s in splits])
    return files


def data_yaml(class_names: Sequence[str], splits: Sequence[str] = ("train", "val")) -> str:
    """Ultralytics' data.yaml: split folders relative to the file, and the class names.

    No `path:` key: Ultralytics then resolves the folders next to data.yaml wherever the
    dataset is unpacked.
    """
    document: dict[str, Any] = {split: f"images/{split}" for split in splits}
    document["nc"] = len(class_names)
    document["names"] = dict(enumerate(class_names))
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def write_yolo(root: Path, images: Sequence[LabelledImage], class_names: Sequence[str], image_bytes: Callable[[LabelledImage], bytes] | None = None) -> Path:
    """Write a YOLO dataset under `root`; return the path of its data.yaml.

    `image_bytes(image)` supplies each image's file; without it the caller places the images
    at `root / yolo_image_path(image)` itself.
    """
    root.mkdir(parents=True, exist_ok=True)
    for relative, text in yolo_files(images, class_names).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    if image_bytes is not None:
        for image in images:
            path = root / yolo_image_path(image)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(image))
    return root / "data.yaml"


def read_data_yaml(text: str) -> tuple[list[str], dict[str, str]]:
    """Class names and split folders of an Ultralytics data.yaml."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FormatError("invalid_format", f"data.yaml is not YAML: {exc}") from None
    if not isinstance(doc, dict) or "names" not in doc:
        raise FormatError("invalid_format", "data.yaml must be a mapping with `names`")
    names = doc["names"]
    if isinstance(names, dict):
        try:
            ordered = sorted((int(k), str(v)) for k, v in names.items())
        except (TypeError, ValueError, OverflowError):
            raise FormatError("invalid_format", "data.yaml `names` maps class indices to names") from None
        if [k for k, _ in ordered] != list(range(len(ordered))):
            raise FormatError("invalid_format", "data.yaml `names` indices must run 0, 1, 2, ...")
        class_names = [v for _, v in ordered]
    elif isinstance(names, list):
        class_names = [str(v) for v in names]
    else:
        raise FormatError("invalid_format", "data.yaml `names` is a list or a mapping")
    splits = {s: str(doc[s]) for s in SPLITS if isinstance(doc.get(s), str)}
    return class_names, splits


def read_yolo_labels(text: str, class_names: Sequence[str], width: int, height: int) -> list[Box]:
    """The boxes of one YOLO label file (blank lines ignored)."""
    return [from_yolo_line(line, class_names, width, height) for line in text.splitlines() if line.strip()]


def image_facts(data: bytes, *, max_pixels: int = 80_000_000) -> tuple[int, int, str]:
    """Width and height after EXIF orientation, and Pillow's format name, of encoded image bytes."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise FormatError("invalid_image", f"the image has {width * height} pixels, over the cap of {max_pixels}")
            image_format = img.format or "unknown"
            orientation = img.getexif().get(0x0112, 1)
    except FormatError:
        raise
    except Exception as exc:  # Pillow raises many kinds for hostile files
        raise FormatError("invalid_image", f"the file is not a readable image: {exc}") from None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height, image_format


# -- Label Studio ----------------------------------------------------------------------------------

LS_FROM_NAME = "label"
LS_TO_NAME = "image"


def ls_result(
    box: Box,
    width: int,
    height: int,
    *,
    from_name: str = LS_FROM_NAME,
    to_name: str = LS_TO_NAME,
    result_id: str | None = None,
) -> dict[str, Any]:
    """One Label Studio `rectanglelabels` result item for a box."""
    item: dict[str, Any] = {
        "from_name": from_name,
        "to_name": to_name,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {**percent_value(box, width, height), "rectanglelabels": [box.class_name]},
    }
    if result_id is not None:
        item["id"] = result_id
    if box.score is not None:
        item["score"] = box.score
    return item


def boxes_from_ls_results(results: Any, width: int | None = None, height: int | None = None) -> list[Box]:
    """Canonical boxes from Label Studio result items; items of other types are skipped.

    The image size comes from each item's `original_width` / `original_height`, else from the
    arguments.
    """
    if not isinstance(results, list):
        raise FormatError("invalid_format", "Label Studio `result` is a list")
    boxes = []
    for item in results:
        if not isinstance(item, dict) or item.get("type") not in ("rectanglelabels", "rectangle"):
            continue
        value = item.get("value")
        if not isinstance(value, dict):
            raise FormatError("invalid_format", "a rectanglelabels result has a `value` object")
        w_px = item.get("original_width", width)
        h_px = item.get("original_height", height)
        labels = value.get("rectanglelabels") or value.get("labels") or []
        if not w_px or not h_px:
            raise FormatError("invalid_format", "a rectanglelabels result needs original_width and original_height")
        if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
            raise FormatError("invalid_box", "a rectanglelabels result names exactly one class")
        try:
            boxes.append(
                from_percent(
                    float(value["x"]), float(value["y"]), float(value["width"]), float(value["height"]),
                    int(w_px), int(h_px), labels[0],
                    rotation=float(value.get("rotation") or 0.0),
                    score=item.get("score") if isinstance(item.get("score"), int | float) and 0 <= item["score"] <= 1 else None,
                )
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # Infinity is valid JSON to json.loads
            if isinstance(exc, FormatError):
                raise
            raise FormatError("invalid_box", f"a rectanglelabels value is malformed: {exc}") from None
    return boxes


def ls_tasks(images: Iterable[LabelledImage], image_url: Callable[[LabelledImage], str]) -> list[dict[str, Any]]:
    """Label Studio JSON tasks: the image URL, the verified boxes as an annotation, the model's
    boxes as a prediction. The image id and split travel in `data` so an import finds them."""
    tasks = []
    for image in images:
        data: dict[str, Any] = {"image": image_url(image), "visionloop_split": image.split}
        if image.image_id:
            data["visionloop_image_id"] = image.image_id
        task: dict[str, Any] = {
            "data": data,
            "annotations": [
                {
                    "result": [ls_result(b, image.width, image.height, result_id=f"b{n}") for n, b in enumerate(image.boxes)],
                    "ground_truth": image.split == "test",
                    "was_cancelled": False,
                }
            ],
        }
        if image.predictions:
            scores = [b.score for b in image.predictions if b.score is not None]
            task["predictions"] = [
                {
                    "model_version": image.prediction_model or "unknown",
                    "score": min(scores) if scores else None,
                    "result": [ls_result(b, image.width, image.height, result_id=f"p{n}") for n, b in enumerate(image.predictions)],
                }
            ]
        tasks.append(task)
    return tasks


@dataclass(frozen=True)
class LsTask:
    """What an import needs from one Label Studio task."""

    image: str
    """`data.image`: a URL or a file name."""
    image_id: str | None
    boxes: list[Box]
    split: str
    width: int | None
    height: int | None


def read_ls_tasks(doc: Any) -> list[LsTask]:
    """The labelled tasks of a Label Studio JSON export (tasks without an annotation are skipped).

    The last annotation that was not cancelled counts; without annotations, nothing is taken
    from predictions (they are a model's guesses, not labels).
    """
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise FormatError("invalid_format", "a Label Studio export is a JSON list of tasks")
    tasks = []
    for n, task in enumerate(doc):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise FormatError("invalid_format", f"task {n} has no `data` object")
        data = task["data"]
        image = data.get("image")
        if not isinstance(image, str) or not image:
            raise FormatError("invalid_format", f"task {n} has no `data.image`")
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not annotations:
            continue
        annotation = annotations[-1]
        results = annotation.get("result") or []
        sizes = [(r.get("original_width"), r.get("original_height")) for r in results if isinstance(r, dict)]
        width, height = next(((w, h) for w, h in sizes if w and h), (None, None))
        split = data.get("visionloop_split")
        if split not in SPLITS:
            split = "test" if annotation.get("ground_truth") else "train"
        tasks.append(
            LsTask(
                image=image,
                image_id=data.get("visionloop_image_id") if isinstance(data.get("visionloop_image_id"), str) else None,
                boxes=boxes_from_ls_results(results),
                split=split,
                width=int(width) if width else None,
                height=int(height) if height else None,
            )
        )
    return tasks
