"""ingest's settings: `VL_INGEST_<NAME>`, or the `ingest:` section of the config file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from visionloop.libs.settings import ServiceSettings, service_config


class IngestSettings(ServiceSettings):
    """What ingest accepts and from where."""

    section = "ingest"
    model_config = service_config("ingest")

    port: int = Field(default=8081, ge=0, le=65535, description="HTTP port of `POST /v1/images` (0 = free).")
    file_root: Path | None = Field(
        default=None, description="`file://` sources must lie under this folder; unset refuses them."
    )
    inline_max_bytes: int = Field(
        default=2 * 1024 * 1024, ge=1, description="Largest image accepted inline in a submit event."
    )
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1, description="Largest image file accepted.")
    max_pixels: int = Field(
        default=80_000_000, ge=1, description="Pixel-count cap (decompression bombs are refused)."
    )
    max_frames: int = Field(default=1, ge=1, description="Most frames an (animated) file may hold.")
    formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"],
        description="Image formats accepted, as Pillow names them.",
    )
