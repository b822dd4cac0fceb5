"""The gateway's decisions alone (services/labeling_gateway/decide.py): tasks made from images,
the one `LabelSubmitted` builder, a submission's checks, an import's training arguments; no
broker, no database."""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from helpers import box, det

from visionloop.contracts import (
    DeviceStatus,
    EdgeRelease,
    ImageRef,
    LabelActions,
    LabelRejectReason,
    LabelSourceKind,
    ModelRef,
    ReviewDecision,
    ServerRelease,
    Target,
    TaskKind,
)
from visionloop.contracts.release import DeviceState, ReleaseAction, RolloutStage
from visionloop.services.labeling_gateway.config import Policy
from visionloop.services.labeling_gateway.decide import (
    Refusal,
    SubmitIn,
    annotate_tasks,
    device_row,
    group_owner,
    handled_per_s,
    instance_state,
    label_submitted,
    prepare_submission,
    reannotate_tasks,
    release_row,
    release_status,
    review_task,
    status_rate,
    training_arguments,
    usable,
)


def counter() -> Callable[[str], str]:
    """Ids `t-1`, `g-2`, ... in the order asked: decisions take their ids from the caller."""
    n = itertools.count(1)
    return lambda prefix: f"{prefix}-{next(n)}"


def test_tasks_from_images() -> None:
    policy = Policy(consensus_labellers=3)
    slots = annotate_tasks("p", "i" * 64, uncertainty=0.7, detections=[det(0, 0, 1, 1)], model=ModelRef(model_id="m", version=1), policy=policy,
                           new_id=counter())
    assert [s.task_id for s in slots] == ["t-1", "t-3", "t-4"] and {s.group_id for s in slots} == {"g-2"}
    assert all(s.group_size == 3 and s.priority == 0.7 and s.kind == "annotate" for s in slots)
    review = review_task("p", "i" * 64, uncertainty=0.2, prelabels=[], model=ModelRef(model_id="m", version=1), policy=policy, new_id=counter())
    assert (review.kind, review.state, review.group_size) == ("review", "verifying", 1)
    with pytest.raises(ValueError, match="auto_accept is the verifier's setting"):
        Policy(auto_accept=False)  # one auto_accept setting: the verifier's
    again = reannotate_tasks("p", "i", rejected_boxes=[box(0, 0, 1, 1)], reason=LabelRejectReason.REVIEWER_REJECTED, message="no",
                             issues=[], priority=0.5, uncertainty=0.5, parent_task="t", model=None, policy=Policy(), new_id=counter())
    assert again[0].start_boxes == [] and again[0].issues[0]["reason"] == "reviewer_rejected"
    fix = reannotate_tasks("p", "i", rejected_boxes=[box(0, 0, 1, 1)], reason=LabelRejectReason.BOX_TOO_SMALL, message="small",
                           issues=[{"index": 0, "reason": "box_too_small", "message": "m"}], priority=0.5, uncertainty=None,
                           parent_task="t", model=None, policy=Policy(), new_id=counter())
    assert fix[0].start_boxes == [box(0, 0, 1, 1)] and len(fix[0].issues) == 2


def test_one_builder_makes_every_label_submitted() -> None:
    """Its rules, the same for people, imports, Label Studio and a model's offer."""
    image = ImageRef(image_id="c" * 64, blob_uri="file:///x/" + "c" * 64, width=10, height=10, format="PNG", byte_size=10)
    model = ModelRef(model_id="m", version=1)
    now = datetime.now(UTC)
    common = {"task_id": "t", "kind": TaskKind.ANNOTATE, "image": image, "submitted_at": now, "class_names": ["car"]}
    person = label_submitted(source=LabelSourceKind.GATEWAY, submission_id="s1", boxes=[box(0, 0, 1, 1)], labeller="x" * 200,
                             role="annotator", prelabel_model=model, **common)
    assert len(person.labeller.user_id) == 128 and person.prelabel_model is None  # no pre-labels, no model
    assert person.actions == LabelActions(boxes_drawn=1)
    offer = label_submitted(source=LabelSourceKind.PRELABEL, submission_id="pre-t", boxes=[], labeller="model:m@v1", role="model",
                            prelabel_model=model, uncertainty=0.2, **common)
    assert offer.prelabel_model == model and offer.actions == LabelActions() and offer.uncertainty == 0.2  # "nothing there" is a claim
    imported = label_submitted(source=LabelSourceKind.IMPORT, submission_id="import-1", boxes=[box(0, 0, 1, 1)] * 2, labeller="admin",
                               role="admin", for_test_set=True, **common)
    assert imported.for_test_set and imported.actions.boxes_drawn == 2 and imported.source is LabelSourceKind.IMPORT


def _submit(**body: object) -> SubmitIn:
    return SubmitIn.model_validate({"lease_id": str(uuid.uuid4()), **body})


