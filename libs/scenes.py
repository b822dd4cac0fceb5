"""Synthetic scenes: coloured shapes on noisy backgrounds, with their ground-truth boxes.

Tests, benchmarks and the demo make their own data with this; nothing is downloaded. A scene
is fully determined by its seed and parameters.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from visionloop.libs import photos

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


# -- the photo world --------------------------------------------------------------------------------
# Real photographs (libs/photos.py) as backgrounds and as the surface of every object; the class is
# the object's shape, never its colour or texture. Objects vary in scale, aspect and rotation, may
# overlap, and share the image with shapes of no class; the camera adds blur, noise, uneven light
# and JPEG artefacts. A colour threshold cannot solve it (visionloop/bench/baseline.py); it is meant
# for a small detector (yolov8n at 160-192 px) to learn.

PHOTO_CLASSES = ("ring", "triangle", "cross", "star")
"""Photo-world classes, told apart by shape alone: a ring has a hole, a triangle three corners, a
cross four arms, a star five points; none turns into another under rotation or stretch."""
PHOTO_SIZE = (0.12, 0.5)
"""Default object extent in the photo world, as a fraction of the shorter image side."""
PHOTO_OBJECTS = (1, 3)
"""Default number of labelled objects per photo-world scene."""
PHOTO_DISTRACTORS = ("blob", "ellipse", "polygon", "bar")
"""Shapes of no class, textured like the objects (0-2 a scene): a plain ellipse is a ring
without its hole, so a detector must see structure, not just a textured patch."""

_MIN_VISIBLE = 0.4  # an object less visible than this is not labelled (and placement avoids it)
_SS = 3  # masks are drawn this many times larger, then averaged down: smooth, realistic edges
_PAD = 4  # pixels around an object that its shadow may reach


def _unit_outline(name: str, rng: np.random.Generator) -> list[np.ndarray]:
    """The outline of a class or distractor around (0, 0), radius 1: the outer polygon first, then
    any hole. Each class varies within itself (hole size, corner angles, arm width, point depth)."""
    turn = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(turn), np.sin(turn)], axis=1)
    if name == "ring":
        return [circle, circle * rng.uniform(0.42, 0.62)]
    if name == "triangle":
        angles = np.radians(np.array([90.0, 210.0, 330.0]) + rng.uniform(-14, 14, size=3))
        return [np.stack([np.cos(angles), np.sin(angles)], axis=1)]
    if name == "cross":
        t = rng.uniform(0.2, 0.34)
        return [np.array([(1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
                          (-t, -t), (-t, -1), (t, -1), (t, -t)], dtype=np.float64)]
    if name == "star":
        radius = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.36, 0.5))
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        return [np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)]
    if name == "blob":  # a smooth irregular blob; weak harmonics, so it never grows points or arms
        radius = 1.0 + sum(rng.uniform(0.0, top) * np.cos(k * turn + rng.uniform(0, 2 * np.pi))
                           for k, top in ((2, 0.2), (3, 0.06), (4, 0.05)))
        return [circle * (radius / radius.max())[:, None]]
    if name == "ellipse":
        return [circle]
    if name == "polygon":  # an irregular polygon of 5 to 7 corners
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(5, 8))))
        radius = rng.uniform(0.7, 1.0, size=len(angles))
        return [np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)]
    w = rng.uniform(0.1, 0.22)  # bar: one straight stroke
    return [np.array([(-1.0, -w), (1.0, -w), (1.0, w), (-1.0, w)])]


def _place_outline(unit: list[np.ndarray], rng: np.random.Generator, width: int, height: int,
                   size: tuple[float, float]) -> list[np.ndarray]:
    """The outline in pixels: an extent drawn log-uniformly from `size` (times the shorter side),
    an aspect of 0.6-1.6, any rotation, and a position leaving at most a quarter of its width
    and of its height off the image."""
    extent = float(np.exp(rng.uniform(np.log(size[0]), np.log(size[1])))) * min(width, height)
    aspect = float(rng.uniform(0.6, 1.6))
    scale = np.array([np.sqrt(aspect), 1 / np.sqrt(aspect)]) * extent / 2
    theta = float(rng.uniform(0, 2 * np.pi))
    rotate = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    shaped = [(p * scale) @ rotate for p in unit]
    lo, hi = shaped[0].min(axis=0), shaped[0].max(axis=0)
    span = hi - lo
    low = -lo - 0.25 * span
    high = np.array([width, height]) - hi + 0.25 * span
    centre = rng.uniform(np.minimum(low, high), np.maximum(low, high))
    return [p + centre for p in shaped]


def _polygon_area(outline: list[np.ndarray]) -> float:
    """Area in pixels of an outline: the outer polygon less its hole (shoelace formula)."""

    def shoelace(p: np.ndarray) -> float:
        x, y = p[:, 0], p[:, 1]
        return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2

    return shoelace(outline[0]) - sum(shoelace(p) for p in outline[1:])


Region = tuple[int, int, int, int]
"""(x0, y0, x1, y1): a rectangle of whole pixels on the image."""


def _coverage(outline: list[np.ndarray], width: int, height: int) -> tuple[Region, np.ndarray] | None:
    """Where an outline lies, padded for its shadow: (x0, y0, x1, y1) on the image and the
    fraction of each pixel there it covers (antialiased), or None when it misses the image."""
    lo, hi = outline[0].min(axis=0), outline[0].max(axis=0)
    x0, y0 = max(0, int(np.floor(lo[0])) - _PAD), max(0, int(np.floor(lo[1])) - _PAD)
    x1, y1 = min(width, int(np.ceil(hi[0])) + _PAD), min(height, int(np.ceil(hi[1])) + _PAD)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    mask = Image.new("L", ((x1 - x0) * _SS, (y1 - y0) * _SS), 0)
    draw = ImageDraw.Draw(mask)
    for i, polygon in enumerate(outline):
        points = (polygon - (x0, y0)) * _SS - 0.5
        draw.polygon([tuple(p) for p in points.tolist()], fill=0 if i else 255)
    alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return (x0, y0, x1, y1), alpha


def _photo_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random crop (a third of the photo's width to all of it) of a random background photo,
    maybe mirrored, slightly tinted, as (H, W, 3) float32."""
    photo = photos.load_photo(photos.BACKGROUNDS[int(rng.integers(len(photos.BACKGROUNDS)))])
    ph, pw = photo.shape[:2]
    full_w = min(pw, ph * width / height)
    crop_w = max(8.0, float(rng.uniform(0.33, 1.0)) * full_w)
    crop_h = crop_w * height / width
    x = float(rng.uniform(0, pw - crop_w))
    y = float(rng.uniform(0, ph - crop_h))
    image = Image.fromarray(photo).resize((width, height), Image.Resampling.BILINEAR,
                                          box=(x, y, x + crop_w, y + crop_h), reducing_gap=2.0)
    pixels = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels * rng.uniform(0.88, 1.12, size=3).astype(np.float32)


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A (h, w, 3) float32 surface: a crop of a random texture photo at a random zoom, maybe
    flipped, tinted and with its contrast changed; the same for every class."""
    photo = photos.load_photo(photos.TEXTURES[int(rng.integers(len(photos.TEXTURES)))])
    ph, pw = photo.shape[:2]
    crop_w = min(float(pw), w * float(rng.uniform(0.6, 3.0)))
    crop_h = crop_w * h / w
    if crop_h > ph:
        crop_w, crop_h = crop_w * ph / crop_h, float(ph)
    x, y = float(rng.uniform(0, pw - crop_w)), float(rng.uniform(0, ph - crop_h))
    box = (x, y, x + crop_w, y + crop_h)
    crop = Image.fromarray(photo).resize((w, h), Image.Resampling.BILINEAR, box=box)
    pixels = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        pixels = pixels[::-1]
    mean = pixels.mean(axis=(0, 1))
    pixels = mean + (pixels - mean) * rng.uniform(0.6, 1.1)
    return pixels * rng.uniform(0.75, 1.25, size=3).astype(np.float32)


def _shifted(alpha: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`alpha` moved by (dx, dy) pixels, zeros where nothing moved in."""
    out = np.zeros_like(alpha)
    h, w = alpha.shape
    target = (slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))
    source = (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
    out[target] = alpha[source]
    return out


def _filtered(alpha: np.ndarray, kind: ImageFilter.Filter) -> np.ndarray:
    """A coverage map (0-1) through one of PIL's filters."""
    image = Image.fromarray((alpha * 255).astype(np.uint8)).filter(kind)
    return np.asarray(image, dtype=np.float32) / 255.0


def _paint(canvas: np.ndarray, region: Region, alpha: np.ndarray,
           rng: np.random.Generator, light: tuple[int, int]) -> None:
    """Draw one textured object onto `canvas`: maybe a soft shadow (one light per scene), a
    surface brighter or darker than what it covers, maybe a thin outline. None depends on class."""
    x0, y0, x1, y1 = region
    under = canvas[y0:y1, x0:x1]
    if rng.random() < 0.5:
        shadow = _filtered(_shifted(alpha, *light), ImageFilter.GaussianBlur(1.2))
        under *= 1.0 - float(rng.uniform(0.25, 0.5)) * shadow[:, :, None]
    surface = _texture(rng, x1 - x0, y1 - y0)
    weight = alpha / max(float(alpha.sum()), 1e-6)
    lum_under = float((under.mean(axis=2) * weight).sum())
    lum_surface = float((surface.mean(axis=2) * weight).sum())
    delta = float(rng.uniform(28, 70)) * (1 if rng.random() < 0.5 else -1)
    if not 20 <= lum_under + delta <= 235:
        delta = -delta
    surface += float(np.clip(lum_under + delta, 20, 235)) - lum_surface
    if rng.random() < 0.75:
        edge = (alpha - _filtered(alpha, ImageFilter.MinFilter(3)))[:, :, None]
        edge *= float(rng.uniform(0.5, 0.9))
        tone = surface * 0.4 if rng.random() < 0.5 else surface * 0.5 + 128
        surface = surface * (1 - edge) + tone * edge
    a = alpha[:, :, None]
    canvas[y0:y1, x0:x1] = under * (1 - a) + np.clip(surface, 0, 255) * a


def _camera(canvas: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """What a cheap camera adds: uneven light and gamma, sometimes blur, sensor noise, and
    sometimes a low-quality JPEG round trip."""
    h, w = canvas.shape[:2]
    gx, gy = rng.uniform(-0.35, 0.35, size=2)
    across = np.arange(w, dtype=np.float32) / w - 0.5
    down = np.arange(h, dtype=np.float32) / h - 0.5
    light = 1.0 + gx * across[None, :] + gy * down[:, None]
    pixels = 255.0 * (np.clip(canvas * light[:, :, None], 0, 255) / 255.0) ** float(rng.uniform(0.75, 1.35))
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if rng.random() < 0.35:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.1))))
    noise = rng.normal(0.0, rng.uniform(1.0, 7.0), size=(h, w, 3)).astype(np.float32)
    noisy = np.asarray(image, dtype=np.float32) + noise
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.35:
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=int(rng.integers(30, 71)))
        image = Image.open(io.BytesIO(out.getvalue())).convert("RGB")
    return image


