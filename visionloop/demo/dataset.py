"""A user's labelled images as the demo's world: `visionloop demo --dataset PATH`, `visionloop bench loop --dataset PATH`.

`load_dataset` (datasetfiles.py, re-exported here) reads and checks a COCO or YOLO dataset before
anything starts; `DatasetWorld` hands its images out as `World` hands out rendered scenes (the
same item kinds, expected answers and truth) and keeps a seeded part of the dataset apart for
the frozen test set; `world_for` picks the world the demo and the loop benchmark run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from visionloop.contracts import Box
from visionloop.demo.datasetfiles import Dataset, DatasetError, DatasetImage, load_dataset, slug
from visionloop.demo.world import (
    ACCEPTED,
    NEAR_DUPLICATE_RADIUS,
    RESOLUTION_FLOOR,
    Item,
    ItemKind,
    World,
    _jpeg,
    _moved,
    _Original,
)
from visionloop.libs.perceptual import hash_image

log = logging.getLogger(__name__)

__all__ = ["Dataset", "DatasetError", "DatasetImage", "DatasetWorld", "load_dataset", "slug", "world_for"]

INLINE_BYTES = 700_000
"""Largest item a dataset world hands out: the demo sends images inline on Kafka, whose requests
are limited to 1 MiB (base64 adds a third). Bigger images are re-encoded as JPEG, shrunk if needed."""
PICTURE_SIDE = 1024
"""Longest side of the pictures variants (near duplicates, thumbnails, broken files) are made from."""
KEPT_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"})
"""Formats ingest accepts by default: such files travel as they are (if still, unrotated and small enough)."""


class DatasetWorld(World):
    """A `World` whose pictures are a dataset's images.

    Fresh items are the dataset's images in a seeded order, each at most once (one within
    `near_radius` of an image handed out before is skipped, as dedup would drop it); duplicates,
    near duplicates, thumbnails and broken files are made from them as `World` makes them from
    scenes. A seeded part of the dataset (`test_images`, else `test_fraction` of it) is kept for
    `test_set` and never streamed. A fresh item is the file's own bytes when ingest takes them as
    they are (a still image of an accepted format, no EXIF turn, at most `max_item_bytes`), else
    the image re-encoded as JPEG (turned upright, shrunk to fit). Two worlds with the same
    dataset, seed and parameters hand out the same items for the same calls in the same order.
    """

    def __init__(
        self,
        dataset: Dataset | Path | str,
        seed: int = 0,
        *,
        test_fraction: float = 0.2,
        test_images: int | None = None,
        near_radius: int = NEAR_DUPLICATE_RADIUS,
        resolution_floor: int = RESOLUTION_FLOOR,
        max_item_bytes: int = INLINE_BYTES,
    ) -> None:
        self.dataset = dataset if isinstance(dataset, Dataset) else load_dataset(Path(dataset))
        self.style = "dataset"
        self.name = self.dataset.name
        self.new_class = None
        self._drawable = self.dataset.classes
        self._begin(seed, self.dataset.classes, near_radius, resolution_floor)
        self.max_item_bytes = max_item_bytes
        total = len(self.dataset.images)
        # `test_images` is at most half the dataset: the other half at least is streamed.
        held = min(test_images, total // 2) if test_images is not None else round(test_fraction * total)
        if not 0 <= held < total or not 0 <= test_fraction < 1:
            raise ValueError(f"the test set takes {held} of the dataset's {total} images; leave at least one to stream")
        order = [int(i) for i in np.random.default_rng([seed, 0x7E57]).permutation(total)]
        self._test_pool, self._pool = order[:held], order[held:]
        self._streamable = tuple(self._pool)
        self._labels = [frozenset(b.class_name for b in image.boxes) for image in self.dataset.images]
        self._streamed = self._skipped = self._tests = self._asked = 0

    # -- what is left -------------------------------------------------------------------------------

    def fresh_left(self, classes: Sequence[str] | None = None) -> int:
        """Images not streamed yet (with no class outside `classes`); some may still be skipped as near duplicates."""
        allowed = set(self.classes if classes is None else classes)
        return sum(1 for k in self._pool if self._labels[k] <= allowed)

    def test_left(self) -> int:
        """Images of the test part not handed out yet."""
        return len(self._test_pool)

    def _exhausted(self, asked: int, left: int) -> DatasetError:
        total = len(self.dataset.images)
        return DatasetError("exhausted", (
            f"the dataset {self.dataset.root} has {total} images ({total - len(self._streamable)} kept for the test set, "
            f"{self._streamed} streamed, {self._skipped} skipped as near duplicates of others); "
            f"{left} are left, and the stream asks for {asked} fresh images"
        ))

    # -- the stream and the test set -------------------------------------------------------------

    def stream(self, n: int, *, exact_dup_rate: float = 0.0, near_dup_rate: float = 0.0, low_res_rate: float = 0.0,
               corrupt_rate: float = 0.0, classes: Sequence[str] | None = None) -> list[Item]:
        """`World.stream` over the dataset's images; `DatasetError` (`exhausted`) when too few are left.
        `classes` limits this stream to images with no other class (the others wait)."""
        rates = (exact_dup_rate, near_dup_rate, low_res_rate, corrupt_rate)
        fresh = n - sum(round(r * n) for r in rates)
        left = self.fresh_left(self._checked(classes) if classes is not None else None)
        if min(rates) >= 0 and fresh > left:
            raise self._exhausted(fresh, left)
        self._asked = fresh
        return super().stream(n, exact_dup_rate=exact_dup_rate, near_dup_rate=near_dup_rate, low_res_rate=low_res_rate,
                              corrupt_rate=corrupt_rate, classes=classes)

    def test_set(self, n: int, classes: Sequence[str] | None = None, *, offset: int = 0) -> list[Item]:
        """Up to `n` fresh items of the dataset's test part (with no class outside `classes`), each
        handed out once: a later call continues where the last stopped (`offset` is not needed)."""
        allowed = self._checked(classes) if classes is not None else self.classes
        items: list[Item] = []
        while len(items) < n:
            k = self._take(self._test_pool, allowed)
            if k is None:
                break
            data, width, height, boxes = self._prepared(k)
            hashes, _ = hash_image(data)
            if not self._unlike(hashes):
                continue
            self._held.append(hashes)
            items.append(self._keep(Item(
                index=self._tests, name=f"w{self.seed}-t{self._tests:05d}", kind=ItemKind.FRESH, data=data,
                image_id=hashlib.sha256(data).hexdigest(), expected=ACCEPTED, truth=boxes, width=width, height=height,
                source=self.dataset.relative(self.dataset.images[k].path),
            )))
            self._tests += 1
        return items

    def _take(self, pool: list[int], allowed: Sequence[str]) -> int | None:
        """The first image of `pool` with no class outside `allowed`, taken out of it."""
        allowed_set = set(allowed)
        at = next((n for n, k in enumerate(pool) if self._labels[k] <= allowed_set), None)
        return None if at is None else pool.pop(at)

    def _fresh(self, index: int, name: str, rng: np.random.Generator, classes: tuple[str, ...]) -> Item:
        while True:
            k = self._take(self._pool, classes)
            if k is None:
                raise self._exhausted(self._asked, 0)
            data, width, height, boxes = self._prepared(k)
            hashes, _ = hash_image(data)
            if self._unlike(hashes):
                break
            self._skipped += 1
        self._streamed += 1
        image_id = hashlib.sha256(data).hexdigest()
        self._originals.append(_Original(image_id, (width, height), boxes, hashes, source=k))
        return self._keep(Item(
            index=index, name=name, kind=ItemKind.FRESH, data=data, image_id=image_id, expected=ACCEPTED, truth=boxes,
            width=width, height=height, source=self.dataset.relative(self.dataset.images[k].path),
        ))

    # -- pictures -----------------------------------------------------------------------------------

    def _prepared(self, k: int) -> tuple[bytes, int, int, tuple[Box, ...]]:
        """Image `k` as an item's bytes, size and truth: the file itself when ingest takes it as it is, else a JPEG."""
        image = self.dataset.images[k]
        raw = image.path.read_bytes()
        if self._as_is(raw):
            return raw, image.width, image.height, image.boxes
        with Image.open(io.BytesIO(raw)) as opened:
            picture = ImageOps.exif_transpose(opened).convert("RGB")
        scale, data = 1.0, _jpeg(picture)
        while self.max_item_bytes is not None and len(data) > self.max_item_bytes:
            scale *= 0.95 * math.sqrt(self.max_item_bytes / len(data))
            size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            data = _jpeg(picture.resize(size, Image.Resampling.LANCZOS))
        width, height = max(1, round(picture.width * scale)), max(1, round(picture.height * scale))
        boxes = _moved(image.boxes, sx=width / image.width, sy=height / image.height, width=width, height=height, min_visible=0.0)
        return data, width, height, boxes

    def _as_is(self, raw: bytes) -> bool:
        if self.max_item_bytes is not None and len(raw) > self.max_item_bytes:
            return False
        with Image.open(io.BytesIO(raw)) as image:
            still = image.format == "MPO" or not getattr(image, "is_animated", False)
            return image.format in KEPT_FORMATS and still and image.getexif().get(0x0112, 1) in (0, 1)

    def _loaded(self, original: _Original) -> tuple[bytes, int, int, tuple[Box, ...]]:
        """A fresh item handed out before, made again from its file (the same bytes, or an error)."""
        assert original.source is not None
        prepared = self._prepared(original.source)
        if hashlib.sha256(prepared[0]).hexdigest() != original.image_id:
            raise RuntimeError(f"{self.dataset.images[original.source].path} changed while the world was streaming it")
        return prepared

    def _data_of(self, original: _Original) -> bytes:
        return self._loaded(original)[0]

    def _picture_of(self, original: _Original) -> tuple[Image.Image, tuple[Box, ...]]:
        return _picture(*self._loaded(original))

    def _render(self, rng: np.random.Generator, classes: tuple[str, ...]) -> tuple[int | None, Image.Image, tuple[Box, ...]]:
        """A picture of one of the streamable images (chosen by `rng`; none of the test part) for thumbnails and broken files."""
        allowed = set(classes)
        choices = [k for k in self._streamable if self._labels[k] <= allowed] or list(self._streamable)
        return None, *_picture(*self._prepared(choices[int(rng.integers(len(choices)))]))


