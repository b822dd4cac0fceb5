"""Import and export over real HTTP (the gateway and verifier on the in-memory bus, `fake_lab`):
a COCO import bootstraps a project (and its frozen test set) through the verifier; its COCO, YOLO
and Label Studio exports load with pycocotools and with Ultralytics' dataset checker; importing
each export into a new project gives the same boxes."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from labelling import Lab, fake_lab, png

CLASSES = ["car", "person", "bicycle"]


@pytest.fixture(scope="module")
async def lab(database_url: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    async with fake_lab(database_url, tmp_path_factory.mktemp("datasets")) as running:
        yield running


def _coco_zip(images: list[tuple[str, bytes, int, int, list[tuple[str, float, float, float, float]], str]], classes: list[str] = CLASSES) -> bytes:
    """A COCO archive: annotations/instances_<split>.json and the images under images/."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for split in ("train", "test"):
            doc: dict[str, Any] = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}
            for number, (name, data, width, height, boxes, image_split) in enumerate(images, start=1):
                if image_split != split:
                    continue
                doc["images"].append({"id": number, "file_name": name, "width": width, "height": height})
                for cls, x, y, w, h in boxes:
                    doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": number, "category_id": classes.index(cls) + 1,
                                               "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            archive.writestr(f"annotations/instances_{split}.json", json.dumps(doc))
        for name, data, *_ in images:
            archive.writestr(f"images/{name}", data)
    return out.getvalue()


async def _verified(lab: Lab, project: str, count: int) -> None:
    async def enough() -> bool:
        return await lab.pool.fetchval(f"SELECT count(*) FROM {lab.schema}.labels WHERE project = $1", project) >= count

    from helpers import eventually

    await eventually(enough, timeout=30, interval=0.1)


async def _export(lab: Lab, project: str, fmt: str, *, images: bool = True) -> Any:
    answer = await lab.http.get(f"/v1/projects/{project}/export", params={"format": fmt, "images": str(images).lower()}, headers=lab.auth("reviewer"))
    assert answer.status_code == 200, answer.text
    return answer


def _boxes(doc: dict[str, Any]) -> dict[tuple[str, str], list[tuple[str, float, float, float, float]]]:
    """(image id, split) -> sorted boxes, from a COCO export of every image (`images=false`)."""
    names = {c["id"]: c["name"] for c in doc["categories"]}
    found: dict[tuple[str, str], list[tuple[str, float, float, float, float]]] = {}
    by_id = {img["id"]: (img["visionloop_image_id"], img["visionloop_split"]) for img in doc["images"]}
    for key in by_id.values():
        found[key] = []
    for ann in doc["annotations"]:
        found[by_id[ann["image_id"]]].append((names[ann["category_id"]], *ann["bbox"]))
    return {k: sorted(v) for k, v in found.items()}


def _same(a: dict[Any, list[Any]], b: dict[Any, list[Any]], tolerance: float = 0.01) -> None:
    assert set(a) == set(b)
    for key in a:
        assert len(a[key]) == len(b[key]), key
        for left, right in zip(a[key], b[key], strict=True):
            assert left[0] == right[0]
            assert left[1:] == pytest.approx(right[1:], abs=tolerance), key