def _check_photo_args(width: int, height: int, classes: tuple[str, ...], objects: tuple[int, int],
                      size: tuple[float, float]) -> None:
    """Refuse parameters the photo world cannot draw, saying which and why."""
    unknown = [name for name in classes if name not in PHOTO_CLASSES]
    if not classes or unknown:
        raise ValueError(f"photo-world classes must be some of {', '.join(PHOTO_CLASSES)}; "
                         f"got {list(classes)}")
    if not 0 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be (min, max) with 0 <= min <= max; got {objects}")
    if not 0 < size[0] <= size[1] <= 1:
        raise ValueError(f"size must be (min, max) fractions with 0 < min <= max <= 1; got {size}")
    if width < 16 or height < 16:
        raise ValueError(f"a photo-world image needs at least 16x16 pixels; got {width}x{height}")


Placed = tuple[str, list[np.ndarray], float]
"""An item drawn on a scene: its class or distractor name, its outline, its area in pixels."""


def _find_spot(name: str, rng: np.random.Generator, width: int, height: int,
               size: tuple[float, float], owner: np.ndarray,
               placed: list[Placed]) -> tuple[list[np.ndarray], Region, np.ndarray] | None:
    """An outline for a new item, with its region and coverage, that leaves every labelled object
    placed before at least `_MIN_VISIBLE` visible (and, for an object, itself half on the image);
    None after 8 tries."""
    for _ in range(8):
        outline = _place_outline(_unit_outline(name, rng), rng, width, height, size)
        cover = _coverage(outline, width, height)
        if cover is None:
            continue
        (x0, y0, x1, y1), alpha = cover
        solid = alpha > 0.5
        if name in PHOTO_CLASSES and np.count_nonzero(solid) < 0.5 * _polygon_area(outline):
            continue
        hidden = np.bincount(owner[y0:y1, x0:x1][solid], minlength=len(placed) + 1)
        shown = np.bincount(owner.ravel(), minlength=len(placed) + 1)
        if all(shown[i + 1] - hidden[i + 1] >= _MIN_VISIBLE * area
               for i, (kind, _, area) in enumerate(placed) if kind in PHOTO_CLASSES):
            return outline, (x0, y0, x1, y1), alpha
    return None


