"""The consumer policy for one message at a time (see the package's note): parse, handle in one
transaction with the inbox and outbox rows, retry with backoff, dead-letter, and only then let the
framework commit the offset (after the bus is verified: `Epoch.wait_verified`)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
from faststream.kafka import KafkaMessage

from visionloop.contracts import SYSTEM_PROJECT, DeadLetterReason, Envelope
from visionloop.libs.bus.parse import dead_letter, parse_event
from visionloop.libs.bus.unit import (
    INFRASTRUCTURE_ERRORS,
    Handler,
    PermanentError,
    Subscription,
    Unit,
)
from visionloop.libs.db import quote_ident, quote_literal
from visionloop.libs.settings import Settings

if TYPE_CHECKING:
    from visionloop.libs.bus.epoch import Epoch
    from visionloop.libs.bus.outbox import Outbox

log = logging.getLogger("visionloop.libs.bus")


class Consuming:
    """The one-message consumer policy, as part of `Runtime`."""

    service: str
    settings: Settings
    schema: str
    pool: asyncpg.Pool | None
    counters: Counter[str]
    outbox: "Outbox"
    epoch: "Epoch"

    async def _on_message(self, sub: Subscription, message: KafkaMessage) -> None:
        record = message.raw_message
        self.counters["received"] += 1
        event, reason, problem = self._parse(sub, record.value)
        if event is None:
            assert reason is not None
            await self._dead_letter(sub, record, reason, problem, attempts=1, event_id=None, error_type=None)
        else:
            await self._with_retries(sub, record, event, lambda attempt: self._handle_once(sub, event))
        await self.epoch.wait_verified()  # the framework commits the offset when this returns

    async def _with_retries(
        self,
        sub: Subscription,
        record: Any,
        event: Envelope[Any],
        attempt: Callable[[int], Awaitable[bool]],
        *,
        attempts: int = 0,
        failure: BaseException | None = None,
    ) -> None:
        """Run `attempt(n)` until it succeeds, retrying with backoff, then dead-letter.

        `attempts` and `failure` carry an attempt that already failed elsewhere (a batch).
        """
        backoff = self.settings.retry_backoff_ms / 1000
        while True:
            try:
                if failure is not None:
                    exc, failure = failure, None
                    raise exc
                attempts += 1
                handled = await attempt(attempts)
                self.counters["handled" if handled else "duplicates_skipped"] += 1
                return
            except INFRASTRUCTURE_ERRORS as exc:
                # Not the message's fault: back off, then rewind (FastStream nacks on raise).
                log.warning("%s: infrastructure error on %s, will redeliver: %s", self.service, sub.spec.name, exc)
                self.counters["infrastructure_errors"] += 1
                await asyncio.sleep(min(backoff * 4, self.settings.retry_backoff_max_ms / 1000))
                raise
            except Exception as exc:
                permanent = isinstance(exc, PermanentError)
                if permanent or attempts >= self.settings.handler_max_attempts:
                    log.error(
                        "%s: %s %s failed %d time(s), dead-lettering: %r",
                        self.service, sub.spec.payload.event_type, event.event_id, attempts, exc,
                    )
                    await self._dead_letter(
                        sub, record, DeadLetterReason.HANDLER_FAILED, f"{type(exc).__name__}: {exc}",
                        attempts=attempts, event_id=event.event_id, error_type=type(exc).__name__,
                        envelope=event,
                    )
                    return
                self.counters["retries"] += 1
                delay = min(backoff * 2 ** (attempts - 1), self.settings.retry_backoff_max_ms / 1000)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))

    def _parse(
        self, sub: Subscription, value: bytes | None
    ) -> tuple[Envelope[Any] | None, DeadLetterReason | None, str]:
        return parse_event(sub.spec, sub.model, value)

    async def _handle_once(self, sub: Subscription, event: Envelope[Any], handler: Handler[Any] | None = None) -> bool:
        """One attempt in one transaction; False when the inbox says it was handled already."""
        assert self.pool is not None, "consumers need a database (inbox)"
        handler = handler or sub.handler
        unit: Unit[Any]
        async with self.pool.acquire() as conn:
            unit = Unit(conn=conn, runtime=self, event=event)
            # BEGIN and the inbox row in one round trip (the simple protocol takes no parameters:
            # the group is quoted as a literal, the event id is a UUID).
            try:
                status = await conn.execute(
                    f"BEGIN; INSERT INTO {quote_ident(self.schema)}.inbox (consumer_group, event_id) "
                    f"VALUES ({quote_literal(sub.group)}, '{event.event_id}'::uuid) ON CONFLICT DO NOTHING"
                )
                if status != "INSERT 0 1":
                    return False  # handled already (the rollback below ends the transaction)
                await handler(event, unit)
                await self.outbox.store(conn, unit.emitted)
                await conn.execute("COMMIT")
            finally:
                if conn.is_in_transaction() and not conn.is_closed():
                    await conn.execute("ROLLBACK")
        await self.outbox.publish_after_commit(unit.emitted)
        return True

    async def _dead_letter(
        self,
        sub: Subscription,
        record: Any,
        reason: DeadLetterReason,
        problem: str,
        *,
        attempts: int,
        event_id: Any,
        error_type: str | None,
        envelope: Envelope[Any] | None = None,
    ) -> None:
        """Send a message to the dead-letter topic, durably, and record it in the inbox."""
        letter = dead_letter(
            record, reason, problem, consumer_group=sub.group, service=self.service, attempts=attempts,
            event_id=event_id, error_type=error_type,
        )
        self.counters[f"dead_lettered.{reason.value}"] += 1
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            unit: Unit[Any] = Unit(conn=conn, runtime=self, event=envelope)
            async with conn.transaction():
                if event_id is not None:
                    await conn.execute(
                        f"INSERT INTO {quote_ident(self.schema)}.inbox (consumer_group, event_id, outcome) "
                        "VALUES ($1, $2, 'dead_lettered') ON CONFLICT DO NOTHING",
                        sub.group,
                        event_id,
                    )
                unit.emit(letter, project=envelope.project if envelope else SYSTEM_PROJECT)
                await self.outbox.store(conn, unit.emitted)
        await self.outbox.publish_after_commit(unit.emitted)

