"""Export and import of labelled images: COCO, Ultralytics YOLO and Label Studio JSON.

Conversions live in `libs/formats.py`; this module lays files out, reads archives safely and
turns an import into `label submitted` events (source `import`), which the verifier turns into
verified labels (method `import`) — for the training data, or for the frozen test set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from visionloop.contracts import (
    Box,
    ImageRef,
    LabelSourceKind,
    TaskKind,
    TrainingRequested,
    TrainingTrigger,
)
from visionloop.contracts.envelope import utcnow
from visionloop.libs import formats
from visionloop.libs.boxes import clip, geometry_problem
from visionloop.libs.formats import FormatError, LabelledImage
from visionloop.services.labeling_gateway import store
from visionloop.services.labeling_gateway.api_models import ImportOut
from visionloop.services.labeling_gateway.auth import Principal, sign
from visionloop.services.labeling_gateway.decide import MAX_ISSUES_SHOWN, Refusal, label_submitted

if TYPE_CHECKING:
    from visionloop.services.labeling_gateway.http import Gateway

log = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"


# -- export ---------------------------------------------------------------------------------------------


def _labelled(rows: list[Any], val_fraction: float) -> list[LabelledImage]:
    images = []
    for row in rows:
        split = "test" if row["for_test_set"] else formats.split_for(row["image_id"], val_fraction)
        predictions = tuple(store.detections_from(row["prelabels"])) if row["prelabels"] else ()
        model = json.loads(row["prelabel_model"]) if row["prelabel_model"] else None
        images.append(
            LabelledImage(
                file_name=formats.file_name_for(row["image_id"], row["format"]),
                width=row["width"],
                height=row["height"],
                boxes=tuple(store.boxes_from(row["boxes"])),
                split=split,
                image_id=row["image_id"],
                predictions=predictions,
                prediction_model=f"{model['model_id']}@v{model['version']}" if model else None,
            )
        )
    return images


async def export(gw: "Gateway", project: str, fmt: str, *, include_images: bool, base_url: str) -> Response:
    """The export answer of `GET /v1/projects/{project}/export`."""
    async with gw.pool.acquire() as conn:
        rows = await store.labels(conn, gw.s, project)
        class_names = await store.classes(conn, gw.s, project)
    images = _labelled(list(rows), gw.config.export_val_fraction)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tasks: list[dict[str, Any]] | None = None
    if fmt == "labelstudio":
        key = await gw.signing_key()
        expires = int(time.time()) + gw.config.signed_url_ttl_s

        def url(image: LabelledImage) -> str:
            assert image.image_id
            signature = sign(key, project, image.image_id, expires)
            return f"{base_url}/v1/projects/{project}/images/{image.image_id}?expires={expires}&signature={signature}"

        tasks = formats.ls_tasks(images, url)
        if not include_images:
            return JSONResponse(tasks, headers=_attachment(f"{project}-labelstudio-{stamp}.json"))
    if fmt == "coco" and not include_images:
        doc = formats.coco_document(images, class_names, description=f"visionloop project {project}")
        for entry, image in zip(doc["images"], images, strict=True):
            entry["visionloop_split"] = image.split
        return JSONResponse(doc, headers=_attachment(f"{project}-coco-{stamp}.json"))
    blobs = {row["image_id"]: row["blob_uri"] for row in rows}

    async def image_bytes(image: LabelledImage) -> bytes:
        assert image.image_id
        return await gw.blobs.get(blobs[image.image_id])

    archive = await _zip(images, class_names, fmt, image_bytes if include_images else None, project, tasks)
    return StreamingResponse(_chunks(archive), media_type="application/zip", headers=_attachment(f"{project}-{fmt}-{stamp}.zip"))


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


async def _zip(
    images: list[LabelledImage],
    class_names: list[str],
    fmt: str,
    image_bytes: Callable[[LabelledImage], Any] | None,
    project: str,
    tasks: list[dict[str, Any]] | None = None,
) -> IO[bytes]:
    """The export archive, spooled to disk past 32 MiB."""
    out = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)
    archive = zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED)
    if fmt == "yolo":
        for relative, text in formats.yolo_files(images, class_names).items():
            archive.writestr(relative, text)
        for split in {"train", "val", *(i.split for i in images)}:
            archive.writestr(f"images/{split}/", b"")
            archive.writestr(f"labels/{split}/", b"")
        place = formats.yolo_image_path
    elif fmt == "labelstudio":
        archive.writestr("tasks.json", json.dumps(tasks or []))
        place = formats.yolo_image_path
    else:
        for split in formats.SPLITS:
            chosen = [i for i in images if i.split == split]
            if chosen or split != "test":
                doc = formats.coco_document(chosen, class_names, description=f"visionloop project {project}, {split}")
                archive.writestr(f"annotations/instances_{split}.json", json.dumps(doc))
        place = formats.yolo_image_path  # images/<split>/<file>, COCO's usual layout too
    if image_bytes is not None:
        for image in images:
            data = await image_bytes(image)
            # Images are compressed already: store them.
            archive.writestr(zipfile.ZipInfo(place(image), date_time=(2024, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_STORED)
    archive.close()
    out.seek(0)
    return out


async def _chunks(file: IO[bytes], size: int = 256 * 1024) -> Any:
    try:
        while chunk := await asyncio.to_thread(file.read, size):
            yield chunk
    finally:
        file.close()


# -- import ---------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One image of an import: where its bytes are, and its labels."""

    name: str
    boxes: list[Box]
    split: str
    image_id: str | None = None
    width: int | None = None
    height: int | None = None
    normalised: list[tuple[int, float, float, float, float]] | None = None
    """YOLO rows (class, cx, cy, w, h) waiting for the image size."""


