"""Is this an image we may keep? A pure function over bytes, with Pillow's safety limits.

Nothing here touches the network, the disk or the bus: it takes bytes and limits and answers
with the facts of the image or a refusal that carries a reason code and a sentence.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from visionloop.contracts import ImageRejectReason


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
    with warnings.catch_warnings():
        # Pillow warns, then raises, past MAX_IMAGE_PIXELS; we check the size ourselves first.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt = (image.format or "").upper()
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
                frames = getattr(image, "n_frames", 1)
                if frames > limits.max_frames:
                    raise Refusal(
                        ImageRejectReason.TOO_MANY_FRAMES,
                        f"the file has {frames} frames; at most {limits.max_frames} are accepted",
                        {"frames": frames, "limit": limits.max_frames},
                    )
                image.load()  # decodes every pixel: truncated or corrupt data fails here
                if _rotated(image):
                    width, height = height, width
        except Refusal:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise Refusal(ImageRejectReason.DECOMPRESSION_BOMB, f"Pillow refused the image: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise Refusal(
                ImageRejectReason.NOT_AN_IMAGE, "the bytes are not an image format Pillow knows"
            ) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise Refusal(ImageRejectReason.CORRUPT, f"the image does not decode: {exc}") from exc
    return ImageFacts(
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=fmt,
        byte_size=size,
    )


def _rotated(image: Image.Image) -> bool:
    """True when EXIF orientation swaps width and height (orientations 5-8)."""
    try:
        return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # unreadable EXIF is not a reason to refuse pixels that decode
        return False
