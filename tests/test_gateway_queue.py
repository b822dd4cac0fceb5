"""The labelling queue over real HTTP, with PostgreSQL and the verifier behind it on the in-memory
bus (tests/labelling.py `fake_lab`; each answer's verdict is delivered before the answer returns):
50 labellers drain 500 tasks (no task held twice, none lost, one verdict per submission),
priority, leases that expire, renew, release and skip."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from labelling import Lab, fake_image, fake_lab, recognized, unrecognized

from visionloop.contracts import Detection

ENV = {
    "VL_LABELING_GATEWAY_PROJECTS": '{"short": {"lease_s": 1}}',
    "VL_VERIFIER_PROJECTS": '{"drain": {"auto_accept": false}}',
    "VL_VERIFIER_MIN_BOX_PX": "4",
}


@pytest.fixture(scope="module")
async def lab(database_url: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    async with fake_lab(database_url, tmp_path_factory.mktemp("queue"), env=ENV) as running:
        yield running


def _box(rng: random.Random, cls: str, w: int = 640, h: int = 480) -> dict[str, Any]:
    x1, y1 = rng.uniform(0, w - 60), rng.uniform(0, h - 60)
    return {"class_name": cls, "x1": x1, "y1": y1, "x2": x1 + rng.uniform(10, 50), "y2": y1 + rng.uniform(10, 50)}


async def test_fifty_labellers_drain_five_hundred_tasks(lab: Lab) -> None:
    await lab.use_project("drain")
    rng = random.Random(7)
    annotate = [unrecognized(fake_image(n), uncertainty=rng.random()) for n in range(400)]
    review = [
        recognized(fake_image(1000 + n), [Detection(x1=10, y1=10, x2=100, y2=90, class_name="car", score=0.9)], uncertainty=rng.random())
        for n in range(100)
    ]
    await lab.publish([*annotate, *review], project=lab.project)
    await lab.wait_tasks(500, where="project = 'drain' AND state = 'queued'")  # review tasks after the verifier's needs_review

    labellers = [await lab.token("annotator", f"ann-{i}") for i in range(40)]
    labellers += [await lab.token("reviewer", f"rev-{i}") for i in range(10)]
    handed: list[tuple[str, str]] = []  # (task, labeller) for every lease handed out
    submitted: dict[str, str] = {}      # submission id -> task
    to_fail: set[str] = set()           # submissions the verifier must reject (a box too small)

    async def labeller(n: int, token: str) -> None:
        local = random.Random(n)
        async with httpx.AsyncClient(base_url=lab.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            while True:
                # Re-annotate tasks (from rejections) appear while the queue drains; these 500 are the test.
                got = await http.post(f"/v1/projects/{lab.project}/tasks/next", params=[("kind", "annotate"), ("kind", "review")])
                if got.status_code == 204:
                    return
                assert got.status_code == 200, got.text
                task = got.json()
                handed.append((task["task_id"], f"labeller-{n}"))
                if task["kind"] == "review":
                    decision = local.choice(["accept", "correct", "reject"])
                    body: dict[str, Any] = {"lease_id": task["lease"]["lease_id"], "decision": decision}
                    if decision == "correct":
                        body["boxes"] = [_box(local, "person")]
                else:
                    body = {"lease_id": task["lease"]["lease_id"], "boxes": [_box(local, local.choice(["car", "person"])) for _ in range(local.randint(0, 3))]}
                    if local.random() < 0.1:
                        body["boxes"].append({"class_name": "bicycle", "x1": 5, "y1": 5, "x2": 6.5, "y2": 6.5})  # 1.5 px: too small
                answer = await http.post(f"/v1/projects/{lab.project}/tasks/{task['task_id']}/submit", json=body)
                assert answer.status_code == 201, answer.text
                sid = answer.json()["submission_id"]
                submitted[sid] = task["task_id"]
                if any(b.get("x2") == 6.5 for b in body.get("boxes", [])):
                    to_fail.add(sid)

    start = time.perf_counter()
    await asyncio.gather(*(labeller(n, token) for n, token in enumerate(labellers)))
    drained = time.perf_counter() - start

    tasks = Counter(task for task, _ in handed)
    assert len(tasks) == 500 and set(tasks.values()) == {1}, "a task was handed out twice"
    assert sorted(submitted.values()) == sorted(tasks), "a task was lost or answered twice"
    rows = await lab.tasks("project = 'drain'")
    # every answer is decided before its submit returns (the in-memory bus delivers at once)
    assert {r["state"] for r in rows if r["kind"] != "reannotate"} == {"done", "rejected"}
    assert drained < 30, f"draining 500 tasks took {drained:.1f} s"

    # Every submission becomes exactly one verified or rejected label.
    def once(kind: str) -> list[dict[str, Any]]:
        """Each event once: a relay may send a record again (delivery is at least once)."""
        return list({m["event_id"]: m for m in lab.messages(kind)}.values())

    async def decided() -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for m in once("label.verified"):
            for sid in m["payload"]["provenance"]["submission_ids"]:
                seen.setdefault(sid, []).append("verified")
        for m in once("label.rejected"):
            seen.setdefault(m["payload"]["submission_id"], []).append(m["payload"]["reason"])
        return seen

    async def all_decided() -> bool:
        return set(submitted) <= set(await decided())

    from helpers import eventually

    await eventually(all_decided, timeout=60, interval=0.2)
    await asyncio.sleep(1.0)  # anything extra (a duplicate) would arrive now
    outcome = await decided()
    ours = {sid: v for sid, v in outcome.items() if sid in submitted}
    assert all(len(v) == 1 for v in ours.values()), {k: v for k, v in ours.items() if len(v) != 1}
    assert {sid for sid, v in ours.items() if v == ["box_too_small"]} == to_fail
    rejected = {sid for sid, v in ours.items() if v != ["verified"]}
    assert {v[0] for sid, v in ours.items() if sid in rejected} <= {"box_too_small", "reviewer_rejected"}
    # ... and each rejection came back as one re-annotate task.
    await lab.wait_tasks(len(rejected), where="project = 'drain' AND kind = 'reannotate'")
    submitted_events = {m["payload"]["submission_id"] for m in lab.messages("label.submitted")}
    assert set(submitted) <= submitted_events


async def test_priority_is_uncertainty_then_age(lab: Lab) -> None:
    await lab.use_project("priority")
    images = [fake_image(n) for n in range(4)]
    for image, uncertainty in zip(images, (0.2, 0.9, 0.5, 0.9), strict=True):
        await lab.publish([unrecognized(image, uncertainty)], project=lab.project)
        await lab.wait_tasks(images.index(image) + 1, where="project = 'priority'")
    order = []
    for n in range(4):
        token = await lab.token("annotator", f"p-{n}")
        got = await lab.http.post(f"/v1/projects/{lab.project}/tasks/next", headers=lab.auth(token))
        order.append((got.json()["image"]["image_id"], got.json()["priority"]))
    assert [i for i, _ in order] == [images[1].image_id, images[3].image_id, images[2].image_id, images[0].image_id]


async def test_leases_expire_renew_release_and_skip(lab: Lab) -> None:
    await lab.use_project("short")
    await lab.publish([unrecognized(fake_image(1), 0.5)], project="short")
    await lab.wait_tasks(1, where="project = 'short'")
    alice, bob = await lab.token("annotator", "alice"), await lab.token("annotator", "bob")
    url = "/v1/projects/short/tasks"

    first = (await lab.http.post(f"{url}/next", headers=lab.auth(alice))).json()
    assert first["lease"]["lease_s"] == 1
    assert (await lab.http.post(f"{url}/next", headers=lab.auth(bob))).status_code == 204  # held by alice
    again = (await lab.http.post(f"{url}/next", headers=lab.auth(alice))).json()
    assert again["task_id"] == first["task_id"] and again["resumed"] is True
    renewed = await lab.http.post(f"{url}/{first['task_id']}/renew", headers=lab.auth(alice), json={"lease_id": first["lease"]["lease_id"]})
    assert renewed.status_code == 200 and renewed.json()["expires_at"] > first["lease"]["expires_at"]
    await asyncio.sleep(1.3)
    # expired: the task is back in the queue and goes to bob; alice's late answer is refused
    taken = (await lab.http.post(f"{url}/next", headers=lab.auth(bob))).json()
    assert taken["task_id"] == first["task_id"] and taken["lease"]["lease_id"] != first["lease"]["lease_id"]
    late = await lab.http.post(f"{url}/{first['task_id']}/submit", headers=lab.auth(alice), json={"lease_id": first["lease"]["lease_id"], "boxes": []})
    assert (late.status_code, late.json()["reason"]) == (409, "lease_lost")
    # bob releases it; alice gets it back and skips it; bob gets it; alice never again
    released = await lab.http.post(f"{url}/{taken['task_id']}/release", headers=lab.auth(bob), json={"lease_id": taken["lease"]["lease_id"]})
    assert released.status_code == 204
    mine = (await lab.http.post(f"{url}/next", headers=lab.auth(alice))).json()
    skipped = await lab.http.post(f"{url}/{mine['task_id']}/skip", headers=lab.auth(alice), json={"lease_id": mine["lease"]["lease_id"]})
    assert skipped.status_code == 204
    assert (await lab.http.post(f"{url}/next", headers=lab.auth(alice))).status_code == 204
    bobs = (await lab.http.post(f"{url}/next", headers=lab.auth(bob))).json()
    done = await lab.http.post(f"{url}/{bobs['task_id']}/submit", headers=lab.auth(bob), json={"lease_id": bobs["lease"]["lease_id"], "boxes": []})
    assert done.status_code == 201
    # a retried submit returns the first answer
    retried = await lab.http.post(f"{url}/{bobs['task_id']}/submit", headers=lab.auth(bob), json={"lease_id": bobs["lease"]["lease_id"], "boxes": []})
    assert retried.status_code == 201 and retried.headers["Idempotent-Replayed"] == "true"
    assert retried.json()["submission_id"] == done.json()["submission_id"]
    assert done.json()["duration_s"] >= 0
