"""Is this an image we may keep? A pure function over bytes, with Pillow's safety limits.

Nothing here touches the network, the disk or the bus: it takes bytes and limits and answers
with the facts of the image or a refusal that carries a reason code and a sentence.

The bytes are judged by their first bytes (magic numbers) before any decoder sees them, and
Pillow is only offered the decoders of the accepted formats, so a file that claims to be a
JPEG never reaches, say, the EPS plugin (which runs Ghostscript).
"""

from __future__ import annotations

import hashlib
import io
import sys
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from visionloop.contracts import ImageRejectReason

MAGIC_BYTES = 16
"""How many leading bytes `sniff_format` needs to recognise every format it knows."""

_SIGNATURES: tuple[tuple[int, bytes, tuple[str, ...]], ...] = (
    (0, b"\xff\xd8\xff", ("JPEG", "MPO")),
    (0, b"\x89PNG\r\n\x1a\n", ("PNG",)),
    (0, b"GIF87a", ("GIF",)),
    (0, b"GIF89a", ("GIF",)),
    (8, b"WEBP", ("WEBP",)),  # after b"RIFF" + length, checked below
    (0, b"BM", ("BMP",)),
    (0, b"II*\x00", ("TIFF",)),
    (0, b"MM\x00*", ("TIFF",)),
    (0, b"II+\x00", ("TIFF",)),  # BigTIFF
    (0, b"MM\x00+", ("TIFF",)),
    (0, b"\x00\x00\x01\x00", ("ICO",)),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", ("JPEG2000",)),
    (0, b"\xff\x4f\xff\x51", ("JPEG2000",)),
    (4, b"ftypavif", ("AVIF",)),
    (4, b"ftypavis", ("AVIF",)),
    (0, b"qoif", ("QOI",)),
)
SNIFFED_FORMATS = frozenset(f for _, _, names in _SIGNATURES for f in names)
"""Formats `sniff_format` recognises; for others the magic-byte check defers to Pillow."""


@dataclass(frozen=True)
class Limits:
    """What ingest accepts."""

    max_bytes: int
    max_pixels: int
    max_frames: int
    formats: frozenset[str]


@dataclass(frozen=True)
class ImageFacts:
    """What ingest learned about an accepted image."""

    sha256: str
    width: int
    height: int
    format: str
    byte_size: int


@dataclass
class Refusal(Exception):
    """Why an input is not ingested: a reason code and a sentence that says what to do."""

    reason: ImageRejectReason
    message: str
    details: dict[str, str | int | float | bool | None] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


def sniff_format(head: bytes) -> tuple[str, ...]:
    """The formats (Pillow names) whose magic number `head` starts with; empty when none."""
    for offset, magic, names in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            if names == ("WEBP",) and head[:4] != b"RIFF":
                continue
            return names
    return ()


def check_magic(head: bytes, formats: frozenset[str]) -> None:
    """Refuse bytes whose first bytes show they are no accepted image, before any decoding.

    Recognised but not accepted: `unsupported_format`. Not recognised at all: `not_an_image`,
    unless an accepted format is one this check cannot recognise (then Pillow decides).
    Empty input passes: `inspect_image` refuses zero bytes with its own sentence.
    """
    if not head:
        return
    names = sniff_format(head)
    if names:
        if not formats.intersection(names):
            raise Refusal(
                ImageRejectReason.UNSUPPORTED_FORMAT,
                f"the bytes are {names[0]}, which is not accepted here (accepted: "
                f"{', '.join(sorted(formats))})",
                {"format": names[0]},
            )
        return
    if formats <= SNIFFED_FORMATS:
        raise Refusal(
            ImageRejectReason.NOT_AN_IMAGE,
            f"the bytes do not start like any accepted image format{_looks_like(head)}; "
            f"send {', '.join(sorted(formats))} files",
            {"head": head[:8].hex()},
        )


def _looks_like(head: bytes) -> str:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return " (they look like an HTML page)"
    if text.startswith((b"<?xml", b"<svg")):
        return " (they look like XML or SVG text)"
    if text[:1] in (b"{", b"["):
        return " (they look like JSON)"
    return ""


