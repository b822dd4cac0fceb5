"""evaluator settings: `VL_EVALUATOR_<NAME>`, or the `evaluator:` section of the config file.

The gate's floors and tolerances have defaults for every project and may be overridden per
project in the file's `evaluator.projects` mapping, e.g.::

    evaluator:
      map50_95_floor: 0.4
      projects:
        parking: {map50_95_floor: 0.6, class_tolerance: 0.02}
"""

from __future__ import annotations

from pydantic import Field
from visionloop.libs.settings import ServiceSettings, service_config
from visionloop.services.evaluator.gate import GatePolicy


class Policy(GatePolicy):
    """How one project's candidates are measured and gated."""

    conf: float = Field(
        default=0.25, gt=0, lt=1, description="Operating threshold: precision, recall and per-image agreement count detections scoring at least this."
    )
    match_iou: float = Field(default=0.5, gt=0, le=1, description="IoU at which a detection matches a label (precision, recall, agreement).")
    device: str = Field(default="auto", description="`auto` (the first CUDA GPU if present, else CPU), `cpu`, or a CUDA index like `0`.")
    batch: int = Field(default=16, ge=1, le=256, description="Test images per inference batch.")


class EvaluatorSettings(ServiceSettings, Policy):
    """Defaults for every project, plus per-project overrides."""

    section = "evaluator"
    model_config = service_config("evaluator")

    projects: dict[str, dict[str, int | float | bool | str | None]] = Field(
        default_factory=dict, description="Per-project overrides of the policy values above."
    )

    def policy(self, project: str) -> Policy:
        """The policy in force for `project`."""
        defaults = {name: getattr(self, name) for name in Policy.model_fields}
        return Policy.model_validate({**defaults, **self.projects.get(project, {})})