def render_photo_scene(
    seed: int,
    *,
    width: int = 192,
    height: int = 144,
    classes: tuple[str, ...] = PHOTO_CLASSES[:3],
    objects: tuple[int, int] = PHOTO_OBJECTS,
    size: tuple[float, float] = PHOTO_SIZE,
) -> Scene:
    """Draw a photo-world scene: a crop of a real photograph, `objects` shapes of `classes`
    and 0-2 distractors, all textured with photographs, possibly overlapping, then a camera.

    Each object is labelled with the box of its full outline clipped to the image, even where
    a later object covers part of it; placement retries keep at least 40% of every labelled
    object visible, and an object that still shows less is left out of the labels.
    """
    _check_photo_args(width, height, classes, objects, size)
    rng = np.random.default_rng(seed)
    canvas = _photo_background(rng, width, height)
    wanted, others = int(rng.integers(objects[0], objects[1] + 1)), int(rng.integers(0, 3))
    kinds = [classes[int(rng.integers(len(classes)))] for _ in range(wanted)]
    kinds += [PHOTO_DISTRACTORS[int(rng.integers(len(PHOTO_DISTRACTORS)))] for _ in range(others)]
    angle = rng.uniform(0, 2 * np.pi)
    reach = float(rng.uniform(1.0, 3.0))
    light = (round(reach * np.cos(angle)), round(reach * np.sin(angle)))
    owner = np.zeros((height, width), dtype=np.int32)  # which placed item shows at each pixel (0: none)
    placed: list[Placed] = []
    for k in rng.permutation(len(kinds)):
        spot = _find_spot(kinds[k], rng, width, height, size, owner, placed)
        if spot is None:
            continue
        outline, region, alpha = spot
        _paint(canvas, region, alpha, rng, light)
        x0, y0, x1, y1 = region
        owner[y0:y1, x0:x1][alpha > 0.5] = len(placed) + 1
        placed.append((kinds[k], outline, _polygon_area(outline)))
    boxes = []
    for i, (name, outline, area) in enumerate(placed):
        if name in PHOTO_CLASSES and np.count_nonzero(owner == i + 1) >= _MIN_VISIBLE * area:
            lo, hi = outline[0].min(axis=0), outline[0].max(axis=0)
            x1, x2 = (float(v) for v in np.clip([lo[0], hi[0]], 0, width))
            y1, y2 = (float(v) for v in np.clip([lo[1], hi[1]], 0, height))
            boxes.append(SceneBox(x1, y1, x2, y2, name))
    return Scene(image=_camera(canvas, rng), boxes=boxes, seed=seed)


# -- worlds by style --------------------------------------------------------------------------------

STYLE_CLASSES: dict[str, tuple[str, ...]] = {"shapes": SHAPES[:4], "photo": PHOTO_CLASSES}
"""Per world style, the classes it can draw: the first three are a world's starting classes, the
fourth the class a later round adds (the demo's round 3)."""


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
    if style == "photo":
        return render_photo_scene(seed, width=width, height=height, classes=classes, objects=objects,
                                  size=size)
    raise ValueError(f"unknown world style {style!r} ({', '.join(STYLE_CLASSES)})")
