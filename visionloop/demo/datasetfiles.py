"""Reading and checking a user's labelled dataset (COCO or YOLO) for the demo's `DatasetWorld`.

`load_dataset` reads a COCO detection file or a YOLO folder and checks all of it before anything
starts: a malformed dataset is refused with one `DatasetError` that lists its first problems
(file, line, what is wrong) and how many there are. `visionloop.demo.dataset` re-exports these names.

Where the files are:

- **COCO**: PATH is the JSON file, or a folder holding exactly one `*.json` (at its top or in
  `annotations/`). An image's `file_name` is looked for, in this order, relative to the JSON's
  folder, to an `images/` folder in it, to the folder above it, and to an `images/` folder
  there (so both `x.json` + `images/` and `annotations/x.json` + `images/` work); absolute
  names are taken as they are. Crowd annotations (`iscrowd`) are skipped, as training does.
- **YOLO**: PATH is a folder with `data.yaml` (or the yaml file itself): `names` (a list, or a
  mapping 0..n-1) and optionally `path` (the dataset folder: absolute or relative to the yaml;
  ignored when it does not exist) and `train` / `val` / `test` (a folder of images, a `.txt`
  list of image paths, or a list of these). Without splits, every image under `images/` is
  taken. An image's labels are Ultralytics': the path with its last `images` folder replaced by
  `labels` and the extension by `.txt`; no label file means no objects.

Boxes are in pixels of the image as it is shown (after EXIF orientation); a box may pass the
image's border by one pixel (it is clipped), not more.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from PIL import Image

from visionloop.contracts import Box
from visionloop.libs.formats import FormatError, from_coco_bbox, from_yolo_line, image_facts, read_data_yaml

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".mpo"})
"""Files taken as images in a YOLO folder."""
TOLERANCE_PX = 1.0
"""How far a box may pass the image's border (it is clipped) before the dataset is refused."""
LISTED = 5
"""Problems a refusal lists (it counts them all)."""


class DatasetError(ValueError):
    """A dataset the demo cannot use. `reason` is the first problem's code (`missing_image`,
    `box_outside_image`, `unknown_class`, `bad_box`, `bad_label_line`, `unreadable_image`,
    `size_mismatch`, `missing_split`, `duplicate_class`, `bad_annotation`, `no_classes`, `empty`,
    `not_a_dataset`, `exhausted`); `problems` holds (code, text) of the listed ones."""

    def __init__(self, reason: str, message: str, problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.problems = tuple(problems) or ((reason, message),)

    @property
    def reasons(self) -> tuple[str, ...]:
        """The codes of the listed problems, once each."""
        return tuple(dict.fromkeys(code for code, _ in self.problems))


class _Problems:
    """Problems found while reading a dataset: all counted, the first `LISTED` kept."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.count = 0
        self.listed: list[tuple[str, str]] = []

    def add(self, reason: str, text: str) -> None:
        self.count += 1
        if len(self.listed) < LISTED:
            self.listed.append((reason, text))

    def check(self) -> None:
        """Raise the refusal if anything was found."""
        if not self.count:
            return
        head = "1 problem" if self.count == 1 else f"{self.count} problems"
        more = "; ..." if self.count > len(self.listed) else ""
        message = f"{head} in {self.where}: " + "; ".join(text for _, text in self.listed) + more
        raise DatasetError(self.listed[0][0], message, self.listed)


class DatasetImage(NamedTuple):
    """One labelled image: its file, its size as shown (after EXIF orientation), its boxes in those pixels."""

    path: Path
    width: int
    height: int
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class Dataset:
    """A checked dataset: class names in id order and every image with its boxes."""

    root: Path
    """The dataset's folder (file names in messages and items are relative to it)."""
    format: str
    """`coco` or `yolo`."""
    classes: tuple[str, ...]
    images: tuple[DatasetImage, ...]

    @property
    def name(self) -> str:
        """The folder's name as a project slug (lowercase letters, digits, `-`, `_`)."""
        return slug(self.root.name)

    def relative(self, path: Path) -> str:
        """`path` relative to the dataset's folder where it lies under it."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


def slug(text: str) -> str:
    """`text` as a project name: lowercase, runs of other characters as `-`, at most 63 characters."""
    out = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:63].rstrip("-_")
    return out or "dataset"


# -- reading --------------------------------------------------------------------------------------


def load_dataset(path: Path) -> Dataset:
    """Read and check a COCO or YOLO dataset (see the module docstring); `DatasetError` if it cannot be used."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError("not_a_dataset", f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return _load_coco(path, path.parent.parent if path.parent.name == "annotations" else path.parent)
        if path.suffix.lower() in (".yaml", ".yml"):
            return _load_yolo(path)
        raise DatasetError("not_a_dataset", f"{path}: not a COCO .json file or a YOLO data.yaml")
    for name in ("data.yaml", "data.yml"):
        if (path / name).is_file():
            return _load_yolo(path / name)
    jsons = sorted([*path.glob("*.json"), *path.glob("annotations/*.json")])
    if len(jsons) == 1:
        return _load_coco(jsons[0], path)
    if jsons:
        names = ", ".join(p.relative_to(path).as_posix() for p in jsons[:LISTED])
        raise DatasetError("not_a_dataset", f"{path}: {len(jsons)} JSON files ({names}); pass the COCO file itself")
    if not any(p.is_file() for p in path.rglob("*")):
        raise DatasetError("empty", f"{path}: the folder is empty")
    if (path / "labels").is_dir():
        raise DatasetError("no_classes", f"{path}: YOLO labels but no data.yaml naming the classes")
    raise DatasetError("not_a_dataset", f"{path}: neither a COCO dataset (a .json file) nor a YOLO one (data.yaml)")


def _read_image(path: Path, rel: str, problems: _Problems) -> tuple[int, int] | None:
    """The size of an image as shown, after checking that every pixel decodes; None (and a problem) if not."""
    try:
        data = path.read_bytes()
        width, height, _ = image_facts(data, max_pixels=2**40)
        with Image.open(io.BytesIO(data)) as image:
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))  # JPEG: decode every block, cheaply
            image.load()
    except FormatError as exc:
        problems.add("unreadable_image", f"{rel}: {exc.message}")
        return None
    except Exception as exc:  # Pillow raises many kinds for broken files
        problems.add("unreadable_image", f"{rel}: the image does not decode ({type(exc).__name__}: {exc})")
        return None
    return width, height


