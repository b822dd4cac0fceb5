"""Fuzzing every consumer with malformed events, over the real broker and PostgreSQL.

Every service of the loop (and an edge agent) runs; on every topic any of them reads, the test
publishes generated malformed messages — random bytes, a tombstone, JSON that is no envelope,
another event type, an unknown major version, and schema violations made by mutating a valid
envelope of the topic's contract — then one valid event, all with one key (one partition, so in
that order). Every consumer group must dead-letter every malformed message with the reason code
that fits it, keep running, and then handle the valid event.

Generation is seeded (`SEED`), so the messages are the same on every run, whatever else runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaProducer
from examples import EXAMPLES
from helpers import Collector, Services, eventually
from pydantic import ValidationError

from visionloop.contracts import DeadLetter, DeadLetterReason, EdgeRelease, Envelope, Payload, RolloutStage, topic_of
from visionloop.libs.kafka import client_kwargs
from visionloop.libs.settings import Settings

REPO = Path(__file__).resolve().parent.parent
KEY = b"fuzz"
"""One key for every message: one partition per topic, so the valid event comes after the fuzz."""
MALFORMED = {r for r in DeadLetterReason if r is not DeadLetterReason.HANDLER_FAILED}

# -- generation ---------------------------------------------------------------------------------------

SEED = 20251127
"""Generation is seeded here, so every run (and every test selection) sends the same messages."""
EDGE_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308, float("inf"),
    "", " ", "\x00", "é", "🙂" * 3, "x" * 5000, "-1", "null", [], [None], {}, {"": None}, {"$ref": "#"},
]
"""Values at the edges of what JSON can say: boundaries, control characters, odd types."""


def json_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, often one of `EDGE_VALUES`."""
    kind = rng.choice(["edge", "edge", "int", "float", "text", "list", "dict"][: 7 if depth < 2 else 5])
    if kind == "edge":
        return rng.choice(EDGE_VALUES)
    if kind == "int":
        return rng.randint(-(2**40), 2**40)
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    if kind == "text":
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0x2FFF)])) for _ in range(rng.randint(0, 12)))
    if kind == "list":
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {str(json_value(rng, 2)): json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _rng(*labels: object) -> random.Random:
    return random.Random(f"{SEED}:" + ":".join(map(str, labels)))


def _is_json(value: bytes) -> bool:
    try:
        json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def example_of(payload_type: type[Payload]) -> Payload:
    """The contract tests' valid example of a payload type."""
    return next(p for p in EXAMPLES if type(p) is payload_type)


def _valid(payload: Payload, **envelope: Any) -> dict[str, Any]:
    return json.loads(Envelope.of(payload, producer="fuzz", project="fuzz", **envelope).model_dump_json())


def _breaks(model: type[Envelope[Any]], document: dict[str, Any]) -> bool:
    """Whether the contract refuses `document` as a consumer receives it (JSON text)."""
    try:
        model.model_validate_json(json.dumps(document))
    except ValidationError:
        return True
    return False


@functools.cache
def mutations(payload_type: type[Payload]) -> list[dict[str, Any]]:
    """Envelopes of the contract of `payload_type` whose payload breaks the contract's schema:
    a field of its example deleted or replaced by a generated value, or the whole payload
    replaced, kept only where the contract refuses the result."""
    model = Envelope[payload_type]  # type: ignore[valid-type]
    valid = _valid(example_of(payload_type))
    rng = _rng("mutations", payload_type.__name__)
    fields = sorted(payload_type.model_fields)
    broken: list[dict[str, Any]] = []
    for _ in range(60):
        document = copy.deepcopy(valid)
        field = rng.choice(fields)
        if rng.random() < 0.3:
            document["payload"].pop(field, None)
        else:
            document["payload"][field] = json_value(rng)
        if _breaks(model, document) and document not in broken:
            broken.append(document)
        if len(broken) == 6:
            break
    for whole in (None, [], "payload", {}, {"unknown": 1}):  # the payload is no object of the contract
        document = copy.deepcopy(valid)
        document["payload"] = whole
        if _breaks(model, document):
            broken.append(document)
    return broken


def malformed(payload: Payload, other: Payload) -> list[tuple[bytes | None, DeadLetterReason | None]]:
    """Malformed messages for `payload`'s topic with the reason each must be dead-lettered with
    (None: any malformed-message reason, for generated bytes that may happen to be JSON)."""
    cases: list[tuple[bytes | None, DeadLetterReason | None]] = []
    cases += [(None, DeadLetterReason.NOT_JSON), (b"", DeadLetterReason.NOT_JSON), (b"\xff\xfe{", DeadLetterReason.NOT_JSON)]
    rng = _rng("malformed", type(payload).__name__)
    randoms = [rng.randbytes(rng.randint(1, 48)) for _ in range(4)]
    cases += [(raw, None if _is_json(raw) else DeadLetterReason.NOT_JSON) for raw in randoms]
    not_envelopes = [[], "text", 3, {"hello": "world"}, _valid(payload)["payload"], {**_valid(payload), "event_id": "not-a-uuid"}]
    not_envelopes += [doc for doc in (json_value(rng) for _ in range(4)) if not isinstance(doc, dict) or "event_id" not in doc]
    cases += [(json.dumps(doc).encode(), DeadLetterReason.NOT_AN_ENVELOPE) for doc in not_envelopes]
    for version in ("2.0", "0.9"):
        document = _valid(payload)
        document["schema_version"] = version
        cases.append((json.dumps(document).encode(), DeadLetterReason.UNSUPPORTED_VERSION))
    cases.append((json.dumps(_valid(other)).encode(), DeadLetterReason.UNEXPECTED_EVENT_TYPE))
    cases += [(json.dumps(doc).encode(), DeadLetterReason.SCHEMA_VIOLATION) for doc in mutations(type(payload))]
    return cases


# -- who reads what -----------------------------------------------------------------------------------


def documented_consumers() -> set[tuple[str, str]]:
    """(service, topic) of every subscription in the committed AsyncAPI document."""
    doc = yaml.safe_load((REPO / "contracts" / "asyncapi.yaml").read_text(encoding="utf-8"))
    found = set()
    for channel in doc["channels"]:
        service, sep, topic = channel.partition(" consumes ")
        if sep:
            found.add((service, topic))
    return found


def handled_example(example: Payload) -> Payload:
    """The valid event sent after the fuzz; an edge release addresses every device of its fleet."""
    if isinstance(example, EdgeRelease):
        return example.model_copy(update={"stage": RolloutStage(index=0, percent=100)})
    return example


# -- the test -------------------------------------------------------------------------------------------


async def test_every_consumer_dead_letters_malformed_events_and_keeps_going(settings: Settings, pool: Any, tmp_path: Path) -> None:
    from visionloop import services
    from visionloop.libs import signing
    from visionloop.services.edge_agent.agent import EdgeAgent
    from visionloop.services.trainer.config import TrainerSettings

    async with Services(settings, pool, trainer=TrainerSettings(trigger="count")) as loop:
        edge = example_of(EdgeRelease)
        agent = EdgeAgent(settings, edge.fleet, "fuzz-cam", tmp_path / "edge", signing.TrustStore.load([signing.generate()[1]]))
        try:
            # All at once: their migrations lock their own schemas, their consumer groups join side by side.
            await asyncio.gather(agent.start(), *(loop.start(name) for name in services.available()))
            await _fuzz_consumers(settings, loop, agent)
        finally:
            await asyncio.gather(agent.stop(), *(runtime.stop() for runtime in loop.runtimes))
            loop.runtimes.clear()


async def _fuzz_consumers(settings: Settings, loop: Services, agent: Any) -> None:
    # Every subscription, as the running services registered it; the AsyncAPI document agrees.
    groups: dict[type[Payload], dict[str, str]] = {}  # payload -> consumer group -> service schema
    for runtime in loop.runtimes:
        for sub in runtime._subscriptions:
            groups.setdefault(sub.spec.payload, {})[sub.group] = runtime.schema
    registered = {(rt.service, sub.spec.name) for rt in loop.runtimes for sub in rt._subscriptions}
    assert registered == documented_consumers()
    groups.setdefault(EdgeRelease, {})[agent.group] = ""  # the edge agent: no database, same policy

    payloads = sorted(groups, key=lambda p: p.event_type)
    sent: dict[tuple[str, int, int], tuple[type[Payload], DeadLetterReason | None]] = {}
    valid: dict[type[Payload], Envelope[Any]] = {}
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=5)
    await producer.start()
    async with Collector(settings, topic_of(DeadLetter, settings.topic_prefix)) as letters:
        try:
            for n, payload_type in enumerate(payloads):
                example = example_of(payload_type)
                other = example_of(payloads[(n + 1) % len(payloads)])
                topic = topic_of(example, settings.topic_prefix)
                cases = malformed(example, other)
                # Sent together (one producer, one key: one partition, in this order), the valid event last.
                sends = [await producer.send(topic, value, key=KEY) for value, _ in cases]
                envelope = Envelope.of(handled_example(example), producer="fuzz", project="fuzz")
                sends.append(await producer.send(topic, envelope.model_dump_json().encode(), key=KEY))
                for meta, (_, reason) in zip(await asyncio.gather(*sends[:-1]), cases, strict=True):
                    sent[(meta.topic, meta.partition, meta.offset)] = (payload_type, reason)
                await sends[-1]
                valid[payload_type] = envelope
        finally:
            await producer.stop()

        expected = sum(len(groups[p]) for p, _ in sent.values())

        def letters_of_fuzz() -> dict[tuple[str, str, int, int], dict[str, Any]]:
            found = {}
            for message in letters.messages:
                letter = message.get("payload") or {}
                original = letter.get("original") or {}
                where = (original.get("topic"), original.get("partition"), original.get("offset"))
                if where in sent:
                    found[(letter["consumer_group"], *where)] = letter
            return found

        with contextlib.suppress(AssertionError):  # what is missing is listed below
            await eventually(lambda: len(letters_of_fuzz()) >= expected, timeout=120)
        found = letters_of_fuzz()
        wrong = []
        for where, (payload_type, reason) in sent.items():
            for group in groups[payload_type]:
                letter = found.get((group, *where))
                if letter is None:
                    wrong.append(f"{group} did not dead-letter {where}")
                elif DeadLetterReason(letter["reason"]) not in ({reason} if reason else MALFORMED) or not letter["message"]:
                    wrong.append(f"{group} dead-lettered {where} as {letter['reason']} ({letter['message'][:120]}), expected {reason}")
        missing = Counter(w.split(" did not")[0] for w in wrong if " did not " in w)
        assert not wrong, f"missing per group: {dict(missing)}\n" + "\n".join(wrong[:20])

        # Still alive: the valid event sent after the fuzz reached every consumer's handler.
        for payload_type, envelope in valid.items():
            for group, schema in groups[payload_type].items():
                await eventually(_handled(loop, agent, group, schema, envelope), timeout=60)
        parse_failures = [
            m["payload"] for m in letters.messages
            if (m.get("payload") or {}).get("original_event_id") in {str(e.event_id) for e in valid.values()}
            and m["payload"]["reason"] != DeadLetterReason.HANDLER_FAILED.value
        ]
        assert not parse_failures, parse_failures
    # ...and nothing in the background gave up (outbox relays, heartbeats, workers).
    assert all(not task.done() for runtime in loop.runtimes for task in runtime._tasks)
    assert len(sent) >= 15 * len(payloads)
    print(f"{len(sent)} malformed messages on {len(payloads)} topics, {expected} dead letters from {sum(map(len, groups.values()))} consumer groups")


def _handled(loop: Services, agent: Any, group: str, schema: str, envelope: Envelope[Any]) -> Callable[[], Any]:
    """Whether `group` took `envelope` into its handler (an inbox row; for the edge agent, a report)."""
    if group == agent.group:
        return lambda: any(s.release_id == envelope.payload.release_id for s in agent.history)

    async def check() -> bool:
        return bool(await loop.pool.fetchval(
            f'SELECT true FROM "{schema}".inbox WHERE consumer_group = $1 AND event_id = $2', group, envelope.event_id
        ))

    return check


def test_generated_mutations_break_the_schema() -> None:
    """The generator itself: every mutation is refused by the contract, and there are enough."""
    for payload_type in {type(p) for p in EXAMPLES}:
        broken = mutations(payload_type)
        assert len(broken) >= 6, payload_type.__name__
        model = Envelope[payload_type]  # type: ignore[valid-type]
        assert all(_breaks(model, doc) for doc in broken)
