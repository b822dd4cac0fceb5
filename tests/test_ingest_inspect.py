"""ingest's pure decisions: what bytes may be kept, and which files may be read."""

from __future__ import annotations

import io
import random
from pathlib import Path

import hostile_images
import pytest
from PIL import Image

from visionloop.contracts import ImageRejectReason, ImageSubmitted
from visionloop.libs.scenes import render_scene
from visionloop.services.ingest.inspect import Limits, Refusal, check_magic, inspect_image, sniff_format
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.sources import Sources

LIMITS = Limits(max_bytes=5_000_000, max_pixels=40_000_000, max_frames=1, formats=frozenset({"JPEG", "PNG", "GIF", "WEBP"}))


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
    assert _refusal(hostile_images.png_bomb()) is ImageRejectReason.DECOMPRESSION_BOMB
    big = Limits(max_bytes=100, max_pixels=LIMITS.max_pixels, max_frames=1, formats=LIMITS.formats)
    with pytest.raises(Refusal) as err:
        inspect_image(jpeg, big)
    assert err.value.reason is ImageRejectReason.TOO_LARGE


def test_animated_files_over_the_frame_cap_are_refused() -> None:
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(5)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    assert _refusal(out.getvalue()) is ImageRejectReason.TOO_MANY_FRAMES


def test_text_posing_as_an_image_is_refused_before_any_decoder_runs() -> None:
    for data in (hostile_images.HTML, hostile_images.TEXT, hostile_images.SVG, b"%!PS-Adobe-3.0 EPSF-3.0\n"):
        assert _refusal(data) is ImageRejectReason.NOT_AN_IMAGE
    # recognised, but not accepted here: said as such, before decoding
    assert _refusal(hostile_images.bmp()) is ImageRejectReason.UNSUPPORTED_FORMAT
    assert sniff_format(hostile_images.good(1)) == ("JPEG", "MPO")
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == ("WEBP",)
    assert sniff_format(b"RIFF\x00\x00\x00\x00AVI LIST") == ()
    # a format the sniffer does not know leaves the decision to Pillow's (restricted) decoders
    check_magic(b"\x0a\x05\x01\x08", frozenset({"JPEG", "PCX"}))


def test_unusual_but_valid_images_are_accepted() -> None:
    cmyk = inspect_image(hostile_images.cmyk_jpeg(96, 64), LIMITS)
    assert (cmyk.width, cmyk.height, cmyk.format) == (96, 64, "JPEG")
    deep = inspect_image(hostile_images.png_16bit(80, 50), LIMITS)
    assert (deep.width, deep.height, deep.format) == (80, 50, "PNG")
    # a phone's multi-picture JPEG is its first picture, not an animation
    camera = inspect_image(hostile_images.mpo(64, 48), LIMITS)
    assert (camera.width, camera.height, camera.format) == (64, 48, "JPEG")


def test_frame_count_stops_one_past_the_cap() -> None:
    many = hostile_images.animated_gif(frames=400)
    assert _refusal(many) is ImageRejectReason.TOO_MANY_FRAMES
    lenient = Limits(max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, max_frames=400, formats=LIMITS.formats)
    assert inspect_image(many, lenient).format == "GIF"


def test_mutated_images_are_refused_with_a_reason_never_an_exception() -> None:
    """A cheap fuzz: random byte flips and cuts of valid files in every accepted format."""
    rng = random.Random(0)
    limits = Limits(max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels, max_frames=1,
                    formats=frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"}))
    base = Image.open(io.BytesIO(hostile_images.good(3))).convert("RGB").resize((64, 48))
    for fmt in sorted(limits.formats):
        out = io.BytesIO()
        base.save(out, format=fmt)
        for _ in range(400):
            data = bytearray(out.getvalue())
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(len(data))]
            try:
                inspect_image(bytes(data), limits)
            except Refusal as refusal:
                assert refusal.message