def _picture(data: bytes, width: int, height: int, boxes: tuple[Box, ...]) -> tuple[Image.Image, tuple[Box, ...]]:
    """An item's bytes as a picture at most `PICTURE_SIDE` on its longest side, and its boxes in that picture."""
    with Image.open(io.BytesIO(data)) as opened:
        picture = ImageOps.exif_transpose(opened).convert("RGB")
    scale = min(1.0, PICTURE_SIDE / max(picture.size))
    if scale < 1.0:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    moved = _moved(boxes, sx=picture.width / width, sy=picture.height / height, width=picture.width, height=picture.height,
                   min_visible=0.0)
    return picture, moved


def fit_rounds(rounds: tuple[int, int, int], fresh_share: float, fresh_left: int | None) -> tuple[int, int, int]:
    """`rounds` (items per round, `fresh_share` of them fresh), scaled down when a dataset holds
    fewer fresh images than they need (a tenth kept spare for images skipped as near duplicates)."""
    need = sum(rounds) * fresh_share
    if fresh_left is None or need <= 0.9 * fresh_left:
        return rounds
    factor = 0.9 * fresh_left / need
    scaled = (max(4, int(rounds[0] * factor)), max(4, int(rounds[1] * factor)), max(4, int(rounds[2] * factor)))
    log.warning("the dataset holds %d fresh images; the rounds shrink from %s to %s", fresh_left, rounds, scaled)
    return scaled


def world_for(dataset: Path | str | None, *, style: str = "shapes", seed: int = 0, test_fraction: float = 0.2,
              test_images: int | None = None, **size: Any) -> World:
    """The world the demo and the loop benchmark run: a `DatasetWorld` of `dataset` (`DatasetError`
    if it cannot be used; `size` is ignored), else a rendered `World` of `style` with `size`
    (`width`, `height`, `objects`, `size`, ... as `World` takes them)."""
    if dataset is None:
        return World(seed, style=style, **size)
    return DatasetWorld(Path(dataset), seed, test_fraction=test_fraction, test_images=test_images)