class _Archive:
    """A zip read within limits: entry count, each entry's and the total uncompressed size."""

    def __init__(self, file: IO[bytes], *, max_files: int, max_bytes: int) -> None:
        try:
            self.zip = zipfile.ZipFile(file)
        except zipfile.BadZipFile as exc:
            raise Refusal(422, "invalid_archive", f"the body is not a readable zip: {exc}") from None
        infos = [i for i in self.zip.infolist() if not i.is_dir()]
        if len(infos) > max_files:
            raise Refusal(422, "invalid_archive", f"the archive holds {len(infos)} files; the limit is {max_files}")
        total = sum(i.file_size for i in infos)
        if total > max_bytes * 4:
            raise Refusal(413, "body_too_large", f"the archive unpacks to {total} bytes; the limit is {max_bytes * 4}")
        self.infos = {i.filename: i for i in infos}
        self.by_base: dict[str, list[str]] = {}
        for name in self.infos:
            self.by_base.setdefault(PurePosixPath(name).name, []).append(name)

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(self.infos[name])
        except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
            raise Refusal(422, "invalid_archive", f"{name}: {exc}") from None

    def find(self, name: str, split: str | None = None) -> str | None:
        """An archive member for an image named `name` (a path or a bare file name)."""
        clean = name.lstrip("./")
        for candidate in (clean, f"images/{split}/{clean}" if split else None, f"images/{clean}"):
            if candidate and candidate in self.infos:
                return candidate
        matches = self.by_base.get(PurePosixPath(clean).name, [])
        if split:
            preferred = [m for m in matches if f"/{split}/" in f"/{m}"]
            matches = preferred or matches
        return matches[0] if matches else None

    def find_stem(self, stem: str) -> str | None:
        """An archive member named `<stem>.<ext>` anywhere (images by id)."""
        for name in self.infos:
            if PurePosixPath(name).stem == stem and PurePosixPath(name).suffix.lower().lstrip(".") in _IMAGE_EXTENSIONS:
                return name
        return None

    def names(self, suffix: str) -> list[str]:
        return sorted(n for n in self.infos if n.lower().endswith(suffix) and not PurePosixPath(n).name.startswith("."))


