"""The embedded broker's front door: a loopback relay that can hold produce requests.

The embedded broker keeps its records in memory, so a planned restart (`libs/rotation.py`) must
know every record it acknowledged and nobody has read yet, and must not acknowledge one more
after that. Kafka clients cannot be paused from outside, so the broker listens on an inner port
and advertises this door's port: every client connection passes through here. The door reads each
request's frame header (size, API key, correlation id, client id) and forwards it unchanged;
responses go back frame by frame.

`hold()` keeps produce requests (API key 0) from every client but the exempt one at the door, then
waits until each produce request already forwarded has its answer. From then on the broker's logs
only change through the exempt client: what the rotation reads is complete. Held requests are never
forwarded to the old broker; its restart closes their connections, and the clients send them again
to the new one (an unanswered request is retried; none was acknowledged). `release()` opens the
door again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("visionloop.embedded")

PRODUCE = 0
"""Kafka's API key of a produce request."""


@dataclass(eq=False)
class _Passage:
    """One client connection and its broker connection."""

    answers_due: set[bytes] = field(default_factory=set)
    """Correlation ids of produce requests forwarded and not answered yet."""
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


def client_id_of(request: bytes) -> str | None:
    """The client id in a Kafka request (after API key, version and correlation id)."""
    if len(request) < 10:
        return None
    size = int.from_bytes(request[8:10], "big", signed=True)
    if size < 0 or len(request) < 10 + size:
        return None
    return request[10:10 + size].decode("utf-8", "replace")


def _uvarint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def answer_expected(request: bytes) -> bool:
    """Whether a produce request gets an answer: not with `acks=0` (read after the transactional id;
    version 9 on uses the flexible header and compact strings). When unsure: it does."""
    try:
        version = int.from_bytes(request[2:4], "big", signed=True)
        at = 10 + max(int.from_bytes(request[8:10], "big", signed=True), 0)  # past the client id
        if version >= 9:
            tags, at = _uvarint(request, at)
            for _ in range(tags):
                _, at = _uvarint(request, at)
                size, at = _uvarint(request, at)
                at += size
            length, at = _uvarint(request, at)
            at += max(length - 1, 0)
        elif version >= 3:
            at += 2 + max(int.from_bytes(request[at:at + 2], "big", signed=True), 0)
    except IndexError:
        return True
    return len(request) < at + 2 or int.from_bytes(request[at:at + 2], "big", signed=True) != 0


class FrontDoor:
    """A relay from `host:port` to the broker on `host:inner_port` (see the module's note)."""

    def __init__(self, host: str, port: int, inner_port: int, *, exempt_client_id: str) -> None:
        self.host, self.port, self.inner_port = host, port, inner_port
        self.exempt_client_id = exempt_client_id
        self.held_requests = 0
        """Produce requests kept at the door, all holds together (for reports and tests)."""
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._open: asyncio.Event | None = None
        self._passages: set[_Passage] = set()

    # -- life --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen on `host:port` (bound before this returns) and relay in a thread of its own."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(256)
        self._thread = threading.Thread(target=self._loop.run_forever, name="broker-front-door", daemon=True)
        self._thread.start()
        self._call(self._listen(sock))

    async def _listen(self, sock: socket.socket) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=2**20)

    def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._close(), timeout_s=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for passage in list(self._passages):
            for writer in passage.writers:
                writer.close()

    def _call(self, coro: object, timeout_s: float = 30.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)  # type: ignore[arg-type]

    # -- holding -----------------------------------------------------------------------------------
    def hold(self, timeout_s: float = 10.0) -> int:
        """Keep produce requests at the door from now on; wait until every one already forwarded is
        answered. The number still unanswered at `timeout_s` (0: the broker's logs are still)."""
        self._call(self._shut())
        deadline = time.monotonic() + timeout_s
        while True:
            due = int(self._call(self._due()))  # type: ignore[call-overload]
            if not due or time.monotonic() >= deadline:
                return due
            time.sleep(0.02)

    async def _shut(self) -> None:
        assert self._open is not None
        self._open.clear()

    async def _due(self) -> int:
        return sum(len(p.answers_due) for p in self._passages)

    def release(self) -> None:
        """Forward produce requests again (held ones on connections still open go on now)."""
        self._call(self._reopen())

    async def _reopen(self) -> None:
        assert self._open is not None
        self._open.set()

    # -- relaying ----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        passage = _Passage(writers=[writer])
        try:
            inner_reader, inner_writer = await asyncio.open_connection(self.host, self.inner_port, limit=2**20)
        except OSError:  # the broker is down (restarting): the client connects again
            writer.close()
            return
        passage.writers.append(inner_writer)
        self._passages.add(passage)
        ways = [asyncio.create_task(self._requests(reader, inner_writer, passage)),
                asyncio.create_task(self._responses(inner_reader, writer, passage))]
        try:
            await asyncio.wait(ways, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for way in ways:
                way.cancel()
            for w in passage.writers:
                w.close()
            self._passages.discard(passage)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, passage: _Passage) -> None:
        assert self._open is not None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big", signed=True))
                if int.from_bytes(body[:2], "big", signed=True) == PRODUCE:
                    if not self._open.is_set() and client_id_of(body) != self.exempt_client_id:
                        self.held_requests += 1
                        await self._open.wait()
                    if answer_expected(body):
                        passage.answers_due.add(body[4:8])
                writer.write(head + body)
                await writer.drain()

    async def _responses(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, passage: _Passage) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(head, "big", signed=True))
                passage.answers_due.discard(body[:4])
                writer.write(head + body)
                await writer.drain()
