"""The committed JSON Schemas say what a consumer needs (issue 16, item 4): for every topic, an
event built from its committed schema alone, with only the fields the schema calls required, is
taken by the consumer's parsing (`libs/bus/parse.py`, the first step of every consumer), not
dead-lettered."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from visionloop.contracts import Envelope
from visionloop.contracts.jsonschemas import load_committed
from visionloop.contracts.topics import TOPICS
from visionloop.libs.bus.parse import parse_event

SCHEMAS = load_committed()
_CANDIDATES = ("demo", "1.0", "0" * 16, "0" * 64, "AAAA", "file:///images/a.jpg", "x")
"""Strings tried, in order, against a schema's pattern and lengths."""


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = root["$defs"][name]
    return node


def minimal(node: dict[str, Any], root: dict[str, Any]) -> Any:
    """The smallest value `node` admits: only required properties, the first admissible choice."""
    node = _resolve(node, root)
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in node and "properties" in node:  # an object with alternative required fields: the first
            rest = {k: v for k, v in node.items() if k != key}
            return minimal(rest | {"required": [*node.get("required", []), *node[key][0].get("required", [])]}, root)
        if key in node:
            branches = [b for b in node[key] if _resolve(b, root).get("type") != "null"] or node[key]
            return minimal(branches[0], root)
    kind = node.get("type", "object")
    if kind == "object":
        properties = node.get("properties", {})
        return {name: minimal(properties.get(name, {}), root) for name in node.get("required", [])}
    if kind == "array":
        return [minimal(node.get("items", {}), root) for _ in range(node.get("minItems", 0))]
    if kind in ("integer", "number"):
        return max(node.get("minimum", 0), node.get("exclusiveMinimum", -1) + 1)
    if kind == "boolean":
        return False
    if node.get("format") == "uuid":
        return "00000000-0000-4000-8000-000000000001"
    if node.get("format") == "date-time":
        return "2026-12-04T00:00:00Z"
    low, high = node.get("minLength", 0), node.get("maxLength", 10**9)
    for text in _CANDIDATES:
        if low <= len(text) <= high and ("pattern" not in node or re.search(node["pattern"], text)):
            return text
    raise AssertionError(f"no candidate string fits {node}")


@pytest.mark.parametrize("spec", list(TOPICS.values()), ids=lambda s: s.name)
def test_an_event_with_only_the_required_fields_is_taken(spec) -> None:  # noqa: ANN001
    schema = SCHEMAS[spec.name]
    event = minimal(schema, schema)
    parsed, reason, problem = parse_event(spec, Envelope[spec.payload], json.dumps(event).encode())  # type: ignore[name-defined]
    assert reason is None, f"{spec.name}: {reason} ({problem}) for {event}"
    assert parsed is not None and parsed.event_type == spec.payload.event_type
