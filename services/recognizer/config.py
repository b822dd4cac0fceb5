"""recognizer settings: `VL_RECOGNIZER_<NAME>`, or the `recognizer:` section of the config file.

The decision thresholds have defaults for all projects and may be overridden per project in the
file's `recognizer.projects` mapping (docs/recognizer.md says how to choose them), e.g.::

    recognizer:
      conf_threshold: 0.5
      projects:
        parking: {conf_threshold: 0.7, uncertain_low: 0.3}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from visionloop.contracts import Target
from visionloop.libs.settings import ServiceSettings, service_config


class Thresholds(BaseModel):
    """When a model's answer counts as recognising an image, for one project."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conf_threshold: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Score a detection needs to be a pre-label (the upper end of the uncertainty band).",
    )
    uncertain_low: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description=(
            "Lower end of the uncertainty band: a detection scoring above it and below "
            "`conf_threshold` makes the image `uncertain`; at or below it a box is background noise."
        ),
    )
    iou_threshold: float = Field(default=0.7, gt=0.0, le=1.0, description="IoU above which NMS suppresses a box of the same class.")
    max_detections: int = Field(default=300, ge=1, le=1000, description="Most boxes kept per image.")

    @model_validator(mode="after")
    def _band(self) -> "Thresholds":
        if self.uncertain_low > self.conf_threshold:
            raise ValueError("uncertain_low must not exceed conf_threshold")
        return self


class RecognizerSettings(ServiceSettings, Thresholds):
    """Defaults for every project, per-project overrides, batching and model cache."""

    section = "recognizer"
    model_config = service_config("recognizer")

    projects: dict[str, dict[str, float | int]] = Field(
        default_factory=dict, description="Per-project overrides of the thresholds above."
    )
    target: Target = Field(default=Target.SERVER, description="Which library artifacts this recognizer runs.")
    batch_max: int = Field(default=8, ge=1, le=256, description="Most accepted images handled together: one inference step, one transaction (N).")
    batch_wait_ms: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description=(
            "How long a batch waits for more images when fewer than `batch_max` are queued (T); 0 "
            "takes what is queued, so batches grow only under load (best on CPU, where a bigger "
            "batch is not faster per image). On a GPU a few milliseconds fill batches."
        ),
    )
    inference_batch: int = Field(
        default=0,
        ge=0,
        le=256,
        description=(
            "Images per `session.run` within a batch; 0 = one at a time on CPU (a bigger ONNX "
            "Runtime batch is slower per image there) and the whole batch on a GPU."
        ),
    )
    threads: int = Field(
        default=0, ge=0, le=256, description="ONNX Runtime threads per model in all; 0 = one per core."
    )
    cpu_parallelism: Literal["images", "operators"] = Field(
        default="images",
        description=(
            "How CPU threads are spent: `images` runs that many images at once with one thread "
            "each (the faster for throughput), `operators` splits each image's operators over all "
            "of them (ONNX Runtime's usual way; lower latency for one image alone)."
        ),
    )
    spinning: bool = Field(
        default=False,
        description=(
            "Let ONNX Runtime's idle threads spin for work (its default): a little faster alone, "
            "but the spinning takes CPU the recognizer's own I/O, the broker and the database need."
        ),
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description=(
            "ONNX Runtime execution providers in order of preference, as a JSON list, e.g. "
            '`["CUDAExecutionProvider", "CPUExecutionProvider"]` (needs onnxruntime-gpu).'
        ),
    )
    max_models: int = Field(default=4, ge=1, le=64, description="Models kept loaded (least recently used goes).")
    library_refresh_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Longest time the recognizer trusts its copy of the library; `model registered` events "
            "refresh it at once, this is the safety net."
        ),
    )
    shadow: bool = Field(
        default=True, description="Run the `candidate` model next to production and record its answers."
    )

    def thresholds(self, project: str) -> Thresholds:
        """The thresholds in force for `project`."""
        defaults = {name: getattr(self, name) for name in Thresholds.model_fields}
        return Thresholds.model_validate({**defaults, **self.projects.get(project, {})})
