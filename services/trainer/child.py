"""One training run, alone in a child process: `python -m visionloop.services.trainer.child JOB_JSON`.

The trainer service writes a job file and starts this module; a run that crashes, leaks memory
or is killed takes nothing else down with it. The job file (JSON):

    state_dir            the loop's state folder (Ultralytics' private, offline config lives there)
    data                 path of the dataset's data.yaml
    out_dir              folder for this run; Ultralytics writes `<out_dir>/run/weights/{best,last}.pt`
    model                "yolo11n.yaml" (a fresh detector) or the .pt of the champion to fine-tune
    parent_class_names   the classes `model` (a .pt) was trained on, in head order; null for a yaml
    base_checkpoint      optional: a user's Ultralytics .pt to start from instead of the yaml `model`,
                         its classes mapped onto `class_names` by name (`pretrained.py`)
    class_names          the data's class names, in order (must match data.yaml)
    hyperparameters      Ultralytics train arguments: epochs, imgsz, batch, lr0, patience, ...
    device               "auto" (GPU 0 if torch sees one, else CPU), "cpu", "0", ...

Stdout carries only the protocol, one JSON object per line, flushed as written; everything
Ultralytics prints goes to stderr:

    {"event": "start", "base_checkpoint": {...}}   (first, only with a base checkpoint: its class mapping)
    {"event": "epoch", "epoch": n, "epochs": total, "losses": {...}, "metrics": {...}}
    {"event": "done", "weights": path, "epochs": n, "best_epoch": n|null, "val": {...},
     "final_losses": {...}, "train_images": n, "val_images": n, "device": str, "duration_s": s}
    {"event": "error", "type": exception class, "message": str, "reason": code (only for a refused base checkpoint)}

`metrics` and `val` hold `map50_95`, `map50`, `precision`, `recall` as Ultralytics computed them.
Exit status 0 after `done`, 1 after `error`. Torch and Ultralytics are imported only inside `main`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from visionloop.services.trainer.pretrained import CheckpointRefused, start_from, summary

METRICS = {
    "map50_95": "metrics/mAP50-95(B)",
    "map50": "metrics/mAP50(B)",
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
}
"""Protocol metric name -> Ultralytics' key in `trainer.metrics`."""

IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}
"""Files counted as images in a split folder (Ultralytics' own image formats)."""


@dataclass(frozen=True)
class Job:
    """One training run, as the trainer service describes it in the job file."""

    state_dir: Path
    data: Path
    out_dir: Path
    model: str
    """A model yaml (fresh detector) or the .pt of the model to fine-tune."""
    parent_class_names: tuple[str, ...] | None
    """The classes a .pt `model` knows, in head order; None for a yaml."""
    class_names: tuple[str, ...]
    """The data's class names in order: the trained model's head order."""
    hyperparameters: dict[str, Any]
    """Ultralytics train arguments over `libs.yolo.TRAIN_DEFAULTS`."""
    device: str
    """"auto", "cpu", "0", ..."""
    base_checkpoint: Path | None = None
    """A user's .pt the first model starts from (with a yaml `model` only); None: the yaml itself."""

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        """Validate a job file's content (a ValueError names what is missing)."""
        missing = [k for k in ("state_dir", "data", "out_dir", "model", "class_names") if not raw.get(k)]
        if missing:
            raise ValueError(f"job file lacks {missing}")
        parent = raw.get("parent_class_names")
        base = raw.get("base_checkpoint")
        if base and str(raw["model"]).endswith(".pt"):
            raise ValueError("a job starts from a base checkpoint or from a .pt model, not both")
        return cls(
            state_dir=Path(raw["state_dir"]),
            data=Path(raw["data"]),
            out_dir=Path(raw["out_dir"]),
            model=str(raw["model"]),
            parent_class_names=tuple(parent) if parent is not None else None,
            class_names=tuple(raw["class_names"]),
            hyperparameters=dict(raw.get("hyperparameters") or {}),
            device=str(raw.get("device") or "auto"),
            base_checkpoint=Path(base) if base else None,
        )