def _fit(box: Box, width: int, height: int, where: str, problems: _Problems) -> Box | None:
    """`box` clipped to the image; None (and a problem) if it passes the border by more than the tolerance or has no area."""
    t = TOLERANCE_PX
    if box.x1 < -t or box.y1 < -t or box.x2 > width + t or box.y2 > height + t:
        problems.add("box_outside_image", f"{where}: box ({box.x1:.1f}, {box.y1:.1f}, {box.x2:.1f}, {box.y2:.1f}) "
                     f"lies outside the {width}x{height} image")
        return None
    x1, y1, x2, y2 = max(box.x1, 0.0), max(box.y1, 0.0), min(box.x2, float(width)), min(box.y2, float(height))
    if x2 <= x1 or y2 <= y1:
        problems.add("bad_box", f"{where}: the box has no area")
        return None
    return Box(x1=x1, y1=y1, x2=x2, y2=y2, class_name=box.class_name)


def _class_names(names: Sequence[str], where: str) -> tuple[str, ...]:
    if not names:
        raise DatasetError("no_classes", f"{where}: no class names")
    bad = [n for n in names if not 0 < len(n) <= 64 or any(ord(c) < 32 for c in n)]
    if bad:
        raise DatasetError("no_classes", f"{where}: class names are 1-64 printable characters, not {bad[0]!r}")
    seen = [n for i, n in enumerate(names) if n in names[:i]]
    if seen:
        raise DatasetError("duplicate_class", f"{where}: the class name {seen[0]!r} appears twice")
    return tuple(names)


def _finish(root: Path, fmt: str, classes: tuple[str, ...], images: list[DatasetImage], problems: _Problems) -> Dataset:
    problems.check()
    if not images:
        raise DatasetError("empty", f"{root}: no images")
    if not any(i.boxes for i in images):
        raise DatasetError("empty", f"{root}: no labelled images (none of the {len(images)} images has a box)")
    return Dataset(root=root, format=fmt, classes=classes, images=tuple(images))


# -- COCO -----------------------------------------------------------------------------------------


def _load_coco(json_path: Path, root: Path) -> Dataset:
    problems = _Problems(json_path)
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError("not_a_dataset", f"{json_path}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        raise DatasetError(
            "not_a_dataset", f"{json_path}: a COCO detection file has the lists `images`, `annotations` and `categories`"
        )
    try:
        categories = sorted((int(c["id"]), str(c["name"])) for c in doc["categories"])
    except (KeyError, TypeError, ValueError):
        raise DatasetError("bad_annotation", f"{json_path}: every category has an integer `id` and a `name`") from None
    classes = _class_names([n for _, n in categories], str(json_path))
    names_by_id = dict(categories)
    boxes = _coco_boxes(doc["annotations"], names_by_id, problems)
    known = {entry.get("id") for entry in doc["images"] if isinstance(entry, dict)}
    for image_id, written in boxes.items():
        if image_id not in known:
            problems.add("bad_annotation", f"{written[0][0]}: image_id {image_id!r} is not in images")
    images = []
    for n, entry in enumerate(doc["images"]):
        image = _coco_image(n, entry, json_path, root, boxes, problems)
        if image is not None:
            images.append(image)
    return _finish(root, "coco", classes, images, problems)


