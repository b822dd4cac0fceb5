"""The trainer's decisions alone (services/trainer/decide.py): no broker, no database."""

from __future__ import annotations

from visionloop.contracts import ModelRef
from visionloop.services.trainer import decide
from visionloop.services.trainer.config import Policy
from visionloop.services.trainer.dataset import reserved_for_test


def _reserved_and_not(fraction: float) -> tuple[str, str]:
    ids = [f"img-{n}" for n in range(200)]
    return (next(i for i in ids if reserved_for_test(i, fraction)), next(i for i in ids if not reserved_for_test(i, fraction)))


def test_a_samples_role_keeps_the_test_set_frozen() -> None:
    policy = Policy(test_fraction=0.2, test_set_size=10)
    reserved, other = _reserved_and_not(0.2)
    assert decide.role_of(None, for_test_set=True, image_id=other, test_count=99, policy=policy) == "test"  # imported for it
    assert decide.role_of({"role": "test"}, for_test_set=False, image_id=other, test_count=0, policy=policy) == "test"  # stays
    assert decide.role_of({"role": "train"}, for_test_set=False, image_id=reserved, test_count=0, policy=policy) == "train"
    assert decide.role_of(None, for_test_set=False, image_id=reserved, test_count=9, policy=policy) == "test"
    assert decide.role_of(None, for_test_set=False, image_id=reserved, test_count=10, policy=policy) == "train"  # full
    assert decide.role_of(None, for_test_set=False, image_id=other, test_count=0, policy=policy) == "train"
    assert decide.needs_test_count(None, for_test_set=False) and not decide.needs_test_count({"role": "train"}, for_test_set=False)


def test_an_unchanged_label_set_changes_nothing_unless_it_moves_to_the_test_set() -> None:
    assert decide.unchanged({"label_hash": "h", "role": "train"}, "h", for_test_set=False)
    assert not decide.unchanged({"label_hash": "h", "role": "train"}, "h", for_test_set=True)
    assert decide.unchanged({"label_hash": "h", "role": "test"}, "h", for_test_set=True)
    assert not decide.unchanged({"label_hash": "h", "role": "train"}, "other", for_test_set=False)
    assert not decide.unchanged(None, "h", for_test_set=False)


def test_the_count_trigger_and_a_lost_runs_fate() -> None:
    assert decide.count_trigger(Policy(trigger="count", min_new_images=50), 50)
    assert not decide.count_trigger(Policy(trigger="count", min_new_images=50), 49)
    assert not decide.count_trigger(Policy(trigger="command", min_new_images=50), 500)
    policy = Policy(max_attempts=2)
    assert decide.lost_run_fate(1, policy, another_queued=False) == "queued"
    assert decide.lost_run_fate(2, policy, another_queued=False) == "failed"
    assert decide.lost_run_fate(1, policy, another_queued=True) == "failed"


def test_the_trained_event_carries_the_runs_figures() -> None:
    snap = {"version": "ds-1", "uri": "file:///m.json", "members": [1, 2, 3], "class_names": ["a", "b"], "train_images": 2,
            "val_images": 1, "test": None}
    event = decide.trained(
        ref=ModelRef(model_id="p-detector", version=3), run_id="run-1", snap=snap, parent={"model_id": "p-detector", "version": 2},
        hyper={"imgsz": 320, "epochs": 5}, result={"epochs": 5, "val": {"map50_95": 1.7, "map50": "nan?"}, "final_losses": {"box": 1.5, "x": "?"}},
        weights_uri="file:///w.pt", weights_sha256="0" * 64, duration_s=12.5,
    )
    assert event.lineage.parent == ModelRef(model_id="p-detector", version=2) and event.lineage.imgsz == 320
    assert event.metrics.val is not None and (event.metrics.val.map50_95, event.metrics.val.map50) == (1.0, 0.0)  # clipped
    assert event.metrics.final_losses == {"box": 1.5} and event.dataset.images == 3 and decide.model_line("p") == "p-detector"


def test_a_run_an_import_asked_for_waits_for_that_import_s_labels() -> None:
    from visionloop.contracts import TrainingRequested

    policy = Policy()
    asked = TrainingRequested(requested_by="import", import_id="imp-1", import_labels=40)
    assert decide.import_wait(asked, policy) == {"batch_id": "imp-1", "labels": 40}
    assert decide.import_wait(TrainingRequested(requested_by="person"), policy) is None
    assert decide.import_wait(asked.model_copy(update={"import_labels": 0}), policy) is None  # an empty import waits for nothing
