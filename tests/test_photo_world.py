"""The photo world (libs/scenes.py::render_photo_scene, libs/photos.py) and the non-learning
baseline (visionloop/bench/baseline.py): deterministic scenes of real photographs, objects that
vary and overlap, and a colour threshold that fails there but works on the shapes world."""

from __future__ import annotations

import pytest

from visionloop.bench.baseline import baseline_detections, baseline_map
from visionloop.contracts import Box
from visionloop.libs import photos
from visionloop.libs.scenes import (
    PHOTO_CLASSES,
    PHOTO_SIZE,
    SHAPES,
    STYLE_CLASSES,
    Scene,
    render_photo_scene,
    render_scene,
    render_world_scene,
)

W, H = 192, 144


def _labelled(scene: Scene) -> tuple:
    return scene.image, [Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes]


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [render_photo_scene(seed, width=W, height=H) for seed in range(100)]


def test_every_listed_photo_ships_with_scikit_image() -> None:
    folder = photos.photo_dir()
    assert set(photos.BACKGROUNDS) <= set(photos.PHOTOS) and set(photos.TEXTURES) <= set(photos.PHOTOS)
    for name in photos.PHOTOS:
        assert (folder / name).is_file(), name
    array = photos.load_photo("camera.png")  # a greyscale photo comes back as RGB
    assert array.ndim == 3 and array.shape[2] == 3 and max(array.shape) <= 480


def test_same_seed_same_scene_and_different_seeds_differ() -> None:
    a, b = render_photo_scene(7), render_photo_scene(7)
    assert a.image.tobytes() == b.image.tobytes() and a.boxes == b.boxes
    assert a.encode() == b.encode()
    assert render_photo_scene(8).image.tobytes() != a.image.tobytes()


def test_boxes_lie_inside_the_image_and_use_only_requested_classes() -> None:
    for seed in range(40):
        scene = render_photo_scene(seed, width=W, height=H, classes=("ring", "star"), objects=(1, 3))
        assert scene.image.size == (W, H) and scene.image.mode == "RGB"
        for b in scene.boxes:
            assert 0 <= b.x1 < b.x2 <= W and 0 <= b.y1 < b.y2 <= H
            assert b.class_name in ("ring", "star")


def test_objects_overlap_and_vary_in_scale(scenes: list[Scene]) -> None:
    def intersect(p, q) -> bool:
        return not (p.x2 <= q.x1 or q.x2 <= p.x1 or p.y2 <= q.y1 or q.y2 <= p.y1)

    overlapping = sum(
        any(intersect(p, q) for i, p in enumerate(s.boxes) for q in s.boxes[i + 1:]) for s in scenes
    )
    assert overlapping >= 0.08 * len(scenes)
    sides = [max(b.x2 - b.x1, b.y2 - b.y1) / H for s in scenes for b in s.boxes]
    assert min(sides) < 1.5 * PHOTO_SIZE[0] and max(sides) > 0.8 * PHOTO_SIZE[1]
    counts = {len(s.boxes) for s in scenes}
    assert counts == {1, 2, 3}
    assert {b.class_name for s in scenes for b in s.boxes} == set(PHOTO_CLASSES[:3])


def test_world_dispatch_and_classes() -> None:
    assert STYLE_CLASSES["photo"] == PHOTO_CLASSES and len(set(PHOTO_CLASSES)) == 4
    scene = render_world_scene("photo", 3, width=W, height=H, classes=PHOTO_CLASSES, objects=(2, 2), size=PHOTO_SIZE)
    assert scene.image.size == (W, H) and all(b.class_name in PHOTO_CLASSES for b in scene.boxes)
    with pytest.raises(ValueError, match="photo-world classes"):
        render_photo_scene(1, classes=("circle",))
    with pytest.raises(ValueError, match="size"):
        render_photo_scene(1, size=(0.5, 0.1))


def test_missing_photos_say_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(photos, "_skimage_data_dir", lambda: None)
    photos.load_photo.cache_clear()
    try:
        with pytest.raises(photos.PhotosMissing, match="pip install scikit-image"):
            render_photo_scene(1)
    finally:
        photos.load_photo.cache_clear()


def test_baseline_fails_on_photos_but_works_on_shapes() -> None:
    classes = PHOTO_CLASSES[:3]
    photo = baseline_map((_labelled(render_photo_scene(s, width=W, height=H, classes=classes)) for s in range(40)), classes)
    shapes = baseline_map((_labelled(render_scene(s, width=W, height=H)) for s in range(40)), SHAPES[:3])
    assert photo["images"] == shapes["images"] == 40
    assert photo["map50_95"] <= 0.30
    assert shapes["map50_95"] >= 0.5 and shapes["map50"] >= 0.7


def test_baseline_detections_are_scored_boxes_of_requested_classes() -> None:
    scene = render_scene(2, width=W, height=H)
    found = baseline_detections(scene.image, SHAPES[:3])
    assert found and all(b.class_name in SHAPES[:3] and 0.0 < b.score <= 1.0 for b in found)
    assert baseline_detections(scene.image, ("widget",))[0].class_name == "widget"  # knows no shape: the first class
    with pytest.raises(ValueError):
        baseline_detections(scene.image, ())
