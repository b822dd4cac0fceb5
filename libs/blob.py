"""Content-addressed blob store: bytes are stored once, under the SHA-256 of their content.

Events carry a blob URI and the content SHA-256; the bytes themselves live here. Two backends
share one interface: a local directory (the embedded default) and an S3-compatible bucket (for
scale). Every method that names a blob accepts either its SHA-256 (64 lowercase hex characters)
or a URI this store handed out, and every storage failure a user can meet is a `BlobError`
carrying a `reason` code and a sentence that says what to do.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "BlobCorrupt",
    "BlobError",
    "BlobInvalidKey",
    "BlobMissing",
    "BlobRef",
    "BlobStat",
    "BlobStore",
    "BlobUriForeign",
    "LocalBlobStore",
    "S3BlobStore",
    "open_blob_store",
]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


class BlobError(Exception):
    """A blob store failure: `reason` is a stable code, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BlobMissing(BlobError):
    """No blob is stored under the requested SHA-256."""

    def __init__(self, sha256: str, location: str) -> None:
        super().__init__(
            "blob_missing",
            f"Blob {sha256} is not in {location}. Check that whoever published its event stored "
            "the bytes in this same blob store (VL_BLOB_URL) first, and that nobody deleted them.",
        )
        self.sha256 = sha256


class BlobCorrupt(BlobError):
    """The stored bytes no longer hash to the key they are stored under."""

    def __init__(self, sha256: str, uri: str, actual: str) -> None:
        super().__init__(
            "blob_corrupt",
            f"Blob {uri} failed its integrity check: its bytes hash to {actual}, not {sha256}. "
            "Delete it and put the original bytes again; if this recurs, check the storage.",
        )
        self.sha256 = sha256
        self.actual = actual


class BlobUriForeign(BlobError):
    """A URI that this store did not hand out (another store, another scheme, a stray path)."""

    def __init__(self, uri: str, location: str) -> None:
        super().__init__(
            "blob_uri_foreign",
            f"{uri!r} is not a blob URI of the store at {location}. Open the blob store that "
            "owns it (VL_BLOB_URL), or pass the blob's SHA-256 instead.",
        )
        self.uri = uri


class BlobInvalidKey(BlobError):
    """A key that is not a SHA-256 hex digest, refused before it can name a path."""

    def __init__(self, key: str) -> None:
        super().__init__(
            "blob_invalid_key",
            f"{key!r} is not a blob key. Pass the blob's SHA-256 as 64 lowercase hex characters, "
            "or the URI the store returned from put.",
        )
        self.key = key


@dataclass(frozen=True, slots=True)
class BlobRef:
    """What `put` returns: where the bytes live and whether this call stored them."""

    sha256: str
    """SHA-256 of the content, 64 lowercase hex characters; the blob's key."""
    uri: str
    """Where the blob lives (`file://...` or `s3://...`); what events carry."""
    size: int
    """Length of the content in bytes."""
    created: bool
    """True when this call wrote the bytes, False when they were already stored.

    Concurrent first writers of the same bytes may each see True; the stored blob is one.
    """


@dataclass(frozen=True, slots=True)
class BlobStat:
    """What `stat` returns about a stored blob, without reading its bytes."""

    size: int
    """Length of the content in bytes."""
    sha256: str
    """SHA-256 of the content; the blob's key."""
    uri: str
    """Where the blob lives."""


def _check_sha(key: str) -> str:
    if not isinstance(key, str) or not _SHA256_HEX.fullmatch(key):
        raise BlobInvalidKey(str(key))
    return key


def _check_range(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"byte range [{start}, {end}) is not a range: need 0 <= start <= end")


