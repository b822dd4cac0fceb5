"""Fetching Label Studio task images: bounded in size and time, checked addresses, and the
Label Studio token sent to Label Studio only.

Task image URLs come from Label Studio's requests, so they are treated as hostile: `http(s)`
only; the host is resolved here and every address checked (loopback, private, link-local and
other non-public ranges refused unless `fetch_allow_private_addresses`), and the connection goes
to the checked address with the name as `Host` and TLS SNI, so DNS cannot answer differently
for the connection (rebinding); redirects are followed by hand and checked again; a deadline
bounds the whole fetch and the body is cut off at `fetch_max_bytes`. The Label Studio token
goes only to Label Studio's own origin (the `hostname` of its `/setup` call), never to a third
party an image URL happens to name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from visionloop.services.labeling_gateway.config import GatewaySettings


class FetchError(Exception):
    """An image that could not be fetched: reason code and sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Origin:
    """Where Label Studio lives and how to authenticate to it."""

    base: str
    token: str | None

    @property
    def key(self) -> tuple[str, str, int]:
        """(scheme, host, port) of Label Studio."""
        return _origin(self.base)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def absolute(url: str, origin: Origin | None) -> str:
    """A task's image URL made absolute against Label Studio's address (`/data/upload/...`)."""
    if urlsplit(url).scheme:
        return url
    if origin is None:
        raise FetchError("unresolvable_url", f"{url[:200]!r} is relative and Label Studio's address is unknown (call /setup)")
    return urljoin(origin.base.rstrip("/") + "/", url.lstrip("/"))


def address_problem(address: str, allow_private: bool) -> str | None:
    """Why a resolved address may not be fetched from, or None."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return f"{address} is not a host address"
    if not allow_private and not ip.is_global:
        return f"{address} is not a public address (set VL_LABELING_GATEWAY_FETCH_ALLOW_PRIVATE_ADDRESSES on a trusted network)"
    return None


class Fetcher:
    """Fetches task images under the gateway's limits."""

    def __init__(self, config: GatewaySettings) -> None:
        self.config = config
        self._timeout = httpx.Timeout(
            connect=config.fetch_connect_timeout_s,
            read=config.fetch_read_timeout_s,
            write=config.fetch_read_timeout_s,
            pool=config.fetch_connect_timeout_s,
        )
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False, trust_env=False)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def fetch(self, url: str, origin: Origin | None) -> bytes:
        """The bytes at `url` (relative URLs are Label Studio's), or `FetchError`."""
        try:
            async with asyncio.timeout(self.config.fetch_deadline_s):
                return await self._fetch(absolute(url, origin), origin)
        except TimeoutError:
            raise FetchError("timed_out", f"fetching {url[:200]!r} took longer than {self.config.fetch_deadline_s:g} s") from None

    async def _fetch(self, url: str, origin: Origin | None) -> bytes:
        for _ in range(self.config.fetch_max_redirects + 1):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https") or not parts.hostname:
                raise FetchError("forbidden_source", f"only http(s) image URLs are fetched, not {url[:200]!r}")
            host = parts.hostname
            port = parts.port or (443 if scheme == "https" else 80)
            address = await self._checked_address(host, port)
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "visionloop-labeling-gateway"}
            if origin is not None and origin.token and _origin(url) == origin.key:
                headers["Authorization"] = f"Token {origin.token}"
            netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            pinned = parts._replace(netloc=netloc).geturl()
            request = self._client.build_request(
                "GET", pinned, headers=headers, extensions={"sni_hostname": host} if scheme == "https" else {}
            )
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise FetchError("unreachable", f"{host}: {type(exc).__name__}: {exc}") from None
            try:
                if response.status_code in (301, 302, 303, 307, 308):
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError("unreachable", f"{host} redirected without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise FetchError("unreachable", f"{host} answered HTTP {response.status_code} for the image")
                return await self._read_capped(response)
            finally:
                await response.aclose()
        raise FetchError("unreachable", f"more than {self.config.fetch_max_redirects} redirects")

    async def _checked_address(self, host: str, port: int) -> str:
        try:
            literal = ipaddress.ip_address(host)
            addresses = [str(literal)]
        except ValueError:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise FetchError("unreachable", f"host {host} does not resolve: {exc}") from None
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            problem = address_problem(address, self.config.fetch_allow_private_addresses)
            if problem is not None:
                raise FetchError("forbidden_source", f"{host}: {problem}")
        return addresses[0]

    async def _read_capped(self, response: httpx.Response) -> bytes:
        limit = self.config.fetch_max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FetchError("too_large", f"the image is {declared} bytes, over the cap of {limit}")
        body = bytearray()
        async for chunk in response.aiter_bytes():  # decoded; the cap counts what inflates
            body += chunk
            if len(body) > limit:
                raise FetchError("too_large", f"the image is over the cap of {limit} bytes")
        return bytes(body)