def test_prepare_submission() -> None:
    policy = Policy(max_boxes=3)
    kw = {"width": 200, "height": 100, "class_names": ["car", "person"], "policy": policy}
    boxes, decision = prepare_submission(_submit(boxes=[{"class_name": "car", "x1": 1, "y1": 2, "x2": 201, "y2": 50}]), kind="annotate", start_boxes=[], **kw)
    assert boxes == [box(1, 2, 200, 50)] and decision is None  # clipped within the tolerance
    boxes, _ = prepare_submission(_submit(units="percent", boxes=[{"class_name": "car", "x": 10, "y": 10, "width": 50, "height": 50}]), kind="annotate", start_boxes=[], **kw)
    assert boxes == [box(20, 10, 120, 60)]
    start = [det(10, 10, 20, 20)]
    assert prepare_submission(_submit(decision="accept"), kind="review", start_boxes=start, **kw) == ([box(10, 10, 20, 20)], ReviewDecision.ACCEPT)
    assert prepare_submission(_submit(decision="reject"), kind="review", start_boxes=start, **kw) == ([], ReviewDecision.REJECT)
    with pytest.raises(Refusal) as err:  # a model's class outside the taxonomy cannot be accepted as is
        prepare_submission(_submit(decision="accept"), kind="review", start_boxes=[det(10, 10, 20, 20, "cow")], **kw)
    assert err.value.reason == "unknown_class" and "decision `correct`" in err.value.message
    refusals = {
        "missing_decision": (_submit(boxes=[]), "review"),
        "invalid_submission": (_submit(decision="accept", boxes=[{"class_name": "car", "x1": 0, "y1": 0, "x2": 5, "y2": 5}]), "review"),
        "too_many_boxes": (_submit(boxes=[{"class_name": "car", "x1": 0, "y1": 0, "x2": 5, "y2": 5}] * 4), "annotate"),
        "degenerate_box": (_submit(boxes=[{"class_name": "car", "x1": math.inf, "y1": 0, "x2": 5, "y2": 5}]), "annotate"),
        "unknown_class": (_submit(boxes=[{"class_name": "cow", "x1": 0, "y1": 0, "x2": 5, "y2": 5}]), "annotate"),
        "out_of_bounds": (_submit(boxes=[{"class_name": "car", "x1": 0, "y1": 0, "x2": 500, "y2": 5}]), "annotate"),
    }
    for reason, (body, kind) in refusals.items():
        with pytest.raises(Refusal) as err:
            prepare_submission(body, kind=kind, start_boxes=start, **kw)
        assert err.value.reason == reason and err.value.status == 422


def test_training_arguments_are_typed_and_a_malformed_pair_is_refused() -> None:
    assert training_arguments(["epochs=3", " imgsz = 128", "lr0=0.01", "cache=true", "rect=False", "model=yolo11n.pt"]) == {
        "epochs": 3, "imgsz": 128, "lr0": 0.01, "cache": True, "rect": False, "model": "yolo11n.pt"}
    for bad in ("epochs", "=3"):
        with pytest.raises(Refusal) as err:
            training_arguments([bad])
        assert (err.value.status, err.value.reason) == (422, "invalid_training_argument") and bad in err.value.message
    assert usable(["car", "", "x" * 65, "tab\there", "person"]) == ["car", "person"]


# -- the dashboard -----------------------------------------------------------------------------------


def test_throughput_is_the_counter_growth_over_the_uptime_growth() -> None:
    assert handled_per_s(None, 5.0, 10) is None
    assert handled_per_s((5.0, 10), 7.0, 30) == 10.0
    assert handled_per_s((5.0, 10), 1.0, 2) is None  # restarted under the same name
    assert handled_per_s((5.0, 10), 5.0, 10) is None


def test_the_same_instant_twice_keeps_the_last_rate_and_a_restart_forgets_it() -> None:
    assert status_rate(None, 5.0, 10) is None
    assert status_rate((5.0, 10, 3.0), 7.0, 30) == 10.0
    assert status_rate((5.0, 10, 3.0), 5.0, 10) == 3.0  # redelivered: the same instant
    assert status_rate((5.0, 10, 3.0), 1.0, 2) is None  # restarted under the same name


def test_states_and_group_owners() -> None:
    assert instance_state("heartbeat", 2.0, 1.0) == "running"
    assert instance_state("heartbeat", 20.0, 1.0) == "silent"
    assert instance_state("heartbeat", 14.0, 1.0) == "running"  # at least 15 s whatever the interval
    assert instance_state("stopped", 0.0, 1.0) == "stopped"
    assert release_status("activate", 0, 10.0) == "canary"
    assert release_status("activate", 2, 50.0) == "rolling out"
    assert release_status("activate", 3, 100.0) == "complete"
    assert release_status("rollback", 0, 100.0) == "rollback"
    assert group_owner("tx.dedup.image.ingested", "tx.") == ("dedup", "tx.vl.image.ingested.v1")
    assert group_owner("tx.labeling-gateway.release.edge", "tx.") == ("labeling-gateway", "tx.vl.release.edge.v1")
    assert group_owner("tx.recognizer.model.registered.host-1", "tx.") == ("recognizer", "tx.vl.model.registered.v1")
    assert group_owner("ty.dedup.image.ingested", "tx.") is None
    assert group_owner("tx.someone", "tx.") is None


def test_what_the_dashboard_keeps_of_releases_and_devices() -> None:
    model = ModelRef(model_id="yard-detector", version=2)
    signed = {"package_uri": "file:///p.tar", "package_sha256": "0" * 64, "signature": "c2ln", "key_id": "k1"}
    edge = EdgeRelease(release_id="r1", fleet="cams", target=Target.EDGE, model=model, stage=RolloutStage(index=0, percent=25.0), **signed)
    row = release_row(edge)
    assert (row["kind"], row["fleet"], row["model_id"], row["model_version"], row["rollback_to"]) == ("edge", "cams", "yard-detector", 2, None)
    assert (row["stage_index"], row["stage_percent"], row["action"]) == (0, 25.0, "activate")
    back = ServerRelease(release_id="r2", fleet="gpu", target=Target.SERVER, model=model, action=ReleaseAction.ROLLBACK,
                         rollback_to=ModelRef(model_id="yard-detector", version=1), stage=RolloutStage(index=1, percent=100.0), **signed)
    assert (release_row(back)["kind"], release_row(back)["rollback_to"]) == ("server", "yard-detector v1")
    report = device_row(DeviceStatus(fleet="cams", device_id="cam-1", state=DeviceState.FAILED, model=model))
    assert report == {"release_id": "", "device_id": "cam-1", "fleet": "cams", "state": "failed", "reason": None, "active_model": None}
