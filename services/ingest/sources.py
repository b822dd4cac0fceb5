"""Where submitted bytes come from: inline in the event, a file under the configured root, an
`http(s)://` URL or an `s3://` object. Every way out is the bytes or a `Refusal`.

A fetch is hostile ground, so every `http(s)` read:

- resolves the host itself, checks every address it gets (`policy.check_addresses`) and
  connects to a checked address, sending the original name as `Host` and TLS SNI, so a
  name that resolves differently a second time (DNS rebinding) cannot redirect the socket;
- follows redirects by hand, checking each hop as if it were the first;
- is cut off by a deadline on the whole fetch (DNS, redirects, body), besides connect and
  read timeouts, so a source that trickles one byte at a time cannot hold a consumer;
- refuses a declared `Content-Length` over the cap at once and counts the bytes that
  actually arrive, stopping at the cap; refuses non-image content types and checks the
  magic bytes as soon as the first ones arrive;
- ignores proxy variables (a proxy would defeat the address checks).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import certifi
import httpx

from visionloop.contracts import ImageRejectReason, ImageSubmitted
from visionloop.services.ingest import decide as policy
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.inspect import MAGIC_BYTES, Refusal, check_magic

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""`(host, port) -> addresses`: how a fetch learns where a host name points."""

_CHUNK = 64 * 1024


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address (IPv4 and IPv6) the system resolver gives for `host`, in its order."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refusal(
            ImageRejectReason.UNREACHABLE, f"host {host} does not resolve: {exc}", {"host": host}
        ) from None
    addresses: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    return addresses


