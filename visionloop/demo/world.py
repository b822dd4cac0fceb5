"""The synthetic upstream world: scenes with known ground truth, streamed as a real feed would.

A `World` renders scenes of a world style (libs/scenes.py: `shapes`, `photo`) deterministically
from its seed and remembers the ground truth of every image it hands out, by image id (the
SHA-256 of the bytes); `dataset.DatasetWorld` hands out a user's labelled images instead. `stream` mixes
in what real feeds carry besides new pictures: the same file sent twice, the same picture
re-encoded, resized or cropped, thumbnails too small to label, and broken files. Each `Item`
says what it is and what the loop is expected to answer, with the reason codes ingest and
dedup/quality give (`ImageRejectReason`), so the demo can check the loop against the world.

What the demo asks of any world: `name` (a project-name-safe slug), `classes` (the starting
classes), `new_class` (the class a later round adds, or None), `stream`, `test_set` (fresh items
for the frozen test set, never streamed) and `truth`.

`submission` and `publish` send items on the submit topic as any upstream Kafka producer would.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from PIL import Image

from visionloop.contracts import Box, Envelope, ImageRejectReason, ImageSource, ImageSubmitted, Stage
from visionloop.libs.perceptual import Hashes, hamming, hash_image
from visionloop.libs.scenes import SHAPES, STYLE_CLASSES, render_scene, render_world_scene
from visionloop.libs.settings import Settings
from visionloop.libs.variants import variant

NEAR_DUPLICATE_RADIUS = 16
"""dedup/quality's default radius: summed pHash + dHash Hamming distance of a near duplicate."""
RESOLUTION_FLOOR = 32
"""dedup/quality's default floor (`min_width`, `min_height`): low-res items stay below it on both sides."""
NEAR_KINDS = ("resize", "recompress", "crop", "brightness")
"""How a near duplicate differs from its original (libs/variants.py's kinds; crop is done here,
where its offsets are known, so the truth can follow the picture)."""
JPEG_QUALITY = 90


class ItemKind(StrEnum):
    """What an upstream item is."""

    FRESH = "fresh"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    LOW_RES = "low_res"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class Expected:
    """What the loop should answer for an item: accepted, or rejected by `stage` for `reason`.

    For duplicates this assumes the original was decided first (see `publish`).
    """

    accepted: bool
    reason: ImageRejectReason | None = None
    stage: Stage | None = None

    @property
    def code(self) -> str:
        """`accepted` or the reject reason code."""
        return "accepted" if self.accepted else str(self.reason)


ACCEPTED = Expected(accepted=True)
EXPECTED = {
    ItemKind.FRESH: ACCEPTED,
    ItemKind.EXACT_DUPLICATE: Expected(False, ImageRejectReason.DUPLICATE, Stage.DEDUP),
    ItemKind.NEAR_DUPLICATE: Expected(False, ImageRejectReason.NEAR_DUPLICATE, Stage.DEDUP),
    ItemKind.LOW_RES: Expected(False, ImageRejectReason.LOW_RESOLUTION, Stage.DEDUP),
}
TRUNCATED = Expected(False, ImageRejectReason.CORRUPT, Stage.INGEST)
"""A JPEG cut short: the header reads, the pixels do not decode."""
GARBAGE = Expected(False, ImageRejectReason.NOT_AN_IMAGE, Stage.INGEST)
"""Random bytes: no image format's magic number."""


@dataclass(frozen=True)
class Item:
    """One image an upstream system sends, with what it is and what should become of it."""

    index: int
    """Position among everything this world handed out (all streams), from 0."""
    name: str
    """Stable name (`w<seed>-<index>`): the upstream id and the submission id's stem."""
    kind: ItemKind
    data: bytes
    image_id: str
    """SHA-256 of `data`: the id the loop gives the image."""
    expected: Expected
    truth: tuple[Box, ...] | None
    """Ground-truth boxes in this image's pixels; None for corrupt items."""
    width: int | None = None
    height: int | None = None
    original: str | None = None
    """Duplicates: the image id of the fresh item they copy."""
    variant: str | None = None
    """Near duplicates: how they differ (`NEAR_KINDS`); corrupt items: `truncated` or `garbage`."""
    seed: int | None = None
    """The scene seed the picture was rendered from."""
    source: str | None = None
    """Dataset worlds: the dataset file the picture comes from (relative to the dataset's folder)."""


