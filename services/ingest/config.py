"""ingest's settings: `VL_INGEST_<NAME>`, or the `ingest:` section of the config file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator

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
    max_bytes: int = Field(
        default=50 * 1024 * 1024,
        ge=1,
        description="Largest image file accepted, fetched or uploaded (bigger uploads are refused while streaming).",
    )
    max_pixels: int = Field(
        default=80_000_000, ge=1, description="Pixel-count cap (decompression bombs are refused)."
    )
    max_frames: int = Field(default=1, ge=1, description="Most frames an (animated) file may hold.")
    formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"],
        description="Image formats accepted, as Pillow names them; no other decoder is ever tried.",
    )

    # -- http(s) and s3 sources ---------------------------------------------------------------
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Hosts `http(s)://` sources may name, as a JSON list: `images.example.com` exactly, "
            "`*.example.com` for its subdomains. Empty allows any host with public addresses."
        ),
    )
    allow_private_addresses: bool = Field(
        default=False,
        description=(
            "Let `http(s)://` sources reach loopback, private, link-local and other non-public "
            "addresses. Only on a trusted network: it lets whoever can submit make ingest call "
            "internal services. Unspecified and multicast addresses stay refused."
        ),
    )
    fetch_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest wait for a source's TCP (and TLS) connection."
    )
    fetch_read_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest silence between two reads from a source."
    )
    fetch_deadline_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Whole budget of one `http(s)://` or `s3://` read, DNS and redirects included; a "
            "source that trickles bytes is cut off here and refused as `unreachable`."
        ),
    )
    fetch_max_redirects: int = Field(
        default=3, ge=0, le=20, description="Redirects followed per fetch; each hop is checked again."
    )
    fetch_ca_file: Path | None = Field(
        default=None, description="CA bundle that signs `https://` sources' certificates (default: certifi's)."
    )
    fetch_user_agent: str = Field(
        default="visionloop-ingest", description="User-Agent of every `http(s)://` fetch."
    )
    s3_endpoint: str | None = Field(
        default=None, description="S3-compatible endpoint of `s3://` sources (e.g. `http://minio:9000`); unset: AWS."
    )
    s3_region: str | None = Field(default=None, description="Region of `s3://` sources.")
    s3_access_key: str | None = Field(
        default=None,
        description="Access key of `s3://` sources; unset: boto3's chain (AWS_* variables, profiles, roles).",
    )
    s3_secret_key: SecretStr | None = Field(
        default=None, description="Secret key of `s3://` sources (prefer the _FILE variant); never printed."
    )
    s3_secret_key_file: str | None = Field(
        default=None, description="File holding the secret key of `s3://` sources (preferred over the variable)."
    )
    s3_buckets: list[str] = Field(
        default_factory=list,
        description=(
            "Buckets `s3://` sources may name, as a JSON list; empty (the default) allows none, `[\"*\"]` any bucket "
            "the credentials read."
        ),
    )

    # -- the HTTP API ---------------------------------------------------------------------------
    api_max_concurrent: int = Field(
        default=16,
        ge=1,
        description="`POST /v1/images` requests worked on at once; more wait their turn (bounds memory).",
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        names = [name.strip().upper() for name in value]
        unknown = [name for name in names if name not in Image.OPEN]
        if unknown:
            raise ValueError(
                f"Pillow cannot read {', '.join(unknown)}; readable formats are "
                f"{', '.join(sorted(Image.OPEN))}"
            )
        return names

    @property
    def s3_secret(self) -> str | None:
        """The secret key of `s3://` sources, from its file when one is named."""
        if self.s3_secret_key_file:
            return Path(self.s3_secret_key_file).read_text(encoding="utf-8").strip()
        return self.s3_secret_key.get_secret_value() if self.s3_secret_key else None
