"""The trainer's dataset rules, as pure functions (no broker, no database)."""

from __future__ import annotations

import hashlib

from PIL import ImageEnhance

from visionloop.libs.manifest import Member, manifest, read_manifest
from visionloop.libs.perceptual import hash_image
from visionloop.libs.scenes import render_scene
from visionloop.services.trainer.config import TrainerSettings
from visionloop.services.trainer.dataset import (
    assign_splits,
    label_hash,
    merge_taxonomy,
    exclusions,
    near_test_duplicates,
    reserved_for_test,
    version_of,
)
from visionloop.services.trainer.decide import hyperparameters


def _id(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _box(x1: float, name: str = "circle") -> dict:
    return {"x1": x1, "y1": 1.0, "x2": x1 + 10, "y2": 11.0, "class_name": name}


def test_label_hash_ignores_box_order_and_sub_centipixel_noise() -> None:
    a = [_box(1.0), _box(20.0, "square")]
    assert label_hash(a) == label_hash(list(reversed(a)))
    assert label_hash(a) == label_hash([_box(1.001), _box(20.0, "square")])
    assert label_hash(a) != label_hash([_box(1.5), _box(20.0, "square")])
    assert label_hash(a) != label_hash([_box(1.0), _box(20.0, "circle")])


def test_taxonomy_only_appends() -> None:
    assert merge_taxonomy(None, ["b", "a"]) == ["b", "a"]
    assert merge_taxonomy(["b", "a"], ["a", "c", "b"]) == ["b", "a", "c"]
    assert merge_taxonomy(["b", "a"], None, ["z", "a", "y"]) == ["b", "a", "y", "z"]
    assert merge_taxonomy(["b", "a"], ["a"], []) == ["b", "a"]


def test_test_reservation_is_fixed_per_image_and_near_the_fraction() -> None:
    ids = [_id(n) for n in range(4000)]
    chosen = [i for i in ids if reserved_for_test(i, 0.15)]
    assert 0.12 < len(chosen) / len(ids) < 0.18
    assert chosen == [i for i in ids if reserved_for_test(i, 0.15)]
    assert not any(reserved_for_test(i, 0.0) for i in ids[:100])


def test_near_duplicates_of_test_images_are_found_and_others_are_not() -> None:
    test_scenes = [render_scene(seed=s, width=128, height=96) for s in range(5)]
    test = [hash_image(s.encode())[0] for s in test_scenes]
    near = [hash_image(render_scene(seed=s, width=128, height=96).encode(quality=70))[0] for s in range(3)]
    brighter = hash_image(_encode(ImageEnhance.Brightness(test_scenes[4].image).enhance(1.05)))[0]
    other = [hash_image(render_scene(seed=100 + s, width=128, height=96).encode())[0] for s in range(20)]
    candidates = [(f"near{i}", h.phash_hex, h.dhash_hex) for i, h in enumerate(near)]
    candidates += [("bright", brighter.phash_hex, brighter.dhash_hex)]
    candidates += [(f"other{i}", h.phash_hex, h.dhash_hex) for i, h in enumerate(other)]
    found = near_test_duplicates(candidates, [(f"test{i}", h.phash_hex, h.dhash_hex) for i, h in enumerate(test)], radius=16)
    assert set(found) == {"near0", "near1", "near2", "bright"}
    assert [found[f"near{i}"][0] for i in range(3)] == ["test0", "test1", "test2"] and found["bright"][0] == "test4"
    assert all(0 <= distance <= 16 for _, distance in found.values())
    assert exclusions(found)[0] == {"image_id": "bright", "reason": "near_test_duplicate", "test_image_id": "test4",
                                    "distance": found["bright"][1]}
    assert near_test_duplicates(candidates, [], radius=16) == {}


def _encode(image) -> bytes:  # noqa: ANN001
    import io

    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_splits_are_fixed_by_image_id_and_val_is_never_empty() -> None:
    rows = [({"image_id": _id(n)}, [_box(1.0)], "h") for n in range(200)]
    members = assign_splits(rows, 0.2)
    val = sum(m.split == "val" for m in members)
    assert 25 < val < 55
    again = {m.image_id: m.split for m in assign_splits(list(reversed(rows)), 0.2)}
    assert again == {m.image_id: m.split for m in members}
    two = assign_splits(rows[:2], 0.01)
    assert sorted(m.split for m in two) == ["train", "val"]


def test_versions_are_content_hashes() -> None:
    members = assign_splits([({"image_id": _id(n)}, [_box(1.0)], f"h{n}") for n in range(10)], 0.2)
    v = version_of("ds", ["a", "b"], members)
    assert v.startswith("ds-") and v == version_of("ds", ["a", "b"], list(reversed(members)))
    assert v != version_of("ds", ["b", "a"], members), "the class order is part of the version"
    changed = [Member(members[0].image, members[0].boxes, "other", members[0].split), *members[1:]]
    assert v != version_of("ds", ["a", "b"], changed), "a changed label set is another version"
    doc = read_manifest(manifest("p", v, ["a", "b"], members))
    assert doc["version"] == v and len(doc["images"]) == 10
    assert manifest("p", v, ["a", "b"], members) == manifest("p", v, ["a", "b"], list(reversed(members)))


def test_run_hyperparameters_layer_policy_project_and_command() -> None:
    config = TrainerSettings(projects={"p": {"imgsz": 320, "train_args": {"lr0": 0.005, "not_tunable": 1}}})
    first = hyperparameters(config.policy("p"), {"epochs": 3}, first=True)
    assert first == {"epochs": 3, "imgsz": 320, "batch": 16, "patience": 20, "lr0": 0.005}
    later = hyperparameters(config.policy("other"), {}, first=False)
    assert later["epochs"] == config.finetune_epochs and later["imgsz"] == 256
