"""`visionloop import`: a user's labelled COCO or YOLO dataset, as it sits on disk, into a project.

The dataset is read and checked whole first (`visionloop.demo.datasetfiles.load_dataset`: a
malformed one is refused with its first problems before anything is sent). Then:

- **The test set.** `--test-split NAME`: the images under a folder named NAME (YOLO's
  `images/test/`, or any `test/` folder a COCO file's images sit in). `--test-fraction F`: a
  share of the images chosen by a hash of their bytes (the same images on every run). Neither:
  the `test` folder when the dataset has one, else 15 %. The test images become the project's
  frozen test set; the rest train (the trainer splits off its own validation images).
- **The classes.** `--classes a,b,...`: the project's taxonomy, in this order; boxes of other
  classes are left out (and counted). Default: the dataset's classes, in its order.
- **The upload.** The images (by content hash, whatever their names) and their labels are packed
  into the YOLO layout the gateway's import endpoint reads (`POST /v1/projects/{p}/import?
  format=yolo`) and sent with a short-lived admin token that is revoked afterwards. The gateway
  checks everything again, stores the images and sends each label set to the verifier.
- **Training.** One run once the import's labels are verified (`--set NAME=VALUE` arguments), or
  none (`--no-train`); the import's labels never fire the count trigger.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from visionloop.demo.datasetfiles import Dataset, DatasetImage, load_dataset
from visionloop.libs.formats import LabelledImage, yolo_files, yolo_image_path

DEFAULT_TEST_FRACTION = 0.15
"""The test share when the dataset names no test split and none is asked for."""


@dataclass
class Packed:
    """A dataset packed for the gateway: the zip, and what went into it."""

    zip_bytes: bytes
    classes: list[str]
    train: int
    test: int
    boxes: int
    test_rule: str
    """How the test set was chosen, in words."""
    left_out: Counter[str] = field(default_factory=Counter)
    """Boxes of classes outside `classes`, by class."""


def in_test_fraction(digest: str, fraction: float) -> bool:
    """Whether an image (by its SHA-256) falls in the test share: fixed by its bytes."""
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def _in_folder(dataset: Dataset, image: DatasetImage, name: str) -> bool:
    return name in Path(dataset.relative(image.path)).parts[:-1]


def choose_test_set(dataset: Dataset, test_split: str | None, test_fraction: float | None) -> tuple[str, str | None, float]:
    """(in words, split folder, fraction): how the test set is chosen (see the module's note)."""
    if test_split is not None and test_fraction is not None:
        raise ValueError("give --test-split or --test-fraction, not both")
    if test_split is not None:
        if not any(_in_folder(dataset, image, test_split) for image in dataset.images):
            raise ValueError(f"no image of {dataset.root} lies in a folder named {test_split!r}")
        return f"the images under a folder named {test_split!r}", test_split, 0.0
    if test_fraction is not None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be between 0 and 1, not {test_fraction}")
        return f"{test_fraction:.0%} of the images, chosen by their bytes", None, test_fraction
    if any(_in_folder(dataset, image, "test") for image in dataset.images):
        return "the dataset's own test split (images under test/)", "test", 0.0
    return f"{DEFAULT_TEST_FRACTION:.0%} of the images, chosen by their bytes (the dataset names no test split)", None, DEFAULT_TEST_FRACTION


def pack(path: Path, *, classes: Sequence[str] | None = None, test_split: str | None = None,
         test_fraction: float | None = None) -> Packed:
    """Read `path` (COCO or YOLO) and pack it for the gateway's YOLO import."""
    dataset = load_dataset(path)
    taxonomy = list(classes) if classes else list(dataset.classes)
    rule, split_folder, fraction = choose_test_set(dataset, test_split, test_fraction)
    out = io.BytesIO()
    images: list[LabelledImage] = []
    left_out: Counter[str] = Counter()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        seen: set[str] = set()
        for image in dataset.images:
            data = image.path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                continue  # the same bytes twice in the dataset: one image
            seen.add(digest)
            is_test = _in_folder(dataset, image, split_folder) if split_folder else in_test_fraction(digest, fraction)
            kept = tuple(b for b in image.boxes if b.class_name in taxonomy)
            left_out.update(b.class_name for b in image.boxes if b.class_name not in taxonomy)
            labelled = LabelledImage(file_name=f"{digest}{image.path.suffix.lower() or '.jpg'}", width=image.width,
                                     height=image.height, boxes=kept, split="test" if is_test else "train", image_id=digest)
            archive.writestr(yolo_image_path(labelled), data)
            images.append(labelled)
        for name, text in yolo_files(images, taxonomy).items():
            archive.writestr(name, text)
    test = sum(i.split == "test" for i in images)
    return Packed(zip_bytes=out.getvalue(), classes=taxonomy, train=len(images) - test, test=test,
                  boxes=sum(len(i.boxes) for i in images), test_rule=rule, left_out=left_out)


FIRST_MODEL_GUIDANCE = """What to expect of a first model (measured on 2 vCPU, docs/training.md):
  from scratch, 600 photographs of 4 classes reach mAP50-95 about 0.19 after 25 epochs at 256 px (16 min);
  at the demo's settings (8 epochs, 160 px) they stay near 0.03. Ask for more with --set epochs=25 --set imgsz=256,
  start from a checkpoint of your own (VL_TRAINER_BASE_CHECKPOINT, docs/training.md), and set the first
  model's gate with --floor (the configured floor applies otherwise)."""
