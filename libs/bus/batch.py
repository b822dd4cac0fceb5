"""The consumer policy for batches (`Runtime.consume_batch`): prepare once per batch, commit every
prepared event's effect in one transaction, settle failures one by one."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from itertools import chain
from typing import Any

from faststream.kafka import KafkaMessage

from visionloop.contracts import DeadLetterReason, Envelope
from visionloop.libs.bus.consume import Consuming
from visionloop.libs.bus.unit import INFRASTRUCTURE_ERRORS, Subscription, Unit
from visionloop.libs.db import quote_ident

log = logging.getLogger("visionloop.libs.bus")


class Batching(Consuming):
    """The batch consumer policy, as part of `Runtime`."""

    async def _on_batch(self, sub: Subscription, message: KafkaMessage) -> None:
        """The batch policy of `consume_batch`; FastStream commits the offsets when this returns."""
        records = message.raw_message
        if not isinstance(records, tuple):
            records = (records,)
        self.counters["received"] += len(records)
        self.counters["batches"] += 1
        malformed: list[tuple[Any, DeadLetterReason, str]] = []
        parsed: dict[Any, tuple[Any, Envelope[Any]]] = {}
        for record in records:
            event, reason, problem = self._parse(sub, record.value)
            if event is None:
                assert reason is not None
                malformed.append((record, reason, problem))
            elif event.event_id in parsed:  # the same event twice in one batch (a relayed copy)
                self.counters["duplicates_skipped"] += 1
            else:
                parsed[event.event_id] = (record, event)
        assert self.pool is not None, "consumers need a database (inbox)"
        done = {
            row["event_id"]
            for row in await self.pool.fetch(
                f"SELECT event_id FROM {quote_ident(self.schema)}.inbox "
                "WHERE consumer_group = $1 AND event_id = ANY($2::uuid[])",
                sub.group,
                list(parsed),
            )
        } if parsed else set()
        self.counters["duplicates_skipped"] += len(done)
        fresh = [item for key, item in parsed.items() if key not in done]
        if fresh:
            try:
                await self._handle_batch(sub, fresh)
            except INFRASTRUCTURE_ERRORS as exc:
                # Not the messages' fault: back off, then rewind the whole batch (nack).
                log.warning("%s: infrastructure error on %s, will redeliver: %s", self.service, sub.spec.name, exc)
                self.counters["infrastructure_errors"] += 1
                await asyncio.sleep(min(self.settings.retry_backoff_ms * 4, self.settings.retry_backoff_max_ms) / 1000)
                raise
        for record, reason, problem in malformed:
            await self._dead_letter(sub, record, reason, problem, attempts=1, event_id=None, error_type=None)
        await self.epoch.wait_verified()  # the framework commits the offsets when this returns

    async def _handle_batch(self, sub: Subscription, fresh: list[tuple[Any, Envelope[Any]]]) -> None:
        """Prepare once, commit what prepared in one transaction, settle the rest one by one."""
        results = await self._prepare(sub, [event for _, event in fresh])
        pairs = list(zip(fresh, results, strict=True))
        ready = [(r, e, res) for (r, e), res in pairs if not isinstance(res, BaseException)]
        failed: list[tuple[Any, Envelope[Any], Any]] = [(r, e, res) for (r, e), res in pairs if isinstance(res, BaseException)]
        if ready:
            try:
                await self._handle_together(sub, ready)
            except INFRASTRUCTURE_ERRORS:
                raise
            except Exception as exc:
                # One event's effect failed and rolled the transaction back: settle each alone.
                log.warning(
                    "%s: batch of %d on %s failed (%r); handling its events one by one",
                    self.service, len(ready), sub.spec.name, exc,
                )
                self.counters["batch_fallbacks"] += 1
                failed = [(r, e, _Prepared(res)) for r, e, res in ready] + failed
        for record, event, outcome in failed:
            await self._settle_alone(sub, record, event, outcome)

    async def _prepare(self, sub: Subscription, events: list[Envelope[Any]]) -> list[Any]:
        """`prepare` for a batch; a failure of the whole call becomes every event's failure."""
        try:
            results = list(await sub.prepare(events))
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            log.warning("%s: preparing a batch of %d failed: %r", self.service, len(events), exc)
            return [exc] * len(events)
        if len(results) != len(events):
            problem = RuntimeError(f"prepare returned {len(results)} results for {len(events)} events")
            return [problem] * len(events)
        return results

    async def _settle_alone(self, sub: Subscription, record: Any, event: Envelope[Any], outcome: Any) -> None:
        """The one-message path for an event of a batch: its first result, then fresh attempts."""

        async def attempt(n: int) -> bool:
            if n == 1 and isinstance(outcome, _Prepared):
                result = outcome.value
            else:
                (result,) = await self._prepare(sub, [event])
                if isinstance(result, BaseException):
                    raise result

            async def handler(ev: Envelope[Any], unit: Unit[Any]) -> None:
                await sub.handler(ev, unit, result)

            return await self._handle_once(sub, event, handler)

        if isinstance(outcome, BaseException):
            await self._with_retries(sub, record, event, attempt, attempts=1, failure=outcome)
        else:
            await self._with_retries(sub, record, event, attempt)

    async def _handle_together(self, sub: Subscription, ready: list[tuple[Any, Envelope[Any], Any]]) -> None:
        """Every prepared event's effect, inbox row and outbox rows in one transaction."""
        assert self.pool is not None
        schema = quote_ident(self.schema)
        units: list[Unit[Any]] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                fresh = {
                    row["event_id"]
                    for row in await conn.fetch(
                        f"INSERT INTO {schema}.inbox (consumer_group, event_id) "
                        "SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id",
                        sub.group,
                        [event.event_id for _, event, _ in ready],
                    )
                }
                for _, event, result in ready:
                    if event.event_id not in fresh:
                        continue
                    unit: Unit[Any] = Unit(conn=conn, runtime=self, event=event)
                    await sub.handler(event, unit, result)
                    units.append(unit)
                emitted = [out for unit in units for out in unit.emitted]
                await self.outbox.store(conn, emitted)
        self.counters["handled"] += len(units)
        self.counters["duplicates_skipped"] += len(ready) - len(units)
        await self.outbox.publish_after_commit(emitted, concurrently=True)



@dataclass(frozen=True)
class _Prepared:
    """A prepared result carried to the one-message path (it may itself be any value)."""

    value: Any


_BATCH_POLL_MS = 200
"""How long a batch consumer's fetch waits when nothing is buffered (it wakes when data comes)."""


def _linger(subscriber: Any, max_records: int, max_wait_ms: int) -> None:
    """Make a FastStream batch subscriber wait up to `max_wait_ms` to fill its batch.

    FastStream's batch subscriber takes whatever one `getmany` returns; this replaces its
    `get_msg` (FastStream's hook for reading one batch) with one that, having found fewer than
    `max_records` messages, polls again until the batch is full or the time is up. Records of
    one partition stay in order.
    """

    async def get_msg(consumer: Any) -> tuple[Any, ...]:
        got = await consumer.getmany(timeout_ms=_BATCH_POLL_MS, max_records=max_records)
        records = list(chain.from_iterable(got.values()))
        if records and max_wait_ms > 0 and len(records) < max_records:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max_wait_ms / 1000
            while len(records) < max_records and (left := deadline - loop.time()) > 0:
                more = await consumer.getmany(timeout_ms=max(1, int(left * 1000)), max_records=max_records - len(records))
                records.extend(chain.from_iterable(more.values()))
        return tuple(records)

    subscriber.get_msg = get_msg