def resolve_device(device: str, cuda_available: bool) -> tuple[str, bool]:
    """The Ultralytics device for `device` and whether to train with AMP (only on a GPU)."""
    if device == "auto":
        device = "0" if cuda_available else "cpu"
    return device, device not in {"cpu", "mps"}


def needs_extension(job: Job) -> bool:
    """Whether the parent .pt must grow its class list before fine-tuning on the job's data."""
    return (
        job.model.endswith(".pt")
        and job.parent_class_names is not None
        and job.parent_class_names != job.class_names
    )


def count_images(split: str | Sequence[str] | None) -> int:
    """Images of one dataset split: a folder (searched recursively), a .txt list, or a list of either."""
    if split is None:
        return 0
    if isinstance(split, (list, tuple)):
        return sum(count_images(s) for s in split)
    path = Path(split)
    if path.is_dir():
        return sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if path.suffix == ".txt" and path.is_file():
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    return 1 if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() else 0


def data_class_names(data: Path) -> list[str]:
    """The class names of a data.yaml (`names` as a list or an index -> name mapping)."""
    import yaml

    names = (yaml.safe_load(data.read_text()) or {}).get("names")
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    return [str(n) for n in names or []]


class Protocol:
    """The JSON-lines channel to the parent: the process's original stdout, one object per line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    @classmethod
    def take_stdout(cls) -> Protocol:
        """Keep the real stdout for the protocol and point fd 1 at stderr (for Ultralytics' prints)."""
        sys.stdout.flush()
        protocol_fd = os.dup(1)
        os.dup2(2, 1)
        return cls(os.fdopen(protocol_fd, "w", buffering=1, encoding="utf-8"))

    def emit(self, event: dict[str, Any]) -> None:
        """Write one event line and flush it."""
        self.stream.write(json.dumps(_finite(event)) + "\n")
        self.stream.flush()


def _finite(value: Any) -> Any:
    """The value with NaN/inf turned into null (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class Progress:
    """Ultralytics callbacks that turn each finished epoch into an `epoch` event.

    Ultralytics runs `on_fit_epoch_end` after every epoch and once more after the final
    validation of best.pt; only a call preceded by `on_train_epoch_end` is a training epoch.
    `on_model_save` notes the epoch whose weights best.pt holds.
    """

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol
        self.epochs_done = 0
        self.last_losses: dict[str, float] = {}
        self.last_metrics: dict[str, float | None] = {}
        self.final_metrics: dict[str, float | None] | None = None
        self.best_epoch: int | None = None
        self._in_epoch = False

    def on_train_epoch_end(self, trainer: Any) -> None:
        self._in_epoch = True

    def on_model_save(self, trainer: Any) -> None:
        if trainer.best_fitness == trainer.fitness:  # the condition under which save_model wrote best.pt
            self.best_epoch = trainer.epoch + 1

    def on_fit_epoch_end(self, trainer: Any) -> None:
        metrics = {name: _float((trainer.metrics or {}).get(key)) for name, key in METRICS.items()}
        if not self._in_epoch:
            self.final_metrics = metrics  # the final validation of best.pt
            return
        self._in_epoch = False
        self.epochs_done += 1
        self.last_losses, self.last_metrics = losses(trainer), metrics
        self.protocol.emit({
            "event": "epoch", "epoch": trainer.epoch + 1, "epochs": trainer.epochs,
            "losses": self.last_losses, "metrics": metrics,
        })


def losses(trainer: Any) -> dict[str, float]:
    """The epoch's mean training losses by Ultralytics' names (box_loss, cls_loss, dfl_loss)."""
    tloss = trainer.tloss
    if tloss is None:
        return {}
    if isinstance(tloss, dict):  # Ultralytics 8.4: a dict of loss name -> running mean
        return {str(k): float(v) for k, v in tloss.items()}
    values = tloss.tolist() if hasattr(tloss, "tolist") else list(tloss)  # older: a tensor
    values = values if isinstance(values, list) else [values]
    return {str(k): float(v) for k, v in zip(trainer.loss_names, values, strict=False)}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _offline_amp_check() -> None:
    """Skip Ultralytics' AMP self-test when its test model is not on disk.

    The test (`check_amp`) fetches yolo26n.pt from GitHub, and this loop never downloads
    anything; with the file present it runs as usual.
    """
    from ultralytics.engine import trainer as engine
    from ultralytics.utils import WEIGHTS_DIR

    original = engine.check_amp

    def check_amp(model: Any) -> bool:
        on_cpu = next(model.parameters()).device.type in {"cpu", "mps"}  # answered without the file
        if on_cpu or (Path(WEIGHTS_DIR) / "yolo26n.pt").is_file():
            return original(model)
        print("AMP: self-test skipped (offline, yolo26n.pt absent); training with AMP", file=sys.stderr)
        return True

    engine.check_amp = check_amp


def run(job: Job, protocol: Protocol, started: float) -> dict[str, Any]:
    """Train as the job says, emitting `epoch` events; return the `done` event."""
    from visionloop.libs import yolo

    if job.model.endswith(".pt") and not Path(job.model).is_file():  # Ultralytics would look for it online
        raise FileNotFoundError(f"model weights {job.model} do not exist")
    names = data_class_names(job.data)
    if names != list(job.class_names):
        raise ValueError(f"{job.data} names {names} differ from the job's class_names {list(job.class_names)}")
    ul = yolo.ultralytics(job.state_dir)
    import torch

    _offline_amp_check()
    device, amp = resolve_device(job.device, torch.cuda.is_available())
    out_dir = job.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    model: str | Path = job.model
    if needs_extension(job):
        model = yolo.extend_classes(
            job.state_dir, Path(job.model), job.parent_class_names or (), job.class_names,
            out_dir / "parent-extended.pt",
        )
    elif job.base_checkpoint is not None:
        model, record = start_from(job.state_dir, job.base_checkpoint, job.class_names, out_dir / "base-mapped.pt")
        print(f"base checkpoint: {summary(record, limit=100_000)}", file=sys.stderr)
        protocol.emit({"event": "start", "base_checkpoint": record})
    detector = ul.YOLO(str(model))
    progress = Progress(protocol)
    detector.add_callback("on_train_epoch_end", progress.on_train_epoch_end)
    detector.add_callback("on_fit_epoch_end", progress.on_fit_epoch_end)
    detector.add_callback("on_model_save", progress.on_model_save)
    args = yolo.TRAIN_DEFAULTS | {"amp": amp} | job.hyperparameters | {
        "device": device, "project": str(out_dir), "name": "run",
    }
    detector.train(data=str(job.data), **args)

    trainer = detector.trainer
    best, last = Path(trainer.best), Path(trainer.last)
    weights = best if best.exists() else last
    return {
        "event": "done",
        "weights": str(weights),
        "epochs": progress.epochs_done,
        "best_epoch": progress.best_epoch if best.exists() else None,
        "val": progress.final_metrics or progress.last_metrics,
        "final_losses": progress.last_losses,
        "train_images": count_images(trainer.data.get("train")),
        "val_images": count_images(trainer.data.get("val")),
        "device": device,
        "duration_s": round(time.monotonic() - started, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job file named on the command line; exit status 0 (done) or 1 (error)."""
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    protocol = Protocol.take_stdout()
    try:
        if len(argv) != 1:
            raise ValueError("usage: python -m visionloop.services.trainer.child JOB_JSON_PATH")
        job = Job.from_json(json.loads(Path(argv[0]).read_text()))
        protocol.emit(run(job, protocol, started))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - every failure becomes one error event
        traceback.print_exc()
        error = {"event": "error", "type": type(exc).__name__, "message": str(exc)}
        protocol.emit(error | ({"reason": exc.reason} if isinstance(exc, CheckpointRefused) else {}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
