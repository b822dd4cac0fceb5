"""The trainer's dataset rules, as pure functions: label hashes, taxonomy, test reservation,
near-duplicate isolation, splits and content-hashed versions.

A dataset version is an immutable snapshot: its id is a hash of the class list and of every
member's image id, label hash and split, so the same data always has the same id and any change
gives a new one. Its manifest (JSON in the blob store) is what training materialises and what
the evaluator reads for the frozen test set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from visionloop.libs.formats import split_for
from visionloop.libs.manifest import Member


def label_hash(boxes: Sequence[Mapping[str, Any]]) -> str:
    """Hash of a label set: its boxes, in a canonical order, to 1/100 pixel."""
    canon = sorted(
        (b["class_name"], round(float(b["x1"]), 2), round(float(b["y1"]), 2), round(float(b["x2"]), 2), round(float(b["y2"]), 2))
        for b in boxes
    )
    return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()


def merge_taxonomy(stored: Sequence[str] | None, carried: Sequence[str] | None, used: Iterable[str] = ()) -> list[str]:
    """The project's class list after a label set: the stored order kept, new names appended.

    New names come in the order the labelling taxonomy (`carried`) lists them, then any other
    class a box uses, sorted. A class is never dropped or moved: a model's head order is its
    class list, and fine-tuning maps classes by name onto it.
    """
    merged = list(stored or [])
    seen = set(merged)
    for name in list(carried or []) + sorted(set(used) - set(carried or [])):
        if name not in seen:
            merged.append(name)
            seen.add(name)
    return merged


def reserved_for_test(image_id: str, fraction: float) -> bool:
    """Whether an image falls in the share reserved for the test set (fixed by its id)."""
    if fraction <= 0:
        return False
    bucket = int(hashlib.sha256(f"test:{image_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def near_test_duplicates(
    candidates: Sequence[tuple[str, str | None, str | None]], test: Sequence[tuple[str, str | None, str | None]], radius: int
) -> dict[str, tuple[str, int]]:
    """`candidates` (id, pHash hex, dHash hex) within `radius` summed bits of a test image (id, pHash,
    dHash): each one's nearest test image and the distance, by candidate id."""
    test_items = [(i, p, d) for i, p, d in test if p and d]
    cands = [(i, p, d) for i, p, d in candidates if p and d]
    if not test_items or not cands:
        return {}
    t = np.array([[int(p, 16), int(d, 16)] for _, p, d in test_items], dtype=np.uint64)
    near: dict[str, tuple[str, int]] = {}
    for start in range(0, len(cands), 512):
        chunk = cands[start:start + 512]
        c = np.array([[int(p, 16), int(d, 16)] for _, p, d in chunk], dtype=np.uint64)
        x = c[:, None, :] ^ t[None, :, :]
        distance = _popcount(x).sum(axis=2)
        for (image_id, _, _), row in zip(chunk, distance, strict=True):
            nearest = int(row.argmin())
            if row[nearest] <= radius:
                near[image_id] = (test_items[nearest][0], int(row[nearest]))
    return near


def exclusions(near: dict[str, tuple[str, int]]) -> list[dict[str, Any]]:
    """What a dataset version left out and why, as it is recorded and shown."""
    return [
        {"image_id": image_id, "reason": "near_test_duplicate", "test_image_id": test_id, "distance": distance}
        for image_id, (test_id, distance) in sorted(near.items())
    ]


def _popcount(x: np.ndarray) -> np.ndarray:
    bytes_ = x.view(np.uint8).reshape(*x.shape, 8)
    return np.unpackbits(bytes_, axis=-1).sum(axis=-1, dtype=np.int64)


def assign_splits(rows: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]], str]], val_fraction: float) -> list[Member]:
    """Training members with their split (by image id); at least one goes to val when there are two."""
    members = [Member(image, boxes, h, split_for(str(image["image_id"]), val_fraction)) for image, boxes, h in rows]
    members.sort(key=lambda m: m.image_id)
    if len(members) >= 2 and not any(m.split == "val" for m in members):
        first = members[0]
        members[0] = Member(first.image, first.boxes, first.label_hash, "val")
    return members


def version_of(prefix: str, class_names: Sequence[str], members: Iterable[Member]) -> str:
    """The content hash that names a dataset version (`ds-...`) or a test set (`ts-...`)."""
    body = {
        "classes": list(class_names),
        "members": sorted((m.image_id, m.label_hash, m.split) for m in members),
    }
    return f"{prefix}-" + hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()[:32]