class Sources:
    """Reads a submission's bytes from wherever it names, under ingest's settings."""

    def __init__(self, config: IngestSettings, *, resolve: Resolver = resolve_host) -> None:
        """`resolve` is the system resolver unless a test pins names to addresses."""
        self.config = config
        self._resolve = resolve
        self._formats = frozenset(config.formats)
        self._tls = ssl.create_default_context(cafile=str(config.fetch_ca_file or certifi.where()))
        self._timeout = httpx.Timeout(
            connect=config.fetch_connect_timeout_s,
            read=config.fetch_read_timeout_s,
            write=config.fetch_read_timeout_s,
            pool=config.fetch_connect_timeout_s,
        )
        self._s3: Any = None
        self._s3_lock = threading.Lock()

    async def read(self, submission: ImageSubmitted, *, inline_max: int) -> bytes:
        """The submission's bytes, or a Refusal saying why they cannot be had.

        `inline_max` bounds inline bytes: the event setting on the topic, the upload cap on
        the HTTP API (whose bodies were already counted while streaming).
        """
        if submission.inline_bytes is not None:
            if len(submission.inline_bytes) > inline_max:
                raise Refusal(
                    ImageRejectReason.INLINE_TOO_LARGE,
                    f"inline images are limited to {inline_max} bytes; send a source_uri instead",
                    {"bytes": len(submission.inline_bytes), "limit": inline_max},
                )
            return submission.inline_bytes
        uri = submission.source_uri or ""
        try:
            scheme = urlsplit(uri).scheme.lower()
        except ValueError as exc:
            raise Refusal(
                ImageRejectReason.INVALID_SUBMISSION, f"{uri!r} is not a valid URI: {exc}"
            ) from None
        if scheme == "file":
            return await asyncio.to_thread(_read_file, uri, self.config.file_root, self.config.max_bytes)
        if scheme in policy.FETCH_SCHEMES:
            return await self.fetch(uri)
        if scheme == "s3":
            return await self.read_s3(uri)
        raise Refusal(
            ImageRejectReason.FORBIDDEN_SOURCE,
            f"source scheme {scheme or '(none)'!r} is not accepted by this ingest "
            "(inline bytes, http(s)://, s3:// and file:// under the configured root are)",
            {"scheme": scheme},
        )

    # -- http(s) -----------------------------------------------------------------------------
    async def fetch(self, url: str) -> bytes:
        """The bytes at an `http(s)://` URL, read under every rule in this module's docstring."""
        progress = _Progress(url)
        deadline = self.config.fetch_deadline_s
        try:
            async with asyncio.timeout(deadline):
                return await self._follow(url, progress)
        except TimeoutError:
            raise Refusal(
                ImageRejectReason.UNREACHABLE,
                f"{progress.url} did not deliver the image within the {deadline:g} s deadline "
                f"({progress.received} bytes arrived); serve it faster or upload it instead",
                {"deadline_s": deadline, "bytes_read": progress.received, "timed_out": True},
            ) from None

    async def _follow(self, url: str, progress: _Progress) -> bytes:
        limit = self.config.fetch_max_redirects
        for _ in range(limit + 1):
            progress.url = url
            target = policy.http_target(url)
            policy.check_host(target, self.config.allowed_hosts)
            addresses = [target.host] if target.host_is_ip else await self._resolve(target.host, target.port)
            policy.check_addresses(target, addresses, allow_private=self.config.allow_private_addresses)
            answer = await self._get(target, addresses, progress)
            if isinstance(answer, bytes):
                return answer
            url = answer.location
        raise policy.too_many_redirects(progress.url, limit)

    async def _get(
        self, target: policy.HttpTarget, addresses: list[str], progress: _Progress
    ) -> bytes | _Redirect:
        """One hop: try the checked addresses in order until one connects."""
        headers = {
            "Host": target.host_header,
            "User-Agent": self.config.fetch_user_agent,
            "Accept": "image/*, application/octet-stream;q=0.8",
            "Accept-Encoding": "identity",
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" and not target.host_is_ip else {}
        failure: Exception | None = None
        for address in addresses:
            try:
                pinned = httpx.URL(target.url).copy_with(host=address)
            except (httpx.InvalidURL, ValueError) as exc:
                raise Refusal(
                    ImageRejectReason.INVALID_SUBMISSION, f"{target.url!r} is not a URL ingest can fetch: {exc}"
                ) from None
            # A client per hop: its pool never hands a connection verified for one name to another.
            async with httpx.AsyncClient(
                verify=self._tls, timeout=self._timeout, trust_env=False, follow_redirects=False
            ) as client:
                try:
                    async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                        return await self._answer(target, response, progress)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    failure = exc
                    continue
                except httpx.TimeoutException as exc:
                    raise Refusal(
                        ImageRejectReason.UNREACHABLE,
                        f"{target.url} stopped sending ({type(exc).__name__}) after "
                        f"{progress.received} bytes",
                        {"bytes_read": progress.received, "timed_out": True},
                    ) from None
                except httpx.HTTPError as exc:
                    raise Refusal(
                        ImageRejectReason.UNREACHABLE,
                        f"{target.url} broke off: {type(exc).__name__}: {exc}",
                        {"bytes_read": progress.received},
                    ) from None
        raise Refusal(
            ImageRejectReason.UNREACHABLE,
            f"cannot connect to {target.host_header} ({', '.join(addresses)}): {failure}",
            {"host": target.host, "timed_out": isinstance(failure, httpx.ConnectTimeout)},
        )

    async def _answer(
        self, target: policy.HttpTarget, response: httpx.Response, progress: _Progress
    ) -> bytes | _Redirect:
        status = response.status_code
        if status in policy.REDIRECT_STATUSES:
            return _Redirect(policy.redirect_location(target.url, response.headers.get("location"), status))
        if not response.is_success:
            raise Refusal(
                ImageRejectReason.UNREACHABLE,
                f"{target.url} answered HTTP {status}",
                {"status": status},
            )
        for problem in (
            policy.content_type_problem(response.headers.get("content-type")),
            policy.declared_size_problem(response.headers.get("content-length"), self.config.max_bytes),
        ):
            if problem is not None:
                raise problem
        body = _Capped(self.config.max_bytes, self._formats, response.headers.get("content-encoding"))
        async for chunk in response.aiter_raw():
            body.feed(chunk)
            progress.received = body.size
        return body.finish()

    # -- s3 ------------------------------------------------------------------------------------
    async def read_s3(self, uri: str) -> bytes:
        """The object at `s3://bucket/key`, read in a range no longer than the cap, by the deadline."""
        bucket, key = policy.s3_location(uri)
        policy.check_bucket(bucket, self.config.s3_buckets)
        deadline = time.monotonic() + self.config.fetch_deadline_s
        return await asyncio.to_thread(self._s3_get, uri, bucket, key, deadline)

    def _s3_client(self) -> Any:
        with self._s3_lock:
            if self._s3 is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise Refusal(
                        ImageRejectReason.FORBIDDEN_SOURCE,
                        "this ingest cannot read s3:// sources: boto3 is not installed "
                        "(pip install 'visionloop[s3]')",
                    ) from None
                config = Config(
                    connect_timeout=self.config.fetch_connect_timeout_s,
                    read_timeout=self.config.fetch_read_timeout_s,
                    retries={"mode": "standard", "total_max_attempts": 2},
                    s3={"addressing_style": "path"} if self.config.s3_endpoint else None,
                )
                session = boto3.session.Session(
                    aws_access_key_id=self.config.s3_access_key,
                    aws_secret_access_key=self.config.s3_secret,
                    region_name=self.config.s3_region,
                )
                self._s3 = session.client("s3", endpoint_url=self.config.s3_endpoint, config=config)
            return self._s3

    def _s3_get(self, uri: str, bucket: str, key: str, deadline: float) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        limit = self.config.max_bytes
        try:
            # One byte past the cap tells "exactly at the cap" from "over it" without a HEAD.
            obj = self._s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
            total = _range_total(obj.get("ContentRange")) or int(obj.get("ContentLength") or 0)
            for problem in (
                policy.declared_size_problem(str(total), limit),
                policy.content_type_problem(obj.get("ContentType")),
            ):
                if problem is not None:
                    obj["Body"].close()
                    raise problem
            body = _Capped(limit, self._formats, obj.get("ContentEncoding"))
            with obj["Body"] as stream:
                while chunk := stream.read(_CHUNK):
                    body.feed(chunk)
                    if time.monotonic() > deadline:
                        raise Refusal(
                            ImageRejectReason.UNREACHABLE,
                            f"{uri} did not deliver within the {self.config.fetch_deadline_s:g} s deadline",
                            {"bytes_read": body.size, "timed_out": True},
                        )
            return body.finish()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code == "InvalidRange":  # a zero-byte object has no byte 0
                return b""
            raise Refusal(
                ImageRejectReason.UNREACHABLE,
                f"cannot read {uri}: {code or 'error'} ({error.get('Message', exc)}); check the "
                "bucket, the key and that ingest's credentials may read it",
                {"code": code},
            ) from None
        except (BotoCoreError, OSError) as exc:
            raise Refusal(
                ImageRejectReason.UNREACHABLE,
                f"cannot read {uri}: {type(exc).__name__}: {exc}",
                {"timed_out": "timeout" in type(exc).__name__.lower()},
            ) from None


@dataclass
class _Progress:
    url: str
    received: int = 0


@dataclass(frozen=True)
class _Redirect:
    location: str


class _Capped:
    """Collects a source's bytes up to `limit`: refuses the first byte past it, checks the
    magic bytes as soon as enough have arrived, and inflates gzip/deflate within the cap."""

    def __init__(self, limit: int, formats: frozenset[str], encoding: str | None) -> None:
        self.limit = limit
        self.formats = formats
        self._buffer = bytearray()
        self._checked = False
        self._inflate = _inflater(encoding)

    @property
    def size(self) -> int:
        """Bytes collected so far (after inflating)."""
        return len(self._buffer)

    def feed(self, chunk: bytes) -> None:
        """Add a chunk; raise Refusal when the bytes pass the cap or cannot be an image."""
        if self._inflate is not None:
            try:
                # Inflate at most one byte past the room left: a small bomb never balloons.
                chunk = self._inflate.decompress(chunk, self.limit - len(self._buffer) + 1)
            except zlib.error as exc:
                raise Refusal(
                    ImageRejectReason.CORRUPT, f"the compressed body does not inflate: {exc}"
                ) from None
        self._buffer += chunk
        if len(self._buffer) > self.limit:
            raise policy.too_large(None, self.limit)
        if not self._checked and len(self._buffer) >= MAGIC_BYTES:
            check_magic(bytes(self._buffer[:MAGIC_BYTES]), self.formats)
            self._checked = True

    def finish(self) -> bytes:
        """Every byte collected (bodies shorter than the magic bytes are checked here)."""
        if not self._checked:
            check_magic(bytes(self._buffer), self.formats)
        return bytes(self._buffer)


def _inflater(encoding: str | None) -> Any:
    name = (encoding or "identity").split(",")[0].strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if name == "deflate":
        return zlib.decompressobj()
    raise Refusal(
        ImageRejectReason.UNREACHABLE,
        f"the source sent content-encoding {name}, which ingest does not decode; serve the "
        "image unencoded",
        {"content_encoding": name},
    )


def _range_total(content_range: str | None) -> int | None:
    """The full length from `bytes 0-N/TOTAL`, if the store said it."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return None


def _read_file(uri: str, root: Path | None, max_bytes: int) -> bytes:
    if root is None:
        raise Refusal(
            ImageRejectReason.FORBIDDEN_SOURCE,
            "file:// sources are refused: no VL_INGEST_FILE_ROOT is configured",
        )
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise Refusal(ImageRejectReason.FORBIDDEN_SOURCE, "file:// URIs must not name a host")
    root = root.resolve()
    path = Path(unquote(parts.path)).resolve()  # resolves `..` and symlinks before the check
    if not path.is_relative_to(root):
        raise Refusal(
            ImageRejectReason.FORBIDDEN_SOURCE,
            f"{uri} is outside the configured file root",
            {"root": str(root)},
        )
    try:
        # The resolved path holds no symlink; O_NOFOLLOW keeps a swapped-in one from being
        # followed, and O_NONBLOCK keeps a FIFO from blocking the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise Refusal(ImageRejectReason.UNREACHABLE, f"no file at {uri}") from None
    except OSError as exc:
        raise Refusal(ImageRejectReason.UNREACHABLE, f"cannot read {uri}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refusal(ImageRejectReason.FORBIDDEN_SOURCE, f"{uri} is not a regular file")
        if info.st_size > max_bytes:
            raise policy.too_large(info.st_size, max_bytes)
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise Refusal(ImageRejectReason.UNREACHABLE, f"cannot read {uri}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise policy.too_large(None, max_bytes)
    return data
