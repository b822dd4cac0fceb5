"""What the listing commands print from a report row (visionloop/cli/model.py), without a stack."""

from __future__ import annotations

from visionloop.cli.model import _run_cells, gate_cell

RUN = {
    "run_id": "run-1", "project": "yard", "status": "succeeded", "reason": None, "epoch": 8, "dataset_version": "ds-0123456789abcdef",
    "train_images": 380, "val_images": 94, "excluded": [{"image_id": "a", "reason": "near_test_duplicate"}] * 6,
    "model_id": "yard-detector", "version": 1, "map50_95": 0.035, "gate_passed": False, "started_at": "2026-12-05T06:00:00",
    "finished_at": "2026-12-05T06:16:00",
    "gate_failures": [{"reason": "below_floor", "message": "m", "value": 0.035, "threshold": 0.3}],
}


def test_a_run_shows_its_dataset_what_it_left_out_its_map_and_the_gate_s_verdict() -> None:
    cells = _run_cells(RUN)
    assert cells[2] == "succeeded"
    assert cells[4] == "ds-0123456789ab (380 train, 94 val)" and cells[5] == "6 near-duplicates of test images"
    assert cells[7] == "0.035" and cells[8] == "FAILED: below_floor (0.035 vs 0.300)"


def test_the_gate_cell_says_passed_pending_or_each_reason() -> None:
    assert gate_cell({**RUN, "gate_passed": True}) == "passed"
    assert gate_cell({**RUN, "gate_passed": None}) == "not judged yet"
    assert gate_cell({**RUN, "model_id": None}) == "-"
    two = [{"reason": "no_test_set", "message": "m"}, {"reason": "class_regression", "value": 0.2, "threshold": 0.25}]
    assert gate_cell({**RUN, "gate_failures": two}) == "FAILED: no_test_set; class_regression (0.200 vs 0.250)"


def test_submit_says_why_an_image_goes_to_people() -> None:
    from pathlib import Path

    from visionloop.submit import trail_answer

    event = {"event_type": "image.unrecognized", "payload": {"image": {"image_id": "ab" * 32}, "reason": "no_model", "uncertainty": 1.0,
                                                             "detections": []}}
    answer = trail_answer(Path("a.jpg"), [event], 30)
    assert answer.ok and "goes to people, reason no_model (uncertainty 1.00, 0 boxes found)" in answer.line
