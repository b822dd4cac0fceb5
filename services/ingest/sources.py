"""Where submitted bytes come from: inline in the event, or a file under the configured root."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import unquote, urlsplit

from visionloop.contracts import ImageRejectReason, ImageSubmitted
from visionloop.services.ingest.inspect import Refusal


async def read_source(submission: ImageSubmitted, *, file_root: Path | None, inline_max: int, max_bytes: int) -> bytes:
    """The submission's bytes, or a Refusal saying why they cannot be had."""
    if submission.inline_bytes is not None:
        if len(submission.inline_bytes) > inline_max:
            raise Refusal(
                ImageRejectReason.INLINE_TOO_LARGE,
                f"inline images are limited to {inline_max} bytes; send a source_uri instead",
                {"bytes": len(submission.inline_bytes), "limit": inline_max},
            )
        return submission.inline_bytes
    uri = submission.source_uri or ""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "file":
        return await asyncio.to_thread(_read_file, uri, file_root, max_bytes)
    raise Refusal(
        ImageRejectReason.FORBIDDEN_SOURCE,
        f"source scheme {scheme or '(none)'!r} is not accepted by this ingest "
        "(inline bytes and file:// under the configured root are)",
        {"scheme": scheme},
    )


def _read_file(uri: str, root: Path | None, max_bytes: int) -> bytes:
    if root is None:
        raise Refusal(
            ImageRejectReason.FORBIDDEN_SOURCE,
            "file:// sources are refused: no VL_INGEST_FILE_ROOT is configured",
        )
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise Refusal(ImageRejectReason.FORBIDDEN_SOURCE, "file:// URIs must not name a host")
    root = root.resolve()
    path = Path(unquote(parts.path)).resolve()  # resolves `..` and symlinks before the check
    if not path.is_relative_to(root):
        raise Refusal(
            ImageRejectReason.FORBIDDEN_SOURCE,
            f"{uri} is outside the configured file root",
            {"root": str(root)},
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise Refusal(ImageRejectReason.UNREACHABLE, f"no file at {uri}") from exc
    except OSError as exc:
        raise Refusal(ImageRejectReason.UNREACHABLE, f"cannot read {uri}: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise Refusal(
            ImageRejectReason.TOO_LARGE,
            f"the file is over the {max_bytes}-byte limit",
            {"limit": max_bytes},
        )
    return data