def _from_coco(doc: Any, split: str) -> tuple[list[str], list[Item]]:
    class_names, images = _format(lambda: formats.read_coco(doc, split=split))
    raw = {str(img["file_name"]): img for img in doc["images"]}
    items = []
    for image in images:
        entry_split = raw.get(image.file_name, {}).get("visionloop_split")
        items.append(
            Item(
                name=image.file_name, boxes=list(image.boxes),
                split=entry_split if entry_split in formats.SPLITS else image.split,
                image_id=image.image_id, width=image.width, height=image.height,
            )
        )
    return class_names, items


def _coco_split(name: str) -> str:
    stem = PurePosixPath(name).stem.lower()
    return "test" if "test" in stem else "val" if "val" in stem else "train"


def _parse_archive(fmt: str, archive: _Archive) -> tuple[list[str], list[Item]]:
    if fmt == "coco":
        files = [n for n in archive.names(".json") if "annotation" in n.lower() or "/" not in n] or archive.names(".json")
        if not files:
            raise Refusal(422, "invalid_format", "a COCO archive holds annotations/*.json")
        names: list[str] = []
        items: list[Item] = []
        for name in files:
            file_names, file_items = _from_coco(_json(archive.read(name), name), _coco_split(name))
            names += [n for n in file_names if n not in names]
            items += file_items
        return names, items
    if fmt == "yolo":
        yamls = archive.names("data.yaml") or archive.names(".yaml")
        if not yamls:
            raise Refusal(422, "invalid_format", "a YOLO archive holds data.yaml")
        root = str(PurePosixPath(yamls[0]).parent)
        prefix = "" if root == "." else root + "/"
        class_names, splits = _format(lambda: formats.read_data_yaml(archive.read(yamls[0]).decode("utf-8", "replace")))
        items = []
        for split, folder in splits.items():
            folder = prefix + folder.strip("/").removeprefix("./") + "/"
            members = sorted(
                n for n in archive.infos
                if n.startswith(folder) and PurePosixPath(n).suffix.lower().lstrip(".") in _IMAGE_EXTENSIONS
            )
            for name in members:
                label_name = _yolo_label_for(name)
                text = archive.read(label_name).decode("utf-8", "replace") if label_name in archive.infos else ""
                rows = []
                for line in text.splitlines():
                    if line.strip():
                        # Checked now (columns, numbers, class index); converted once the image size is known.
                        _format(lambda line=line: formats.from_yolo_line(line, class_names, 1, 1))
                        parts = line.split()
                        rows.append((int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]), float(parts[4])))
                items.append(Item(name=name, boxes=[], split=split, normalised=rows))
        return class_names, items
    files = archive.names(".json")
    if not files:
        raise Refusal(422, "invalid_format", "a Label Studio archive holds the tasks as a .json file")
    items = []
    for name in files:
        items += _from_ls(_json(archive.read(name), name))
    return [], items


_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "mpo"}


def _yolo_label_for(image_member: str) -> str:
    """Ultralytics' rule: the last `/images/` of the path becomes `/labels/`, the suffix `.txt`."""
    path = "/" + image_member
    if "/images/" in path:
        head, tail = path.rsplit("/images/", 1)
        path = f"{head}/labels/{tail}"
    return str(PurePosixPath(path).with_suffix(".txt")).lstrip("/")


def _from_ls(doc: Any) -> list[Item]:
    tasks = _format(lambda: formats.read_ls_tasks(doc))
    return [Item(name=t.image, boxes=t.boxes, split=t.split, image_id=t.image_id, width=t.width, height=t.height) for t in tasks]


