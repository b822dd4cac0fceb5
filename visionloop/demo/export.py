"""`visionloop demo world export`: the built-in world as a dataset folder a user could have made.

It writes `images` fresh scenes of the world (no duplicates, no bad items: a dataset holds the
pictures, the demo derives the rest), every class the world draws (its starting classes and the
class a later round adds), as a COCO document with its images (`annotations/instances.json` +
`images/`) or a YOLO folder (`data.yaml`, `images/train`, `labels/train`). `--dataset` reads
both, so the dataset path can be checked against the built-in world.
"""

from __future__ import annotations

import json
from pathlib import Path

from visionloop.libs.formats import LabelledImage, coco_document, write_yolo

FORMATS = ("coco", "yolo")


def export_world(out: Path, *, fmt: str = "coco", images: int = 600, style: str = "photo", seed: int = 7,
                 width: int = 192, height: int = 144, objects: tuple[int, int] = (1, 3),
                 size: tuple[float, float] | None = None) -> Path:
    """Write the world as a dataset under `out` (created; must be empty if it exists); the folder."""
    from visionloop.demo.scenario import DemoConfig
    from visionloop.demo.world import ItemKind, World
    from visionloop.libs.scenes import STYLE_CLASSES

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    if images < 1:
        raise ValueError(f"images must be at least 1 (got {images})")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: export writes a new dataset folder")
    classes = STYLE_CLASSES[style][:4]
    world = World(seed, classes, style=style, width=width, height=height, objects=objects, size=size or DemoConfig(world=style).object_size)
    items = [i for i in world.stream(images) if i.kind is ItemKind.FRESH]
    labelled = [LabelledImage(file_name=f"{i.name}.jpg", width=int(i.width or width), height=int(i.height or height),
                              boxes=tuple(i.truth or ()), split="train", image_id=i.image_id) for i in items]
    data = {f"{i.name}.jpg": i.data for i in items}
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "yolo":
        write_yolo(out, labelled, list(classes), image_bytes=lambda image: data[image.file_name])
        return out
    (out / "images").mkdir()
    for name, blob in data.items():
        (out / "images" / name).write_bytes(blob)
    (out / "annotations").mkdir()
    doc = coco_document(labelled, list(classes), description=f"visionloop {style} world, seed {seed}")
    (out / "annotations" / "instances.json").write_text(json.dumps(doc))
    return out