class BlobStore(abc.ABC):
    """A content-addressed blob store; every method that touches storage is async.

    Subclasses implement storage; this base resolves keys and URIs and checks integrity.
    """

    def __init__(self, *, verify: bool = True) -> None:
        """`verify` recomputes the SHA-256 of every `get`; turn it off only for trusted storage."""
        self.verify = verify

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where this store keeps its blobs, in words a reader of an error message can act on."""

    @abc.abstractmethod
    def uri_for(self, sha256: str) -> str:
        """The URI a blob with this SHA-256 has (or would have) in this store."""

    def owns(self, uri: str) -> bool:
        """Whether `uri` is a blob URI of this store."""
        sha256 = uri.rsplit("/", 1)[-1]
        return bool(_SHA256_HEX.fullmatch(sha256)) and self.uri_for(sha256) == uri

    def resolve(self, uri_or_sha: str) -> str:
        """The SHA-256 named by a key or by one of this store's URIs; refuses anything else."""
        if isinstance(uri_or_sha, str) and "://" in uri_or_sha:
            if not self.owns(uri_or_sha):
                raise BlobUriForeign(uri_or_sha, self.location)
            return uri_or_sha.rsplit("/", 1)[-1]
        return _check_sha(uri_or_sha)

    async def put(self, data: bytes, *, content_type: str | None = None) -> BlobRef:
        """Store `data` under its SHA-256; storing bytes that are already there is a no-op.

        A stored blob whose size is wrong (a torn or truncated copy) is written again.
        """
        data = bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        created = await asyncio.to_thread(self._store_bytes, sha256, data, content_type)
        return BlobRef(sha256, self.uri_for(sha256), len(data), created)

    async def put_file(
        self, path: str | os.PathLike[str], *, content_type: str | None = None
    ) -> BlobRef:
        """Store the file at `path` under its SHA-256, streaming it in chunks."""
        sha256, size, created = await asyncio.to_thread(self._store_file, Path(path), content_type)
        return BlobRef(sha256, self.uri_for(sha256), size, created)

    async def get(self, uri_or_sha: str) -> bytes:
        """The blob's bytes; raises `BlobCorrupt` if they do not hash to their key (verify on)."""
        sha256 = self.resolve(uri_or_sha)
        return await asyncio.to_thread(self._load_verified, sha256)

    async def open_range(self, uri_or_sha: str, start: int, end: int) -> bytes:
        """Bytes `start` up to, not including, `end`, clamped to the blob's size like a slice.

        A part of a blob cannot be checked against its SHA-256, so ranges are not verified.
        """
        sha256 = self.resolve(uri_or_sha)
        _check_range(start, end)
        return await asyncio.to_thread(self._load_range, sha256, start, end)

    async def exists(self, uri_or_sha: str) -> bool:
        """Whether the blob is stored."""
        sha256 = self.resolve(uri_or_sha)
        return await asyncio.to_thread(self._stored_size, sha256) is not None

    async def stat(self, uri_or_sha: str) -> BlobStat:
        """Size and URI of a stored blob; raises `BlobMissing` if it is not stored."""
        sha256 = self.resolve(uri_or_sha)
        size = await asyncio.to_thread(self._stored_size, sha256)
        if size is None:
            raise BlobMissing(sha256, self.location)
        return BlobStat(size, sha256, self.uri_for(sha256))

    async def delete(self, uri_or_sha: str) -> None:
        """Remove the blob; deleting one that is not stored is not an error."""
        sha256 = self.resolve(uri_or_sha)
        await asyncio.to_thread(self._remove, sha256)

    def _load_verified(self, sha256: str) -> bytes:
        data = self._load(sha256)
        if self.verify:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise BlobCorrupt(sha256, self.uri_for(sha256), actual)
        return data

    # Blocking primitives, run in a worker thread; the SHA-256 given to them is already checked.

    @abc.abstractmethod
    def _store_bytes(self, sha256: str, data: bytes, content_type: str | None) -> bool: ...

    @abc.abstractmethod
    def _store_file(self, path: Path, content_type: str | None) -> tuple[str, int, bool]: ...

    @abc.abstractmethod
    def _load(self, sha256: str) -> bytes: ...

    @abc.abstractmethod
    def _load_range(self, sha256: str, start: int, end: int) -> bytes: ...

    @abc.abstractmethod
    def _stored_size(self, sha256: str) -> int | None: ...

    @abc.abstractmethod
    def _remove(self, sha256: str) -> None: ...


