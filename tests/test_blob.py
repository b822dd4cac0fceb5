"""The blob store contract, run against a local folder and against a real S3-compatible server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tracemalloc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from visionloop.libs.blob import (
    BlobCorrupt,
    BlobError,
    BlobStore,
    LocalBlobStore,
    S3BlobStore,
    open_blob_store,
)

CREDENTIALS = {"access_key": "testing", "secret_key": "testing", "region": "us-east-1"}
SHA_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass
class Backend:
    """A store plus a way to reach its storage behind its back."""

    store: BlobStore
    overwrite: Callable[[str, bytes], None]
    stored_names: Callable[[], list[str]]


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket for one test."""
    bucket = f"vl-test-{uuid.uuid4().hex[:12]}"
    _s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


def _s3_client(endpoint: str):
    boto3 = pytest.importorskip("boto3", reason="S3 tests need boto3 (s3 extra)")
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["access_key"],
        aws_secret_access_key=CREDENTIALS["secret_key"],
        region_name=CREDENTIALS["region"],
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each contract test runs once per implementation."""
    if request.param == "local":
        local = LocalBlobStore(tmp_path / "blobs")
        return Backend(
            store=local,
            overwrite=lambda sha, data: local.path_for(sha).write_bytes(data),
            stored_names=lambda: sorted(
                p.name for p in local.root.rglob("*") if p.is_file() and SHA_NAME.fullmatch(p.name)
            ),
        )
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    s3 = S3BlobStore(bucket, "blobs", endpoint_url=endpoint, **CREDENTIALS)
    client = _s3_client(endpoint)

    def stored_names() -> list[str]:
        listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return sorted(obj["Key"].rsplit("/", 1)[-1] for obj in listing)

    return Backend(
        store=s3,
        overwrite=lambda sha, data: client.put_object(
            Bucket=bucket, Key=s3.key_for(sha), Body=data
        ),
        stored_names=stored_names,
    )


async def test_put_get_round_trip(backend: Backend) -> None:
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(1000)
    ref = await backend.store.put(data, content_type="image/png")

    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert ref.size == len(data)
    assert ref.created
    assert ref.uri == backend.store.uri_for(ref.sha256)
    assert backend.store.owns(ref.uri)
    assert await backend.store.get(ref.uri) == data
    assert await backend.store.get(ref.sha256) == data
    assert await backend.store.exists(ref.sha256)
    stat = await backend.store.stat(ref.uri)
    assert (stat.size, stat.sha256, stat.uri) == (len(data), ref.sha256, ref.uri)


async def test_uri_layout_fans_out_by_two_byte_pairs(backend: Backend) -> None:
    ref = await backend.store.put(b"fan-out")
    sha = ref.sha256
    assert ref.uri.endswith(f"/{sha[0:2]}/{sha[2:4]}/{sha}")
    if isinstance(backend.store, LocalBlobStore):
        assert ref.uri == (backend.store.root / sha[0:2] / sha[2:4] / sha).as_uri()
    else:
        assert ref.uri == f"s3://{backend.store.bucket}/blobs/{sha[0:2]}/{sha[2:4]}/{sha}"


async def test_second_put_of_same_bytes_is_a_no_op(backend: Backend) -> None:
    first = await backend.store.put(b"same bytes")
    second = await backend.store.put(b"same bytes")

    assert first.created and not second.created
    assert (second.sha256, second.uri, second.size) == (first.sha256, first.uri, first.size)
    assert backend.stored_names() == [first.sha256]


async def test_bytes_changed_behind_the_store_are_detected(backend: Backend) -> None:
    data = b"original content"
    ref = await backend.store.put(data)
    backend.overwrite(ref.sha256, b"tampered content")

    with pytest.raises(BlobCorrupt) as caught:
        await backend.store.get(ref.uri)
    assert caught.value.reason == "blob_corrupt"
    assert caught.value.actual == hashlib.sha256(b"tampered content").hexdigest()


async def test_verification_can_be_turned_off(backend: Backend) -> None:
    ref = await backend.store.put(b"original content")
    backend.overwrite(ref.sha256, b"tampered content")
    backend.store.verify = False

    assert await backend.store.get(ref.sha256) == b"tampered content"


async def test_put_rewrites_a_truncated_copy(backend: Backend) -> None:
    data = b"a complete image"
    ref = await backend.store.put(data)
    backend.overwrite(ref.sha256, data[:5])

    again = await backend.store.put(data)

    assert again.created
    assert await backend.store.get(ref.sha256) == data


async def test_missing_blob_has_its_reason(backend: Backend) -> None:
    sha = hashlib.sha256(b"never stored").hexdigest()

    assert not await backend.store.exists(sha)
    for read in (
        backend.store.get(sha),
        backend.store.stat(sha),
        backend.store.open_range(sha, 0, 10),
        backend.store.open_range(sha, 0, 0),
    ):
        with pytest.raises(BlobError) as caught:
            await read
        assert caught.value.reason == "blob_missing"


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "ab/cd/../../../../etc/passwd",
        "A" * 64,
        "0" * 63,
        "0" * 64 + "/",
        "",
    ],
)
async def test_keys_that_are_not_a_sha256_are_refused(backend: Backend, key: str) -> None:
    for call in (
        backend.store.get(key),
        backend.store.exists(key),
        backend.store.stat(key),
        backend.store.delete(key),
        backend.store.open_range(key, 0, 1),
    ):
        with pytest.raises(BlobError) as caught:
            await call
        assert caught.value.reason == "blob_invalid_key"


async def test_uris_of_other_stores_are_refused(backend: Backend) -> None:
    ref = await backend.store.put(b"mine")
    sha = ref.sha256
    foreign = [
        f"s3://someone-else/blobs/{sha[0:2]}/{sha[2:4]}/{sha}",
        f"file:///etc/{sha}",
        ref.uri.replace(f"/{sha[0:2]}/{sha[2:4]}/", "/../../../etc/"),
        ref.uri + "/../../../../../etc/passwd",
    ]
    for uri in foreign:
        assert not backend.store.owns(uri)
        with pytest.raises(BlobError) as caught:
            await backend.store.get(uri)
        assert caught.value.reason == "blob_uri_foreign"


async def test_range_reads_behave_like_slices(backend: Backend) -> None:
    data = bytes(range(256)) * 4
    ref = await backend.store.put(data)

    for start, end in [(0, 1), (10, 20), (0, len(data)), (1000, 2000), (len(data), 5000), (5, 5)]:
        assert await backend.store.open_range(ref.uri, start, end) == data[start:end]
    with pytest.raises(ValueError):
        await backend.store.open_range(ref.sha256, 10, 5)


async def test_concurrent_puts_of_the_same_bytes_store_one_blob(backend: Backend) -> None:
    data = os.urandom(256 * 1024)

    refs = await asyncio.gather(*(backend.store.put(data) for _ in range(20)))

    assert {(r.sha256, r.uri, r.size) for r in refs} == {
        (hashlib.sha256(data).hexdigest(), refs[0].uri, len(data))
    }
    assert any(r.created for r in refs)
    assert backend.stored_names() == [refs[0].sha256]
    assert await backend.store.get(refs[0].sha256) == data


async def test_put_file_streams_a_large_file(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024)
    source = tmp_path / "big.bin"
    source.write_bytes(data)

    ref = await backend.store.put_file(source, content_type="application/octet-stream")
    again = await backend.store.put_file(source)

    assert ref.created and not again.created
    assert ref.sha256 == again.sha256 == hashlib.sha256(data).hexdigest()
    assert ref.size == len(data)
    assert (await backend.store.stat(ref.sha256)).size == len(data)
    assert await backend.store.get(ref.uri) == data
    assert backend.stored_names() == [ref.sha256]


async def test_delete_is_idempotent(backend: Backend) -> None:
    ref = await backend.store.put(b"short-lived")

    await backend.store.delete(ref.uri)
    await backend.store.delete(ref.sha256)

    assert not await backend.store.exists(ref.sha256)
    assert backend.stored_names() == []


async def test_local_put_file_does_not_hold_the_file_in_memory(tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024))
    store = LocalBlobStore(tmp_path / "blobs")

    tracemalloc.start()
    try:
        await store.put_file(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 3 * 1024 * 1024


async def test_local_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    source = tmp_path / "a.bin"
    source.write_bytes(b"from a file")

    await asyncio.gather(*(store.put(b"same") for _ in range(10)))
    await store.put_file(source)
    await store.put_file(source)

    leftovers = [p for p in store.root.rglob("*") if p.is_file() and not SHA_NAME.fullmatch(p.name)]
    assert leftovers == []


def test_open_blob_store_reads_local_urls(tmp_path: Path) -> None:
    by_uri = open_blob_store((tmp_path / "with space").as_uri())
    by_path = open_blob_store(str(tmp_path / "plain"), verify=False)

    assert isinstance(by_uri, LocalBlobStore) and by_uri.root == tmp_path / "with space"
    assert isinstance(by_path, LocalBlobStore) and by_path.root == tmp_path / "plain"
    assert by_uri.verify and not by_path.verify


def test_open_blob_store_reads_s3_urls() -> None:
    pytest.importorskip("boto3", reason="S3 stores need boto3 (s3 extra)")
    store = open_blob_store(
        "s3://visionloop-blobs/blobs/v1?endpoint=http://minio:9000&region=eu-west-1",
        access_key="k",
        secret_key="s",
    )

    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == ("visionloop-blobs", "blobs/v1")
    assert (store.endpoint_url, store.region) == ("http://minio:9000", "eu-west-1")
    assert store.uri_for("0" * 64) == f"s3://visionloop-blobs/blobs/v1/00/00/{'0' * 64}"

    bare = open_blob_store("s3://bucket", region="us-east-1", endpoint_url="http://x:9000")
    assert (bare.bucket, bare.prefix, bare.endpoint_url) == ("bucket", "", "http://x:9000")
    assert bare.uri_for("0" * 64) == f"s3://bucket/00/00/{'0' * 64}"


async def test_open_blob_store_s3_round_trip(s3_endpoint: str, s3_bucket: str) -> None:
    store = open_blob_store(f"s3://{s3_bucket}/p?endpoint={s3_endpoint}", **CREDENTIALS)

    ref = await store.put(b"through the url")

    assert ref.uri.startswith(f"s3://{s3_bucket}/p/")
    assert await store.get(ref.uri) == b"through the url"


@pytest.mark.parametrize(
    "url",
    ["", "http://example.com/blobs", "s3://", "s3://bucket?colour=red", "file://host/x", "file://"],
)
def test_open_blob_store_refuses_other_urls(url: str) -> None:
    with pytest.raises(BlobError) as caught:
        open_blob_store(url)
    assert caught.value.reason == "blob_url_invalid"


async def test_s3_errors_carry_a_reason(s3_endpoint: str) -> None:
    store = S3BlobStore("no-such-bucket", endpoint_url=s3_endpoint, **CREDENTIALS)

    with pytest.raises(BlobError) as caught:
        await store.put(b"nowhere to go")
    assert caught.value.reason == "blob_store_error"
