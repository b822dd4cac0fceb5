"""A project's first model can start from the operator's own Ultralytics checkpoint.

With `base_checkpoint` set (see `config.Policy`), the first model of a project fine-tunes a
detector the user already has, e.g. a COCO-pretrained `yolo11n.pt`, instead of training from the
model yaml. Its classes are matched to the project's taxonomy by name (case-insensitive, trimmed):
a matched class's rows of the final classification convs start from the checkpoint's rows for
that name, an unmatched class starts as a fresh model's would, and every other tensor (backbone,
neck, box branch, hidden layers of the class branch) is the checkpoint's. The mapped checkpoint
has the project's classes in the project's order, so Ultralytics' trainer transfers it whole.

The child process runs `start_from`; its record (`ClassMapping.record`) travels to the service,
which keeps it with the run. A checkpoint the trainer cannot use is refused with a reason code:

    checkpoint_missing       the file is not there
    checkpoint_unreadable    not a PyTorch file, or not an Ultralytics model checkpoint
    checkpoint_not_detection a model of another task (segment, pose, obb, classify)
    checkpoint_unsupported   a detector this trainer cannot fine-tune by class name (RT-DETR,
                             open-vocabulary World/YOLOE, fused for inference, odd head)

Torch and Ultralytics are imported only inside the functions that need them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MISSING = "checkpoint_missing"
UNREADABLE = "checkpoint_unreadable"
NOT_DETECTION = "checkpoint_not_detection"
UNSUPPORTED = "checkpoint_unsupported"


class CheckpointRefused(Exception):
    """The base checkpoint cannot start a project; `reason` is one of the codes above."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def normalise(name: str) -> str:
    """The form two class names are compared in: trimmed, case-folded."""
    return str(name).strip().casefold()


def match_classes(checkpoint_names: Sequence[str], project_names: Sequence[str]) -> list[int]:
    """For each project class, the index of the checkpoint class of the same name, or -1.

    Names match case-insensitively after trimming. Where two checkpoint classes share a name
    in that form, the first one counts.
    """
    index: dict[str, int] = {}
    for i, name in enumerate(checkpoint_names):
        index.setdefault(normalise(name), i)
    return [index.get(normalise(name), -1) for name in project_names]


@dataclass(frozen=True)
class ClassMapping:
    """Where each class of a project's first model started: a checkpoint class, or fresh."""

    checkpoint_names: tuple[str, ...]
    """The checkpoint's classes, in its head order."""
    project_names: tuple[str, ...]
    """The project's classes, in the new head's order."""
    source_rows: tuple[int, ...]
    """Per project class, the checkpoint row it started from; -1 for fresh."""

    @classmethod
    def of(cls, checkpoint_names: Sequence[str], project_names: Sequence[str]) -> ClassMapping:
        """The mapping of `project_names` onto `checkpoint_names` by name."""
        return cls(tuple(checkpoint_names), tuple(project_names), tuple(match_classes(checkpoint_names, project_names)))

    @property
    def mapped(self) -> dict[str, str]:
        """Project class -> the checkpoint class its rows came from."""
        return {p: self.checkpoint_names[r] for p, r in zip(self.project_names, self.source_rows, strict=True) if r >= 0}

    @property
    def fresh(self) -> list[str]:
        """Project classes no checkpoint class matched: they start as in a fresh model."""
        return [p for p, r in zip(self.project_names, self.source_rows, strict=True) if r < 0]

    @property
    def unused(self) -> list[str]:
        """Checkpoint classes no project class took."""
        taken = set(self.source_rows)
        return [name for i, name in enumerate(self.checkpoint_names) if i not in taken]

    def record(self, **about: Any) -> dict[str, Any]:
        """The JSON record kept with the run: `about` (checkpoint path, sha256, ...) and the mapping."""
        return {
            **about,
            "checkpoint_names": list(self.checkpoint_names),
            "mapped": self.mapped,
            "fresh": self.fresh,
            "unused": self.unused,
        }


