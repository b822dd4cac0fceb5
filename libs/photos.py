"""Real photographs for the `photo` world: the sample images the scikit-image wheel ships.

The photo world (`libs/scenes.py::render_photo_scene`) crops its backgrounds and its object
textures from these, so nothing is downloaded and every machine with scikit-image installed
draws the same scenes. The files live in the wheel's `skimage/data/` folder; it is found without
importing scikit-image (a slow import) and read with PIL. scikit-image is in the `train` and
`bench` extras of pyproject.toml.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS: dict[str, str] = {
    "astronaut.png": "portrait of astronaut Eileen Collins, colour",
    "camera.png": "cameraman on a lawn, greyscale",
    "chelsea.png": "a tabby cat's face, colour",
    "coffee.png": "a cup of coffee on a saucer, colour",
    "motorcycle_left.png": "a motorcycle in a workshop (left of a stereo pair), colour",
    "motorcycle_right.png": "the same motorcycle (right of the stereo pair), colour",
    "rocket.jpg": "a rocket on its launch pad, colour",
    "hubble_deep_field.jpg": "galaxies of the Hubble deep field, colour",
    "coins.png": "old coins on a table, greyscale",
    "moon.png": "the surface of the moon, greyscale",
    "retina.jpg": "a human retina (fundus photograph), colour",
    "ihc.png": "an immunohistochemistry tissue slide, colour",
    "cell.png": "a cell under a microscope, greyscale",
    "page.png": "a scanned page of printed text, greyscale",
    "text.png": "photographed printed text, greyscale",
    "clock_motion.png": "a wall clock, motion blurred, greyscale",
    "grass.png": "grass, greyscale texture",
    "gravel.png": "gravel, greyscale texture",
    "brick.png": "a brick wall, greyscale texture",
}
"""Every photograph used, by file name in `skimage/data/`, with what it shows."""

BACKGROUNDS: tuple[str, ...] = (
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
    "motorcycle_right.png", "rocket.jpg", "hubble_deep_field.jpg", "coins.png", "moon.png",
    "retina.jpg", "page.png", "text.png", "clock_motion.png", "grass.png", "gravel.png", "brick.png",
)
"""Photographs a scene's background is cropped from (whole scenes and surfaces)."""

TEXTURES: tuple[str, ...] = (
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
    "motorcycle_right.png", "rocket.jpg", "hubble_deep_field.jpg", "coins.png", "moon.png",
    "retina.jpg", "ihc.png", "cell.png", "grass.png", "gravel.png", "brick.png",
)
"""Photographs an object's surface is cropped from; every class draws from this one pool."""

_MAX_SIDE = 480
"""Photos are kept at most this wide or tall: a scene's crops are small, and resizing from a
smaller source keeps a scene fast to draw."""


class PhotosMissing(RuntimeError):
    """The sample photographs could not be found or read."""


def _skimage_data_dir() -> Path | None:
    """The wheel's `skimage/data/` folder, or None when scikit-image is not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def photo_dir() -> Path:
    """The folder holding the photographs; a clear error when scikit-image is not installed."""
    folder = _skimage_data_dir()
    if folder is None or not folder.is_dir():
        raise PhotosMissing(
            "the photo world needs the sample photographs shipped with scikit-image, which is "
            "not installed: run `pip install scikit-image` (or install visionloop's `train` or "
            "`bench` extra)"
        )
    return folder


@lru_cache(maxsize=64)
def load_photo(name: str) -> np.ndarray:
    """One photograph as a read-only (H, W, 3) uint8 RGB array, at most `_MAX_SIDE` pixels a
    side; each is read once per process."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r} (one of {', '.join(PHOTOS)})")
    path = photo_dir() / name
    try:
        with Image.open(path) as raw:
            image = raw.convert("RGB")
    except OSError as exc:
        raise PhotosMissing(
            f"cannot read the sample photograph {path} ({exc}): reinstall scikit-image "
            "(`pip install --force-reinstall scikit-image`)"
        ) from exc
    scale = _MAX_SIDE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    array.setflags(write=False)
    return array


def backgrounds() -> tuple[np.ndarray, ...]:
    """The background photographs, in `BACKGROUNDS` order."""
    return tuple(load_photo(name) for name in BACKGROUNDS)


def textures() -> tuple[np.ndarray, ...]:
    """The texture photographs, in `TEXTURES` order."""
    return tuple(load_photo(name) for name in TEXTURES)