@dataclass(frozen=True)
class _Original:
    """A fresh item later items may copy. Rendered worlds keep its bytes and picture; dataset
    worlds keep `source` (the dataset image's index) and load them again when asked."""

    image_id: str
    size: tuple[int, int]
    boxes: tuple[Box, ...]
    """The truth in the item's pixels."""
    hashes: Hashes
    data: bytes | None = None
    image: Image.Image | None = None
    source: int | None = None


def _distance(a: Hashes, b: Hashes) -> int:
    return hamming(a.phash, b.phash) + hamming(a.dhash, b.dhash)


def _jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _moved(boxes: Sequence[Box], *, sx: float = 1.0, sy: float = 1.0, dx: float = 0.0, dy: float = 0.0,
           width: float, height: float, min_visible: float = 0.3) -> tuple[Box, ...]:
    """Boxes scaled by (sx, sy), then shifted by (dx, dy) and clipped to the new image; a box
    with less than `min_visible` of its area left is gone."""
    out = []
    for b in boxes:
        x1, y1, x2, y2 = b.x1 * sx + dx, b.y1 * sy + dy, b.x2 * sx + dx, b.y2 * sy + dy
        area = (x2 - x1) * (y2 - y1)
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if cx2 <= cx1 or cy2 <= cy1 or area <= 0 or (cx2 - cx1) * (cy2 - cy1) < min_visible * area:
            continue
        out.append(Box(x1=cx1, y1=cy1, x2=cx2, y2=cy2, class_name=b.class_name))
    return tuple(out)


