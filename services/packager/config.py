"""packager settings: `VL_PACKAGER_<NAME>`, or the `packager:` section of the config file.

The signing key comes from `signing_key` (a secret: PEM text or base64 of the raw 32-byte
seed) or `signing_key_file` (a PEM file, mode 0600), in that order. With neither, the packager
creates a key pair under `key_dir` (default `<state_dir>/keys/`) when `auto_create_key` allows it:
by default only on the embedded stack of `visionloop up`, where a demo needs no set-up. Anywhere
else a missing key is an operator error: every `model converted` event is dead-lettered with
`signing_key_missing`, and nothing unsigned ever leaves the packager.

The fleets a package may run on and the decoding thresholds written into its manifest have
defaults for every project and may be overridden per project, e.g.::

    packager:
      signing_key_file: /run/secrets/packager-ed25519.key
      fleets: {edge: [], server: []}
      projects:
        parking: {fleets: {edge: [gates, lab]}, conf: 0.3}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from visionloop.contracts import Target
from visionloop.libs import signing
from visionloop.libs.settings import ServiceSettings, service_config


class PackagePolicy(BaseModel):
    """What goes into one project's manifests besides the model's own facts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fleets: dict[Target, list[str]] = Field(
        default_factory=lambda: {Target.EDGE: [], Target.SERVER: []},
        description="Fleets a package of each target may run on (written into the manifest); an empty list: any fleet.",
    )
    conf: float = Field(default=0.25, gt=0, lt=1, description="Confidence threshold devices decode with.")
    iou: float = Field(default=0.7, gt=0, le=1, description="NMS IoU threshold devices decode with.")
    max_det: int = Field(default=300, ge=1, le=10000, description="Most boxes per image devices keep.")


class PackagerSettings(ServiceSettings, PackagePolicy):
    """Signing key, manifest defaults for every project, plus per-project overrides."""

    section = "packager"
    model_config = service_config("packager")

    signing_key_file: str | None = Field(
        default=None, description="PEM file of the Ed25519 private key that signs packages (keep it mode 0600)."
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="The Ed25519 private key itself (PEM text or base64 of the raw 32-byte seed); prefer the file. Never printed.",
    )
    auto_create_key: bool | None = Field(
        default=None,
        description=(
            "Create a key pair under `key_dir` when no key is configured. Unset: only on the embedded "
            "stack (`visionloop up`); elsewhere a missing key dead-letters every event with `signing_key_missing`."
        ),
    )
    key_dir: Path | None = Field(
        default=None, description="Where an auto-created key pair lives; default `<state_dir>/keys`."
    )
    projects: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-project overrides of `fleets` (per target), `conf`, `iou`, `max_det`."
    )

    def policy(self, project: str) -> PackagePolicy:
        """The manifest defaults in force for `project` (a project's `fleets` override target by target)."""
        override = dict(self.projects.get(project, {}))
        fleets = {**self.fleets, **{Target(k): v for k, v in (override.pop("fleets", None) or {}).items()}}
        defaults = {name: getattr(self, name) for name in PackagePolicy.model_fields if name != "fleets"}
        return PackagePolicy.model_validate({**defaults, **override, "fleets": fleets})

    def load_key(self, state_dir: Path, *, embedded: bool) -> tuple[Ed25519PrivateKey | None, str]:
        """The signing key and where it came from (`signing_key`, a file path, or `none`).

        Raises `signing.SigningError` for a configured key that cannot be used.
        """
        if self.signing_key is not None:
            return signing.load_private(self.signing_key), "signing_key"
        if self.signing_key_file:
            return signing.load_private(Path(self.signing_key_file)), self.signing_key_file
        create = self.auto_create_key if self.auto_create_key is not None else embedded
        if not create:
            return None, "none"
        path = signing.ensure_key_pair(self.key_dir or state_dir / "keys")
        return signing.load_private(path), str(path)
