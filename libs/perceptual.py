"""Perceptual hashes, fast: pHash and dHash from a reduced-size decode.

The DCT hash follows imagehash's `phash` (32x32 greyscale, 2-D DCT-II, the 8x8 lowest
frequencies against their median) and the difference hash its `dhash` (9x8 greyscale, each pixel
against its right neighbour). The speed comes from never decoding the full image: JPEG files
are decoded straight to 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's `draft`), which is
all a 32x32 thumbnail needs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

HASH_SIDE = 8
DCT_SIDE = HASH_SIDE * 4  # imagehash's highfreq_factor of 4


def _dct_matrix(n: int) -> np.ndarray:
    """Orthogonal DCT-II basis; `M @ x` is scipy's dct(x, type=2, norm='ortho') up to scale."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT = _dct_matrix(DCT_SIDE)[:HASH_SIDE]  # only the 8 lowest frequencies are ever used
_BITS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


@dataclass(frozen=True)
class Hashes:
    """The hashes of one image, as unsigned 64-bit integers."""

    phash: int
    dhash: int

    @property
    def phash_hex(self) -> str:
        """16 hex digits, as contracts carry it."""
        return f"{self.phash:016x}"

    @property
    def dhash_hex(self) -> str:
        """16 hex digits, as contracts carry it."""
        return f"{self.dhash:016x}"


def _pack(bits: np.ndarray) -> int:
    return int(np.bitwise_or.reduce(_BITS[bits.ravel()]) if bits.any() else 0)


def thumbnail(image: Image.Image) -> Image.Image:
    """Greyscale image at most a few times the hash size, decoded as cheaply as the format allows."""
    if image.format == "JPEG":
        image.draft("L", (DCT_SIDE * 2, DCT_SIDE * 2))
    image = image.convert("L")
    if min(image.size) > DCT_SIDE * 4:
        image = image.reduce(max(1, min(image.size) // (DCT_SIDE * 2)))
    return image


def hash_thumbnail(grey: Image.Image) -> Hashes:
    """pHash and dHash of a greyscale image."""
    small = np.asarray(grey.resize((DCT_SIDE, DCT_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _DCT @ small @ _DCT.T
    phash = _pack(low > np.median(low))
    tiny = np.asarray(grey.resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.int16)
    dhash = _pack(tiny[:, 1:] > tiny[:, :-1])
    return Hashes(phash=phash, dhash=dhash)


def hash_image(data: bytes) -> tuple[Hashes, Image.Image]:
    """Hashes of encoded image bytes, and the greyscale thumbnail they came from."""
    with Image.open(io.BytesIO(data)) as image:
        grey = thumbnail(image)
        grey.load()
    return hash_thumbnail(grey), grey


def blur_variance(grey: Image.Image) -> float:
    """Variance of the Laplacian of a greyscale image (higher is sharper).

    Measured on the reduced-size thumbnail, so thresholds are in that scale's units.
    """
    a = np.asarray(grey, dtype=np.float32)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes."""
    return (a ^ b).bit_count()
