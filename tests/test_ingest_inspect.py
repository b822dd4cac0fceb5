"""ingest's pure decisions: what bytes may be kept, and which files may be read."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from visionloop.contracts import ImageRejectReason, ImageSubmitted
from visionloop.libs.scenes import render_scene
from visionloop.services.ingest.inspect import Limits, Refusal, inspect_image
from visionloop.services.ingest.sources import read_source

LIMITS = Limits(max_bytes=5_000_000, max_pixels=40_000_000, max_frames=1, formats=frozenset({"JPEG", "PNG", "GIF", "WEBP"}))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size (a decompression bomb's header) with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _refusal(data: bytes) -> ImageRejectReason:
    with pytest.raises(Refusal) as err:
        inspect_image(data, LIMITS)
    assert err.value.message
    return err.value.reason


def test_a_good_image_is_described() -> None:
    data = render_scene(seed=1).encode()
    facts = inspect_image(data, LIMITS)
    assert (facts.width, facts.height, facts.format, facts.byte_size) == (320, 240, "JPEG", len(data))
    assert len(facts.sha256) == 64


def test_hostile_bytes_are_refused_with_reasons() -> None:
    jpeg = render_scene(seed=2).encode()
    assert _refusal(b"") is ImageRejectReason.NOT_AN_IMAGE
    assert _refusal(b"<html><body>hello</body></html>") is ImageRejectReason.NOT_AN_IMAGE
    assert _refusal(jpeg[: len(jpeg) // 2]) is ImageRejectReason.CORRUPT
    assert _refusal(_png_header_only(100_000, 100_000)) is ImageRejectReason.DECOMPRESSION_BOMB
    big = Limits(max_bytes=100, max_pixels=LIMITS.max_pixels, max_frames=1, formats=LIMITS.formats)
    with pytest.raises(Refusal) as err:
        inspect_image(jpeg, big)
    assert err.value.reason is ImageRejectReason.TOO_LARGE


def test_animated_files_over_the_frame_cap_are_refused() -> None:
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(5)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    assert _refusal(out.getvalue()) is ImageRejectReason.TOO_MANY_FRAMES


def test_exif_rotation_swaps_width_and_height() -> None:
    image = Image.new("RGB", (64, 32), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    facts = inspect_image(out.getvalue(), LIMITS)
    assert (facts.width, facts.height) == (32, 64)


async def test_file_sources_stay_under_their_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"bytes")
    (tmp_path / "secret.txt").write_text("no")
    ok = ImageSubmitted(submission_id="a", source_uri=(root / "ok.jpg").as_uri())
    assert await read_source(ok, file_root=root, inline_max=10, max_bytes=100) == b"bytes"
    for uri in (f"file://{root}/../secret.txt", "file:///etc/passwd", f"file://evil-host{root}/ok.jpg"):
        with pytest.raises(Refusal) as err:
            await read_source(ImageSubmitted(submission_id="b", source_uri=uri), file_root=root, inline_max=10, max_bytes=100)
        assert err.value.reason is ImageRejectReason.FORBIDDEN_SOURCE, uri
    with pytest.raises(Refusal) as err:
        await read_source(ok, file_root=None, inline_max=10, max_bytes=100)
    assert err.value.reason is ImageRejectReason.FORBIDDEN_SOURCE


async def test_inline_bytes_are_bounded() -> None:
    with pytest.raises(Refusal) as err:
        await read_source(ImageSubmitted(submission_id="c", inline_bytes=b"x" * 11), file_root=None, inline_max=10, max_bytes=100)
    assert err.value.reason is ImageRejectReason.INLINE_TOO_LARGE