def pillow_open(stream: io.BytesIO, formats: list[str] | tuple[str, ...] | None) -> Image.Image:
    """Pillow's own `Image.open`, even where a library replaced it.

    Ultralytics (loaded in the same process under `visionloop up`) swaps `Image.open` for one
    that, on bytes Pillow cannot identify, runs its requirement check for a HEIF plugin (a pip
    install where installs are allowed) and fails with `No module named 'pi_heif'` offline. Bytes
    sent to ingest must be judged the same in every process and never install anything."""
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", None) if patches is not None else None
    if opener is None or Image.open is not getattr(patches, "image_open", None):
        opener = Image.open
    return opener(stream, formats=formats)


def inspect_image(data: bytes, limits: Limits) -> ImageFacts:
    """Decode the header and pixels of `data` safely; raise Refusal when it must not be kept."""
    size = len(data)
    if size == 0:
        raise Refusal(ImageRejectReason.NOT_AN_IMAGE, "the submission holds zero bytes")
    if size > limits.max_bytes:
        raise Refusal(
            ImageRejectReason.TOO_LARGE,
            f"the image is {size} bytes, over the {limits.max_bytes}-byte limit",
            {"bytes": size, "limit": limits.max_bytes},
        )
    check_magic(data[:MAGIC_BYTES], limits.formats)
    with warnings.catch_warnings():
        # Hostile files make plugins warn a lot; only the bomb warning matters (as an error),
        # and Pillow warns, then raises, past MAX_IMAGE_PIXELS: we check the size ourselves first.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with pillow_open(io.BytesIO(data), _decoders(limits.formats)) as image:
                fmt, width, height = _checked_decode(image, limits)
        except Refusal:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise Refusal(ImageRejectReason.DECOMPRESSION_BOMB, f"Pillow refused the image: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise Refusal(
                ImageRejectReason.NOT_AN_IMAGE, "the bytes are not an image format Pillow knows"
            ) from exc
        except Exception as exc:
            # Decoders fed hostile bytes raise more than OSError (TypeError, struct.error,
            # IndexError...): whatever they raise, the bytes do not decode.
            raise Refusal(
                ImageRejectReason.CORRUPT, f"the image does not decode: {type(exc).__name__}: {exc}"
            ) from exc
    return ImageFacts(
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=fmt,
        byte_size=size,
    )


def _checked_decode(image: Image.Image, limits: Limits) -> tuple[str, int, int]:
    """(format, width, height as shown) of an opened image within the limits, every pixel decoded."""
    fmt = (image.format or "").upper()
    # A camera's multi-picture JPEG (MPO) is a JPEG whose first picture is the
    # photo; the others are previews or depth maps, not frames of an animation.
    still = fmt == "MPO"
    if still:
        fmt = "JPEG"
    if fmt not in limits.formats:
        raise Refusal(
            ImageRejectReason.UNSUPPORTED_FORMAT,
            f"format {fmt or 'unknown'} is not accepted here (accepted: "
            f"{', '.join(sorted(limits.formats))})",
            {"format": fmt},
        )
    width, height = image.size
    if width * height > limits.max_pixels:
        raise Refusal(
            ImageRejectReason.DECOMPRESSION_BOMB,
            f"{width}x{height} is {width * height} pixels, over the "
            f"{limits.max_pixels}-pixel limit",
            {"width": width, "height": height, "limit": limits.max_pixels},
        )
    if not still and _has_frame(image, limits.max_frames):
        raise Refusal(
            ImageRejectReason.TOO_MANY_FRAMES,
            f"the file has more than {limits.max_frames} frame(s); send a still image",
            {"limit": limits.max_frames},
        )
    image.load()  # decodes every pixel: truncated or corrupt data fails here
    if _rotated(image):
        width, height = height, width
    return fmt, width, height


def _decoders(formats: frozenset[str]) -> list[str]:
    """The Pillow plugins to offer: those of the accepted formats, nothing else."""
    return sorted(formats)


def _has_frame(image: Image.Image, index: int) -> bool:
    """Whether frame number `index` (0-based, at least 1) exists, seeking no further than it.

    `n_frames` would walk (and for GIF, decode) every frame of a file that may hold
    thousands; stopping one past the cap keeps the cost bounded by the cap.
    """
    if not getattr(image, "is_animated", False):
        return False
    try:
        image.seek(index)
    except EOFError:
        return False
    finally:
        image.seek(0)
    return True


def _rotated(image: Image.Image) -> bool:
    """True when EXIF orientation swaps width and height (orientations 5-8)."""
    try:
        return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # unreadable EXIF is not a reason to refuse pixels that decode
        return False
