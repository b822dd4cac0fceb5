"""JSON Schema export of every contract and the additive-change check against committed schemas.

`visionloop contracts export` writes one schema per topic into `contracts/schemas/`; the test
suite (and `visionloop contracts check`) compares the live models against those files and fails
on any change that is not additive: a removed field, a new required field, a changed type, a
removed enum value, a tightened constraint or a removed topic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionloop.contracts.envelope import Envelope, EnvelopeHeader
from visionloop.contracts.topics import TOPICS, TopicSpec

SCHEMA_DIR = Path(__file__).parent / "schemas"

JsonSchema = dict[str, Any]


def schema_of(spec: TopicSpec) -> JsonSchema:
    """The JSON Schema of the envelope carrying `spec`'s payload, with topic metadata."""
    schema = Envelope[spec.payload].model_json_schema(mode="validation")  # type: ignore[name-defined]
    # Consumers read the header first (`EnvelopeHeader`), which needs fields the producing model
    # fills in by default (`event_id`, `schema_version`): an event without them is dead-lettered,
    # so the schema calls them required.
    needed = set(schema.get("required", [])) | {n for n, f in EnvelopeHeader.model_fields.items() if f.is_required()}
    schema["required"] = [name for name in schema["properties"] if name in needed]
    schema["properties"]["event_type"]["const"] = spec.payload.event_type  # one event type per topic
    schema["title"] = spec.payload.__name__
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["x-topic"] = spec.name
    schema["x-event-type"] = spec.payload.event_type
    schema["x-schema-version"] = spec.payload.schema_version
    schema["x-key"] = spec.key
    schema["x-partitions"] = spec.partitions
    return schema


def current_schemas() -> dict[str, JsonSchema]:
    """Schemas of the models as they are now, by topic name."""
    return {spec.name: schema_of(spec) for spec in TOPICS.values()}


