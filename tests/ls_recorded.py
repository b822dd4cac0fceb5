"""Request bodies of the shapes Label Studio 1.23 sends an ML backend, with its field names and
nesting (ml/api_connector.py: `setup`, `_prep_prediction_req`; webhooks/serializers for the
annotation, task and project of a webhook). Ids, URLs and times are filled in by the tests."""

from __future__ import annotations

from typing import Any

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="label" toName="image">
    <Label value="car" background="green"/>
    <Label value="person" background="blue"/>
    <Label value="bicycle" background="red"/>
  </RectangleLabels>
</View>"""

CREATED_AT = "2024-05-01T10:00:00.000000Z"


def project(ls_id: int) -> dict[str, Any]:
    """The project object a webhook carries (`send payload` on)."""
    return {
        "id": ls_id, "title": "Parking lot", "description": "", "label_config": LABEL_CONFIG, "expert_instruction": "",
        "show_instruction": False, "show_skip_button": True, "enable_empty_annotation": True, "show_annotation_history": False,
        "organization": 1, "color": "#FFFFFF", "maximum_annotations": 1, "is_published": False, "model_version": "",
        "is_draft": False, "created_by": {"id": 1, "first_name": "", "last_name": "", "email": "admin@example.com", "avatar": None},
        "created_at": CREATED_AT, "min_annotations_to_start_training": 0, "start_training_on_annotation_update": False,
        "show_collab_predictions": True, "num_tasks_with_annotations": 1, "task_number": 3, "useful_annotation_number": 1,
        "ground_truth_number": 0, "skipped_annotations_number": 0, "total_annotations_number": 1, "total_predictions_number": 0,
        "sampling": "Sequential sampling", "show_ground_truth_first": False, "show_overlap_first": False, "overlap_cohort_percentage": 100,
        "task_data_login": None, "task_data_password": None, "control_weights": {}, "parsed_label_config": {},
        "evaluate_predictions_automatically": False, "config_has_control_tags": True, "skip_queue": "REQUEUE_FOR_OTHERS",
        "reveal_preannotations_interactively": False, "pinned_at": None, "finished_task_number": 1, "queue_total": 3, "queue_done": 1,
    }


def task(task_id: int, ls_id: int, image: str, *, data_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A task as /predict and webhooks carry it."""
    return {
        "id": task_id, "data": {"image": image, **(data_extra or {})}, "meta": {}, "created_at": CREATED_AT,
        "updated_at": CREATED_AT, "is_labeled": False, "overlap": 1, "inner_id": task_id, "total_annotations": 0,
        "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
        "last_comment_updated_at": None, "project": ls_id, "updated_by": None, "file_upload": 1, "comment_authors": [],
        "annotations": [], "predictions": [],
    }


def setup(ls_uid: str, hostname: str, access_token: str) -> dict[str, Any]:
    """`POST /setup` when the backend is connected (api_connector.MLApi.setup)."""
    return {"project": ls_uid, "schema": LABEL_CONFIG, "hostname": hostname, "access_token": access_token, "extra_params": None}


def predict(ls_uid: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """`POST /predict` (api_connector.MLApi._prep_prediction_req)."""
    return {"tasks": tasks, "project": ls_uid, "label_config": LABEL_CONFIG, "params": {"login": None, "password": None, "context": None}}


def rectangle(x: float, y: float, w: float, h: float, label: str, width: int, height: int, result_id: str) -> dict[str, Any]:
    """One `rectanglelabels` result item as the editor saves it."""
    return {
        "original_width": width, "original_height": height, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
        "id": result_id, "from_name": "label", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
    }


def annotation_event(action: str, annotation_id: int, the_task: dict[str, Any], ls_id: int, result: list[dict[str, Any]], *, lead_time: float = 12.5) -> dict[str, Any]:
    """`ANNOTATION_CREATED` / `ANNOTATION_UPDATED` webhook with its payload."""
    return {
        "action": action,
        "annotation": {
            "id": annotation_id, "result": result, "created_username": " admin@example.com, 1", "created_ago": "0 minutes",
            "completed_by": 1, "was_cancelled": False, "ground_truth": False, "created_at": CREATED_AT, "updated_at": CREATED_AT,
            "draft_created_at": None, "lead_time": lead_time, "import_id": None, "last_action": None, "task": the_task["id"],
            "project": ls_id, "updated_by": 1, "parent_prediction": None, "parent_annotation": None, "last_created_by": None,
        },
        "task": {**the_task, "is_labeled": True, "total_annotations": 1},
        "project": project(ls_id),
    }


def start_training(ls_id: int) -> dict[str, Any]:
    """What "Start Training" sends (api_connector.MLApi.train, webhook form)."""
    return {"action": "START_TRAINING", "project": project(ls_id)}
