"""trainer settings: `VL_TRAINER_<NAME>`, or the `trainer:` section of the config file.

Every policy value has a default for all projects and may be overridden per project in the
file's `trainer.projects` mapping, e.g.::

    trainer:
      min_new_images: 100
      projects:
        parking: {min_new_images: 20, imgsz: 320, epochs: 60}

The defaults train a `yolo11n` at 160 px, which two CPU cores do in about a minute per 30 epochs
on a few hundred images; on a machine with a CUDA GPU `device: auto` uses it.

A project may start from a detector the user already has: `base_checkpoint` names a local
Ultralytics `.pt` (detect task), e.g. `VL_TRAINER_BASE_CHECKPOINT=/models/yolo11n-coco.pt` for every
project, or `trainer.projects.<project>.base_checkpoint` for one (`null` there turns it off).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from visionloop.libs.settings import ServiceSettings, service_config

TUNABLE = frozenset({
    "epochs", "imgsz", "batch", "patience", "optimizer", "lr0", "lrf", "momentum", "weight_decay",
    "warmup_epochs", "cos_lr", "close_mosaic", "mosaic", "mixup", "degrees", "translate", "scale",
    "shear", "perspective", "fliplr", "flipud", "hsv_h", "hsv_s", "hsv_v", "seed", "freeze", "cache",
    "dropout", "label_smoothing", "nbs", "rect",
})
"""Ultralytics train arguments a project or a `training requested` command may set."""


class Policy(BaseModel):
    """When and how the trainer trains one project."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- triggers ------------------------------------------------------------------------------------
    trigger: Literal["count", "command", "both"] = Field(
        default="both",
        description="What starts a run: `count` (enough new verified images), `command` (`training requested`) or `both`.",
    )
    min_new_images: int = Field(
        default=50, ge=1, description="New verified training images since the last run that start the next one (`count`)."
    )
    min_train_images: int = Field(default=8, ge=2, description="Fewest training images (train + val) a run needs; fewer fail as `not_enough_data`.")

    # -- dataset ---------------------------------------------------------------------------------------
    val_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of training images held out for validation (fixed per image by its id)."
    )
    test_fraction: float = Field(
        default=0.15, ge=0, lt=1,
        description="Share of new verified images reserved (by a hash of the image id) for the frozen test set while it is smaller than `test_set_size`.",
    )
    test_set_size: int = Field(
        default=60, ge=0, description="Verified images reserved for the test set before it freezes (imports marked for the test set always join it)."
    )
    near_duplicate_radius: int = Field(
        default=16, ge=0, le=128,
        description="pHash + dHash distance (of 128 bits) at or under which an image is a near duplicate of a test image and never trains.",
    )

    # -- training ----------------------------------------------------------------------------------------
    model_yaml: str = Field(default="yolo11n.yaml", description="Architecture of a project's first model (Ultralytics model yaml; nothing is downloaded).")
    base_checkpoint: str | None = Field(
        default=None,
        description=(
            "A local Ultralytics detection checkpoint (.pt) a project's first model fine-tunes from instead of training "
            "`model_yaml` from scratch; its classes map onto the project's by name (case-insensitive), the rest start "
            "fresh. A relative path is taken from the trainer's working folder. Later models fine-tune the champion."
        ),
    )
    epochs: int = Field(default=25, ge=1, description=(
        "Epochs of a project's first model (trained from the yaml). 25 at 256 px: about 0.19 mAP50-95 from scratch on 600 "
        "photographs of 4 classes in 16 minutes on 2 vCPU (docs/training.md)."))
    finetune_epochs: int = Field(
        default=15, ge=1, description="Epochs of a fine-tune: later models (from the champion) and a first model started from `base_checkpoint`."
    )
    imgsz: int = Field(default=256, ge=32, le=4096, description=(
        "Square training and inference size, pixels (a multiple of 32); 256 for photographs (the demo's shapes train at 128-160)."))
    batch: int = Field(default=16, ge=1, description="Images per batch.")
    patience: int = Field(default=20, ge=0, description="Epochs without val improvement before training stops early.")
    train_args: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Further Ultralytics train arguments (only those the trainer lets through; see TUNABLE)."
    )
    device: str = Field(default="auto", description="`auto` (the first CUDA GPU if present, else CPU), `cpu`, or a CUDA index like `0`.")
    time_limit_s: float = Field(default=3600.0, gt=0, description="A run still going after this long is killed and reported as `time_limit`.")
    max_attempts: int = Field(
        default=2, ge=1, description="Times a run is started again after its trainer died under it (a crash of the run itself is not retried)."
    )
    import_wait_s: float = Field(
        default=600.0, gt=0,
        description="Longest wait of a run an import asked for, for the import's labels to be verified (some may be rejected).",
    )


    @field_validator("base_checkpoint")
    @classmethod
    def _a_pt_file(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.strip().endswith(".pt"):
            raise ValueError(f"base_checkpoint {value!r} must name an Ultralytics .pt checkpoint")
        return value.strip()


class TrainerSettings(ServiceSettings, Policy):
    """Defaults for every project, plus per-project overrides."""

    section = "trainer"
    model_config = service_config("trainer")

    projects: dict[str, dict[str, int | float | bool | str | dict[str, str | int | float | bool] | None]] = Field(
        default_factory=dict, description="Per-project overrides of the policy values above."
    )
    lease_s: float = Field(default=60.0, gt=0, description="How long a claimed run stays this instance's without a renewal.")
    poll_interval_s: float = Field(default=1.0, gt=0, description="How often an idle trainer looks for queued runs.")
    keep_runs: int = Field(
        default=3, ge=1,
        description="Run folders (logs, Ultralytics output) and written-out datasets kept on local disk per project; older ones are deleted (weights and manifests stay in the blob store).",
    )

    def policy(self, project: str) -> Policy:
        """The policy in force for `project`."""
        defaults = {name: getattr(self, name) for name in Policy.model_fields}
        return Policy.model_validate({**defaults, **self.projects.get(project, {})})
