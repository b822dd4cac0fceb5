"""converter settings: `VL_CONVERTER_<NAME>`, or the `converter:` section of the config file.

How artifacts are built and the parity rules they must meet have defaults for every project and
may be overridden per project in the file's `converter.projects` mapping, e.g.::

    converter:
      edge_precision: int8
      projects:
        cameras: {edge_precision: fp16, edge_imgsz: 320}
        strict: {int8_map_tolerance: 0.005}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from visionloop.contracts import Precision
from visionloop.libs.settings import ServiceSettings, service_config


class Policy(BaseModel):
    """How one project's models are exported, and how closely each artifact must match PyTorch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    edge_precision: Literal["int8", "fp16", "fp32"] = Field(
        default="int8",
        description=(
            "Precision of the edge artifact: `int8` (static quantisation of the Conv layers, "
            "calibrated on the training set), `fp16` or `fp32`."
        ),
    )
    edge_imgsz: int | None = Field(
        default=None,
        ge=32,
        le=4096,
        multiple_of=32,
        description="Square input size of the edge artifact (a multiple of 32); empty: the size the model was trained at.",
    )
    calibration_images: int = Field(
        default=64,
        ge=1,
        le=2048,
        description="Most training images INT8 calibration runs through: evenly spread over the training split, then validation images if it has fewer.",
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax",
        description="How INT8 calibration picks each activation's range (ONNX Runtime's calibrators).",
    )
    int8_per_channel: bool = Field(
        default=True, description="Quantise Conv weights per output channel (else one scale per tensor)."
    )
    int8_keep_dfl_float: bool = Field(
        default=True,
        description=(
            "Leave the detection head's DFL projection (a fixed 1x1 Conv that turns box "
            "distributions into pixels) in float: quantising it cost 0.01-0.02 mAP50-95 in measurements here."
        ),
    )
    fp32_max_abs_diff_px: float = Field(
        default=0.01,
        ge=0.0,
        description="Largest difference, in input pixels, between the FP32 ONNX's raw box outputs and PyTorch's.",
    )
    fp32_map_tolerance: float = Field(
        default=0.01, ge=0.0, le=1.0, description="How far an FP32 artifact's test-set mAP50-95 may be from PyTorch's."
    )
    fp16_map_tolerance: float = Field(
        default=0.01, ge=0.0, le=1.0, description="How far an FP16 artifact's test-set mAP50-95 may be from PyTorch's."
    )
    int8_map_tolerance: float = Field(
        default=0.02, ge=0.0, le=1.0, description="How far an INT8 artifact's test-set mAP50-95 may be from PyTorch's."
    )
    parity_images: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Images the raw-output comparison with PyTorch runs on (test images, else training images).",
    )
    opset: int | None = Field(
        default=None, ge=11, le=24, description="ONNX opset of the exports; empty: Ultralytics' choice."
    )

    def map_tolerance(self, precision: Precision) -> float:
        """The mAP50-95 tolerance of an artifact of this precision."""
        return {
            Precision.FP32: self.fp32_map_tolerance,
            Precision.FP16: self.fp16_map_tolerance,
            Precision.INT8: self.int8_map_tolerance,
        }[precision]


class ConverterSettings(ServiceSettings, Policy):
    """Defaults for every project, plus per-project overrides."""

    section = "converter"
    model_config = service_config("converter")

    projects: dict[str, dict[str, int | float | bool | str | None]] = Field(
        default_factory=dict, description="Per-project overrides of the policy values above."
    )

    @model_validator(mode="after")
    def _overrides_are_valid(self) -> "ConverterSettings":
        for project in self.projects:  # a bad override fails at start, not on the project's next model
            self.policy(project)
        return self

    def policy(self, project: str) -> Policy:
        """The policy in force for `project`."""
        defaults = {name: getattr(self, name) for name in Policy.model_fields}
        return Policy.model_validate({**defaults, **self.projects.get(project, {})})
