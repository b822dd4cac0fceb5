"""verifier settings: `VL_VERIFIER_<NAME>`, or the `verifier:` section of the config file.

Every policy value has a default for all projects and may be overridden per project in the
file's `verifier.projects` mapping, e.g.::

    verifier:
      target_precision: 0.95
      confidence: 0.95
      projects:
        parking: {target_precision: 0.98, spot_check_rate: 0.1, min_box_px: 4}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from visionloop.contracts.label import MAX_BOXES
from visionloop.libs.settings import ServiceSettings, service_config


class Policy(BaseModel):
    """What the verifier lets through, for one project."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- checks on every submission ----------------------------------------------------------------
    box_tolerance_px: float = Field(
        default=2.0, ge=0, description="How far a box may leave the image (pixels) before it is `out_of_bounds`; within it, it is clipped."
    )
    min_box_px: float = Field(default=2.0, ge=0, description="Smallest box side in pixels (`box_too_small` below).")
    duplicate_iou: float = Field(
        default=0.9, gt=0, le=1, description="Two boxes of one class overlapping more than this are one object drawn twice (`duplicate_box`)."
    )
    max_boxes: int = Field(default=MAX_BOXES, ge=1, le=MAX_BOXES, description="Most boxes one label set may have (`too_many_boxes`; the gateway's default too).")

    # -- auto-accept of pre-labels -------------------------------------------------------------------
    auto_accept: bool = Field(default=True, description="Accept pre-labels without a person when calibration allows.")
    target_precision: float = Field(
        default=0.95, gt=0, le=1,
        description="Box precision (at `match_iou`) that the lower confidence bound at a class's threshold must reach for auto-accept.",
    )
    confidence: float = Field(
        default=0.95, ge=0.5, lt=1,
        description="Confidence of that one-sided Clopper-Pearson lower bound of box precision (per class and model version).",
    )
    match_iou: float = Field(default=0.5, gt=0, le=1, description="IoU at which a pre-label counts as right against the verified boxes.")
    min_samples: int = Field(
        default=50, ge=1,
        description="Human-verified pre-label boxes a class needs (per model version) before anything of it is auto-accepted, whatever the bound says.",
    )
    min_support: int = Field(
        default=20, ge=1,
        description="Verified boxes that must score at or above a class's threshold, whatever the bound says (a floor).",
    )
    calibration_window: int = Field(
        default=5000, ge=10, description="Newest verified pre-label boxes per class and model version that calibration uses."
    )
    spot_check_rate: float = Field(
        default=0.05, ge=0, le=1, description="Share of auto-acceptable pre-label sets still sent to people (fixed per image by its id)."
    )

    # -- consensus -------------------------------------------------------------------------------------
    consensus_iou: float = Field(default=0.5, gt=0, le=1, description="IoU at which two labellers' boxes (same class) are the same object.")
    consensus_quorum: float = Field(
        default=0.5, ge=0, lt=1, description="A box is kept when more than this share of the labellers drew it (0.5: a majority)."
    )
    consensus_max_disputed: float = Field(
        default=0.25, ge=0, le=1, description="Largest share of objects without a quorum before the labellers are said to disagree (`no_consensus`)."
    )


class VerifierSettings(ServiceSettings, Policy):
    """Defaults for every project, plus per-project overrides."""

    section = "verifier"
    model_config = service_config("verifier")

    projects: dict[str, dict[str, int | float | bool | None]] = Field(
        default_factory=dict, description="Per-project overrides of the policy values above."
    )

    def policy(self, project: str) -> Policy:
        """The policy in force for `project`."""
        defaults = {name: getattr(self, name) for name in Policy.model_fields}
        return Policy.model_validate({**defaults, **self.projects.get(project, {})})
