"""Contracts: every event round-trips, matches its committed JSON Schema, and changes only additively."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
from examples import EXAMPLES
from pydantic import Field, ValidationError, create_model

from visionloop import asyncapi
from visionloop.contracts import (
    TOPICS,
    Box,
    Envelope,
    ImageRejected,
    ImageSubmitted,
    Payload,
    topic_of,
)
from visionloop.contracts import jsonschemas as contract_schemas
from visionloop.contracts.envelope import EnvelopeHeader
from visionloop.contracts.topics import TopicSpec


def test_every_registered_contract_has_an_example() -> None:
    assert {type(e) for e in EXAMPLES} == set(TOPICS)


@pytest.mark.parametrize("payload", EXAMPLES, ids=lambda p: type(p).__name__)
def test_round_trip_and_committed_schema(payload: Payload) -> None:
    envelope = Envelope.of(payload, producer="test/1", project="demo")
    text = envelope.model_dump_json()
    back = Envelope[type(payload)].model_validate_json(text)  # type: ignore[misc]
    assert back == envelope
    committed = contract_schemas.load_committed()[topic_of(payload)]
    jsonschema.Draft202012Validator(committed).validate(json.loads(text))
    assert EnvelopeHeader.model_validate_json(text).event_type == payload.event_type


def test_topic_registry_names_and_keys() -> None:
    names = [spec.name for spec in TOPICS.values()]
    assert len(names) == len(set(names))
    for spec in TOPICS.values():
        assert re.fullmatch(r"vl\.[a-z]+\.[a-z]+\.v1", spec.name), spec.name
        assert spec.partitions >= 1
    for example in EXAMPLES:
        key = TOPICS[type(example)].key_of(Envelope.of(example, producer="t", project="demo"))
        assert isinstance(key, str) and key


def test_committed_schemas_are_current() -> None:
    """`visionloop contracts export` was run after the last model change."""
    assert contract_schemas.load_committed() == contract_schemas.current_schemas()


def test_current_models_are_compatible_with_committed_schemas() -> None:
    assert contract_schemas.check() == []


def test_asyncapi_document_is_current() -> None:
    assert asyncapi.DOCUMENT.read_text(encoding="utf-8") == asyncapi.generate()
    doc = asyncapi.DOCUMENT.read_text(encoding="utf-8")
    assert "vl.image.submitted.v1" in doc and "vl.image.ingested.v1" in doc


def _variant(base: type[Payload], *, drop: tuple[str, ...] = (), **changes) -> dict:  # noqa: ANN003
    """The schema of a copy of `base` with fields dropped or replaced, under base's topic name."""
    fields = {name: (f.annotation, f) for name, f in base.model_fields.items() if name not in drop}
    fields |= changes
    model = create_model(base.__name__, __base__=Payload, **fields)  # type: ignore[call-overload]
    model.event_type = base.event_type
    spec = TOPICS[base]
    return {spec.name: contract_schemas.schema_of(TopicSpec(model, spec.key, spec.key_of, spec.partitions, spec.description))}


BROKEN = {
    "field removed": (_variant(ImageRejected, drop=("duplicate_of",)), "field removed"),
    "new required field": (_variant(ImageRejected, severity=(int, Field(description="x"))), "became required"),
    "type changed": (_variant(ImageRejected, hamming_distance=(str | None, None)), "type changed"),
    "enum value removed": (
        _variant(ImageRejected, reason=(__import__("enum").StrEnum("R", {"DUPLICATE": "duplicate"}), Field())),
        "enum values removed",
    ),
    "constraint tightened": (_variant(ImageRejected, message=(str, Field(max_length=10))), "maxLength tightened"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_breaking_copies_are_caught(case: str) -> None:
    """A deliberately broken copy of a committed contract fails the compatibility check."""
    schema, problem = BROKEN[case]
    committed = contract_schemas.load_committed()
    found = contract_schemas.incompatibilities({k: committed[k] for k in schema}, schema)
    assert any(problem in p.problem for p in found), found


def test_removed_topic_is_caught() -> None:
    committed = contract_schemas.load_committed()
    current = {k: v for k, v in contract_schemas.current_schemas().items() if k != "vl.image.rejected.v1"}
    found = contract_schemas.incompatibilities(committed, current)
    assert [p.problem for p in found] == ["topic removed (a breaking change needs a new major topic)"]


def test_additive_change_passes() -> None:
    schema = _variant(ImageRejected, severity=(int | None, Field(default=None, description="new, optional")))
    committed = contract_schemas.load_committed()
    assert contract_schemas.incompatibilities({k: committed[k] for k in schema}, schema) == []


def test_boxes_are_canonical_pixels() -> None:
    with pytest.raises(ValidationError, match="x1 <= x2"):
        Box(x1=10, y1=0, x2=5, y2=5, class_name="a")
    with pytest.raises(ValidationError):
        Box(x1=math.nan, y1=0, x2=5, y2=5, class_name="a")
    with pytest.raises(ValidationError):
        Box(x1=0, y1=0, x2=5, y2=5, class_name="a", score=1.5)


def test_submission_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ImageSubmitted(submission_id="s")
    with pytest.raises(ValidationError, match="exactly one"):
        ImageSubmitted(submission_id="s", source_uri="file:///x.jpg", inline_bytes=b"x")
    with pytest.raises(ValidationError, match="base64"):
        ImageSubmitted.model_validate({"submission_id": "s", "inline_bytes": "%%%"})


def test_envelope_chains_correlation_and_causation() -> None:
    first = Envelope.of(EXAMPLES[0], producer="upstream", project="demo", correlation_id="img-1")
    second = Envelope.of(EXAMPLES[2], producer="ingest/1", project="demo", causation=first)
    assert second.correlation_id == "img-1" and second.causation_id == first.event_id
    assert second.occurred_at.tzinfo is not None


def test_unknown_fields_are_ignored_missing_required_rejected() -> None:
    data = json.loads(Envelope.of(EXAMPLES[2], producer="p", project="demo").model_dump_json())
    data["payload"]["added_in_1_1"] = {"anything": True}
    Envelope[type(EXAMPLES[2])].model_validate(data)  # type: ignore[misc]
    del data["payload"]["image"]
    with pytest.raises(ValidationError):
        Envelope[type(EXAMPLES[2])].model_validate(data)  # type: ignore[misc]


def test_project_names_are_slugs() -> None:
    with pytest.raises(ValidationError):
        Envelope.of(EXAMPLES[0], producer="p", project="Bad Project!")