class LocalBlobStore(BlobStore):
    """Blobs as files under `root/ab/cd/<sha256>`, written atomically and fsynced."""

    def __init__(self, root: str | os.PathLike[str], *, verify: bool = True) -> None:
        """Keep blobs under `root`, which is created on the first write."""
        super().__init__(verify=verify)
        self.root = Path(root).expanduser().resolve()

    @property
    def location(self) -> str:
        """The root folder."""
        return str(self.root)

    def path_for(self, sha256: str) -> Path:
        """The file a blob with this SHA-256 has (or would have)."""
        _check_sha(sha256)
        return self.root / sha256[0:2] / sha256[2:4] / sha256

    def uri_for(self, sha256: str) -> str:
        """`file://` URI of the blob's file."""
        return self.path_for(sha256).as_uri()

    def _store_bytes(self, sha256: str, data: bytes, content_type: str | None) -> bool:
        path = self.path_for(sha256)
        if _file_size(path) == len(data):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        # A private temp name in the blob's own folder keeps os.replace atomic (same
        # filesystem), so concurrent writers of the same blob never expose a partial file.
        tmp = path.with_name(f".{sha256}.{secrets.token_hex(8)}.tmp")
        try:
            with _create_exclusive(tmp) as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        return True

    def _store_file(self, path: Path, content_type: str | None) -> tuple[str, int, bool]:
        # The key is only known once the whole file is read, so the copy goes to a staging
        # folder on the same filesystem and moves into place once hashed.
        incoming = self.root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        tmp = incoming / f"{secrets.token_hex(16)}.tmp"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as src, _create_exclusive(tmp) as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                sha256 = digest.hexdigest()
                target = self.path_for(sha256)
                if _file_size(target) == size:
                    return sha256, size, False
                out.flush()
                os.fsync(out.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return sha256, size, True

    def _load(self, sha256: str) -> bytes:
        try:
            return self.path_for(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobMissing(sha256, self.location) from None

    def _load_range(self, sha256: str, start: int, end: int) -> bytes:
        try:
            with open(self.path_for(sha256), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except FileNotFoundError:
            raise BlobMissing(sha256, self.location) from None

    def _stored_size(self, sha256: str) -> int | None:
        return _file_size(self.path_for(sha256))

    def _remove(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _create_exclusive(path: Path) -> IO[bytes]:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable, not only the file's contents.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RangeNotSatisfiable(Exception):
    """S3 refused a range that starts at or past the end of the object."""


class S3BlobStore(BlobStore):
    """Blobs as objects `prefix/ab/cd/<sha256>` in an S3-compatible bucket.

    Credentials come from the arguments or from boto3's standard chain (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, profiles, instance roles). Uploads carry their SHA-256 as an S3
    checksum, so the server refuses bytes damaged in transit, and as `sha256` metadata.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        verify: bool = True,
    ) -> None:
        """Keep blobs in `bucket` under `prefix`; `endpoint_url` points at MinIO and the like."""
        super().__init__(verify=verify)
        if not bucket:
            raise BlobError("blob_url_invalid", "An S3 blob store needs a bucket name.")
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise BlobError(
                "s3_unavailable",
                "The S3 blob store needs boto3, which is not installed: "
                "pip install 'visionloop[s3]'.",
            ) from None
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._client_error = ClientError
        self._botocore_error = BotoCoreError
        config: dict[str, Any] = {"max_pool_connections": 32, "retries": {"mode": "standard"}}
        if endpoint_url:
            # Self-hosted stores rarely resolve bucket-named hosts; path style always works.
            config["s3"] = {"addressing_style": "path"}
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        self._s3 = session.client("s3", endpoint_url=endpoint_url, config=Config(**config))

    @property
    def location(self) -> str:
        """The bucket and prefix, with the endpoint when it is not AWS."""
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    def key_for(self, sha256: str) -> str:
        """The object key of a blob with this SHA-256."""
        _check_sha(sha256)
        return "/".join(p for p in (self.prefix, sha256[0:2], sha256[2:4], sha256) if p)

    def uri_for(self, sha256: str) -> str:
        """`s3://bucket/key` URI of the blob's object."""
        return f"s3://{self.bucket}/{self.key_for(sha256)}"

    def _call(self, operation: str, sha256: str, **params: Any) -> dict[str, Any]:
        try:
            return getattr(self._s3, operation)(
                Bucket=self.bucket, Key=self.key_for(sha256), **params
            )
        except self._client_error as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise BlobMissing(sha256, self.location) from None
            if code == "InvalidRange":
                raise _RangeNotSatisfiable from None
            raise BlobError(
                "blob_store_error",
                f"S3 {operation} of {self.uri_for(sha256)} failed with {code or 'an error'}: "
                f"{error.get('Message', exc)}. Check that the bucket exists and that the "
                "endpoint and credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) are right.",
            ) from exc
        except self._botocore_error as exc:
            raise BlobError(
                "blob_store_error",
                f"S3 {operation} of {self.uri_for(sha256)} failed: {exc}. Check that the S3 "
                "endpoint is reachable and that credentials are configured.",
            ) from exc

    def _upload(
        self, sha256: str, body: bytes | IO[bytes], size: int, content_type: str | None
    ) -> None:
        params: dict[str, Any] = {
            "Body": body,
            "ContentLength": size,
            "Metadata": {"sha256": sha256},
            "ChecksumSHA256": base64.b64encode(bytes.fromhex(sha256)).decode("ascii"),
        }
        if content_type:
            params["ContentType"] = content_type
        self._call("put_object", sha256, **params)

    def _store_bytes(self, sha256: str, data: bytes, content_type: str | None) -> bool:
        if self._stored_size(sha256) == len(data):
            return False
        self._upload(sha256, data, len(data), content_type)
        return True

    def _store_file(self, path: Path, content_type: str | None) -> tuple[str, int, bool]:
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            size = f.tell()
            if self._stored_size(sha256) == size:
                return sha256, size, False
            f.seek(0)
            # The checksum makes S3 refuse the upload if the file changed since it was hashed.
            self._upload(sha256, f, size, content_type)
        return sha256, size, True

    def _load(self, sha256: str) -> bytes:
        body = self._call("get_object", sha256)["Body"]
        with body:
            return body.read()

    def _load_range(self, sha256: str, start: int, end: int) -> bytes:
        if start == end:
            self._call("head_object", sha256)
            return b""
        try:
            body = self._call("get_object", sha256, Range=f"bytes={start}-{end - 1}")["Body"]
        except _RangeNotSatisfiable:
            return b""
        with body:
            return body.read()

    def _stored_size(self, sha256: str) -> int | None:
        try:
            return int(self._call("head_object", sha256)["ContentLength"])
        except BlobMissing:
            return None

    def _remove(self, sha256: str) -> None:
        self._call("delete_object", sha256)


def open_blob_store(url: str, **kwargs: Any) -> BlobStore:
    """Open the blob store a URL names; keyword arguments go to the store's constructor.

    - `file:///var/lib/visionloop/blobs` or a plain path: a `LocalBlobStore`.
    - `s3://bucket/prefix?endpoint=http://minio:9000&region=us-east-1`: an `S3BlobStore`;
      keyword arguments (`endpoint_url`, `region`, `access_key`, ...) override the query.
    """
    parts = urlsplit(url)
    if parts.scheme == "s3" and parts.netloc:
        query = parse_qs(parts.query, keep_blank_values=True)
        if unknown := set(query) - {"endpoint", "region"}:
            raise _invalid_url(url, f"unknown parameter {', '.join(sorted(unknown))}")
        options: dict[str, Any] = {
            "endpoint_url": query.get("endpoint", [None])[-1] or None,
            "region": query.get("region", [None])[-1] or None,
        }
        options.update(kwargs)
        return S3BlobStore(parts.netloc, unquote(parts.path), **options)
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
        if parts.query or parts.fragment:
            raise _invalid_url(url, "a file URL takes no query")
        return LocalBlobStore(Path(unquote(parts.path)), **kwargs)
    if not parts.scheme and url:
        return LocalBlobStore(Path(url), **kwargs)
    raise _invalid_url(url, "unsupported form")


def _invalid_url(url: str, why: str) -> BlobError:
    return BlobError(
        "blob_url_invalid",
        f"{url!r} is not a blob store URL ({why}). Use file:///path/to/blobs, a plain path, or "
        "s3://bucket/prefix?endpoint=http://host:9000&region=us-east-1.",
    )
