"""What ingest may read, and what it does with a submission id it has seen: pure decisions.

Nothing here resolves a name, opens a socket or touches the database. The I/O in `sources.py`
and `intake.py` asks these functions and acts on the answer; a refusal is a `Refusal` with a
reason code and a sentence that says what to do.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urljoin, urlsplit

from visionloop.contracts import SYSTEM_PROJECT, ImageRejectReason
from visionloop.services.ingest.inspect import Refusal

FETCH_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_OCTET_STREAMS = frozenset({"application/octet-stream", "binary/octet-stream"})
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


# -- who may submit --------------------------------------------------------------------------------


def project_problem(project: str) -> Refusal | None:
    """Why images may not be submitted to `project` (a slug already), or None. The same on both
    doors, HTTP and the submit topic: `_system` is the platform's own (status, dead letters)."""
    if project == SYSTEM_PROJECT:
        return Refusal(ImageRejectReason.INVALID_SUBMISSION,
                       f"project {SYSTEM_PROJECT} is reserved for the platform's own events; submit to a project of yours",
                       {"project": project})
    return None


# -- where a source URI points ------------------------------------------------------------------


@dataclass(frozen=True)
class HttpTarget:
    """An `http(s)://` URL taken apart: what to resolve, where to connect, what to send as Host."""

    url: str
    scheme: str
    host: str
    """Lowercase ASCII host name (IDNA-encoded), or an IP address without brackets."""
    port: int
    host_header: str
    """The `Host` header: the host, with the port when it is not the scheme's default."""

    @property
    def host_is_ip(self) -> bool:
        """True when the URL names an address rather than a host name (no DNS, no SNI)."""
        return _ip_or_none(self.host) is not None


def http_target(url: str) -> HttpTarget:
    """Parse an `http(s)://` URL; refuse anything a fetch must not follow."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = (parts.hostname or "").rstrip(".")
    except ValueError as exc:
        raise Refusal(
            ImageRejectReason.INVALID_SUBMISSION, f"{url!r} is not a valid URL: {exc}"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in FETCH_SCHEMES:
        raise Refusal(
            ImageRejectReason.FORBIDDEN_SOURCE,
            f"a fetch may only follow http:// or https:// URLs, not {scheme or '(none)'}://",
            {"scheme": scheme},
        )
    if not host:
        raise Refusal(ImageRejectReason.INVALID_SUBMISSION, f"{url!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise Refusal(
            ImageRejectReason.FORBIDDEN_SOURCE,
            "URLs carrying credentials (user:password@host) are refused: they would travel "
            "in events and logs; make the image readable without them",
        )
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        ascii_host = ""
    if not (_ip_or_none(host) or _HOST_NAME.fullmatch(ascii_host)):
        raise Refusal(ImageRejectReason.INVALID_SUBMISSION, f"{host!r} is not a valid host name")
    if _ip_or_none(host):
        ascii_host = host.lower()
    default = 443 if scheme == "https" else 80
    port = port or default
    shown = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    host_header = shown if port == default else f"{shown}:{port}"
    return HttpTarget(url=url, scheme=scheme, host=ascii_host, port=port, host_header=host_header)


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Whether `host` passes the allow-list: empty allows any host; `*.example.com` allows
    every subdomain of example.com (not example.com itself); other entries match exactly."""
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().strip().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def check_host(target: HttpTarget, allowed: list[str]) -> None:
    """Refuse a host that is not on the allow-list."""
    if not host_allowed(target.host, allowed):
        raise Refusal(
            ImageRejectReason.FORBIDDEN_SOURCE,
            f"host {target.host} is not on this ingest's allow-list (VL_INGEST_ALLOWED_HOSTS); "
            "ask its operator to add it, or upload the bytes instead",
            {"host": target.host},
        )


def address_problem(address: str, *, allow_private: bool) -> str | None:
    """Why ingest must not connect to `address`, in a word, or None when it may.

    Public (globally routable) addresses are fine. Loopback, private, link-local (cloud
    metadata lives there), shared, reserved and documentation ranges are refused unless
    `allow_private`; unspecified (0.0.0.0 reaches loopback on Linux) and multicast addresses
    are always refused. An IPv4 address embedded in IPv6 (mapped, 6to4) is judged as itself.
    """
    ip = _ip_or_none(address)
    if ip is None:
        return "not an address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            ip = embedded
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip.is_global or allow_private:
        return None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private:
        return "private"
    return "reserved"


def check_addresses(target: HttpTarget, addresses: list[str], *, allow_private: bool) -> None:
    """Refuse the target when any address its host resolves to is one ingest must not reach.

    Every address is checked, not only the first: a name with one public and one private
    address is refused, so no choice of address at connect time can reach the private one.
    """
    if not addresses:
        raise Refusal(
            ImageRejectReason.UNREACHABLE, f"host {target.host} resolves to no address",
            {"host": target.host},
        )
    for address in addresses:
        problem = address_problem(address, allow_private=allow_private)
        if problem is not None:
            hint = (
                "" if problem in ("unspecified", "multicast")
                else "; on a trusted network an operator may allow non-public addresses "
                "(VL_INGEST_ALLOW_PRIVATE_ADDRESSES)"
            )
            raise Refusal(
                ImageRejectReason.FORBIDDEN_SOURCE,
                f"host {target.host} resolves to {address}, a {problem} address, which ingest "
                f"does not fetch from{hint}",
                {"host": target.host, "address": address, "address_kind": problem},
            )


