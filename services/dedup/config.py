"""dedup/quality settings: `VL_DEDUP_<NAME>`, or the `dedup:` section of the config file.

Every policy value has a default for all projects and may be overridden per project in the
file's `dedup.projects` mapping, e.g.::

    dedup:
      min_width: 64
      projects:
        parking: {min_width: 320, min_height: 240, near_duplicate_radius: 12}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from visionloop.libs.settings import ServiceSettings, service_config


class Policy(BaseModel):
    """What dedup/quality lets through, for one project."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_width: int = Field(default=32, ge=1, description="Images narrower than this are dropped (low_resolution).")
    min_height: int = Field(default=32, ge=1, description="Images shorter than this are dropped (low_resolution).")
    min_blur_variance: float | None = Field(
        default=None,
        ge=0.0,
        description=(
            "Variance of the Laplacian below which an image is dropped as blurry, measured on the "
            "hashing thumbnail (longest side 64-128 px); unset disables the blur floor."
        ),
    )
    near_duplicate_radius: int = Field(
        default=16,
        ge=0,
        le=128,
        description=(
            "Largest pHash + dHash Hamming distance (of 128 bits) at which an image is a near "
            "duplicate of one already accepted; 0 keeps exact duplicates only."
        ),
    )
    across_projects: bool = Field(
        default=False,
        description=(
            "Also drop an exact copy of an image another project has seen (said without naming that project or "
            "its decision); off: duplicates are decided within the project."
        ),
    )


class DedupSettings(ServiceSettings, Policy):
    """Defaults for every project, plus per-project overrides."""

    section = "dedup"
    model_config = service_config("dedup")

    projects: dict[str, dict[str, bool | int | float | None]] = Field(
        default_factory=dict, description="Per-project overrides of the policy values above."
    )

    def policy(self, project: str) -> Policy:
        """The policy in force for `project`."""
        defaults = {name: getattr(self, name) for name in Policy.model_fields}
        return Policy.model_validate({**defaults, **self.projects.get(project, {})})
