"""The verifier with the gateway, over the real broker and PostgreSQL: pre-labels go to people
until calibration vouches for their class, then are auto-accepted (with spot checks still sent
to people); consensus of several labellers; the calibration report (CLI and status gauges)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from helpers import eventually
from labelling import Lab, fake_image, publish_many, recognition, recognized, running_lab, unrecognized

from visionloop.contracts import Detection, ImageRecognized, ModelRef

ENV = {
    "VL_VERIFIER_MIN_SAMPLES": "6",
    "VL_VERIFIER_MIN_SUPPORT": "4",
    "VL_VERIFIER_SPOT_CHECK_RATE": "0",
    "VL_VERIFIER_PROJECTS": '{"spot": {"spot_check_rate": 1.0, "min_samples": 1, "min_support": 1}}',
    "VL_LABELING_GATEWAY_PROJECTS": '{"vote": {"consensus_labellers": 3}}',
}


@pytest.fixture(scope="module")
async def lab(kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    async with running_lab(kafka_bootstrap, database_url, tmp_path_factory.mktemp("verifier"), env=ENV) as running:
        yield running


CAR = Detection(x1=100, y1=100, x2=200, y2=180, class_name="car", score=0.9)
GHOST = Detection(x1=400, y1=300, x2=450, y2=380, class_name="person", score=0.3)


def cars(n: int) -> list[Detection]:
    """`n` cars apart from each other (rows of ten), scoring 0.9."""
    return [Detection(x1=10 + 60 * (i % 10), y1=10 + 70 * (i // 10), x2=50 + 60 * (i % 10), y2=40 + 70 * (i // 10), class_name="car", score=0.9)
            for i in range(n)]


CARS = cars(10)
"""Six images of ten cars are 60 verified boxes: enough evidence for a lower bound of
0.05 ** (1 / 60) = 0.951 at target 0.95 (six single boxes would bound at 0.61)."""


def by_model(payload: ImageRecognized, model: ModelRef) -> ImageRecognized:
    """The same recognition, pre-labelled by another model version."""
    return payload.model_copy(update={"recognition": recognition(0.1).model_copy(update={"model": model})})


async def _review_all(lab: Lab, project: str, answer: Any) -> list[str]:
    """A reviewer answers every queued review task of the project; the submission ids."""
    done = []
    while True:
        got = await lab.http.post(f"/v1/projects/{project}/tasks/next", headers=lab.auth("reviewer"), params={"kind": "review"})
        if got.status_code == 204:
            return done
        task = got.json()
        body = {"lease_id": task["lease"]["lease_id"], **answer(task)}
        sent = await lab.http.post(f"/v1/projects/{project}/tasks/{task['task_id']}/submit", headers=lab.auth("reviewer"), json=body)
        assert sent.status_code == 201, sent.text
        done.append(sent.json()["submission_id"])


def _outcome(lab: Lab, image_id: str) -> list[tuple[str, str]]:
    found = []
    for m in lab.messages("label.verified"):
        if m["payload"]["image"]["image_id"] == image_id:
            found.append(("verified", m["payload"]["provenance"]["method"]))
    for m in lab.messages("label.rejected"):
        if m["payload"]["image"]["image_id"] == image_id:
            found.append(("rejected", m["payload"]["reason"]))
    return found


async def test_prelabels_are_auto_accepted_once_calibrated(lab: Lab) -> None:
    await lab.use_project("auto")
    first = [fake_image(n) for n in range(6)]
    await publish_many(lab.settings, [recognized(image, [*CARS, GHOST]) for image in first], project="auto")
    await lab.wait_tasks(6, where="project = 'auto' AND state = 'queued'")
    # nothing calibrated yet (the collector may trail the task table by a moment)
    await eventually(lambda: all(_outcome(lab, i.image_id) == [("rejected", "needs_review")] for i in first))
    # People keep the cars (a pixel off) and delete the ghost, six times.
    keep_car = {"decision": "correct", "boxes": [{"class_name": "car", "x1": c.x1 + 1, "y1": c.y1 - 1, "x2": c.x2, "y2": c.y2 + 1} for c in CARS]}
    reviewed = await _review_all(lab, "auto", lambda task: keep_car)
    assert len(reviewed) == 6
    await eventually(lambda: sum(1 for i in first if ("verified", "human") in _outcome(lab, i.image_id)) == 6)

    sure, unsure_class, low_score = fake_image(100), fake_image(101), fake_image(102)
    await publish_many(lab.settings, [
        recognized(sure, [CAR.model_copy(update={"score": 0.95})]),
        recognized(unsure_class, [CAR.model_copy(update={"score": 0.95}), GHOST.model_copy(update={"score": 0.99})]),
        recognized(low_score, [CAR.model_copy(update={"score": 0.85})]),
    ], project="auto")
    await eventually(lambda: all(_outcome(lab, i.image_id) for i in (sure, unsure_class, low_score)))
    assert _outcome(lab, sure.image_id) == [("verified", "auto")]
    assert _outcome(lab, unsure_class.image_id) == [("rejected", "needs_review")]
    assert _outcome(lab, low_score.image_id) == [("rejected", "needs_review")]
    [auto] = [m["payload"] for m in lab.messages("label.verified") if m["payload"]["image"]["image_id"] == sure.image_id]
    assert auto["provenance"]["labellers"][0]["role"] == "model" and auto["provenance"]["prelabel_model"]["model_id"] == "demo-detector"
    assert auto["provenance"]["actions"]["prelabels_accepted"] == 1 and auto["boxes"][0]["score"] is None
    message = next(m["payload"]["message"] for m in lab.messages("label.rejected") if m["payload"]["image"]["image_id"] == low_score.image_id)
    assert "0.850 < threshold 0.900" in message
    # A new version of the model starts uncalibrated: v3's evidence does not vouch for v4's boxes.
    newer = fake_image(104)
    v4 = ModelRef(model_id="demo-detector", version=4)
    await publish_many(lab.settings, [by_model(recognized(newer, [CAR.model_copy(update={"score": 0.99})]), v4)], project="auto")
    await eventually(lambda: _outcome(lab, newer.image_id))
    assert _outcome(lab, newer.image_id) == [("rejected", "needs_review")]
    message = next(m["payload"]["message"] for m in lab.messages("label.rejected") if m["payload"]["image"]["image_id"] == newer.image_id)
    assert "demo-detector@v4" in message, message
    # A model that predates a class of the taxonomy vouches for nothing: it cannot see objects of that class.
    predates = fake_image(103)
    await publish_many(lab.settings, [recognized(predates, [CAR.model_copy(update={"score": 0.95})]).model_copy(update={"class_names": ["car"]})],
                       project="auto")
    await eventually(lambda: _outcome(lab, predates.image_id))
    assert _outcome(lab, predates.image_id) == [("rejected", "needs_review")]
    message = next(m["payload"]["message"] for m in lab.messages("label.rejected") if m["payload"]["image"]["image_id"] == predates.image_id)
    assert "does not know 'person'" in message
    # Auto-accepted: no task for anyone; the others wait for a reviewer.
    await lab.wait_tasks(1, where=f"image_id = '{sure.image_id}' AND state = 'done'")
    states = {r["image_id"]: r["state"] for r in await lab.tasks("project = 'auto'")}
    assert {states.get(unsure_class.image_id), states.get(low_score.image_id)} <= {"queued", "verifying"}

    # The calibration report: CLI, and the verifier's status gauges.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {
        "VL_KAFKA_BOOTSTRAP": lab.settings.kafka_bootstrap or "", "VL_DATABASE_URL": lab.settings.database_url or "",
        "VL_SCHEMA_PREFIX": lab.settings.schema_prefix,
    }
    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "visionloop.cli", "verifier", "calibration", "--project", "auto", "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    report = {r["class_name"]: r for r in json.loads(shown.stdout.strip().splitlines()[-1])["classes"]}
    car, person = report["car"], report["person"]
    assert car["status"] == "calibrated" and car["threshold"] == pytest.approx(0.9) and (car["model_id"], car["model_version"]) == ("demo-detector", 3)
    assert (car["correct"], car["samples"], car["support_correct"], car["support"]) == (60, 60, 60, 60)
    assert car["precision"] == 1.0 and car["lower_bound"] == pytest.approx(0.05 ** (1 / 60)) and (car["target"], car["confidence"]) == (0.95, 0.95)
    assert person["status"] == "bound_below_target" and person["threshold"] is None and (person["correct"], person["samples"]) == (0, 6)
    assert person["lower_bound"] == 0.0
    verifier = next(r for r in lab.host.runtimes if r.service == "verifier")
    assert verifier.gauges["calibration.auto.demo-detector@v3.car.threshold"] == pytest.approx(0.9)
    assert verifier.gauges["calibration.auto.demo-detector@v3.car.lower_bound"] == pytest.approx(0.05 ** (1 / 60))

    # A person's verdict on v4's pre-labels is evidence for v4 (and for no other version).
    await _review_all(lab, "auto", lambda task: {"decision": "accept"})
    await eventually(lambda: ("verified", "human") in _outcome(lab, newer.image_id))

    async def v4_evidence() -> list[Any]:
        return await lab.pool.fetch(f"SELECT * FROM {lab.verifier_schema}.calibration WHERE project = 'auto' AND model_version = 4")

    await eventually(v4_evidence)
    [row] = await v4_evidence()
    assert (row["class_name"], row["samples"], row["correct"], row["status"], row["threshold"]) == ("car", 1, 1, "too_few_samples", None)


async def test_spot_checks_still_go_to_people(lab: Lab) -> None:
    await lab.use_project("spot")
    seed = fake_image(200)
    await publish_many(lab.settings, [recognized(seed, cars(60))], project="spot")
    await lab.wait_tasks(1, where="project = 'spot' AND state = 'queued'")
    await _review_all(lab, "spot", lambda task: {"decision": "accept"})
    await eventually(lambda: ("verified", "human") in _outcome(lab, seed.image_id))
    checked = fake_image(201)
    await publish_many(lab.settings, [recognized(checked, [CAR.model_copy(update={"score": 0.97})])], project="spot")
    await eventually(lambda: _outcome(lab, checked.image_id))
    assert _outcome(lab, checked.image_id) == [("rejected", "spot_check")]
    await lab.wait_tasks(1, where=f"project = 'spot' AND image_id = '{checked.image_id}' AND state = 'queued' AND spot_check")
    await _review_all(lab, "spot", lambda task: {"decision": "accept"})
    await eventually(lambda: ("verified", "human") in _outcome(lab, checked.image_id))
    [label] = [m["payload"] for m in lab.messages("label.verified") if m["payload"]["image"]["image_id"] == checked.image_id]
    assert label["provenance"]["spot_check"] is True
    # the spot check's verdict is more evidence for the version that drew the pre-labels
    row = await lab.pool.fetchrow(f"SELECT * FROM {lab.verifier_schema}.calibration WHERE project = 'spot' AND class_name = 'car'")
    assert (row["model_id"], row["model_version"], row["samples"], row["correct"], row["status"]) == ("demo-detector", 3, 61, 61, "calibrated")


async def _annotate(lab: Lab, token: str, boxes: list[tuple[str, float, float, float, float]]) -> dict[str, Any]:
    got = await lab.http.post("/v1/projects/vote/tasks/next", headers=lab.auth(token))
    assert got.status_code == 200, got.text
    task = got.json()
    body = {"lease_id": task["lease"]["lease_id"], "boxes": [{"class_name": c, "x1": x1, "y1": y1, "x2": x2, "y2": y2} for c, x1, y1, x2, y2 in boxes]}
    sent = await lab.http.post(f"/v1/projects/vote/tasks/{task['task_id']}/submit", headers=lab.auth(token), json=body)
    assert sent.status_code == 201, sent.text
    return task


async def test_consensus_keeps_what_a_quorum_drew(lab: Lab) -> None:
    await lab.use_project("vote")
    image = fake_image(300)
    await publish_many(lab.settings, [unrecognized(image, 0.7)], project="vote")
    await lab.wait_tasks(3, where="project = 'vote'")
    people = [await lab.token("annotator", name) for name in ("ann", "bea", "cid")]
    shared = [("car", 10, 10, 60, 50), ("car", 100, 100, 150, 160), ("person", 300, 50, 340, 200)]
    a = await _annotate(lab, people[0], [*shared, ("bicycle", 400, 400, 460, 440)])
    # one person never gets a second slot of the same image
    assert (await lab.http.post("/v1/projects/vote/tasks/next", headers=lab.auth(people[0]))).status_code == 204
    b = await _annotate(lab, people[1], [(c, x1 + 2, y1 - 1, x2 + 1, y2 + 2) for c, x1, y1, x2, y2 in shared] + [("bicycle", 402, 401, 459, 442), ("car", 500, 10, 520, 30)])
    assert not _outcome(lab, image.image_id)  # waiting for the third labeller
    c = await _annotate(lab, people[2], shared)
    assert a["group_size"] == 3 and len({a["task_id"], b["task_id"], c["task_id"]}) == 3
    await eventually(lambda: _outcome(lab, image.image_id))
    assert _outcome(lab, image.image_id) == [("verified", "consensus")]
    [label] = [m["payload"] for m in lab.messages("label.verified") if m["payload"]["image"]["image_id"] == image.image_id]
    assert sorted(b["class_name"] for b in label["boxes"]) == ["bicycle", "car", "car", "person"]  # the lone car is out
    assert {p["user_id"] for p in label["provenance"]["labellers"]} == {"ann", "bea", "cid"}
    assert len(label["provenance"]["submission_ids"]) == 3 and label["provenance"]["actions"]["boxes_drawn"] == 12

    split = fake_image(301)
    await publish_many(lab.settings, [unrecognized(split, 0.7)], project="vote")
    await lab.wait_tasks(3, where=f"project = 'vote' AND image_id = '{split.image_id}'")
    for n, token in enumerate(people):
        await _annotate(lab, token, [("car", 10 + 200 * n, 10, 60 + 200 * n, 50)])
    await eventually(lambda: _outcome(lab, split.image_id))
    assert _outcome(lab, split.image_id) == [("rejected", "no_consensus")]
    await lab.wait_tasks(3, where=f"project = 'vote' AND image_id = '{split.image_id}' AND kind = 'reannotate'")
