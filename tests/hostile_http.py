"""An HTTP/1.1 server on 127.0.0.1 that misbehaves on purpose, for ingest's fetch tests.

Plain asyncio streams, so a route controls every byte: trickle, lie about lengths, never end.
Each connection serves one request and closes. `requests` records (path, Host header) pairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

Route = Callable[[asyncio.StreamWriter], Awaitable[None]]


def head(status: int = 200, headers: dict[str, str] | None = None) -> bytes:
    """A response's status line and headers."""
    lines = [f"HTTP/1.1 {status} X", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HostileServer:
    """Routes by path; `serve`, `redirect`, `trickle`, `endless` and `route` add behaviours."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str]] = []
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def base(self) -> str:
        """`http://127.0.0.1:<port>` (or https)."""
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def serve(self, path: str, body: bytes, content_type: str | None = "image/jpeg", **headers: str) -> str:
        """An honest answer; returns the URL."""
        extra = {"Content-Length": str(len(body)), **({"Content-Type": content_type} if content_type else {})}
        extra |= {k.replace("_", "-"): v for k, v in headers.items()}

        async def route(writer: asyncio.StreamWriter) -> None:
            writer.write(head(200, extra) + body)

        return self.route(path, route)

    def status(self, path: str, code: int) -> str:
        """An HTTP error."""

        async def route(writer: asyncio.StreamWriter) -> None:
            writer.write(head(code, {"Content-Length": "0"}))

        return self.route(path, route)

    def redirect(self, path: str, location: str, code: int = 302) -> str:
        """A redirect to `location` (relative or absolute)."""

        async def route(writer: asyncio.StreamWriter) -> None:
            writer.write(head(code, {"Location": location, "Content-Length": "0"}))

        return self.route(path, route)

    def trickle(self, path: str, first: bytes, every_s: float = 0.05) -> str:
        """Claims a small image, sends `first`, then one byte every `every_s`, forever."""

        async def route(writer: asyncio.StreamWriter) -> None:
            writer.write(head(200, {"Content-Type": "image/jpeg", "Content-Length": "100000"}) + first)
            while True:
                await writer.drain()
                await asyncio.sleep(every_s)
                writer.write(b"\x00")

        return self.route(path, route)

    def endless(self, path: str, first: bytes, declared: int | None = None) -> str:
        """Streams `first` then zeros as fast as the client reads, forever (or declares a size)."""

        async def route(writer: asyncio.StreamWriter) -> None:
            headers = {"Content-Type": "image/jpeg"}
            if declared is not None:
                headers["Content-Length"] = str(declared)
            writer.write(head(200, headers) + first)
            chunk = b"\x00" * 65536
            while True:
                writer.write(chunk)
                await writer.drain()

        return self.route(path, route)

    def route(self, path: str, route: Route) -> str:
        """A custom behaviour; returns the URL."""
        self.routes[path] = route
        return self.base + path

    async def start(self) -> HostileServer:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and every connection still being served."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(BaseException):
                await task

    async def __aenter__(self) -> HostileServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            lines = request.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1].split("?", 1)[0]
            host = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("host:")), "")
            self.requests.append((path, host))
            route = self.routes.get(path)
            if route is None:
                writer.write(head(404, {"Content-Length": "0"}))
            else:
                await route(writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client gave up on us, which is the point of most routes
        except asyncio.CancelledError:
            pass  # stop() ends routes that never end on their own
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