def _coco_boxes(annotations: list[Any], names_by_id: dict[int, str], problems: _Problems) -> dict[Any, list[tuple[str, Box]]]:
    """Boxes by COCO image id, each with where it was written (for messages)."""
    out: dict[Any, list[tuple[str, Box]]] = {}
    ids = ", ".join(str(i) for i in list(names_by_id)[:12]) + (", ..." if len(names_by_id) > 12 else "")
    for n, ann in enumerate(annotations):
        where = f"annotation {ann.get('id', n) if isinstance(ann, dict) else n}"
        if not isinstance(ann, dict) or "image_id" not in ann or "bbox" not in ann or "category_id" not in ann:
            problems.add("bad_annotation", f"{where}: needs `image_id`, `category_id` and `bbox`")
            continue
        if ann.get("iscrowd"):
            continue
        try:
            category = int(ann["category_id"])
        except (TypeError, ValueError):
            category = None
        if category not in names_by_id:
            problems.add("unknown_class", f"{where}: category_id {ann['category_id']!r} is not in categories ({ids})")
            continue
        try:
            if not isinstance(ann["bbox"], list):
                raise FormatError("invalid_box", "bbox is not a list")
            box = from_coco_bbox(ann["bbox"], names_by_id[category])
        except (FormatError, TypeError, ValueError) as exc:
            problems.add("bad_box", f"{where}: bbox {str(ann['bbox'])[:60]}: {getattr(exc, 'message', exc)}")
            continue
        out.setdefault(ann["image_id"], []).append((where, box))
    return out


def _coco_file(json_path: Path, file_name: str) -> tuple[Path | None, list[Path]]:
    """Where an image's `file_name` lies (see the module docstring), and the folders looked in."""
    if Path(file_name).is_absolute():
        return (Path(file_name) if Path(file_name).is_file() else None), [Path(file_name).parent]
    here = json_path.parent
    folders = [here, here / "images", here.parent, here.parent / "images"]
    found = next((f / file_name for f in folders if (f / file_name).is_file()), None)
    return found, folders


def _coco_image(n: int, entry: Any, json_path: Path, root: Path, boxes: dict[Any, list[tuple[str, Box]]],
                problems: _Problems) -> DatasetImage | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "id" not in entry:
        problems.add("bad_annotation", f"images[{n}]: needs an `id` and a `file_name`")
        return None
    name = entry["file_name"]
    path, folders = _coco_file(json_path, name)
    if path is None:
        looked = ", ".join(_rel(f, root) + "/" for f in folders)
        problems.add("missing_image", f"{name}: no such image file (looked in {looked})")
        return None
    size = _read_image(path, name, problems)
    if size is None:
        return None
    width, height = size
    declared = (entry.get("width"), entry.get("height"))
    if all(isinstance(v, int | float) for v in declared) and declared != size:
        turned = " (its EXIF orientation turns it; boxes must be in the turned image)" if declared == (height, width) else ""
        problems.add("size_mismatch", f"{name}: the file is {width}x{height}, the JSON says {declared[0]}x{declared[1]}{turned}")
        return None
    kept = [_fit(box, width, height, f"{name} {where}", problems) for where, box in boxes.get(entry["id"], [])]
    return DatasetImage(path, width, height, tuple(b for b in kept if b is not None))


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)


# -- YOLO -----------------------------------------------------------------------------------------


