"""Near-duplicate variants of an image: what a camera or a pipeline does to the same picture.

Used by the dedup tests and the intake benchmark to measure near-duplicate precision and recall.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance

KINDS = ("resize", "recompress", "crop", "brightness")


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def variant(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """One variant of `image` of the given kind, JPEG-encoded."""
    w, h = image.size
    if kind == "resize":
        scale = float(rng.choice([0.5, 0.75, 1.25]))
        return _jpeg(image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR), 90)
    if kind == "recompress":
        return _jpeg(image, int(rng.integers(40, 75)))
    if kind == "crop":
        frac = float(rng.uniform(0.02, 0.05))
        dx, dy = int(w * frac), int(h * frac)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return _jpeg(image.crop((left, top, w - (dx - left), h - (dy - top))), 90)
    if kind == "brightness":
        return _jpeg(ImageEnhance.Brightness(image).enhance(float(rng.choice([0.8, 0.85, 1.15, 1.2]))), 90)
    raise ValueError(f"unknown variant kind {kind!r}")
