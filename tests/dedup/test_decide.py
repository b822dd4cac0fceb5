"""dedup/quality's pure parts: hashes, the index, the decision, near-duplicate precision/recall."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from visionloop.contracts import ImageRejectReason
from visionloop.libs.scenes import render_scene
from visionloop.services.dedup.config import DedupSettings, Policy
from visionloop.services.dedup.decide import check_exact, check_near, check_quality
from visionloop.services.dedup.evaluate import near_duplicate_quality
from visionloop.libs.perceptual import blur_variance, hamming, hash_image
from visionloop.services.dedup.index import HashIndex, Match


def test_phash_agrees_with_imagehash_within_a_few_bits() -> None:
    """The reduced-size decode changes a handful of bits at most, never the hash's nature."""
    distances = []
    for seed in range(20):
        data = render_scene(seed=seed, width=640, height=480).encode(quality=85)
        ours, _ = hash_image(data)
        reference = int(str(imagehash.phash(Image.open(io.BytesIO(data)))), 16)
        distances.append(hamming(ours.phash, reference))
    assert np.mean(distances) <= 3 and max(distances) <= 8


def test_index_finds_the_nearest_within_radius_and_grows() -> None:
    index = HashIndex(capacity=2)
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, size=(100, 2), dtype=np.uint64)
    for i, (p, d) in enumerate(hashes):
        index.add(f"img{i}", int(p), int(d))
    assert len(index) == 100
    p, d = int(hashes[42][0]), int(hashes[42][1])
    assert index.nearest(p ^ 0b101, d ^ 0b1, radius=5) == Match("img42", 3, 2, 1)
    assert index.nearest(p ^ 0b1111, d ^ 0b11, radius=5) is None
    assert HashIndex().nearest(p, d, radius=64) is None


def test_decision_order_and_reasons() -> None:
    policy = Policy(min_width=64, min_height=48, min_blur_variance=10.0, near_duplicate_radius=16)
    assert check_exact("a" * 64, None).accepted
    dup = check_exact("a" * 64, "accepted")
    assert dup.reason is ImageRejectReason.DUPLICATE and dup.duplicate_of == "a" * 64 and dup.distance == 0
    assert check_quality(63, 100, 50.0, policy).reason is ImageRejectReason.LOW_RESOLUTION
    assert check_quality(64, 48, 5.0, policy).reason is ImageRejectReason.BLURRY
    assert check_quality(64, 48, None, policy).accepted  # not measured: no blur verdict
    near = check_near(Match("b" * 64, 16, 10, 6), policy)
    assert near.reason is ImageRejectReason.NEAR_DUPLICATE and near.duplicate_of == "b" * 64
    assert check_near(Match("b" * 64, 17, 10, 7), policy).accepted


def test_policies_per_project() -> None:
    settings = DedupSettings(min_width=32, projects={"parking": {"min_width": 320, "near_duplicate_radius": 8}})
    assert settings.policy("parking").min_width == 320 and settings.policy("parking").near_duplicate_radius == 8
    assert settings.policy("other").min_width == 32
    with pytest.raises(ValueError):
        DedupSettings(projects={"x": {"no_such_setting": 1}}).policy("x")


def test_blur_variance_orders_sharp_above_blurred() -> None:
    from PIL import ImageFilter

    sharp = render_scene(seed=3).image.convert("L")
    assert blur_variance(sharp) > 3 * blur_variance(sharp.filter(ImageFilter.GaussianBlur(3)))


def test_near_duplicate_precision_and_recall_on_generated_variants() -> None:
    """Resize, recompression, 2-5% crops and brightness changes are found; distinct scenes are not."""
    quality = near_duplicate_quality(Policy().near_duplicate_radius, originals=60, distinct=200, seed=7)
    assert quality.recall >= 0.95, quality
    assert quality.precision >= 0.99, quality
