"""Bytes that pose as images, and real images that are unusual, for ingest's tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from visionloop.libs.scenes import render_scene

HTML = b"<!DOCTYPE html><html><head><title>Login</title></head><body>not a picture</body></html>"
TEXT = b"GIF? no. This is a plain text file that someone renamed to photo.jpg.\n"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="4000" height="4000">'
    b'<rect width="100%" height="100%" fill="red"/></svg>'
)


def good(seed: int) -> bytes:
    """A distinct, ordinary 320x240 JPEG per seed."""
    return render_scene(seed=seed).encode()


def truncated_jpeg(seed: int = 5) -> bytes:
    """A JPEG cut in half: the header decodes, the pixels do not."""
    data = good(seed)
    return data[: len(data) // 2]


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG that claims a huge size (a decompression bomb's header) with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def animated_gif(frames: int = 400, size: int = 128) -> bytes:
    """Many frames (small on disk: flat colours compress well)."""
    images = [Image.new("RGB", (size, size), (i % 256, (i * 7) % 256, (i * 13) % 256)) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=20, loop=0)
    return out.getvalue()


def cmyk_jpeg(width: int = 96, height: int = 64) -> bytes:
    """A print-workflow JPEG in CMYK (Adobe markers): valid, if unusual."""
    pixels = np.random.default_rng(1).integers(0, 255, (height, width, 4), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="CMYK").save(out, format="JPEG", quality=90)
    return out.getvalue()


def png_16bit(width: int = 80, height: int = 50) -> bytes:
    """A 16-bit greyscale PNG (scientific and medical cameras make these)."""
    pixels = np.linspace(0, 65535, width * height, dtype=np.uint16).reshape(height, width)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def exif_rotated_jpeg(width: int = 120, height: int = 40) -> bytes:
    """A landscape sensor image whose EXIF says 'rotate 90° on display' (a phone held upright)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(out, format="JPEG", exif=exif)
    return out.getvalue()


def mpo(width: int = 64, height: int = 48) -> bytes:
    """A camera's multi-picture JPEG: the photo plus a second picture."""
    first = Image.new("RGB", (width, height), (200, 10, 10))
    second = Image.new("RGB", (width // 2, height // 2), (10, 10, 200))
    out = io.BytesIO()
    first.save(out, format="MPO", save_all=True, append_images=[second])
    return out.getvalue()


def bmp(width: int = 16, height: int = 16) -> bytes:
    """A tiny BMP (a format an ingest may choose not to accept)."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(out, format="BMP")
    return out.getvalue()