async def test_export_then_import_gives_the_same_boxes(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await lab.use_project("source")
    images = []
    for n in range(8):
        width, height = (320, 240) if n % 2 else (200, 300)
        boxes = [("car", 10.25, 20.5, 50.125, 40.0), ("person", 100.0, 30.0, 33.3, 66.6)][: n % 3] + ([("bicycle", 0.0, 0.0, width, height)] if n == 5 else [])
        images.append((f"frame_{n:03d}.png", png(width, height, seed=500 + n), width, height, boxes, "test" if n in (2, 6) else "train"))
    imported = await lab.http.post("/v1/projects/source/import", params={"format": "coco"}, content=_coco_zip(images),
                                   headers={**lab.auth("admin"), "Content-Type": "application/zip"})
    assert imported.status_code == 202, imported.text
    assert (imported.json()["images"], imported.json()["test_set"]) == (8, 2)
    again = await lab.http.post("/v1/projects/source/import", params={"format": "coco"}, content=_coco_zip(images),
                                headers={**lab.auth("admin"), "Content-Type": "application/zip"})
    assert (again.json()["images"], again.json()["already_imported"]) == (0, 8)
    await _verified(lab, "source", 8)
    verified = [m for m in lab.messages("label.verified") if m["project"] == "source"]
    assert {m["payload"]["provenance"]["method"] for m in verified} == {"import"}
    assert sum(m["payload"]["for_test_set"] for m in verified) == 2
    original = _boxes((await _export(lab, "source", "coco", images=False)).json())
    assert len(original) == 8 and sum(split == "test" for _, split in original) == 2

    # COCO loads with pycocotools, split by split.
    from pycocotools.coco import COCO

    coco_zip = zipfile.ZipFile(io.BytesIO((await _export(lab, "source", "coco")).content))
    unpacked = tmp_path / "coco"
    coco_zip.extractall(unpacked)
    loaded = {split: COCO(str(unpacked / f"annotations/instances_{split}.json")) for split in ("train", "val", "test")}
    assert sum(len(c.getImgIds()) for c in loaded.values()) == 8 and len(loaded["test"].getImgIds()) == 2
    assert [c["name"] for c in loaded["train"].loadCats(loaded["train"].getCatIds())] == CLASSES
    for coco in loaded.values():
        for image in coco.loadImgs(coco.getImgIds()):
            assert (unpacked / "images" / [s for s in ("train", "val", "test") if coco is loaded[s]][0] / image["file_name"]).exists()
    json_doc = tmp_path / "all.json"
    json_doc.write_text(json.dumps((await _export(lab, "source", "coco", images=False)).json()))
    assert len(COCO(str(json_doc)).getAnnIds()) == sum(len(v) for v in original.values())

    # YOLO passes Ultralytics' dataset checker, offline (nothing may download).
    yolo_bytes = (await _export(lab, "source", "yolo")).content
    zipfile.ZipFile(io.BytesIO(yolo_bytes)).extractall(tmp_path / "yolo")
    for name, value in {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "YOLO_CONFIG_DIR": str(tmp_path / "yolo-config")}.items():
        monkeypatch.setenv(name, value)
    from ultralytics.data import utils as yolo_utils

    monkeypatch.setattr(yolo_utils, "check_font", lambda *a, **k: None)  # a font for plots: not the dataset's business
    monkeypatch.setattr(yolo_utils, "safe_download", lambda *a, **k: pytest.fail("the dataset checker tried to download"))
    data = yolo_utils.check_det_dataset(str(tmp_path / "yolo" / "data.yaml"), autodownload=False)
    assert data["names"] == dict(enumerate(CLASSES)) and data["nc"] == 3
    labels = sorted((tmp_path / "yolo" / "labels").rglob("*.txt"))
    assert len(labels) == 8 and all(Path(str(p).replace("/labels/", "/images/")).with_suffix(".png").exists() for p in labels)

    # Each export imported into a new project: the same boxes, the same test set.
    ls_bytes = (await _export(lab, "source", "labelstudio")).content
    ls_json = (await _export(lab, "source", "labelstudio", images=False)).json()
    # The default is what Label Studio's import takes: the JSON task list, not a zip (issue 16, item 8).
    default = await lab.http.get("/v1/projects/source/export", params={"format": "labelstudio"}, headers=lab.auth("reviewer"))
    assert default.headers["content-type"].startswith("application/json") and len(default.json()) == len(ls_json)
    assert len(ls_json) == 8 and all(t["data"]["image"].startswith(lab.base_url) for t in ls_json)
    fetched = await lab.http.get(ls_json[0]["data"]["image"])  # a signed URL works without a token (Label Studio's browser)
    assert fetched.status_code == 200
    for project, fmt, body in (("from-coco", "coco", coco_zip_bytes(coco_zip)), ("from-yolo", "yolo", yolo_bytes), ("from-ls", "labelstudio", ls_bytes)):
        await lab.use_project(project, classes=[])
        answer = await lab.http.post(f"/v1/projects/{project}/import", params={"format": fmt, "add_classes": "true"}, content=body,
                                     headers={**lab.auth("admin"), "Content-Type": "application/zip"})
        assert answer.status_code == 202, (fmt, answer.text)
        assert answer.json()["images"] == 8 and answer.json()["test_set"] == 2, fmt
        await _verified(lab, project, 8)
        again = _boxes((await _export(lab, project, "coco", images=False)).json())
        _same(original, again)
        classes = (await lab.http.get(f"/v1/projects/{project}/classes", headers=lab.auth("annotator"))).json()["classes"]
        assert classes == (CLASSES if fmt != "labelstudio" else [c for c in ("car", "person", "bicycle") if c in classes])
    # Label Studio JSON alone works in the project whose images the tasks name.
    await lab.use_project("source")
    relabel = ls_json[:3]
    for task in relabel:
        task["annotations"][0]["result"] = task["annotations"][0]["result"][:1]
    answer = await lab.http.post("/v1/projects/source/import", params={"format": "labelstudio"}, json=relabel, headers=lab.auth("admin"))
    assert answer.status_code == 202 and answer.json()["images"] >= 1, answer.text


def coco_zip_bytes(archive: zipfile.ZipFile) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as copy:
        for info in archive.infolist():
            copy.writestr(info, archive.read(info))
    return out.getvalue()


async def test_bad_imports_are_refused_before_anything_is_stored(lab: Lab) -> None:
    await lab.use_project("strict")
    image = ("a.png", png(100, 100, seed=1), 100, 100, [("car", 10, 10, 20, 20)], "train")
    headers = {**lab.auth("admin"), "Content-Type": "application/zip"}
    cases = {
        "unknown class": (_coco_zip([(*image[:4], [("unicorn", 10, 10, 20, 20)], "train")], classes=["car", "unicorn"]), 422, "unknown_class"),
        "box outside": (_coco_zip([(*image[:4], [("car", 90, 90, 50, 50)], "train")]), 422, "out_of_bounds"),
        "size mismatch": (_coco_zip([("a.png", image[1], 120, 100, [("car", 10, 10, 20, 20)], "train")]), 422, "size_mismatch"),
        "not a zip": (b"PK\x03\x04 this is not a zip", 422, "invalid_archive"),
        "no images": (_no_image_zip(), 422, "unknown_image"),
    }
    for name, (body, status, reason) in cases.items():
        answer = await lab.http.post("/v1/projects/strict/import", params={"format": "coco"}, content=body, headers=headers)
        assert (answer.status_code, answer.json()["reason"]) == (status, reason), (name, answer.text)
    # Classes a file declares but no box uses are not forced on the taxonomy.
    unused = _coco_zip([image], classes=["car", "unicorn"])
    accepted = await lab.http.post("/v1/projects/strict/import", params={"format": "coco"}, content=unused, headers=headers)
    assert accepted.status_code == 202 and accepted.json()["classes_added"] == []
    wrong_type = await lab.http.post("/v1/projects/strict/import", params={"format": "coco"}, content=b"x", headers={**lab.auth("admin"), "Content-Type": "text/csv"})
    assert (wrong_type.status_code, wrong_type.json()["reason"]) == (415, "unsupported_media_type")
    yolo_json = await lab.http.post("/v1/projects/strict/import", params={"format": "yolo"}, json={}, headers=lab.auth("admin"))
    assert yolo_json.json()["reason"] == "invalid_format"
    assert await lab.pool.fetchval(f"SELECT count(*) FROM {lab.schema}.submissions WHERE project = 'strict'") == 1


def _no_image_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("annotations/instances_train.json", json.dumps({
            "images": [{"id": 1, "file_name": "nowhere.png", "width": 10, "height": 10}], "annotations": [],
            "categories": [{"id": 1, "name": "car"}]}))
    return out.getvalue()

