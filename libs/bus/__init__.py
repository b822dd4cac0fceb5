"""The bus: how a service consumes and emits contract events with at-least-once delivery and
exactly-once effects.

Consumer policy, for every subscribed contract:

1. The message is parsed and validated here (not in the framework): not JSON, not an envelope,
   an unknown major version, the wrong event type or a schema violation each go straight to the
   dead-letter topic with a reason code.
2. The handler runs inside one PostgreSQL transaction together with the inbox row (the event id
   for this consumer group) and the outbox rows of every event it emits. A redelivered event
   finds its inbox row and is skipped: the effect happens once.
3. A handler that raises is retried with exponential backoff, each attempt in a fresh
   transaction; after the last attempt the message is dead-lettered (through the outbox, in the
   same transaction as its inbox row) and the consumer goes on.
4. Only then is the offset committed. A database outage is not the message's fault: the
   message is not dead-lettered but rewound and retried.

Emitted events are handed to the broker client right after the transaction commits, in order;
the offset commit does not wait for the broker's acknowledgements (the committed outbox row is
the durable record; each acknowledgement marks its row published). A relay publishes whatever
that missed (a crash, a broker outage) (`outbox.py`). When the broker has lost its topics (a
restarted embedded broker), the retained outbox is re-published so downstream work is re-derived;
until the process has checked the broker's epoch it publishes and commits nothing (`epoch.py`).

`consume_batch` keeps this policy per message for handlers that are cheaper per batch than per
message (model inference): up to N messages (or what arrives within T ms) are read at once, a
`prepare` step runs once for all of them outside any transaction, then every message's effect,
inbox row and outbox rows commit in one transaction, and only then are the offsets committed.
A message whose preparation or effect fails falls back to the one-message path (its own
transaction, retries, dead letter) without holding back the others.

The package: `unit.py` (what a handler works with), `parse.py` (is it an event? the dead letter),
`consume.py` and `batch.py` (the consumer policy), `outbox.py` (publishing), `epoch.py` (a
broker that lost its topics), `runtime.py` (wiring and lifecycle), `fake.py` (an in-memory
stand-in for the runtime and the broker, for handler tests).
"""

from visionloop.libs.bus.parse import dead_letter, parse_event
from visionloop.libs.bus.runtime import Runtime
from visionloop.libs.bus.unit import (
    INFRASTRUCTURE_ERRORS,
    BatchHandler,
    BatchPrepare,
    Handler,
    PermanentError,
    Unit,
)

__all__ = [
    "INFRASTRUCTURE_ERRORS",
    "BatchHandler",
    "BatchPrepare",
    "Handler",
    "PermanentError",
    "Runtime",
    "Unit",
    "dead_letter",
    "parse_event",
]
