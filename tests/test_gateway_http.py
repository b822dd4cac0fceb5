"""The gateway's HTTP surface: every endpoint of its OpenAPI document refuses a missing token, a
token of another project and a role too low; hostile submissions get a clear 4xx with a reason
code; images are served only to the project's labellers (or by signed URL), never as blob paths.
The gateway and the verifier run on the in-memory bus (tests/labelling.py `fake_lab`)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
import pytest
from helpers import eventually
from labelling import (
    Lab,
    fake_image,
    fake_lab,
    recognized,
    stored_image,
    unrecognized,
)

from visionloop.contracts import Detection
from visionloop.services.labeling_gateway.auth import Role

ENV = {"VL_VERIFIER_PROJECTS": '{"review": {"auto_accept": false}}'}
LS_PROJECT = "41.1700000000"


@pytest.fixture(scope="module")
async def lab(database_url: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    async with fake_lab(database_url, tmp_path_factory.mktemp("http"), env=ENV) as running:
        await running.use_project("guarded")
        yield running


def _bodies(project: str) -> dict[tuple[str, str], Any]:
    """A well-formed body for each endpoint that reads one, so only the credentials are wrong."""
    lease = {"lease_id": "00000000-0000-0000-0000-000000000000"}
    return {
        ("post", "/v1/projects"): {"project": project, "classes": ["car"]},
        ("post", "/v1/projects/{project}/classes"): {"classes": ["truck"]},
        ("post", "/v1/projects/{project}/tokens"): {"role": "annotator", "user_id": "x"},
        ("post", "/v1/projects/{project}/tasks/{task_id}/renew"): lease,
        ("post", "/v1/projects/{project}/tasks/{task_id}/release"): lease,
        ("post", "/v1/projects/{project}/tasks/{task_id}/skip"): lease,
        ("post", "/v1/projects/{project}/tasks/{task_id}/submit"): {**lease, "boxes": []},
        ("post", "/v1/projects/{project}/import"): {"images": [], "annotations": [], "categories": []},
        ("post", "/setup"): {"project": LS_PROJECT, "schema": "<View/>", "hostname": "http://127.0.0.1:1", "access_token": "x"},
        ("post", "/predict"): {"project": LS_PROJECT, "tasks": [{"id": 1, "data": {"image": "/nothing.png"}}]},
        ("post", "/webhook"): {"action": "START_TRAINING", "project": {"id": 41}},
    }


def _url(path: str, project: str) -> str:
    params = {"project": project, "task_id": "t-none", "image_id": "0" * 64, "token_id": "000000000000"}
    url = re.sub(r"\{(\w+)\}", lambda m: params[m.group(1)], path)
    return url + ("?format=coco" if path.endswith(("/import", "/export")) else "")


async def test_every_endpoint_checks_token_project_and_role(lab: Lab) -> None:
    project = "guarded"
    doc = (await lab.http.get("/openapi.json")).json()
    # Label Studio's project is bound to `guarded` (by its first call), so another project's token is refused.
    setup = await lab.http.post("/setup", auth=("labelstudio", lab.tokens["reviewer"]), json=_bodies(project)[("post", "/setup")])
    assert setup.status_code == 200, setup.text
    other = await lab.token("admin", "intruder", project=None)
    await lab.http.post("/v1/projects", headers=lab.auth(other), json={"project": "elsewhere", "classes": ["car"]})
    elsewhere = {role: await lab.token(role.label, f"elsewhere-{role.label}", project="elsewhere") for role in Role}
    below = {Role.REVIEWER: lab.tokens["annotator"], Role.ADMIN: lab.tokens["reviewer"]}
    bodies = _bodies(project)
    public = set()
    checked = 0
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            need = operation["x-required-role"]
            if need == "none":
                public.add(path)
                continue
            role = Role.parse(need)
            body = bodies.get((method, path))
            url = _url(path, project)

            async def call(headers: dict[str, str], *, method: str = method, url: str = url, body: Any = body) -> httpx.Response:
                return await lab.http.request(method.upper(), url, headers=headers, json=body)

            missing = await call({})
            assert (missing.status_code, missing.json()["reason"]) == (401, "unauthenticated"), (method, path, missing.text)
            garbage = await call({"Authorization": "Bearer vl_000000000000_forged"})
            assert garbage.status_code == 401, (method, path)
            if "{project}" in path or path in ("/setup", "/predict", "/webhook", "/v1/projects") and method == "post":
                foreign = await call(lab.auth(elsewhere[role]))
                assert (foreign.status_code, foreign.json()["reason"]) == (403, "wrong_project"), (method, path, foreign.text)
            if role in below:
                low = await call(lab.auth(below[role]))
                assert (low.status_code, low.json()["reason"]) == (403, "insufficient_role"), (method, path, low.text)
            checked += 1
    assert public == {"/health", "/healthz"}
    assert checked >= 20
    # Basic auth (Label Studio's ML connection) with a wrong password is refused like a missing token.
    wrong = await lab.http.post("/predict", auth=("labelstudio", "nope"), json=bodies[("post", "/predict")])
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")


async def test_tokens_are_hashed_listed_without_secrets_and_revocable(lab: Lab) -> None:
    made = await lab.http.post("/v1/projects/guarded/tokens", headers=lab.auth("admin"), json={"role": "annotator", "user_id": "carol"})
    assert made.status_code == 201
    token = made.json()["token"]
    stored = await lab.pool.fetchrow(f"SELECT * FROM {lab.schema}.tokens WHERE token_id = $1", made.json()["token_id"])
    assert token.encode() not in bytes(stored["secret_sha256"]) and len(stored["secret_sha256"]) == 32
    listed = (await lab.http.get("/v1/projects/guarded/tokens", headers=lab.auth("admin"))).json()["tokens"]
    assert token not in json.dumps(listed) and any(t["user_id"] == "carol" for t in listed)
    assert (await lab.http.get("/v1/projects/guarded", headers=lab.auth(token))).status_code == 200
    revoked = await lab.http.delete(f"/v1/projects/guarded/tokens/{made.json()['token_id']}", headers=lab.auth("admin"))
    assert revoked.status_code == 204
    assert (await lab.http.get("/v1/projects/guarded", headers=lab.auth(token))).status_code == 401
    # the taxonomy: append only, order kept, duplicates ignored
    added = await lab.http.post("/v1/projects/guarded/classes", headers=lab.auth("admin"), json={"classes": ["truck", "car", "bus"]})
    assert added.json()["classes"] == ["car", "person", "bicycle", "truck", "bus"]


async def _lease(lab: Lab, project: str, token: str) -> dict[str, Any]:
    got = await lab.http.post(f"/v1/projects/{project}/tasks/next", headers=lab.auth(token))
    assert got.status_code == 200, got.text
    return got.json()


async def test_hostile_submissions_are_refused_with_reason_codes(lab: Lab) -> None:
    await lab.use_project("hostile")
    await lab.publish([unrecognized(fake_image(1, 640, 480), 0.5)], project="hostile")
    await lab.wait_tasks(1, where="project = 'hostile'")
    task = await _lease(lab, "hostile", lab.tokens["annotator"])
    url = f"/v1/projects/hostile/tasks/{task['task_id']}/submit"
    lease = task["lease"]["lease_id"]
    headers = lab.auth("annotator")

    def box(**kw: Any) -> dict[str, Any]:
        return {"class_name": "car", "x1": 10, "y1": 10, "x2": 50, "y2": 50, **kw}

    cases: dict[str, tuple[dict[str, Any], int, str]] = {
        "outside the image": ({"json": {"lease_id": lease, "boxes": [box(x2=900)]}}, 422, "out_of_bounds"),
        "far left": ({"json": {"lease_id": lease, "boxes": [box(x1=-50)]}}, 422, "out_of_bounds"),
        "negative size": ({"json": {"lease_id": lease, "boxes": [box(x1=60, x2=20)]}}, 422, "degenerate_box"),
        "zero area": ({"json": {"lease_id": lease, "boxes": [box(x2=10)]}}, 422, "degenerate_box"),
        "NaN": ({"content": json.dumps({"lease_id": lease, "boxes": [box(x1=float("nan"))]}), "headers": {"Content-Type": "application/json"}}, 422, "degenerate_box"),
        "Infinity": ({"content": json.dumps({"lease_id": lease, "boxes": [box(x2=float("inf"))]}), "headers": {"Content-Type": "application/json"}}, 422, "degenerate_box"),
        "negative percent size": ({"json": {"lease_id": lease, "units": "percent", "boxes": [{"class_name": "car", "x": 10, "y": 10, "width": -5, "height": 5}]}}, 422, "degenerate_box"),
        "percent outside": ({"json": {"lease_id": lease, "units": "percent", "boxes": [{"class_name": "car", "x": 90, "y": 10, "width": 50, "height": 5}]}}, 422, "out_of_bounds"),
        "unknown class": ({"json": {"lease_id": lease, "boxes": [box(class_name="unicorn")]}}, 422, "unknown_class"),
        "10,000 boxes": ({"json": {"lease_id": lease, "boxes": [box()] * 10_000}}, 422, "too_many_boxes"),
        "mixed units": ({"json": {"lease_id": lease, "boxes": [{"class_name": "car", "x1": 1, "y1": 1, "x2": 5, "y2": 5, "width": 3}]}}, 422, "invalid_submission"),
        "string coordinates": ({"json": {"lease_id": lease, "boxes": [box(x1="ten")]}}, 422, "invalid_submission"),
        "extra field": ({"json": {"lease_id": lease, "boxes": [], "admin": True}}, 422, "invalid_submission"),
        "no boxes": ({"json": {"lease_id": lease}}, 422, "invalid_submission"),
        "decision on annotate": ({"json": {"lease_id": lease, "boxes": [], "decision": "accept"}}, 422, "invalid_submission"),
        "not JSON": ({"content": b"{boxes: [", "headers": {"Content-Type": "application/json"}}, 422, "invalid_json"),
        "a JSON list": ({"json": [1, 2, 3]}, 422, "invalid_submission"),
        "oversized body": ({"content": b'{"lease_id": "' + b"x" * (2 * 1024 * 1024) + b'"}', "headers": {"Content-Type": "application/json"}}, 413, "body_too_large"),
        "text/plain": ({"content": json.dumps({"lease_id": lease, "boxes": []}), "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        "form": ({"data": {"lease_id": lease}}, 415, "unsupported_media_type"),
        "no content type": ({"content": b"{}"}, 415, "unsupported_media_type"),
        "someone else's lease": ({"json": {"lease_id": "00000000-0000-0000-0000-000000000001", "boxes": []}}, 409, "lease_lost"),
    }
    for name, (kwargs, status, reason) in cases.items():
        answer = await lab.http.post(url, headers={**headers, **kwargs.pop("headers", {})}, **kwargs)
        assert (answer.status_code, answer.json()["reason"]) == (status, reason), (name, answer.text[:500])
        assert answer.json()["message"], name
    outside = await lab.http.post(url, headers=headers, json={"lease_id": lease, "boxes": [box(), box(x2=900), box(class_name="unicorn")]})
    issues = outside.json()["details"]["issues"]
    assert [(i["index"], i["reason"]) for i in issues] == [(1, "out_of_bounds"), (2, "unknown_class")]
    # Chunked body with no Content-Length, never ending: cut off while streaming.
    assert b" 413 " in await _post_chunked(lab, url, headers["Authorization"])
    # The lease survived every refusal; a box just over the border (within tolerance) is clipped.
    good = await lab.http.post(url, headers=headers, json={"lease_id": lease, "boxes": [box(x2=641.5, y2=481)]})
    assert good.status_code == 201, good.text
    [event] = [m for m in await lab.wait_events("label.submitted", 1) if m["payload"]["submission_id"] == good.json()["submission_id"]]
    assert event["payload"]["boxes"][0]["x2"] == 640 and event["payload"]["boxes"][0]["y2"] == 480
    assert event["payload"]["actions"]["boxes_drawn"] == 1


async def _post_chunked(lab: Lab, target: str, authorization: str) -> bytes:
    """POST a chunked JSON body that never ends; return the server's status line."""
    base = httpx.URL(lab.base_url)
    reader, writer = await asyncio.open_connection(base.host, base.port)
    try:
        writer.write(
            f"POST {target} HTTP/1.1\r\nHost: {base.host}\r\nAuthorization: {authorization}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        for chunk in [b'{"lease_id": "', *[b"x" * 65536] * 40]:
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        return await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()


async def test_review_decisions_and_percent_boxes(lab: Lab) -> None:
    await lab.use_project("review")
    prelabels = [Detection(x1=100, y1=100, x2=200, y2=200, class_name="car", score=0.8),
                 Detection(x1=300, y1=100, x2=400, y2=300, class_name="person", score=0.7)]
    images = [fake_image(n, 1000, 500) for n in range(3)]
    await lab.publish([recognized(image, prelabels) for image in images], project="review")
    await lab.wait_tasks(3, where="project = 'review' AND state = 'queued'")
    annotator = await lab.http.post("/v1/projects/review/tasks/next", headers=lab.auth("annotator"))
    assert annotator.status_code == 204  # review tasks need a reviewer
    task = await _lease(lab, "review", lab.tokens["reviewer"])
    assert task["kind"] == "review" and task["decision_required"] and len(task["start_boxes"]) == 2
    url = f"/v1/projects/review/tasks/{task['task_id']}/submit"
    lease = task["lease"]["lease_id"]
    missing = await lab.http.post(url, headers=lab.auth("reviewer"), json={"lease_id": lease, "boxes": []})
    assert missing.json()["reason"] == "missing_decision"
    # correct in percent: keep the car (moved a little), relabel the person, draw one more
    answer = await lab.http.post(url, headers=lab.auth("reviewer"), json={
        "lease_id": lease, "decision": "correct", "units": "percent",
        "boxes": [
            {"class_name": "car", "x": 10, "y": 20, "width": 10, "height": 20},
            {"class_name": "bicycle", "x": 30.5, "y": 20, "width": 10, "height": 40},
            {"class_name": "car", "x": 70, "y": 70, "width": 5, "height": 10},
        ],
    })
    assert answer.status_code == 201, answer.text
    assert answer.json()["actions"] == {"boxes_drawn": 1, "boxes_moved": 1, "boxes_relabelled": 1, "boxes_deleted": 0, "prelabels_accepted": 1}
    accepted = await _lease(lab, "review", lab.tokens["reviewer"])
    ok = await lab.http.post(f"/v1/projects/review/tasks/{accepted['task_id']}/submit", headers=lab.auth("reviewer"),
                             json={"lease_id": accepted["lease"]["lease_id"], "decision": "accept"})
    assert ok.json()["actions"]["prelabels_accepted"] == 2 and ok.json()["boxes"] == 2
    rejected = await _lease(lab, "review", lab.tokens["reviewer"])
    no = await lab.http.post(f"/v1/projects/review/tasks/{rejected['task_id']}/submit", headers=lab.auth("reviewer"),
                             json={"lease_id": rejected["lease"]["lease_id"], "decision": "reject"})
    assert no.json()["actions"]["boxes_deleted"] == 2
    def verdict(event_type: str, submission_id: str) -> list[dict[str, Any]]:
        """The verifier's verdict on one submission (other verdicts of the module arrive too)."""
        return [m["payload"] for m in lab.messages(event_type)
                if submission_id in m["payload"].get("provenance", {}).get("submission_ids", [m["payload"].get("submission_id")])]

    [corrected] = await eventually(lambda: verdict("label.verified", answer.json()["submission_id"]))
    assert [round(b["x1"]) for b in corrected["boxes"]] == [100, 305, 700]
    assert corrected["provenance"]["method"] == "human" and corrected["provenance"]["prelabel_model"]["version"] == 3
    assert corrected["provenance"]["labellers"] == [{"user_id": "reviewer-review", "role": "reviewer"}]
    [refused] = await eventually(lambda: verdict("label.rejected", no.json()["submission_id"]))
    assert refused["reason"] == "reviewer_rejected"
    # ... and comes back as a re-annotate task that starts from nothing
    await lab.wait_tasks(1, where="project = 'review' AND kind = 'reannotate'")
    again = await _lease(lab, "review", lab.tokens["annotator"])
    assert again["kind"] == "reannotate" and again["start_boxes"] == [] and again["issues"][0]["reason"] == "reviewer_rejected"


async def test_images_are_served_to_the_project_only(lab: Lab) -> None:
    await lab.use_project("pictures")
    image, data = await stored_image(lab.blobs, seed=5)
    await lab.publish([unrecognized(image, 0.4)], project="pictures")
    await lab.wait_tasks(1, where="project = 'pictures'")
    task = await _lease(lab, "pictures", lab.tokens["annotator"])
    assert "blob" not in json.dumps(task) and "file://" not in json.dumps(task)
    got = await lab.http.get(task["image"]["url"], headers=lab.auth("annotator"))
    assert got.status_code == 200 and got.content == data and got.headers["content-type"] == "image/png"
    assert (await lab.http.get(task["image"]["url"], headers={**lab.auth("annotator"), "If-None-Match": got.headers["etag"]})).status_code == 304
    assert (await lab.http.get(task["image"]["url"])).status_code == 401
    foreign = await lab.token("annotator", "x", project="guarded")
    assert (await lab.http.get(task["image"]["url"], headers=lab.auth(foreign))).json()["reason"] == "wrong_project"
    unknown = await lab.http.get(f"/v1/projects/pictures/images/{'1' * 64}", headers=lab.auth("annotator"))
    assert (unknown.status_code, unknown.json()["reason"]) == (404, "unknown_image")
    forged = await lab.http.get(task["image"]["url"], params={"expires": int(time.time()) + 60, "signature": "0" * 32})
    assert (forged.status_code, forged.json()["reason"]) == (403, "bad_signature")


async def test_cli_creates_projects_and_tokens(lab: Lab) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {
        "VL_KAFKA_BOOTSTRAP": lab.settings.kafka_bootstrap or "", "VL_DATABASE_URL": lab.settings.database_url or "",
        "VL_SCHEMA_PREFIX": lab.settings.schema_prefix,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "visionloop.cli", "gateway", *args], capture_output=True, text=True, env=env, timeout=60)

    made = await asyncio.to_thread(cli, "project", "create", "from-cli", "--classes", "car,truck", "--floor", "0.05")
    assert made.returncode == 0 and "car, truck" in made.stdout, made.stderr
    assert "needs mAP50-95 >= 0.050" in made.stderr and "set now (--floor)" in made.stderr
    issued = await asyncio.to_thread(cli, "token", "create", "--project", "from-cli", "--role", "reviewer", "--user", "dana")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip().splitlines()[-1]
    seen = await lab.http.get("/v1/projects/from-cli", headers=lab.auth(token))
    assert seen.status_code == 200 and seen.json()["classes"] == ["car", "truck"]
    refused = await asyncio.to_thread(cli, "token", "create", "--project", "nowhere", "--role", "annotator")
    assert refused.returncode == 2 and "does not exist" in refused.stderr
    everyone = await asyncio.to_thread(cli, "token", "create", "--role", "annotator")
    assert everyone.returncode == 2 and "only admin tokens" in everyone.stderr