class World:
    """Renders scenes deterministically and remembers each image's ground truth by image id.

    Two worlds with the same seed and parameters hand out the same items for the same calls.
    """

    new_class: str | None
    """The class a later round adds (the style's fourth class), or None."""

    def __init__(
        self,
        seed: int,
        classes: Sequence[str] | None = None,
        *,
        style: str = "shapes",
        width: int = 320,
        height: int = 240,
        objects: tuple[int, int] = (1, 4),
        size: tuple[float, float] = (0.12, 0.35),
        background: str = "field",
        near_radius: int = NEAR_DUPLICATE_RADIUS,
        resolution_floor: int = RESOLUTION_FLOOR,
    ) -> None:
        """`style` is a world style of `libs.scenes.STYLE_CLASSES`; `classes` are the classes its
        scenes draw (default: the style's first three) unless a stream asks for others;
        `background` (`field`, `gradient`) is the shapes style's; `near_radius` and
        `resolution_floor` should match the project's dedup policy."""
        if style not in STYLE_CLASSES:
            raise ValueError(f"unknown world style {style!r} (known: {', '.join(STYLE_CLASSES)})")
        self.style = style
        self.name = style
        """A project-name-safe slug naming the world."""
        # The shapes style draws every shape of `libs.scenes.SHAPES` (a world may start with any).
        extra = tuple(c for c in SHAPES if c not in STYLE_CLASSES[style]) if style == "shapes" else ()
        self._drawable = STYLE_CLASSES[style] + extra
        self._begin(seed, STYLE_CLASSES[style][:3] if classes is None else classes, near_radius, resolution_floor)
        self.width, self.height = width, height
        self.objects, self.size, self.background = objects, size, background
        later = [c for c in STYLE_CLASSES[style][3:4] if c not in self.classes]
        self.new_class = later[0] if later else None

    def _begin(self, seed: int, classes: Sequence[str], near_radius: int, resolution_floor: int) -> None:
        """The state every world keeps: what it handed out and the truth of it."""
        self.seed = seed
        self.classes = self._checked(classes)
        self.near_radius = near_radius
        self.resolution_floor = resolution_floor
        self.max_item_bytes: int | None = None
        """Largest item (bytes) a world makes from a picture; None: no limit."""
        self._truth: dict[str, tuple[Box, ...]] = {}
        self._originals: list[_Original] = []
        self._held: list[Hashes] = []
        """Hashes of test-set items this world handed out (fresh items stay away from them too)."""
        self._count = 0
        self._streams = 0

    def _checked(self, classes: Sequence[str]) -> tuple[str, ...]:
        """`classes` as a tuple, or ValueError naming those this world cannot draw."""
        unknown = [c for c in classes if c not in self._drawable]
        if unknown:
            raise ValueError(f"the {self.style} world has no classes {unknown}; its classes: {', '.join(self._drawable)}")
        return tuple(classes)

    # -- the truth ------------------------------------------------------------------------------

    def truth(self, image_id: str) -> list[Box] | None:
        """The ground-truth boxes of an image this world handed out; None for any other image."""
        boxes = self._truth.get(image_id)
        return None if boxes is None else list(boxes)

    def knows(self, image_id: str) -> bool:
        """Whether this world handed out the image (and so knows its truth)."""
        return image_id in self._truth

    # -- the test set ---------------------------------------------------------------------------

    def test_set(self, n: int, classes: Sequence[str] | None = None, *, offset: int = 0) -> list[Item]:
        """`n` fresh scenes for the frozen test set: those of a separate world (seed + 1000 +
        `offset`, same style and sizes), so never any of this world's stream. This world learns
        their truth too."""
        world = World(
            self.seed + 1000 + offset, self.classes if classes is None else classes, style=self.style, width=self.width,
            height=self.height, objects=self.objects, size=self.size, background=self.background,
            near_radius=self.near_radius, resolution_floor=self.resolution_floor,
        )
        items = [i for i in world.stream(n) if i.kind is ItemKind.FRESH]
        self._truth.update((i.image_id, i.truth) for i in items if i.truth is not None)
        return items

    # -- the stream -----------------------------------------------------------------------------

    def stream(
        self,
        n: int,
        *,
        exact_dup_rate: float = 0.0,
        near_dup_rate: float = 0.0,
        low_res_rate: float = 0.0,
        corrupt_rate: float = 0.0,
        classes: Sequence[str] | None = None,
    ) -> list[Item]:
        """`n` items: `round(rate * n)` of each bad kind, fresh scenes for the rest, in a shuffled
        (reproducible) order. Duplicates copy a fresh scene handed out before them (this stream or
        an earlier one); fresh scenes are never within `near_radius` of each other. `classes`
        replaces the world's classes for this stream's new scenes (a later round adds a class)."""
        classes = self._checked(classes) if classes is not None else self.classes
        rng = np.random.default_rng([self.seed, self._streams])
        self._streams += 1
        counts = {
            ItemKind.EXACT_DUPLICATE: round(exact_dup_rate * n),
            ItemKind.NEAR_DUPLICATE: round(near_dup_rate * n),
            ItemKind.LOW_RES: round(low_res_rate * n),
            ItemKind.CORRUPT: round(corrupt_rate * n),
        }
        bad = sum(counts.values())
        if bad > n or min(exact_dup_rate, near_dup_rate, low_res_rate, corrupt_rate) < 0:
            raise ValueError(f"the rates ask for {bad} bad items out of {n}; rates are in 0-1 and sum to at most 1")
        kinds = [k for k, c in counts.items() for _ in range(c)] + [ItemKind.FRESH] * (n - bad)
        order = [kinds[i] for i in rng.permutation(n)]
        duplicate = (ItemKind.EXACT_DUPLICATE, ItemKind.NEAR_DUPLICATE)
        if not self._originals and any(k in duplicate for k in order):
            if ItemKind.FRESH not in order:
                raise ValueError("duplicates need a fresh scene before them: ask for at least one fresh item")
            first = order.index(ItemKind.FRESH)
            if any(k in duplicate for k in order[:first]):
                order[0], order[first] = order[first], order[0]
        return [self._item(kind, rng, classes) for kind in order]

    def _item(self, kind: ItemKind, rng: np.random.Generator, classes: tuple[str, ...]) -> Item:
        index = self._count
        self._count += 1
        name = f"w{self.seed}-{index:05d}"
        if kind is ItemKind.FRESH:
            return self._fresh(index, name, rng, classes)
        if kind is ItemKind.EXACT_DUPLICATE:
            original = self._originals[int(rng.integers(len(self._originals)))]
            data = self._data_of(original)
            return self._keep(Item(
                index=index, name=name, kind=kind, data=data, image_id=original.image_id, expected=EXPECTED[kind],
                truth=original.boxes, width=original.size[0], height=original.size[1], original=original.image_id,
            ))
        if kind is ItemKind.NEAR_DUPLICATE:
            return self._near(index, name, rng)
        if kind is ItemKind.LOW_RES:
            return self._low_res(index, name, rng, classes)
        return self._corrupt(index, name, rng, classes)

    def _keep(self, item: Item) -> Item:
        if item.truth is not None:
            self._truth[item.image_id] = item.truth
        return item

    def _unlike(self, hashes: Hashes) -> bool:
        """Whether a picture is farther than `near_radius` from every fresh and test item so far."""
        return all(_distance(hashes, o.hashes) > self.near_radius for o in self._originals) and all(
            _distance(hashes, h) > self.near_radius for h in self._held
        )

    # Where pictures come from; a dataset world overrides these four.

    def _render(self, rng: np.random.Generator, classes: tuple[str, ...]) -> tuple[int | None, Image.Image, tuple[Box, ...]]:
        """A new picture and its boxes (and the scene seed it was rendered from)."""
        seed = int(rng.integers(2**31))
        if self.style == "shapes" and self.background != "field":
            scene = render_scene(
                seed, width=self.width, height=self.height, classes=classes, objects=self.objects, size=self.size,
                background=self.background,
            )
        else:
            scene = render_world_scene(
                self.style, seed, width=self.width, height=self.height, classes=classes, objects=self.objects, size=self.size,
            )
        boxes = tuple(Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes)
        return seed, scene.image, boxes

    def _data_of(self, original: _Original) -> bytes:
        """The bytes of a fresh item handed out before."""
        assert original.data is not None
        return original.data

    def _picture_of(self, original: _Original) -> tuple[Image.Image, tuple[Box, ...]]:
        """A picture of a fresh item handed out before, to derive variants from, and its boxes in its pixels."""
        assert original.image is not None
        return original.image, original.boxes

    def _fresh(self, index: int, name: str, rng: np.random.Generator, classes: tuple[str, ...]) -> Item:
        # A fresh scene must not be a near duplicate of an earlier one, or dedup would (rightly) drop it.
        for _ in range(50):
            seed, image, boxes = self._render(rng, classes)
            data = _jpeg(image)
            hashes, _ = hash_image(data)
            if self._unlike(hashes):
                break
        else:
            raise RuntimeError("could not render a scene unlike the earlier ones; use another background or fewer scenes")
        image_id = hashlib.sha256(data).hexdigest()
        self._originals.append(_Original(image_id, image.size, boxes, hashes, data=data, image=image))
        return self._keep(Item(
            index=index, name=name, kind=ItemKind.FRESH, data=data, image_id=image_id, expected=ACCEPTED, truth=boxes,
            width=image.width, height=image.height, seed=seed,
        ))

    def _near(self, index: int, name: str, rng: np.random.Generator) -> Item:
        original = self._originals[int(rng.integers(len(self._originals)))]
        picture, boxes = self._picture_of(original)
        w, h = picture.size
        for attempt in range(20):
            how = str(rng.choice(NEAR_KINDS)) if attempt < 19 else "recompress"
            if how == "crop":
                frac = float(rng.uniform(0.02, 0.05))
                dx, dy = int(w * frac), int(h * frac)
                left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
                size = (w - dx, h - dy)
                data = _jpeg(picture.crop((left, top, left + size[0], top + size[1])))
                truth = _moved(boxes, dx=-left, dy=-top, width=size[0], height=size[1])
            else:
                data = variant(picture, how, rng)
                with Image.open(io.BytesIO(data)) as decoded:
                    size = decoded.size
                truth = _moved(boxes, sx=size[0] / w, sy=size[1] / h, width=size[0], height=size[1])
            hashes, _ = hash_image(data)
            image_id = hashlib.sha256(data).hexdigest()
            fits = self.max_item_bytes is None or len(data) <= self.max_item_bytes
            if fits and _distance(hashes, original.hashes) <= self.near_radius and image_id not in self._truth:
                break
        else:
            raise RuntimeError("could not make a near duplicate within the radius")
        return self._keep(Item(
            index=index, name=name, kind=ItemKind.NEAR_DUPLICATE, data=data, image_id=image_id,
            expected=EXPECTED[ItemKind.NEAR_DUPLICATE], truth=truth, width=size[0], height=size[1],
            original=original.image_id, variant=how,
        ))

    def _low_res(self, index: int, name: str, rng: np.random.Generator, classes: tuple[str, ...]) -> Item:
        seed, image, boxes = self._render(rng, classes)
        longest = int(rng.integers(max(8, self.resolution_floor // 2), self.resolution_floor))
        scale = longest / max(image.size)
        size = (max(4, round(image.width * scale)), max(4, round(image.height * scale)))
        small = image.resize(size, Image.Resampling.BILINEAR)
        data = _jpeg(small)
        truth = _moved(boxes, sx=size[0] / image.width, sy=size[1] / image.height, width=size[0], height=size[1])
        return self._keep(Item(
            index=index, name=name, kind=ItemKind.LOW_RES, data=data, image_id=hashlib.sha256(data).hexdigest(),
            expected=EXPECTED[ItemKind.LOW_RES], truth=truth, width=size[0], height=size[1], seed=seed,
        ))

    def _corrupt(self, index: int, name: str, rng: np.random.Generator, classes: tuple[str, ...]) -> Item:
        if rng.random() < 0.5:
            seed, image, _ = self._render(rng, classes)
            whole = _jpeg(image)
            # Past the headers (well under 30 % of a scene's JPEG), short of the end: pixels missing.
            data = whole[: int(len(whole) * float(rng.uniform(0.3, 0.7)))]
            how, expected = "truncated", TRUNCATED
        else:
            seed = None
            data = bytearray(rng.integers(0, 256, size=int(rng.integers(2_000, 20_000)), dtype=np.uint8).tobytes())
            data[0] = 0x01  # no image format's magic number starts with 0x01
            data, how, expected = bytes(data), "garbage", GARBAGE
        return Item(
            index=index, name=name, kind=ItemKind.CORRUPT, data=data, image_id=hashlib.sha256(data).hexdigest(),
            expected=expected, truth=None, variant=how, seed=seed,
        )


# -- sending items upstream -------------------------------------------------------------------------


_MAGIC = ((b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def _extension(data: bytes) -> str:
    """The file extension of encoded image bytes (`jpg` for JPEG and anything unrecognised)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "jpg")


def submission(item: Item, project: str, *, source: str = "demo-upstream") -> ImageSubmitted:
    """The `image submitted` payload an upstream system sends for `item` (inline bytes).

    The submission id is `<source>-<item name>`: resending the same item under the same source
    is a replay (ingest answers it again, nothing new happens). The project travels on the envelope.
    """
    return ImageSubmitted(
        submission_id=f"{source}-{item.name}",
        inline_bytes=item.data,
        filename=f"{item.name}.{_extension(item.data)}",
        source=ImageSource(source_system=source, upstream_id=f"{project}/{item.name}"),
    )


async def publish(
    settings: Settings, items: Sequence[Item], project: str, *, source: str = "demo-upstream", pace_s: float = 0.0
) -> list[Envelope[Any]]:
    """Send `items` on the submit topic, in order, as an upstream Kafka producer would; their envelopes.

    Keys are submission ids (the topic registry's key). Items on different partitions may
    overtake each other, so a duplicate can be decided before its original (then the original is
    the one named a duplicate): to keep `Item.expected` exact, send originals first and wait for
    their answers, or pace the sends (`pace_s` between items).
    """
    from aiokafka import AIOKafkaProducer

    from visionloop.contracts.topics import spec_for
    from visionloop.libs.kafka import client_kwargs, ensure_topics

    spec = spec_for(ImageSubmitted)
    await ensure_topics(settings, [spec])
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=5)  # type: ignore[arg-type]
    await producer.start()
    envelopes: list[Envelope[Any]] = []
    try:
        pending = []
        for n, item in enumerate(items):
            envelope = Envelope.of(submission(item, project, source=source), producer=source, project=project)
            envelopes.append(envelope)
            sent = await producer.send(
                settings.topic(spec.name), envelope.model_dump_json().encode(), key=spec.key_of(envelope).encode()
            )
            if pace_s > 0:
                await sent
                if n < len(items) - 1:
                    await asyncio.sleep(pace_s)
            else:
                pending.append(sent)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return envelopes


def frozen_test_zip(items: Sequence[Item], classes: Sequence[str]) -> bytes:
    """`items` as a COCO zip of a frozen test set (`annotations/test.json` + `images/`), the way an
    admin imports one (`POST /v1/projects/{p}/import?format=coco&test_set=true`)."""
    import json
    import zipfile

    from visionloop.libs.formats import LabelledImage, coco_document

    images = [LabelledImage(file_name=f"{i.image_id}.jpg", width=i.width, height=i.height, boxes=tuple(i.truth or ()),
                            split="test", image_id=i.image_id) for i in items]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("annotations/test.json", json.dumps(coco_document(images, list(classes))))
        for item in items:
            z.writestr(f"images/{item.image_id}.jpg", item.data)
    return archive.getvalue()
