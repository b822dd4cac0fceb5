"""Dataset manifests: the JSON the trainer writes for each dataset version and frozen test set.

A manifest names its version (a content hash), the class list in head order and every image
(its ImageRef), its boxes and its split (`train`, `val` or `test`). The trainer writes it to the
blob store; the evaluator (the test set) and anyone reproducing a run read it back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Member:
    """One image of a dataset version."""

    image: Mapping[str, Any]
    """The ImageRef, as stored."""
    boxes: Sequence[Mapping[str, Any]]
    label_hash: str
    split: str
    """`train`, `val` or `test`."""

    @property
    def image_id(self) -> str:
        """The image's id."""
        return str(self.image["image_id"])


def manifest(project: str, version: str, class_names: Sequence[str], members: Sequence[Member]) -> bytes:
    """The manifest JSON of a dataset version or test set (deterministic bytes)."""
    doc = {
        "project": project,
        "version": version,
        "class_names": list(class_names),
        "images": [
            {"image": dict(m.image), "boxes": [dict(b) for b in m.boxes], "split": m.split}
            for m in sorted(members, key=lambda m: m.image_id)
        ],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def read_manifest(data: bytes) -> dict[str, Any]:
    """A manifest back from its bytes, checked for the keys every reader relies on."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not {"version", "class_names", "images"} <= doc.keys():
        raise ValueError("not a dataset manifest")
    return doc
