"""How well near duplicates are found: precision and recall on generated variants.

Originals go into an index; their resized, recompressed, 2-5 % cropped and brightness-changed
variants must find their own original (recall), and distinct scenes must find nothing
(precision = matches to the right original / all matches). The test suite asserts the targets,
the intake benchmark reports the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from visionloop.libs.perceptual import hash_image
from visionloop.libs.scenes import render_scene
from visionloop.libs.variants import KINDS, variant
from visionloop.services.dedup.index import HashIndex


@dataclass(frozen=True)
class Quality:
    """Near-duplicate detection quality at one radius."""

    precision: float
    recall: float
    recall_by_kind: dict[str, float]
    radius: int


def near_duplicate_quality(radius: int, *, originals: int = 300, distinct: int = 500, seed: int = 42) -> Quality:
    """Measure precision and recall at `radius` on 640x480 synthetic scenes and their variants."""
    rng = np.random.default_rng(seed)
    index = HashIndex()
    scenes = [render_scene(seed=seed * 10_000 + i, width=640, height=480) for i in range(originals)]
    for i, scene in enumerate(scenes):
        h, _ = hash_image(scene.encode(quality=85))
        index.add(str(i), h.phash, h.dhash)
    true_pos = false_neg = false_pos = 0
    found = dict.fromkeys(KINDS, 0)
    for i, scene in enumerate(scenes):
        for kind in KINDS:
            h, _ = hash_image(variant(scene.image, kind, rng))
            match = index.nearest(h.phash, h.dhash, radius)
            if match is not None and match.image_id == str(i):
                true_pos += 1
                found[kind] += 1
            else:
                false_neg += 1
                false_pos += match is not None
    for j in range(distinct):
        h, _ = hash_image(render_scene(seed=seed * 10_000 + 5_000_000 + j, width=640, height=480).encode(quality=85))
        false_pos += index.nearest(h.phash, h.dhash, radius) is not None
    return Quality(
        precision=true_pos / max(true_pos + false_pos, 1),
        recall=true_pos / (true_pos + false_neg),
        recall_by_kind={k: v / originals for k, v in found.items()},
        radius=radius,
    )
