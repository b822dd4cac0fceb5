"""The trainer's decisions, pure: a sample's role, whether a label set changed, when to queue a run,
what becomes of a run whose trainer died, a run's training arguments, and the `model trained`
event built from what a run produced. No I/O, no clock, no ids: the callers pass them in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from visionloop.contracts import (
    DatasetRef,
    Lineage,
    Metrics,
    ModelRef,
    ModelTrained,
    TrainingRequested,
    TrainMetrics,
)
from visionloop.services.trainer.config import TUNABLE, Policy
from visionloop.services.trainer.dataset import reserved_for_test

Role = Literal["train", "test"]


def model_line(project: str) -> str:
    """The model id of a project's detector line."""
    return f"{project}-detector"


def clip(value: Any) -> float:
    """A metric as a number in [0, 1] (0 for anything that is not one)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(1.0, max(0.0, number)) if number == number else 0.0


def unchanged(existing: Mapping[str, Any] | None, label_hash: str, *, for_test_set: bool) -> bool:
    """Whether a verified label set changes nothing the dataset holds (same boxes, same role)."""
    return existing is not None and existing["label_hash"] == label_hash and not (for_test_set and existing["role"] != "test")


def role_of(existing: Mapping[str, Any] | None, *, for_test_set: bool, image_id: str, test_count: int, policy: Policy) -> Role:
    """A sample's role: imported for the test set; else the role it had; else a hash-chosen share
    goes to the test set until it is full. `test_count` is read only when needed (pass 0 otherwise)."""
    if for_test_set:
        return "test"
    if existing is not None:
        return "test" if existing["role"] == "test" else "train"
    full = test_count >= policy.test_set_size
    return "test" if not full and reserved_for_test(image_id, policy.test_fraction) else "train"


def needs_test_count(existing: Mapping[str, Any] | None, *, for_test_set: bool) -> bool:
    """Whether `role_of` needs the project's test-set size (a new image that is not imported for it)."""
    return existing is None and not for_test_set


def count_trigger(policy: Policy, new_images: int) -> bool:
    """Whether `new_images` training images since the last run's snapshot queue a run."""
    return policy.trigger in ("count", "both") and new_images >= policy.min_new_images


def lost_run_fate(attempts: int, policy: Policy, *, another_queued: bool) -> Literal["queued", "failed"]:
    """A run whose trainer died: queued again while attempts remain and no other run waits."""
    return "queued" if attempts < policy.max_attempts and not another_queued else "failed"


def hyperparameters(policy: Policy, overrides: Mapping[str, Any], *, first: bool) -> dict[str, Any]:
    """The Ultralytics train arguments of a run: policy defaults, the project's extras, the command's overrides."""
    base: dict[str, Any] = {
        "epochs": policy.epochs if first else policy.finetune_epochs,
        "imgsz": policy.imgsz,
        "batch": policy.batch,
        "patience": policy.patience,
    }
    extras = {k: v for k, v in policy.train_args.items() if k in TUNABLE}
    return base | extras | {k: v for k, v in overrides.items() if k in TUNABLE}


def trained(*, ref: ModelRef, run_id: str, snap: Mapping[str, Any], parent: Mapping[str, Any] | None, hyper: Mapping[str, Any],
            result: Mapping[str, Any], weights_uri: str, weights_sha256: str, duration_s: float) -> ModelTrained:
    """The `model trained` event of a run that produced weights."""
    val = result.get("val") or {}
    return ModelTrained(
        lineage=Lineage(
            model=ref,
            parent=ModelRef(model_id=parent["model_id"], version=parent["version"]) if parent else None,
            dataset_version=snap["version"],
            class_names=snap["class_names"],
            imgsz=int(hyper["imgsz"]),
        ),
        run_id=run_id,
        weights_uri=weights_uri,
        weights_sha256=weights_sha256,
        metrics=TrainMetrics(
            epochs=int(result.get("epochs") or 0),
            best_epoch=result.get("best_epoch"),
            val=Metrics(
                map50_95=clip(val.get("map50_95")), map50=clip(val.get("map50")),
                precision=clip(val.get("precision")), recall=clip(val.get("recall")),
                images=snap["val_images"],
            ) if val else None,
            train_images=snap["train_images"],
            val_images=snap["val_images"],
            final_losses={k: float(x) for k, x in (result.get("final_losses") or {}).items() if isinstance(x, int | float)},
        ),
        hyperparameters=dict(hyper),
        device=str(result.get("device") or "cpu")[:32],
        duration_s=duration_s,
        dataset=DatasetRef(version=snap["version"], uri=snap["uri"], images=len(snap["members"])),
        test_set=snap["test"],
    )


def import_wait(request: TrainingRequested, policy: Policy) -> dict[str, Any] | None:
    """What a run asked for by an import waits for: the import's label sets ({"batch_id",
    "labels"}); None for a request that follows no import (or an empty one)."""
    if request.import_id is None or not request.import_labels:
        return None
    return {"batch_id": request.import_id, "labels": request.import_labels}
