"""ingest's HTTP API over real HTTP, served by the composition root (`ServiceHost`), with the
real broker and PostgreSQL behind it: uploads three ways, every refusal's status and reason,
bodies cut off while streaming, idempotent resubmission, and the events on the topics."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hostile_images as hi
import httpx
import pytest
from answers import answers
from hostile_http import HostileServer

from visionloop.app import ServiceHost
from visionloop.services.ingest import store as ingest_store
from visionloop.libs.settings import Settings

CAP = 300_000
PROJECT = "http-demo"


@dataclass
class Ingest:
    """The running ingest: its HTTP client, a hostile source server, the file root."""

    http: httpx.AsyncClient
    sources: HostileServer
    root: Path
    settings: Settings


@pytest.fixture
async def ingest(settings, pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    root = tmp_path / "files"
    root.mkdir()
    for name, value in {
        "PORT": "0", "MAX_BYTES": str(CAP), "ALLOW_PRIVATE_ADDRESSES": "true", "FETCH_DEADLINE_S": "1",
        "FILE_ROOT": str(root), "FORMATS": '["JPEG", "PNG", "GIF", "WEBP"]',
    }.items():
        monkeypatch.setenv(f"VL_INGEST_{name}", value)
    host = ServiceHost(settings, ["ingest"])
    await host.start()
    try:
        async with pool.acquire() as conn:
            _, token = await ingest_store.create_token(conn, settings.schema_for("ingest"), name="tests", projects=[PROJECT, "other"])
        async with HostileServer() as sources, httpx.AsyncClient(base_url=host.endpoints["ingest"], timeout=30,
                                                                 headers={"Authorization": f"Bearer {token}"}) as http:
            yield Ingest(http, sources, root, settings)
    finally:
        await host.stop()


def _multipart(data: bytes, filename: str = "photo.jpg", content_type: str = "image/jpeg", **fields: Any) -> dict[str, Any]:
    return {"files": {"file": (filename, data, content_type)}, "data": {"project": PROJECT, **fields}}


async def test_images_come_in_three_ways_and_their_events_follow(ingest: Ingest) -> None:
    photo, raw, fetched = hi.good(1), hi.good(2), hi.good(3)
    (ingest.root / "on-disk.jpg").write_bytes(hi.good(4))
    multipart = await ingest.http.post("/v1/images", **_multipart(
        photo, submission_id="multipart-1", domain=["site=plant-3", "camera=gate-1"], source_system="scada",
        captured_at="2024-05-01T10:00:00+02:00", upstream_id="u-1", metadata='{"lot": "42"}',
    ))
    assert multipart.status_code == 201, multipart.text
    assert multipart.json() == {
        "submission_id": "multipart-1", "project": PROJECT, "image_id": hashlib.sha256(photo).hexdigest(),
        "width": 320, "height": 240, "format": "JPEG",
        "byte_size": len(photo), "already_stored": False,
    }
    body = await ingest.http.post(
        "/v1/images", content=raw, headers={"Content-Type": "image/jpeg"},
        params={"project": PROJECT, "submission_id": "raw-1", "domain": '{"site": "lab"}', "filename": "r.jpg"},
    )
    assert body.status_code == 201, body.text
    assert body.json()["image_id"] == hashlib.sha256(raw).hexdigest()
    by_uri = await ingest.http.post("/v1/images", json={
        "project": PROJECT, "submission_id": "json-1", "source_uri": ingest.sources.serve("/f.jpg", fetched),
        "domain": {"site": "web"}, "captured_at": "2024-05-01T08:00:00Z",
    })
    assert by_uri.status_code == 201, by_uri.text
    assert by_uri.json()["byte_size"] == len(fetched)
    from_file = await ingest.http.post("/v1/images", json={
        "project": PROJECT, "submission_id": "file-1", "source_uri": (ingest.root / "on-disk.jpg").as_uri(),
    })
    assert from_file.status_code == 201, from_file.text
    generated = await ingest.http.post("/v1/images", **_multipart(hi.good(5)))
    assert generated.status_code == 201 and generated.json()["submission_id"].startswith("http-")

    found = await answers(ingest.settings, ["multipart-1", "raw-1", "json-1", "file-1"])
    [event] = found["multipart-1"]
    assert event["event_type"] == "image.ingested" and event["project"] == PROJECT
    assert event["producer"].startswith("ingest/") and event["causation_id"] is None
    assert event["correlation_id"] == event["payload"]["image"]["image_id"]
    source = event["payload"]["source"]
    assert source["domain"] == {"site": "plant-3", "camera": "gate-1"}
    assert (source["source_system"], source["upstream_id"], source["metadata"]) == ("scada", "u-1", {"lot": "42"})
    assert datetime.fromisoformat(source["captured_at"]) == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert event["payload"]["image"]["image_id"] == multipart.json()["image_id"]
    assert "blob_uri" not in multipart.json() and "file:" not in multipart.text  # no server path (issue 16, item 9)
    assert found["raw-1"][0]["payload"]["source"]["domain"] == {"site": "lab"}
    assert found["json-1"][0]["payload"]["source"]["domain"] == {"site": "web"}
    assert (await ingest.http.get("/healthz")).json() == {"status": "ok", "service": "ingest"}


async def test_every_refusal_has_its_status_and_the_reason_of_its_event(ingest: Ingest) -> None:
    src = ingest.sources
    upload = _multipart
    # (request kwargs, status, reason): each carries its own submission_id, which the event repeats
    def fetch(uri: str) -> dict[str, Any]:
        return {"json": {"project": PROJECT, "source_uri": uri}}

    def raw(data: bytes, content_type: str, **params: str) -> dict[str, Any]:
        return {"content": data, "headers": {"Content-Type": content_type}, "params": params}

    # (request, status, reason): each carries its own submission_id, which the event repeats
    emitted = {
        "html-as-jpeg": (upload(hi.HTML), 415, "not_an_image"),
        "svg-as-jpeg": (upload(hi.SVG), 415, "not_an_image"),
        "zero-bytes": (upload(b""), 415, "not_an_image"),
        "bmp-not-accepted": (raw(hi.bmp(), "application/octet-stream", project=PROJECT), 415, "unsupported_format"),
        "truncated": (upload(hi.truncated_jpeg()), 422, "corrupt"),
        "bomb": (upload(hi.png_bomb(), "b.png", "image/png"), 422, "decompression_bomb"),
        "animated": (upload(hi.animated_gif(frames=50), "a.gif", "image/gif"), 422, "too_many_frames"),
        "traversal": (fetch(f"file://{ingest.root}/../../etc/passwd"), 403, "forbidden_source"),
        "bad-scheme": (fetch("gopher://example.com/"), 403, "forbidden_source"),
        "http-404": (fetch(src.status("/nope.jpg", 404)), 502, "unreachable"),
        "trickle": (fetch(src.trickle("/slow.jpg", hi.good(6)[:64])), 504, "unreachable"),
        "too-big-source": (fetch(src.endless("/big.jpg", hi.good(6)[:64])), 413, "too_large"),
        "html-source": (fetch(src.serve("/p.html", hi.HTML, "text/html")), 415, "not_an_image"),
    }
    # refused before a submission exists: answered here only, no event
    two_files = [("file", ("a.jpg", hi.good(7))), ("file", ("b.jpg", hi.good(8)))]
    request_only = {
        "bad-project": (upload(hi.good(7), project="Not A Slug"), 422, "invalid_submission"),
        "bad-metadata": (upload(hi.good(7), metadata="{oops"), 422, "invalid_submission"),
        "bad-captured-at": (upload(hi.good(7), captured_at="last tuesday"), 422, "invalid_submission"),
        "naive-captured-at": (upload(hi.good(7), captured_at="2024-05-01T10:00:00"), 422, "invalid_submission"),
        "unknown-field": (upload(hi.good(7), colour="red"), 422, "invalid_submission"),
        "no-file": ({"data": {"project": PROJECT, "file": "text"}, "files": {"other": ("x", b"x")}}, 422, "invalid_submission"),
        "two-files": ({"data": {"project": PROJECT}, "files": two_files}, 422, "invalid_submission"),
        "html-body": (raw(hi.HTML, "text/html", project=PROJECT), 415, "not_an_image"),
        "svg-body": (raw(hi.SVG, "image/svg+xml", project=PROJECT), 415, "unsupported_format"),
        "form-urlencoded": (raw(hi.good(7), "application/x-www-form-urlencoded"), 415, "not_an_image"),
        "json-without-source": ({"json": {"project": PROJECT}}, 422, "invalid_submission"),
        "json-not-object": ({"json": ["project", PROJECT]}, 422, "invalid_submission"),
        "json-bad-domain": ({"json": {**fetch("http://x.test/a")["json"], "domain": {"Bad Key": "x"}}}, 422, "invalid_submission"),
        "broken-multipart": (raw(b"--xyz\r\ngarbage", "multipart/form-data; boundary=xyz"), 422, "invalid_submission"),
        "multipart-no-boundary": (raw(b"garbage", "multipart/form-data"), 422, "invalid_submission"),
        "not-json": (raw(b"{nope", "application/json"), 422, "invalid_submission"),
    }

    def with_id(sid: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "json" in kwargs:
            return {**kwargs, "json": {**kwargs["json"], "submission_id": sid}}
        if "data" in kwargs:
            return {**kwargs, "data": {**kwargs["data"], "submission_id": sid}}
        return {**kwargs, "params": {**kwargs["params"], "submission_id": sid}}

    requests = {sid: with_id(sid, kwargs) for sid, (kwargs, _, _) in emitted.items()}
    requests |= {sid: kwargs for sid, (kwargs, _, _) in request_only.items()}  # as they are
    for sid, (_, status, reason) in {**emitted, **request_only}.items():
        response = await ingest.http.post("/v1/images", **requests[sid])
        assert (response.status_code, response.json()["reason"]) == (status, reason), (sid, response.text)
        assert response.json()["message"]
    good = await ingest.http.post("/v1/images", **_multipart(hi.good(9), submission_id="good-after-all"))
    assert good.status_code == 201

    found = await answers(ingest.settings, [*emitted, "good-after-all"])
    for sid, (_, _, reason) in emitted.items():
        [event] = found[sid]
        assert event["event_type"] == "image.rejected" and event["payload"]["reason"] == reason, sid
        assert event["project"] == PROJECT and event["payload"]["stage"] == "ingest"
    assert not set(request_only) & set(found)
    assert found["trickle"][0]["payload"]["details"]["timed_out"] is True


async def test_resubmitting_is_idempotent(ingest: Ingest) -> None:
    photo = hi.good(20)
    first = await ingest.http.post("/v1/images", **_multipart(photo, submission_id="retry-1"))
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = await ingest.http.post("/v1/images", **_multipart(photo, submission_id="retry-1"))
    assert (again.status_code, again.json()) == (201, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    # the same id for other bytes is a conflict; the first answer stands
    other = await ingest.http.post("/v1/images", **_multipart(hi.good(21), submission_id="retry-1"))
    assert (other.status_code, other.json()["reason"]) == (409, "invalid_submission")
    assert other.json()["details"]["ingested_image_id"] == first.json()["image_id"]
    # ... and is still answered the same way afterwards
    assert (await ingest.http.post("/v1/images", **_multipart(photo, submission_id="retry-1"))).json() == first.json()
    # the same bytes under a new id: stored once, said to be stored already (dedup's exact duplicate)
    copy = await ingest.http.post("/v1/images", **_multipart(photo, submission_id="copy-1"))
    assert copy.status_code == 201 and copy.json()["already_stored"] is True
    assert copy.json()["image_id"] == first.json()["image_id"]
    # a rejected id may be tried again with fixed bytes
    broken = await ingest.http.post("/v1/images", **_multipart(hi.truncated_jpeg(22), submission_id="fix-1"))
    assert broken.status_code == 422
    fixed = await ingest.http.post("/v1/images", **_multipart(hi.good(22), submission_id="fix-1"))
    assert fixed.status_code == 201
    # ten clients retrying at once: one decision, one event, ten identical answers
    racing = hi.good(23)
    replies = await asyncio.gather(*(
        ingest.http.post("/v1/images", **_multipart(racing, submission_id="race-1")) for _ in range(10)
    ))
    assert {r.status_code for r in replies} == {201}
    assert len({json.dumps(r.json(), sort_keys=True) for r in replies}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in replies) == 9
    # the same bytes in another project: that project's first copy (nothing says another project has them)
    theirs = await ingest.http.post("/v1/images", **_multipart(photo, submission_id="theirs-1", project="other"))
    assert theirs.status_code == 201 and theirs.json()["already_stored"] is False
    # the same id in another project is another submission
    elsewhere = await ingest.http.post("/v1/images", **_multipart(hi.good(24), submission_id="retry-1", project="other"))
    assert elsewhere.status_code == 201

    found = await answers(ingest.settings, ["retry-1", "copy-1", "fix-1", "race-1"])
    kinds = [(m["project"], m["event_type"], m["payload"].get("reason")) for m in found["retry-1"]]
    assert sorted(kinds) == sorted([
        (PROJECT, "image.ingested", None), (PROJECT, "image.rejected", "invalid_submission"), ("other", "image.ingested", None),
    ])
    fix = sorted(found["fix-1"], key=lambda m: m["occurred_at"])  # two topics: no order across them
    assert [m["event_type"] for m in fix] == ["image.rejected", "image.ingested"]
    assert len(found["race-1"]) == 1
    assert found["copy-1"][0]["payload"]["already_stored"] is True


async def _post_chunked(base: httpx.URL, target: str, content_type: str, preamble: bytes, chunks: int, authorization: str) -> bytes:
    """POST `preamble` then image-like bytes, chunked, never ending; return the server's status line."""
    reader, writer = await asyncio.open_connection(base.host, base.port)
    try:
        writer.write(
            f"POST {target} HTTP/1.1\r\nHost: {base.host}\r\nContent-Type: {content_type}\r\n"
            f"Authorization: {authorization}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        body = bytes(64 * 1024)
        for chunk in [preamble + b"\xff\xd8\xff", *[body] * chunks]:
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        # no terminating chunk: a server that waited for the whole body would never answer
        return await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()


async def test_oversized_bodies_are_refused_while_streaming(ingest: Ingest) -> None:
    declared = await ingest.http.post(
        "/v1/images", content=bytes(CAP + 1), headers={"Content-Type": "image/jpeg"}, params={"project": PROJECT}
    )
    assert (declared.status_code, declared.json()["reason"]) == (413, "too_large")
    assert declared.headers["connection"] == "close"
    over_in_form = await ingest.http.post("/v1/images", **_multipart(b"\xff\xd8\xff" + bytes(CAP)))
    assert (over_in_form.status_code, over_in_form.json()["reason"]) == (413, "too_large")
    # no Content-Length: the count of bytes arriving decides
    base = ingest.http.base_url
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    for target, content_type, preamble in [
        (f"/v1/images?project={PROJECT}", "image/jpeg", b""),
        ("/v1/images", "multipart/form-data; boundary=b", part),
        ("/v1/images", "application/json", b'{"project": "p", "source_uri": "'),
    ]:
        status = await _post_chunked(base, target, content_type, preamble, chunks=12, authorization=ingest.http.headers["Authorization"])
        assert status.startswith(b"HTTP/1.1 413"), (content_type, status)
    # and the service answers the next request as usual
    assert (await ingest.http.post("/v1/images", **_multipart(hi.good(30)))).status_code == 201


async def test_the_openapi_document_describes_the_endpoint(ingest: Ingest) -> None:
    document = (await ingest.http.get("/openapi.json")).json()
    post = document["paths"]["/v1/images"]["post"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/octet-stream", "application/json"}
    assert {"201", "403", "409", "413", "415", "422", "502", "503", "504"} <= set(post["responses"])
    assert "decompression_bomb" in post["description"]


async def test_submitting_needs_a_token_bound_to_the_project(ingest: Ingest, pool) -> None:  # noqa: ANN001
    """Issue 16, item 1: no token, a malformed or unknown one, a revoked one: 401 (the body is not
    parsed); a token of other projects: 403; /healthz stays open."""
    schema = ingest.settings.schema_for("ingest")
    async with pool.acquire() as conn:
        token_id, scada = await ingest_store.create_token(conn, schema, name="scada", projects=["plant-3"])
    photo = hi.good(31)
    url = str(ingest.http.base_url)
    async with httpx.AsyncClient(base_url=url, timeout=30) as bare:
        for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": f"Bearer {scada[:-4]}xxxx"}):
            refused = await bare.post("/v1/images", headers=headers, **_multipart(photo, submission_id="no-token"))
            assert (refused.status_code, refused.json()["reason"]) == (401, "unauthenticated"), headers
        assert (await bare.get("/healthz")).status_code == 200
        wrong = await bare.post("/v1/images", headers={"Authorization": f"Bearer {scada}"}, **_multipart(photo, submission_id="elsewhere"))
        assert (wrong.status_code, wrong.json()["reason"]) == (403, "wrong_project")
        right = await bare.post("/v1/images", headers={"Authorization": f"Bearer {scada}"},
                                **_multipart(photo, submission_id="plant", project="plant-3"))
        assert right.status_code == 201, right.text
        async with pool.acquire() as conn:
            assert await ingest_store.revoke_token(conn, schema, token_id)
            listed = {row["token_id"]: row for row in await ingest_store.list_tokens(conn, schema)}
        assert listed[token_id]["revoked_at"] is not None and "secret_sha256" not in listed[token_id]
        revoked = await bare.post("/v1/images", headers={"Authorization": f"Bearer {scada}"},
                                  **_multipart(photo, submission_id="after-revoke", project="plant-3"))
        assert revoked.status_code == 401


async def test_the_cli_creates_lists_and_revokes_ingest_tokens(ingest: Ingest) -> None:
    """`visionloop ingest token create|list|revoke` against the running ingest's database."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {
        "VL_KAFKA_BOOTSTRAP": ingest.settings.kafka_bootstrap or "", "VL_DATABASE_URL": ingest.settings.database_url or "",
        "VL_SCHEMA_PREFIX": ingest.settings.schema_prefix,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "visionloop.cli", "ingest", "token", *args], capture_output=True,
                              text=True, env=env, timeout=60)

    made = await asyncio.to_thread(cli, "create", "--name", "line-9", "--project", "plant-9")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    token_id = made.stderr.split("ingest token ", 1)[1].split()[0]
    photo = hi.good(41)
    async with httpx.AsyncClient(base_url=str(ingest.http.base_url), timeout=30, headers={"Authorization": f"Bearer {token}"}) as bare:
        accepted = await bare.post("/v1/images", **_multipart(photo, submission_id="from-cli", project="plant-9"))
        assert accepted.status_code == 201, accepted.text
        listed = await asyncio.to_thread(cli, "list")
        assert listed.returncode == 0 and "line-9" in listed.stdout and token not in listed.stdout
        revoked = await asyncio.to_thread(cli, "revoke", token_id)
        assert revoked.returncode == 0 and f"revoked {token_id}" in revoked.stdout, (revoked.stdout, revoked.stderr)
        after = await bare.post("/v1/images", **_multipart(photo, submission_id="after-cli-revoke", project="plant-9"))
        assert after.status_code == 401