def _load_yolo(yaml_path: Path) -> Dataset:
    try:
        text = yaml_path.read_text(encoding="utf-8")
        names, _ = read_data_yaml(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError("not_a_dataset", f"{yaml_path}: not readable ({exc})") from None
    except FormatError as exc:
        reason = "no_classes" if "names" in exc.message else "not_a_dataset"
        raise DatasetError(reason, f"{yaml_path}: {exc.message}") from None
    classes = _class_names(names, str(yaml_path))
    doc = yaml.safe_load(text)
    root = yaml_path.parent
    if isinstance(doc.get("path"), str) and doc["path"]:
        declared = Path(doc["path"]).expanduser()
        declared = declared if declared.is_absolute() else root / declared
        root = declared if declared.is_dir() else root
    problems = _Problems(root)
    files = _yolo_images(doc, root, problems)
    images = []
    for path in files:
        rel = _rel(path, root)
        size = _read_image(path, rel, problems)
        if size is not None:
            labels = _label_path(path)
            boxes = _yolo_boxes(labels, _rel(labels, root), classes, *size, problems) if labels.is_file() else ()
            images.append(DatasetImage(path, size[0], size[1], boxes))
    return _finish(root, "yolo", classes, images, problems)


def _label_path(image: Path) -> Path:
    """Ultralytics' label file of an image: the last `images` folder of its path becomes `labels`."""
    parts = list(image.parts)
    if "images" in parts[:-1]:
        at = len(parts) - 2 - parts[-2::-1].index("images")
        parts[at] = "labels"
    return Path(*parts).with_suffix(".txt")


def _yolo_images(doc: dict[str, Any], root: Path, problems: _Problems) -> list[Path]:
    """Every image the splits name (once each, in order); label files without an image are problems."""
    sources: list[tuple[str, str]] = []
    for split in ("train", "val", "test"):
        value = doc.get(split)
        for item in value if isinstance(value, list) else [value] if value else []:
            sources.append((split, str(item)))
    if not sources:
        sources = [("images", "images" if (root / "images").is_dir() else ".")]
    found: dict[Path, None] = {}
    folders: set[Path] = set()
    for split, source in sources:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else root / path
        if path.resolve() in folders:
            continue
        if path.is_dir():
            folders.add(path.resolve())
            listed = sorted(
                p for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and "labels" not in p.relative_to(path).parts
            )
            found.update(dict.fromkeys(listed))
            _orphan_labels(path, set(listed), root, problems)
        elif path.is_file() and path.suffix.lower() == ".txt":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    image = next((b / line.strip() for b in (path.parent, root) if (b / line.strip()).is_file()), None)
                    if image is None:
                        problems.add("missing_image", f"{_rel(path, root)} line {n}: {line.strip()} is not a file")
                    else:
                        found[image] = None
        else:
            problems.add("missing_split", f"data.yaml {split}: {source} is neither a folder nor a .txt list of images")
    return list(found)


def _orphan_labels(folder: Path, images: set[Path], root: Path, problems: _Problems) -> None:
    """Label files under the labels folder parallel to `folder` whose image is missing."""
    labels = _label_path(folder / "x").parent
    if labels == folder or not labels.is_dir():
        return
    expected = {_label_path(i) for i in images}
    for label in sorted(labels.rglob("*.txt")):
        if label not in expected and label.name != "classes.txt":
            problems.add("missing_image", f"{_rel(label, root)}: no image for these labels in {_rel(folder, root)}/")


def _yolo_boxes(path: Path, rel: str, classes: Sequence[str], width: int, height: int, problems: _Problems) -> tuple[Box, ...]:
    boxes = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.add("bad_label_line", f"{rel}: not a readable text file ({exc})")
        return ()
    for n, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{rel} line {n}"
        box = _yolo_box(parts, classes, width, height, where, problems)
        if box is not None:
            fitted = _fit(box, width, height, where, problems)
            if fitted is not None:
                boxes.append(fitted)
    return tuple(boxes)


def _yolo_box(parts: list[str], classes: Sequence[str], width: int, height: int, where: str, problems: _Problems) -> Box | None:
    """One label line (`class cx cy w h`, or `class x1 y1 x2 y2 ...` for a polygon) as a box."""
    if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
        problems.add("bad_label_line", f"{where}: expected `class cx cy w h` (5 numbers), got {len(parts)} values")
        return None
    try:
        values = [float(p) for p in parts]
    except ValueError:
        problems.add("bad_label_line", f"{where}: not numbers: {' '.join(parts)[:60]!r}")
        return None
    if not all(math.isfinite(v) for v in values) or values[0] != int(values[0]):
        problems.add("bad_label_line", f"{where}: the class id is a whole number and every value finite: {' '.join(parts)[:60]!r}")
        return None
    index = int(values[0])
    if not 0 <= index < len(classes):
        problems.add("unknown_class", f"{where}: class id {index} is not in data.yaml names (0-{len(classes) - 1})")
        return None
    if len(parts) > 5:
        xs, ys = values[1::2], values[2::2]
        return Box(x1=min(xs) * width, y1=min(ys) * height, x2=max(xs) * width, y2=max(ys) * height, class_name=classes[index])
    try:
        return from_yolo_line(" ".join([str(index), *parts[1:]]), classes, width, height)
    except FormatError as exc:
        problems.add("bad_label_line", f"{where}: {exc.message}")
        return None