def test_exif_rotation_swaps_width_and_height() -> None:
    image = Image.new("RGB", (64, 32), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    facts = inspect_image(out.getvalue(), LIMITS)
    assert (facts.width, facts.height) == (32, 64)


def _sources(root: Path | None, *, max_bytes: int = 100) -> Sources:
    return Sources(IngestSettings(file_root=root, max_bytes=max_bytes))


async def test_file_sources_stay_under_their_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"bytes")
    (tmp_path / "secret.txt").write_text("no")
    (root / "link.jpg").symlink_to(tmp_path / "secret.txt")
    ok = ImageSubmitted(submission_id="a", source_uri=(root / "ok.jpg").as_uri())
    assert await _sources(root).read(ok, inline_max=10) == b"bytes"
    for uri in (f"file://{root}/../secret.txt", "file:///etc/passwd", f"file://evil-host{root}/ok.jpg",
                (root / "link.jpg").as_uri(), f"file://{root}/%2e%2e/secret.txt"):
        with pytest.raises(Refusal) as err:
            await _sources(root).read(ImageSubmitted(submission_id="b", source_uri=uri), inline_max=10)
        assert err.value.reason is ImageRejectReason.FORBIDDEN_SOURCE, uri
    with pytest.raises(Refusal) as err:
        await _sources(None).read(ok, inline_max=10)
    assert err.value.reason is ImageRejectReason.FORBIDDEN_SOURCE


async def test_file_sources_must_be_small_regular_files(tmp_path: Path) -> None:
    import os

    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    os.mkfifo(tmp_path / "pipe.jpg")  # opening a FIFO for reading would block forever
    (tmp_path / "dir.jpg").mkdir()
    expected = {"big.jpg": ImageRejectReason.TOO_LARGE, "pipe.jpg": ImageRejectReason.FORBIDDEN_SOURCE,
                "dir.jpg": ImageRejectReason.FORBIDDEN_SOURCE, "missing.jpg": ImageRejectReason.UNREACHABLE}
    for name, reason in expected.items():
        with pytest.raises(Refusal) as err:
            await _sources(tmp_path).read(ImageSubmitted(submission_id="f", source_uri=(tmp_path / name).as_uri()), inline_max=10)
        assert err.value.reason is reason, name


async def test_inline_bytes_are_bounded() -> None:
    with pytest.raises(Refusal) as err:
        await _sources(None).read(ImageSubmitted(submission_id="c", inline_bytes=b"x" * 11), inline_max=10)
    assert err.value.reason is ImageRejectReason.INLINE_TOO_LARGE


def test_a_png_with_a_bad_crc_gets_one_answer_with_ultralytics_loaded_or_not() -> None:
    """Issue 16, item 9: Ultralytics replaces `Image.open` with one that tries to install a HEIF
    plugin on bytes Pillow cannot identify; `visionloop up` loads it in ingest's process and the
    bad PNG came back as `corrupt: No module named 'pi_heif'`. The answer must not depend on it."""
    import subprocess
    import sys

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[data.find(b"IHDR") + 4 + 13] ^= 0xFF  # the header chunk's CRC
    check = (
        "import sys\n"
        "from visionloop.services.ingest.inspect import Limits, Refusal, inspect_image\n"
        "if sys.argv[1] == 'ultralytics': import ultralytics.utils.patches\n"
        "try:\n"
        "    inspect_image(sys.stdin.buffer.read(), Limits(10**7, 10**8, 10, frozenset({'PNG', 'JPEG'})))\n"
        "except Refusal as refusal:\n"
        "    print(refusal.reason.value, '|', refusal.message)\n"
    )
    answers = {
        mode: subprocess.run([sys.executable, "-c", check, mode], input=bytes(data), capture_output=True, timeout=120).stdout.decode()
        for mode in ("plain", "ultralytics")
    }
    assert answers["plain"].startswith("not_an_image | ")
    assert answers["ultralytics"] == answers["plain"]
