"""Synthetic scenes: coloured shapes on noisy backgrounds, with their ground-truth boxes.

Tests, benchmarks and the demo make their own data with this; nothing is downloaded. A scene
is fully determined by its seed and parameters.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
"""Class names this generator can draw; a scene uses a prefix or subset of them."""

_COLOURS = [(220, 40, 40), (40, 180, 60), (40, 90, 220), (230, 200, 30), (200, 60, 200)]


@dataclass(frozen=True)
class SceneBox:
    """A ground-truth object: pixel corners and its class name."""

    x1: float
    y1: float
    x2: float
    y2: float
    class_name: str


@dataclass(frozen=True)
class Scene:
    """A rendered image and its objects."""

    image: Image.Image
    boxes: list[SceneBox]
    seed: int

    def encode(self, fmt: str = "JPEG", quality: int = 90) -> bytes:
        """The image as file bytes."""
        out = io.BytesIO()
        self.image.save(out, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
        return out.getvalue()


def render_scene(
    seed: int,
    *,
    width: int = 320,
    height: int = 240,
    classes: tuple[str, ...] = SHAPES[:3],
    objects: tuple[int, int] = (1, 4),
    size: tuple[float, float] = (0.12, 0.35),
    noise: float = 8.0,
    background: str = "field",
) -> Scene:
    """Draw a scene: a noisy background and `objects` non-overlapping shapes.

    `size` bounds an object's side as a fraction of the shorter image side. `background` is
    `field` (a smooth random field: distinct scenes look distinct, as real ones do) or
    `gradient` (a plain linear gradient).
    """
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 190, size=3)
    if background == "field":
        coarse = rng.normal(0.0, 45.0, size=(5, 5, 3))
        layers = [
            np.asarray(Image.fromarray(coarse[:, :, c].astype(np.float32), "F").resize((width, height), Image.Resampling.BICUBIC))
            for c in range(3)
        ]
        structure = np.stack(layers, axis=-1)
    elif background == "gradient":
        structure = np.linspace(0.0, 1.0, width)[None, :, None] * rng.integers(-40, 40, size=3)
    else:
        raise ValueError(f"unknown background {background!r} (field, gradient)")
    pixels = base + structure + rng.normal(0.0, noise, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    boxes: list[SceneBox] = []
    short = min(width, height)
    wanted = int(rng.integers(objects[0], objects[1] + 1))
    for _ in range(wanted * 10):
        if len(boxes) == wanted:
            break
        side = float(rng.uniform(*size)) * short
        x1 = float(rng.uniform(0, width - side))
        y1 = float(rng.uniform(0, height - side))
        box = (x1, y1, x1 + side, y1 + side)
        if any(_overlap(box, (b.x1, b.y1, b.x2, b.y2)) for b in boxes):
            continue
        name = classes[int(rng.integers(len(classes)))]
        colour = _COLOURS[SHAPES.index(name) % len(_COLOURS)] if name in SHAPES else _COLOURS[0]
        _draw_shape(draw, name, box, colour)
        boxes.append(SceneBox(*box, class_name=name))
    return Scene(image=image, boxes=boxes, seed=seed)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box: tuple[float, float, float, float], colour: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "square":
        draw.rectangle(box, fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=colour)
    else:  # cross
        w, h = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle((x1 + w, y1, x2 - w, y2), fill=colour)
        draw.rectangle((x1, y1 + h, x2, y2 - h), fill=colour)


# -- worlds by style --------------------------------------------------------------------------------

STYLE_CLASSES: dict[str, tuple[str, ...]] = {"shapes": SHAPES[:4]}
"""Per world style, the classes it can draw: the first three are a world's starting classes, the
fourth the class a later round adds (the demo's round 3). `photo` is registered by its renderer."""


def render_world_scene(
    style: str,
    seed: int,
    *,
    width: int,
    height: int,
    classes: tuple[str, ...],
    objects: tuple[int, int],
    size: tuple[float, float],
) -> Scene:
    """A scene of the world `style` (`shapes`: `render_scene`; `photo`: real photographs)."""
    if style == "shapes":
        return render_scene(seed, width=width, height=height, classes=classes, objects=objects, size=size)
    raise ValueError(f"unknown world style {style!r} ({', '.join(STYLE_CLASSES)})")