def redirect_location(current: str, location: str | None, status: int) -> str:
    """The absolute URL a redirect points to; refuses a redirect that names none."""
    if not location:
        raise Refusal(
            ImageRejectReason.UNREACHABLE,
            f"{current} answered HTTP {status} without a Location to follow",
            {"status": status},
        )
    return urljoin(current, location.strip()).split("#", 1)[0]


def too_many_redirects(url: str, limit: int) -> Refusal:
    """The refusal of a fetch that kept being redirected (a loop, or a chain over the cap)."""
    return Refusal(
        ImageRejectReason.UNREACHABLE,
        f"{url} redirected more than {limit} times (a redirect loop?); submit the final URL",
        {"redirects": limit},
    )


def s3_location(uri: str) -> tuple[str, str]:
    """Bucket and key of `s3://bucket/key`; the key is taken literally, as the AWS CLI does."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise Refusal(
            ImageRejectReason.INVALID_SUBMISSION,
            f"{uri!r} is not an s3:// source: write s3://bucket/key",
        )
    return bucket, key


def check_bucket(bucket: str, allowed: list[str]) -> None:
    """Refuse a bucket that is not on the allow-list: empty allows none (the fence is shut until
    an operator names the buckets), `*` any bucket the credentials read."""
    if "*" in allowed or bucket in allowed:
        return
    hint = "no s3:// bucket is open" if not allowed else f"bucket {bucket} is not one this ingest reads"
    raise Refusal(
        ImageRejectReason.FORBIDDEN_SOURCE,
        f"{hint}: the operator lists the buckets ingest may read in VL_INGEST_S3_BUCKETS",
        {"bucket": bucket},
    )


# -- what a source answered ---------------------------------------------------------------------


def content_type_problem(content_type: str | None) -> Refusal | None:
    """A refusal for a declared content type that cannot be an image ingest keeps, else None.

    `image/*` and octet streams pass (the bytes decide); no content type passes too. SVG is
    an image but a vector one: unsupported. Anything else (text/html, application/json...)
    is not an image.
    """
    if not content_type:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if not media or media in _OCTET_STREAMS:
        return None
    if media == "image/svg+xml":
        return Refusal(
            ImageRejectReason.UNSUPPORTED_FORMAT,
            "SVG is a vector format; ingest keeps raster images only (rasterise it first)",
            {"content_type": media},
        )
    if media.startswith("image/"):
        return None
    return Refusal(
        ImageRejectReason.NOT_AN_IMAGE,
        f"the declared content type {media} is not an image type",
        {"content_type": media},
    )


def declared_size_problem(content_length: str | None, limit: int) -> Refusal | None:
    """A refusal when a declared length is over `limit` (refuse early; the stream is still
    counted, since a declared length may lie)."""
    if content_length is None:
        return None
    try:
        declared = int(content_length)
    except ValueError:
        return None
    if declared > limit:
        return too_large(declared, limit)
    return None


def too_large(size: int | None, limit: int) -> Refusal:
    """The refusal of bytes over the size limit (`size` None: the count stopped at the limit)."""
    said = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return Refusal(
        ImageRejectReason.TOO_LARGE,
        f"the image is {said}, over the {limit}-byte limit; send a smaller file",
        {"bytes": size, "limit": limit},
    )


# -- a submission id seen before ----------------------------------------------------------------


class Resubmission(StrEnum):
    """What to do with a submission, given what its id already answered."""

    NEW = "new"
    """Decide it and record the answer (replacing an earlier rejection of the same id)."""
    REPLAY = "replay"
    """The same bytes under the same id: give the recorded answer again, emit nothing."""
    CONFLICT = "conflict"
    """The id already brought in other bytes: refuse this attempt, keep the recorded answer."""


@dataclass(frozen=True)
class Prior:
    """What a submission id answered before."""

    outcome: str
    """`ingested` or `rejected`."""
    content_sha256: str | None
    """SHA-256 of the bytes that attempt read; None when it was refused before reading any."""
    answered: bool
    """Whether the answer itself is recorded (rows from before answers were kept are not)."""


def resubmission(prior: Prior | None, content_sha256: str | None) -> Resubmission:
    """Same id and same bytes get the same answer; an ingested id never changes its image.

    A rejected id may be tried again with other bytes (or after a source came back): the
    new attempt is decided afresh.
    """
    if prior is None:
        return Resubmission.NEW
    if prior.answered and content_sha256 is not None and prior.content_sha256 == content_sha256:
        return Resubmission.REPLAY
    if prior.outcome == "ingested" and prior.content_sha256 != content_sha256:
        return Resubmission.CONFLICT
    return Resubmission.NEW


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
