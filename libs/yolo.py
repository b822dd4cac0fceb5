"""Ultralytics YOLO, offline: the one place that prepares its environment, datasets and exports.

Ultralytics reads its environment when it is first imported: where its config lives
(`YOLO_CONFIG_DIR`), whether it may reach the internet (`YOLO_OFFLINE`) and whether it may
pip-install what it misses (`YOLO_AUTOINSTALL`). Left alone it writes under `~/.config`, downloads
`Arial.ttf` for its plots and installs packages at export. `ultralytics()` sets all of that first
(a private config folder under the state folder, a local TTF copied in as `Arial.ttf`, no
network, no installs) and only then imports it, so the recognizer's tests, the benchmark and the
trainer run on a machine without internet exactly as on one with it.

Training here always starts from a model yaml (`yolo11n.yaml`), from weights the loop made
itself, or from a local checkpoint the operator named: nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
)
"""System fonts tried for the `Arial.ttf` Ultralytics wants for plots (then matplotlib's copy)."""


class YoloUnavailable(RuntimeError):
    """Ultralytics (the `train` extra) is not installed, or was imported before it was configured."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _font() -> Path | None:
    for candidate in FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    try:
        import matplotlib

        bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return bundled if bundled.is_file() else None
    except ImportError:
        return None


def configure(state_dir: Path) -> Path:
    """Prepare Ultralytics' environment under `state_dir`; return its private config folder.

    Sets `YOLO_CONFIG_DIR=<state_dir>/ultralytics`, `YOLO_OFFLINE=1`, `YOLO_AUTOINSTALL=0` and
    `YOLO_VERBOSE=0` (unless already set), and places a TTF there as `Ultralytics/Arial.ttf` and
    `Arial.Unicode.ttf` so plotting never downloads one. Must run before `import ultralytics`;
    `ultralytics()` does both in the right order.
    """
    config_dir = (Path(state_dir) / "ultralytics").resolve()
    fonts = config_dir / "Ultralytics"
    fonts.mkdir(parents=True, exist_ok=True)
    font = _font()
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = fonts / name
        if font is not None and not target.exists():
            shutil.copyfile(font, target)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_VERBOSE", "0")
    return config_dir


def ultralytics(state_dir: Path) -> ModuleType:
    """The `ultralytics` module, configured for offline use under `state_dir` (see `configure`).

    If Ultralytics was imported elsewhere first, its module-level switches are corrected so that
    nothing auto-installs or goes online; its config folder then stays where it was.
    """
    config_dir = configure(state_dir)
    already = "ultralytics" in sys.modules
    try:
        import ultralytics as module
        from ultralytics.utils import checks
    except ImportError as exc:
        raise YoloUnavailable(
            "ultralytics_missing",
            f"Ultralytics is not installed ({exc}); install the training extra: pip install 'visionloop[train]'.",
        ) from None
    # Ultralytics reads YOLO_AUTOINSTALL once at import; make sure a module imported before
    # configure() cannot pip-install anything either.
    checks.AUTOINSTALL = False
    from ultralytics import utils

    utils.AUTOINSTALL = False
    from ultralytics.utils import torch_utils

    torch_utils.NUM_THREADS = cpu_threads()
    if already and Path(utils.USER_CONFIG_DIR).resolve() != config_dir / "Ultralytics":
        log.debug("ultralytics was imported before configure(); its config stays in %s", utils.USER_CONFIG_DIR)
    utils.SETTINGS.update({"sync": False})
    return module


def cpu_threads() -> int:
    """The threads torch computes with on CPU here: every core this process may use.

    Ultralytics' `select_device` sets `min(8, cores - 1)`, leaving a core to its dataloader
    workers; training here uses none (`workers: 0`), so on two cores it trained on one thread.
    (`OMP_NUM_THREADS` is not read: Ultralytics' import sets it to 1 when it is unset, so 1 does not
    tell an operator's choice from Ultralytics' default.)
    """
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Sample:
    """One training image and its boxes (pixel corners and class names)."""

    name: str
    image: Any
    """A PIL image."""
    boxes: Sequence[tuple[float, float, float, float, str]]


def write_dataset(root: Path, train: Iterable[Sample], val: Iterable[Sample], class_names: Sequence[str]) -> Path:
    """Write an Ultralytics YOLO dataset (images/, labels/, data.yaml) under `root`; return the yaml.

    Class ids follow `class_names` order, which must never change within a project: a model's
    head order is its class list.
    """
    import yaml

    index = {name: i for i, name in enumerate(class_names)}
    for split, samples in (("train", train), ("val", val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for sample in samples:
            w, h = sample.image.size
            sample.image.convert("RGB").save(images / f"{sample.name}.png")
            lines = []
            for x1, y1, x2, y2, name in sample.boxes:
                if name not in index:
                    raise ValueError(f"class {name!r} of sample {sample.name} is not in {list(class_names)}")
                cx, cy = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
                lines.append(f"{index[name]} {cx:.6f} {cy:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
            (labels / f"{sample.name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data = root / "data.yaml"
    data.write_text(
        yaml.safe_dump(
            {"path": str(root.resolve()), "train": "images/train", "val": "images/val",
             "names": dict(enumerate(class_names))},
            sort_keys=False,
        )
    )
    return data


TRAIN_DEFAULTS: dict[str, Any] = {
    "device": "cpu",
    "workers": 0,
    "plots": False,
    "amp": False,
    "mosaic": 0.0,
    "val": True,
    "verbose": False,
    "exist_ok": True,
    "deterministic": True,
    "seed": 0,
}
"""Options every CPU training run here uses (no dataloader workers, no AMP, no plots)."""


def train(
    state_dir: Path,
    data: Path,
    *,
    model: str | Path = "yolo11n.yaml",
    out_dir: Path,
    name: str = "train",
    **options: Any,
) -> Path:
    """Train a detector with Ultralytics' `train`; return the path of `best.pt`.

    `model` is a model yaml (a fresh detector, nothing downloaded) or weights to fine-tune;
    `options` are Ultralytics' own train arguments (`epochs`, `imgsz`, `batch`, ...), over
    `TRAIN_DEFAULTS`.
    """
    ul = ultralytics(state_dir)
    yolo = ul.YOLO(str(model))
    args = TRAIN_DEFAULTS | {"project": str(out_dir.resolve()), "name": name} | options
    yolo.train(data=str(data), **args)
    weights = out_dir.resolve() / name / "weights"
    best = weights / "best.pt"
    return best if best.exists() else weights / "last.pt"


def export_onnx(state_dir: Path, weights: Path, *, imgsz: int, dynamic: bool = True, opset: int | None = None) -> Path:
    """Export weights to ONNX with Ultralytics' `export` (no simplifier: it would need onnxslim)."""
    ul = ultralytics(state_dir)
    yolo = ul.YOLO(str(weights))
    args: dict[str, Any] = {"format": "onnx", "imgsz": imgsz, "dynamic": dynamic, "simplify": False, "device": "cpu"}
    if opset is not None:
        args["opset"] = opset
    return Path(yolo.export(**args))


def recipe_key(recipe: dict[str, Any]) -> str:
    """A short stable hash of a training recipe (for caching what it produces)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- a small detector of synthetic scenes (tests, benchmarks, demos) ------------------------------
SYNTHETIC_RECIPE: dict[str, Any] = {
    "classes": ["circle", "square", "triangle"],
    "train_images": 160,
    "val_images": 40,
    "scene": {"width": 160, "height": 120, "objects": [1, 3], "size": [0.25, 0.5]},
    "seed": 1000,
    "model": "yolo11n.yaml",
    "train": {"epochs": 30, "imgsz": 128, "batch": 16, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "val": False, "save": False},
}
"""A detector that learns `libs/scenes.py` shapes well in 2-4 minutes on two CPU cores.

Colour augmentation is off so that the model keys on both shape and colour: shapes of classes
it never saw (crosses, diamonds) then score low instead of passing for a known class. It is
validated and saved after its last epoch only (its best epoch was the last when it validated each
one: mAP50-95 0.854 at epoch 30), which saves a quarter of its training time.
"""


@dataclass(frozen=True)
class SyntheticDetector:
    """A trained detector of synthetic scenes, cached on disk by its recipe."""

    folder: Path
    weights: Path
    class_names: tuple[str, ...]
    state_dir: Path

    def onnx(self, imgsz: int = 128, *, dynamic: bool = True) -> Path:
        """The weights exported to ONNX at `imgsz` (cached next to them)."""
        target = self.folder / f"model-{imgsz}{'-dynamic' if dynamic else ''}.onnx"
        if not target.exists():
            with _locked(self.folder / ".lock"):
                if not target.exists():
                    exported = export_onnx(self.state_dir, self.weights, imgsz=imgsz, dynamic=dynamic)
                    shutil.copyfile(exported, target.with_suffix(".tmp"))
                    os.replace(target.with_suffix(".tmp"), target)
        return target


class _locked:
    """An exclusive file lock (two processes never train the same recipe at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w")  # noqa: SIM115
        fcntl.flock(self._f, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


def synthetic_detector(cache_dir: Path, *, state_dir: Path | None = None, recipe: dict[str, Any] | None = None) -> SyntheticDetector:
    """Train (once per recipe, cached under `cache_dir/<recipe hash>`) a detector of synthetic scenes.

    The cache key covers the recipe and the Ultralytics and torch versions, so a changed recipe
    or library trains afresh; a cached model is reused across test sessions and benchmark runs.
    """
    from visionloop.libs.scenes import render_scene

    recipe = recipe or SYNTHETIC_RECIPE
    folder = _synthetic_folder(cache_dir, recipe)
    state_dir = state_dir or folder / "state"
    weights = folder / "best.pt"
    classes = tuple(recipe["classes"])
    if not weights.exists():
        with _locked(folder / ".lock"):
            if not weights.exists():
                scene = recipe["scene"]

                def samples(first: int, count: int) -> Iterable[Sample]:
                    for seed in range(first, first + count):
                        s = render_scene(
                            seed=seed, width=scene["width"], height=scene["height"], classes=classes,
                            objects=tuple(scene["objects"]), size=tuple(scene["size"]),
                        )
                        yield Sample(f"s{seed}", s.image, [(b.x1, b.y1, b.x2, b.y2, b.class_name) for b in s.boxes])

                seed = recipe["seed"]
                data = write_dataset(
                    folder / "dataset", samples(seed, recipe["train_images"]),
                    samples(seed + 100_000, recipe["val_images"]), classes,
                )
                best = train(state_dir, data, model=recipe["model"], out_dir=folder / "runs", **recipe["train"])
                shutil.copyfile(best, weights.with_suffix(".tmp"))
                os.replace(weights.with_suffix(".tmp"), weights)
                (folder / "recipe.json").write_text(json.dumps(recipe, indent=2))
    return SyntheticDetector(folder=folder, weights=weights, class_names=classes, state_dir=state_dir)


def _synthetic_folder(cache_dir: Path, recipe: dict[str, Any]) -> Path:
    """Where `synthetic_detector` keeps what `recipe` trains: keyed by the recipe and the Ultralytics and torch versions."""
    key = recipe_key({**recipe, "ultralytics": _version("ultralytics"), "torch": _version("torch")})
    return Path(cache_dir).resolve() / key


def synthetic_detector_cached(cache_dir: Path, recipe: dict[str, Any] | None = None) -> bool:
    """Whether `synthetic_detector(cache_dir, recipe)` has its detector on disk already (no training)."""
    return (_synthetic_folder(cache_dir, recipe or SYNTHETIC_RECIPE) / "best.pt").exists()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


# -- growing a detector's class list --------------------------------------------------------------
def extend_classes(
    state_dir: Path, weights: Path, old_names: Sequence[str], new_names: Sequence[str], out: Path
) -> Path:
    """Write to `out` a copy of `weights` whose detection head knows `new_names`; return `out`.

    Every tensor is the parent's except the final classification convs of the Detect head,
    rebuilt by `remap_head`: a class the parent knew keeps its parent row exactly (matched by
    name, so `old_names` need not be a prefix); a new class gets the row a freshly built model of
    the same yaml would start with. The model's `names`, head `nc` and yaml `nc` follow
    `new_names`, so Ultralytics' trainer, fine-tuning on data with these names in this order,
    transfers every tensor instead of re-initialising the head. Classes are never dropped: a
    class of `old_names` missing from `new_names` is a ValueError. With `new_names == old_names`
    the file is copied as it is.
    """
    old, new = list(old_names), list(new_names)
    if len(set(new)) != len(new) or len(set(old)) != len(old):
        raise ValueError(f"class names must be unique: old {old}, new {new}")
    dropped = [name for name in old if name not in new]
    if dropped:
        raise ValueError(f"classes {dropped} of the parent model are missing from {new}: classes are never dropped")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if new == old:
        if Path(weights).resolve() != out.resolve():
            shutil.copyfile(weights, out)
        return out

    ultralytics(state_dir)
    from ultralytics.nn.tasks import load_checkpoint

    parent, ckpt = load_checkpoint(str(weights))
    parent_names = [parent.names[i] for i in sorted(parent.names)]
    if parent_names != old:
        raise ValueError(f"{weights} was trained on classes {parent_names}, not {old}")
    child = remap_head(parent, [old.index(name) if name in old else -1 for name in new], new)
    return save_checkpoint(
        state_dir, child, out, train_args=dict(ckpt.get("train_args") or {}),
        provenance={"extended_from": str(weights), "old_names": old, "new_names": new},
    )


def remap_head(model: Any, source_rows: Sequence[int], new_names: Sequence[str]) -> Any:
    """A copy of the YOLO detector `model` whose head has one class row per name of `new_names`.

    The rows are those of the final classification convs of the Detect head (`cv3[i][-1]`, and
    `one2one_cv3[i][-1]` where the head has it). Row `k` is the model's row `source_rows[k]`,
    weight and bias exactly; where that is -1 it is the row a freshly built model of the same
    yaml starts with (built under a fixed seed, so the result is reproducible; where the model's
    branch is wider than a fresh one, e.g. an 80-class parent, a default-initialised row with
    `Detect.bias_init`'s prior bias). Every other tensor is the model's, and `model` itself is
    left as it was. The copy's `names`, head `nc` and `no` and yaml `nc` follow `new_names`.
    A head this cannot rebuild (not a closed-vocabulary YOLO Detect head, or an unexpected
    classification layer) is a ValueError.
    """
    import copy

    import torch
    from torch import nn
    from ultralytics.nn.modules.head import Detect
    from ultralytics.nn.tasks import DetectionModel

    head = model.model[-1]
    if not isinstance(head, Detect) or hasattr(model, "set_classes"):
        raise ValueError(f"not a closed-vocabulary YOLO detector ({type(head).__name__} head)")
    if len(source_rows) != len(new_names) or any(not -1 <= r < head.nc for r in source_rows):
        raise ValueError(f"source rows {list(source_rows)} do not fit {len(new_names)} classes from a head of {head.nc}")
    nc = len(new_names)
    child = copy.deepcopy(model)
    child_head = child.model[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = DetectionModel(copy.deepcopy(model.yaml), ch=model.yaml.get("channels", 3), nc=nc, verbose=False)
        fresh_head = fresh.model[-1]
        for attr in ("cv3", "one2one_cv3"):
            branches = getattr(child_head, attr, None)
            if branches is None:
                continue
            templates = getattr(fresh_head, attr, None)
            for i, branch in enumerate(branches):
                previous = branch[-1]
                if not isinstance(previous, nn.Conv2d) or previous.out_channels != head.nc or previous.bias is None:
                    raise ValueError(f"unexpected classification layer {attr}[{i}][-1]: {previous}")
                template = templates[i][-1] if templates is not None else None
                branch[-1] = _class_conv(previous, template, source_rows, float(child_head.stride[i]))
    child_head.nc = nc
    child_head.no = nc + child_head.reg_max * 4
    child.yaml["nc"] = nc
    child.names = dict(enumerate(new_names))
    for stale in ("class_weights", "criterion", "pt_path"):  # sized for, or pointing at, the parent
        if hasattr(child, stale):
            delattr(child, stale)
    return child


def _class_conv(previous: Any, template: Any, source_rows: Sequence[int], stride: float) -> Any:
    """A classification conv with one row per entry of `source_rows`: `previous`'s row, or a fresh one."""
    import math

    import torch
    from torch import nn

    nc = len(source_rows)
    grown = nn.Conv2d(previous.in_channels, nc, 1)
    with torch.no_grad():
        if template is not None and template.weight.shape == grown.weight.shape:
            grown.weight.copy_(template.weight)
            grown.bias.copy_(template.bias)
        else:  # the model's branch is wider than a fresh one (nc > head width): bias_init's prior
            grown.bias.fill_(math.log(5 / nc / (640 / stride) ** 2))
        for row, src in enumerate(source_rows):
            if src >= 0:
                grown.weight[row] = previous.weight[src]
                grown.bias[row] = previous.bias[src]
    return grown.to(previous.weight.device, previous.weight.dtype).requires_grad_(previous.weight.requires_grad)


def save_checkpoint(
    state_dir: Path, model: Any, out: Path, *, train_args: dict[str, Any], provenance: dict[str, Any]
) -> Path:
    """Write `model` to `out` (atomically) as an Ultralytics checkpoint fine-tuning can start from.

    The file holds a half-precision copy (as Ultralytics saves its own), no optimizer state (so it
    never resumes: it starts a new training), `train_args` and, under `visionloop`, `provenance`.
    """
    ul = ultralytics(state_dir)
    import copy
    from datetime import datetime

    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(
        {
            "epoch": -1,
            "best_fitness": None,
            "model": copy.deepcopy(model).half(),
            "ema": None,
            "updates": None,
            "optimizer": None,
            "train_args": train_args,
            "date": datetime.now().astimezone().isoformat(),
            "version": ul.__version__,
            "visionloop": provenance,
        },
        tmp,
    )
    os.replace(tmp, out)
    return out