def summary(record: Mapping[str, Any], limit: int = 900) -> str:
    """One line for logs and the status topic: what was mapped, what starts fresh."""
    mapped = ", ".join(f"{p}<-{c}" if p != c else p for p, c in (record.get("mapped") or {}).items()) or "none"
    fresh = ", ".join(record.get("fresh") or []) or "none"
    unused = len(record.get("unused") or [])
    line = (
        f"started from {Path(str(record.get('checkpoint', '?'))).name}: classes from the checkpoint: {mapped}; "
        f"fresh: {fresh}; {unused} checkpoint classes unused"
    )
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_detector(model: Any, where: str) -> list[str]:
    """The class names of a checkpoint's model in head order, or CheckpointRefused saying why it cannot start a project."""
    from torch import nn
    from ultralytics.nn.modules.head import Detect, v10Detect
    from ultralytics.nn.tasks import guess_model_task

    yaml = getattr(model, "yaml", None)
    # From the architecture itself: a checkpoint's `task` may be a default its train_args filled in.
    task = guess_model_task(yaml) if isinstance(yaml, dict) else (getattr(model, "task", None) or "detect")
    if task not in (None, "detect"):  # None: an architecture Ultralytics cannot name; the head check below refuses it
        raise CheckpointRefused(NOT_DETECTION, f"{where} is a {task} model; a base checkpoint must be a detection model (task detect)")
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if type(head) not in (Detect, v10Detect) or hasattr(model, "set_classes"):
        kind = type(head).__name__ if head is not None else type(model).__name__
        raise CheckpointRefused(UNSUPPORTED, f"{where} has a {kind} head; the trainer fine-tunes YOLO detectors with a closed class list (Detect head)")
    if not isinstance(yaml, dict):
        raise CheckpointRefused(UNSUPPORTED, f"{where} carries no model yaml, so the trainer cannot rebuild its head")
    fused = getattr(model, "is_fused", None)
    if getattr(head, "cv3", None) is None or (callable(fused) and fused()):
        raise CheckpointRefused(UNSUPPORTED, f"{where} is fused for inference; give the training checkpoint (best.pt or last.pt)")
    names = getattr(model, "names", None)
    if not isinstance(names, Mapping) or sorted(names) != list(range(head.nc)):
        raise CheckpointRefused(UNSUPPORTED, f"{where}: its class names {names!r} do not fit its head of {head.nc} classes")
    return [str(names[i]) for i in range(head.nc)]


def map_head(model: Any, checkpoint_names: Sequence[str], project_names: Sequence[str]) -> tuple[Any, ClassMapping]:
    """A copy of the checkpoint's `model` with the project's classes, and how they were mapped.

    Class rows of the head come from the checkpoint class of the same name (see `match_classes`),
    or start fresh; every other tensor is the checkpoint's; `model` is left as it was. Needs
    Ultralytics imported (configured) first.
    """
    from visionloop.libs.yolo import remap_head

    names = [model.names[i] for i in range(len(model.names))]
    if list(checkpoint_names) != names:
        raise ValueError(f"the model's classes are {names}, not {list(checkpoint_names)}")
    if len(set(project_names)) != len(project_names) or not project_names:
        raise ValueError(f"project class names must be unique and not empty: {list(project_names)}")
    mapping = ClassMapping.of(checkpoint_names, project_names)
    return remap_head(model, mapping.source_rows, list(project_names)), mapping


def start_from(state_dir: Path, checkpoint: Path, project_names: Sequence[str], out: Path) -> tuple[Path, dict[str, Any]]:
    """Write to `out` the base `checkpoint` mapped onto `project_names`; return it and the mapping record.

    The record (JSON): `checkpoint` (path), `sha256`, `architecture` (its yaml file, when known),
    `checkpoint_names`, `mapped` (project class -> checkpoint class), `fresh`, `unused`.
    """
    from visionloop.libs import yolo

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointRefused(MISSING, f"base checkpoint {checkpoint} does not exist")
    yolo.ultralytics(state_dir)
    from ultralytics.nn.tasks import load_checkpoint

    try:
        model, _ = load_checkpoint(str(checkpoint))
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler raises, the file is unusable
        raise CheckpointRefused(UNREADABLE, f"base checkpoint {checkpoint} is not a readable Ultralytics checkpoint: {type(exc).__name__}: {exc}") from exc
    names = check_detector(model, f"base checkpoint {checkpoint}")
    try:
        mapped, mapping = map_head(model, names, project_names)
    except ValueError as exc:
        raise CheckpointRefused(UNSUPPORTED, f"base checkpoint {checkpoint}: {exc}") from exc
    record = mapping.record(
        checkpoint=str(checkpoint), sha256=_sha256(checkpoint), architecture=str(model.yaml.get("yaml_file") or "") or None,
    )
    # The checkpoint's own train_args (its data, single_cls...) must not leak into the project's training.
    yolo.save_checkpoint(state_dir, mapped, out, train_args={}, provenance={"base_checkpoint": record})
    return Path(out), record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