def dumps(schema: JsonSchema) -> str:
    """Stable text form (sorted keys, 2-space indent, newline at end) so diffs stay readable."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema to `directory/<topic>.json`; remove files of topics that no longer exist."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    schemas = current_schemas()
    for name, schema in schemas.items():
        path = directory / f"{name}.json"
        path.write_text(dumps(schema), encoding="utf-8")
        written.append(path)
    for stale in directory.glob("*.json"):
        if stale.stem not in schemas:
            stale.unlink()
    return written


def load_committed(directory: Path = SCHEMA_DIR) -> dict[str, JsonSchema]:
    """The committed schemas, by topic name."""
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.json"))}


@dataclass(frozen=True)
class Incompatibility:
    """One non-additive change."""

    topic: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.topic}: {self.path or '<root>'}: {self.problem}"


class _Walker:
    """Compares an old and a new schema node by node, resolving `$ref`s in each."""

    def __init__(self, topic: str, old: JsonSchema, new: JsonSchema) -> None:
        self.topic = topic
        self.old_root = old
        self.new_root = new
        self.problems: list[Incompatibility] = []
        self._seen: set[tuple[int, int]] = set()

    def _resolve(self, node: JsonSchema, root: JsonSchema) -> JsonSchema:
        while "$ref" in node:
            ref = node["$ref"]
            if not ref.startswith("#/"):
                raise ValueError(f"external $ref not supported: {ref}")
            target: Any = root
            for part in ref[2:].split("/"):
                target = target[part]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def _flag(self, path: str, problem: str) -> None:
        self.problems.append(Incompatibility(self.topic, path, problem))

    @staticmethod
    def _variants(node: JsonSchema) -> list[JsonSchema]:
        return list(node.get("anyOf") or node.get("oneOf") or [node])

    def _types(self, node: JsonSchema, root: JsonSchema) -> set[str]:
        types: set[str] = set()
        for variant in self._variants(node):
            variant = self._resolve(variant, root)
            if "anyOf" in variant or "oneOf" in variant:
                types |= self._types(variant, root)
            elif "type" in variant:
                t = variant["type"]
                types |= set(t) if isinstance(t, list) else {t}
            elif "const" in variant or "enum" in variant:
                types.add("enum")
            else:
                types.add("any")
        return types

    def compare(self, old: JsonSchema, new: JsonSchema, path: str = "") -> None:
        old = self._resolve(old, self.old_root)
        new = self._resolve(new, self.new_root)
        key = (id(old), id(new))
        if key in self._seen:
            return
        self._seen.add(key)

        old_types, new_types = self._types(old, self.old_root), self._types(new, self.new_root)
        if old_types != new_types and "any" not in new_types:
            self._flag(path, f"type changed from {sorted(old_types)} to {sorted(new_types)}")
            return

        self._compare_enum(old, new, path)
        self._compare_constraints(old, new, path)

        old_vars, new_vars = self._variants(old), self._variants(new)
        if len(old_vars) > 1 or len(new_vars) > 1:
            # Pair union members by their type so `X | None` compares X with X.
            for ov in old_vars:
                ov_r = self._resolve(ov, self.old_root)
                ot = self._types(ov_r, self.old_root)
                for nv in new_vars:
                    nv_r = self._resolve(nv, self.new_root)
                    if self._types(nv_r, self.new_root) == ot:
                        self.compare(ov_r, nv_r, path)
                        break
            return

        if "object" in old_types:
            self._compare_object(old, new, path)
        if "array" in old_types and "items" in old and "items" in new:
            self.compare(old["items"], new["items"], f"{path}[]")

    def _compare_object(self, old: JsonSchema, new: JsonSchema, path: str) -> None:
        old_props: dict[str, Any] = old.get("properties", {})
        new_props: dict[str, Any] = new.get("properties", {})
        for name, old_prop in old_props.items():
            if name not in new_props:
                self._flag(f"{path}.{name}", "field removed")
            else:
                self.compare(old_prop, new_props[name], f"{path}.{name}")
        added_required = set(new.get("required", [])) - set(old.get("required", []))
        for name in sorted(added_required):
            self._flag(f"{path}.{name}", "field became required (or was added as required)")
        old_extra, new_extra = old.get("additionalProperties"), new.get("additionalProperties")
        if isinstance(old_extra, dict) and isinstance(new_extra, dict):
            self.compare(old_extra, new_extra, f"{path}{{}}")

    def _compare_enum(self, old: JsonSchema, new: JsonSchema, path: str) -> None:
        def values(node: JsonSchema) -> set[Any] | None:
            if "enum" in node:
                return {json.dumps(v) for v in node["enum"]}
            if "const" in node:
                return {json.dumps(node["const"])}
            return None

        old_values, new_values = values(old), values(new)
        if old_values is not None:
            if new_values is None:
                return  # widened to the plain type: every old value is still valid
            removed = old_values - new_values
            if removed:
                self._flag(path, f"enum values removed: {sorted(removed)}")

    def _compare_constraints(self, old: JsonSchema, new: JsonSchema, path: str) -> None:
        for bound in ("maxLength", "maximum", "exclusiveMaximum", "maxItems", "maxProperties"):
            if bound in new and (bound not in old or new[bound] < old[bound]):
                self._flag(path, f"{bound} tightened from {old.get(bound)} to {new[bound]}")
        for bound in ("minLength", "minimum", "exclusiveMinimum", "minItems", "minProperties"):
            if bound in new and (bound not in old or new[bound] > old[bound]):
                self._flag(path, f"{bound} tightened from {old.get(bound)} to {new[bound]}")
        if "pattern" in new and new.get("pattern") != old.get("pattern"):
            self._flag(path, f"pattern changed from {old.get('pattern')!r} to {new['pattern']!r}")


def incompatibilities(
    committed: dict[str, JsonSchema], current: dict[str, JsonSchema]
) -> list[Incompatibility]:
    """Every non-additive change from `committed` to `current` (empty when compatible)."""
    problems: list[Incompatibility] = []
    for topic, old in committed.items():
        if topic not in current:
            problems.append(Incompatibility(topic, "", "topic removed (a breaking change needs a new major topic)"))
            continue
        walker = _Walker(topic, old, current[topic])
        walker.compare(old, current[topic])
        problems += walker.problems
    return problems


def check(directory: Path = SCHEMA_DIR) -> list[Incompatibility]:
    """Compare the live models with the committed schemas in `directory`."""
    return incompatibilities(load_committed(directory), current_schemas())