def _json(raw: bytes, name: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refusal(422, "invalid_json", f"{name} is not JSON: {exc}") from None


def _format(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except FormatError as exc:
        raise Refusal(422, exc.reason, exc.message) from None


def _known_id(name: str, project: str) -> str | None:
    """An image id named by a file name `<sha>.<ext>` or a URL of this gateway."""
    path = name.split("?", 1)[0]
    marker = f"/v1/projects/{project}/images/"
    if marker in path:
        path = path.split(marker, 1)[1]
    stem = PurePosixPath(path).name.split(".", 1)[0]
    return stem if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) else None


async def _spool(request: Request, limit: int) -> tuple[IO[bytes], bytes]:
    """The request body in a temporary file (cut off past `limit`), and its first bytes."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in ("application/zip", "application/x-zip-compressed", "application/json", "application/octet-stream"):
        raise Refusal(415, "unsupported_media_type", f"send application/zip (images and labels) or application/json (labels), not {media or 'nothing'}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refusal(413, "body_too_large", f"the body is {declared} bytes; the limit is {limit}", {"headers": {"Connection": "close"}})
    file = tempfile.SpooledTemporaryFile(max_size=16 * 1024 * 1024)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            file.close()
            raise Refusal(413, "body_too_large", f"the body is over the limit of {limit} bytes", {"headers": {"Connection": "close"}})
        file.write(chunk)
    file.seek(0)
    head = file.read(4)
    file.seek(0)
    return file, head


async def import_(
    gw: "Gateway",
    project: str,
    fmt: str,
    request: Request,
    *,
    principal: Principal,
    test_set: bool | None,
    add_classes: bool,
    training: dict[str, str | int | float | bool] | None = None,
) -> ImportOut:
    """Check an import completely, then store its images and emit one `label submitted` each; with
    `training` (arguments, possibly none), then one `training requested` for the whole import."""
    config = gw.config
    file, head = await _spool(request, config.import_max_bytes)
    archive: _Archive | None = None
    try:
        if head == ZIP_MAGIC:
            archive = _Archive(file, max_files=config.import_max_files, max_bytes=config.import_max_bytes)
            file_classes, items = await asyncio.to_thread(_parse_archive, fmt, archive)
        else:
            doc = _json(file.read(), "the body")
            if fmt == "yolo":
                raise Refusal(422, "invalid_format", "a YOLO import is a zip (data.yaml, images/, labels/)")
            file_classes, items = _from_coco(doc, "train") if fmt == "coco" else ([], _from_ls(doc))
        if not items:
            raise Refusal(422, "empty_import", "the import holds no labelled image")
        out = await _submit_items(gw, project, fmt, items, file_classes, archive, principal=principal, test_set=test_set,
                                  add_classes=add_classes)
    finally:
        file.close()
    return await _ask_training(gw, project, out, training, principal)


async def _ask_training(gw: "Gateway", project: str, out: ImportOut, training: dict[str, Any] | None, principal: Principal) -> ImportOut:
    """One `training requested` for the whole import (the trainer waits for its labels), or none."""
    if training is None:
        return out.model_copy(update={"training": "none asked (train=false): the import's labels never fire the count trigger"})
    if out.images == 0:
        return out.model_copy(update={"training": "none: the import sent no new label set"})
    request = TrainingRequested(trigger=TrainingTrigger.IMPORT, requested_by=principal.user_id, hyperparameters=training,
                                import_id=out.import_id, import_labels=out.images)
    async with gw.runtime.transaction() as unit:
        unit.emit(request, project=project, key=project)
    args = ", ".join(f"{k}={v}" for k, v in training.items()) or "the project's settings"
    return out.model_copy(update={"training": f"one run once the import's {out.images} label sets are verified ({args})"})


async def _submit_items(
    gw: "Gateway",
    project: str,
    fmt: str,
    items: list[Item],
    file_classes: list[str],
    archive: _Archive | None,
    *,
    principal: Principal,
    test_set: bool | None,
    add_classes: bool,
) -> ImportOut:
    """Check classes and images, store the images, then store and emit the label sets in batches."""
    unknown = await _unknown_classes(gw, project, fmt, items, file_classes, add_classes=add_classes)
    refs = await _checked_images(gw, project, items, file_classes, archive)
    for ref, member in refs:
        if member is not None and archive is not None:
            # Read again rather than held since the check: an import may be far larger than memory.
            await gw.blobs.put(await asyncio.to_thread(archive.read, member))
    batch = _Batch(import_id=f"import-{uuid.uuid4().hex[:16]}", project=project, principal=principal, test_set=test_set)
    for start in range(0, len(items), IMPORT_BATCH):
        async with gw.runtime.transaction() as unit:
            if start == 0 and unknown:
                await store.ensure_project(unit.conn, gw.s, project, created_by=principal.user_id)
                before = await store.classes(unit.conn, gw.s, project)
                batch.taxonomy = await store.add_classes(unit.conn, gw.s, project, unknown)
                batch.added = [c for c in batch.taxonomy if c not in before]
            else:
                batch.taxonomy = await store.classes(unit.conn, gw.s, project)
            for item, (ref, _) in zip(items[start : start + IMPORT_BATCH], refs[start : start + IMPORT_BATCH], strict=True):
                await _submit_one(unit, gw.s, batch, item, ref)
            if start == 0:
                await store.record_import(unit.conn, gw.s, batch.import_id, project, fmt, principal.user_id)
    async with gw.pool.acquire() as conn:
        await store.count_import(conn, gw.s, batch.import_id, batch.emitted, batch.boxes, batch.tests)
    gw.runtime.counters["imported_images"] += batch.emitted
    return ImportOut(import_id=batch.import_id, images=batch.emitted, boxes=batch.boxes, test_set=batch.tests, classes_added=batch.added,
                     already_imported=batch.skipped, training="")


IMPORT_BATCH = 500
"""Label sets stored and emitted per transaction."""


@dataclass
class _Batch:
    """One import under way: who, where, and what it has sent so far."""

    import_id: str
    project: str
    principal: Principal
    test_set: bool | None
    taxonomy: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    emitted: int = 0
    skipped: int = 0
    boxes: int = 0
    tests: int = 0


async def _unknown_classes(gw: "Gateway", project: str, fmt: str, items: list[Item], file_classes: list[str], *,
                           add_classes: bool) -> list[str]:
    """The classes the files name that the taxonomy lacks (refused unless `add_classes`)."""
    used = list(dict.fromkeys([*file_classes, *(b.class_name for item in items for b in item.boxes)]))
    async with gw.pool.acquire() as conn:
        taxonomy = await store.classes(conn, gw.s, project)
    # A YOLO file's class list fixes indices, so all of it counts; elsewhere only classes in use.
    in_use = {b.class_name for item in items for b in item.boxes}
    unknown = [c for c in used if c not in taxonomy and (fmt == "yolo" or c in in_use)]
    if unknown and not add_classes:
        raise Refusal(
            422, "unknown_class",
            f"the import names classes the taxonomy lacks: {', '.join(map(repr, unknown[:20]))}; add them first, or import with add_classes=true",
            {"unknown_classes": unknown[:100], "classes": taxonomy[:100]},
        )
    return unknown


async def _checked_images(gw: "Gateway", project: str, items: list[Item], file_classes: list[str],
                          archive: _Archive | None) -> list[tuple[ImageRef, str | None]]:
    """Each item's image (from the archive, or one the gateway has) and its boxes in pixels, checked;
    every problem refused at once."""
    policy = gw.config.policy(project)
    refs: list[tuple[ImageRef, str | None]] = []
    issues: list[dict[str, Any]] = []
    async with gw.pool.acquire() as conn:
        for item in items:
            ref, member = await _image_of(conn, gw, project, item, archive)
            if item.normalised is not None:
                item.boxes = [
                    formats.from_yolo_line(f"{c} {cx} {cy} {w} {h}", file_classes, ref.width, ref.height) for c, cx, cy, w, h in item.normalised
                ]
            elif item.width and item.height and (item.width, item.height) != (ref.width, ref.height):
                issues.append({"image": item.name, "reason": "size_mismatch",
                               "message": f"the labels say {item.width}x{item.height}, the image is {ref.width}x{ref.height}"})
            for index, box in enumerate(item.boxes):
                problem = geometry_problem(box, ref.width, ref.height, tolerance_px=policy.box_tolerance_px)
                if problem is not None:
                    issues.append({"image": item.name, "index": index, "reason": problem[0].value, "message": problem[1]})
            item.boxes = [clip(b.model_copy(update={"score": None}), ref.width, ref.height) for b in item.boxes]
            refs.append((ref, member))
    if issues:
        raise Refusal(422, issues[0]["reason"], f"{issues[0]['image']}: {issues[0]['message']} ({len(issues)} problem(s) in all)",
                      {"issues": issues[:MAX_ISSUES_SHOWN], "problems": len(issues)})
    return refs


async def _submit_one(unit: Any, s: str, batch: _Batch, item: Item, ref: ImageRef) -> None:
    """Store one label set and emit it; a label set imported before (same content) is skipped."""
    project, principal = batch.project, batch.principal
    for_test = item.split == "test" if batch.test_set is None else batch.test_set
    await store.upsert_image(unit.conn, s, project, ref)
    digest = hashlib.sha256(
        json.dumps([project, ref.image_id, for_test, [b.model_dump(mode="json") for b in item.boxes]]).encode()
    ).hexdigest()[:32]
    submission_id = f"import-{digest}"
    if await store.submission(unit.conn, s, submission_id) is not None:
        batch.skipped += 1
        return
    now = utcnow()
    await store.insert_submission(unit.conn, s, store.SubmissionRow(
        submission_id=submission_id, task_id=batch.import_id, project=project, image_id=ref.image_id,
        user_id=principal.user_id, role=principal.role.label, source=LabelSourceKind.IMPORT.value,
        kind="annotate", decision=None, boxes=item.boxes, actions={}, opened_at=None, submitted_at=now,
        duration_s=None, for_test_set=for_test,
    ))
    unit.emit(
        label_submitted(
            source=LabelSourceKind.IMPORT, submission_id=submission_id, task_id=batch.import_id, kind=TaskKind.ANNOTATE,
            image=ref, boxes=item.boxes, labeller=principal.user_id, role=principal.role.label, submitted_at=now,
            class_names=batch.taxonomy, for_test_set=for_test,
        ),
        project=project,
        correlation_id=ref.image_id,
    )
    batch.emitted += 1
    batch.boxes += len(item.boxes)
    batch.tests += for_test


async def _image_of(conn: Any, gw: "Gateway", project: str, item: Item, archive: _Archive | None) -> tuple[ImageRef, str | None]:
    """The image an import item names (and its archive member): from the archive, else one
    the gateway already has."""
    member = archive.find(item.name, item.split) if archive is not None else None
    if member is None and archive is not None and item.image_id:
        member = archive.find_stem(item.image_id)
    if member is not None and archive is not None:
        data = await asyncio.to_thread(archive.read, member)
        width, height, image_format = _format(lambda: formats.image_facts(data))
        sha = hashlib.sha256(data).hexdigest()
        uri = gw.blobs.uri_for(sha)
        return ImageRef(image_id=sha, blob_uri=uri, width=width, height=height, format=image_format[:16], byte_size=len(data)), member
    image_id = item.image_id or _known_id(item.name, project)
    ref = await store.image(conn, gw.s, project, image_id) if image_id else None
    if ref is None:
        raise Refusal(
            422, "unknown_image",
            f"image {item.name[:200]!r} is neither in the archive nor an image of project {project!r}; import a zip with the images",
        )
    return ref, None

