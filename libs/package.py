"""The model package: one signed, deterministic archive, written by the packager and checked by the
distributor and every edge agent before anything runs.

Format (version 1), a plain uncompressed POSIX (ustar) tar with exactly these members, in order:

1. `manifest.json`: canonical JSON (sorted keys, no spaces, UTF-8) describing the model: id and
   version, project, target, precision, classes in head order, the input tensor, the decoding,
   metrics, lineage, `created_at`, the fleets it may run on and every payload file's SHA-256 and
   size (see `Manifest`).
2. `manifest.sig`: `{"algorithm": "ed25519", "key_id": ..., "signature": <base64>}`, the Ed25519
   signature of the exact `manifest.json` bytes.
3. The payload files named by the manifest (`model.onnx`), in the manifest's order.

Every member is a regular file with mode 0644, uid/gid 0, empty owner names and the manifest's
`created_at` as mtime, so the same inputs always give a byte-identical archive (Ed25519
signatures are deterministic too).

`open_package` trusts nothing: it refuses an archive with `PackageError(reason, message)`, where
`reason` is the contract's `DeviceFailureReason`: `manifest_invalid` (not a tar, wrong or
duplicate members, links, path traversal, oversize, bad JSON or schema), `unknown_key`,
`bad_signature`, `checksum_mismatch`.

`in_stage` is the rollout rule the distributor and the edge agents share.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visionloop.contracts.common import ModelRef, Target
from visionloop.contracts.model import Precision
from visionloop.contracts.release import DeviceFailureReason, RolloutStage
from visionloop.libs import signing
from visionloop.libs.signing import TrustStore

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MODEL_FILE = "model.onnx"
DECODING_FORMAT = "ultralytics-detect"

MAX_ARCHIVE_BYTES = 1 << 30
"""Largest archive `open_package` reads (1 GiB; the biggest YOLO ONNX files are a few hundred MB)."""
MAX_MANIFEST_BYTES = 256 * 1024
MAX_SIGNATURE_BYTES = 4096
MAX_MEMBERS = 8

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CREATED_AT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_RESERVED = (MANIFEST_NAME, SIGNATURE_NAME)


class PackageError(Exception):
    """A package refused: `reason` is a `DeviceFailureReason`, the message says what is wrong."""

    def __init__(self, reason: DeviceFailureReason | str, message: str) -> None:
        super().__init__(message)
        self.reason = DeviceFailureReason(reason)

    @property
    def message(self) -> str:
        """The sentence, without the reason code."""
        return str(self.args[0])

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.args[0]}"


def _invalid(message: str) -> PackageError:
    return PackageError(DeviceFailureReason.MANIFEST_INVALID, message)


# -- the manifest ------------------------------------------------------------------------------------
class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class PackageModel(_Part):
    """The model a package holds."""

    model_id: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1)


class InputSpec(_Part):
    """The input tensor the model takes, and how an image becomes it (Ultralytics' letterbox)."""

    shape: list[int | str] = Field(min_length=4, max_length=4, description="[N, 3, H, W]; N is `batch` when dynamic.")
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    colour: Literal["RGB"] = "RGB"
    scale: float = Field(default=1 / 255, gt=0, description="Pixel values are multiplied by this (0..255 -> 0..1).")
    pad_value: int = Field(default=114, ge=0, le=255, description="Grey level of the letterbox padding.")

    @field_validator("shape")
    @classmethod
    def _nchw(cls, shape: list[int | str]) -> list[int | str]:
        n, c, h, w = shape
        if not (n == "batch" or (isinstance(n, int) and n > 0)):
            raise ValueError("the batch dimension is a positive integer or `batch`")
        if c != 3:
            raise ValueError("the model takes 3-channel images")
        if not (isinstance(h, int) and isinstance(w, int) and 0 < h <= 8192 and 0 < w <= 8192):
            raise ValueError("height and width must be fixed positive integers")
        return shape

    @property
    def height(self) -> int:
        """Input height in pixels."""
        return int(self.shape[2])

    @property
    def width(self) -> int:
        """Input width in pixels."""
        return int(self.shape[3])


class Decoding(_Part):
    """How the head's output becomes boxes (the recognizer's decoding, libs/inference.py)."""

    format: Literal["ultralytics-detect"] = DECODING_FORMAT
    conf: float = Field(default=0.25, gt=0, lt=1)
    iou: float = Field(default=0.7, gt=0, le=1)
    max_det: int = Field(default=300, ge=1, le=10000)


class FileEntry(_Part):
    """One payload file of the package."""

    name: str = Field(pattern=_FILE_NAME.pattern)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(_Part):
    """`manifest.json`, validated (unknown fields are ignored: format 1 may grow optional ones)."""

    format_version: Literal[1]
    model: PackageModel
    project: str = Field(min_length=1, max_length=63)
    target: Target
    precision: Precision
    classes: list[str] = Field(min_length=1, max_length=10000)
    input: InputSpec
    decoding: Decoding
    metrics: dict[str, Any] = Field(default_factory=dict)
    parent: PackageModel | None = None
    dataset_version: str = Field(min_length=1, max_length=80)
    created_at: str = Field(pattern=_CREATED_AT.pattern, description="ISO UTC, whole seconds: `2025-01-31T12:00:00Z`.")
    fleets: list[str] = Field(default_factory=list, description="Fleets it may run on; empty: any.")
    files: list[FileEntry] = Field(min_length=1, max_length=MAX_MEMBERS - 2)

    @model_validator(mode="after")
    def _files(self) -> "Manifest":
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("file names must be unique")
        if set(names) & set(_RESERVED):
            raise ValueError(f"{MANIFEST_NAME} and {SIGNATURE_NAME} are not payload files")
        created_epoch(self.created_at)
        return self

    @property
    def ref(self) -> ModelRef:
        """The model as a contract `ModelRef`."""
        return ModelRef(model_id=self.model.model_id, version=self.model.version)

    @property
    def model_file(self) -> str:
        """The ONNX file to run: `model.onnx`, else the first `.onnx` payload file."""
        names = [f.name for f in self.files]
        if MODEL_FILE in names:
            return MODEL_FILE
        return next((n for n in names if n.endswith(".onnx")), names[0])


def created_at_text(moment: datetime) -> str:
    """A timestamp in the manifest's form: UTC, whole seconds, `Z`."""
    if moment.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def created_epoch(created_at: str) -> int:
    """The manifest's `created_at` as integer epoch seconds (the archive members' mtime)."""
    if not _CREATED_AT.match(created_at):
        raise ValueError(f"created_at {created_at!r} is not UTC whole seconds like 2025-01-31T12:00:00Z")
    return calendar.timegm(datetime.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ").timetuple())


def make_manifest(
    *,
    model: ModelRef,
    project: str,
    target: Target | str,
    precision: Precision | str,
    classes: Sequence[str],
    input_shape: Sequence[int | str],
    created_at: datetime,
    dataset_version: str,
    imgsz: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    parent: ModelRef | None = None,
    fleets: Sequence[str] = (),
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
) -> dict[str, Any]:
    """A manifest (without `files`, which `build` fills in) from the facts of a converted model.

    `input_shape` is the artifact's NCHW shape; a non-integer batch becomes `batch`, non-integer
    height/width become `imgsz`.
    """
    n, _, h, w = list(input_shape)
    shape: list[int | str] = [
        n if isinstance(n, int) and n > 0 else "batch",
        3,
        h if isinstance(h, int) and h > 0 else (imgsz or 0),
        w if isinstance(w, int) and w > 0 else (imgsz or 0),
    ]
    return {
        "format_version": FORMAT_VERSION,
        "model": {"model_id": model.model_id, "version": model.version},
        "project": project,
        "target": Target(target).value,
        "precision": Precision(precision).value,
        "classes": list(classes),
        "input": InputSpec(shape=shape).model_dump(mode="json"),
        "decoding": Decoding(conf=conf, iou=iou, max_det=max_det).model_dump(mode="json"),
        "metrics": dict(metrics or {}),
        "parent": {"model_id": parent.model_id, "version": parent.version} if parent else None,
        "dataset_version": dataset_version,
        "created_at": created_at_text(created_at),
        "fleets": list(fleets),
    }


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys, no spaces, UTF-8, no NaN: the bytes that are signed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _strict_json(data: bytes) -> Any:
    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=refuse)


# -- build --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Built:
    """A package just built."""

    archive: bytes
    sha256: str
    """SHA-256 of the archive (what releases carry)."""
    manifest_bytes: bytes
    manifest_sha256: str
    signature: str
    """Base64 Ed25519 signature of `manifest_bytes`."""
    key_id: str

    @property
    def size(self) -> int:
        """Archive size in bytes."""
        return len(self.archive)


def _member(name: str, data: bytes, mtime: int) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def build(manifest: Mapping[str, Any], files: Mapping[str, bytes], private_key: Ed25519PrivateKey) -> Built:
    """Sign `manifest` (its `files` list computed from `files`, in their order) and archive it.

    Raises `PackageError(manifest_invalid)` for a manifest or file names the format refuses.
    """
    entries = [{"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in files.items()]
    try:
        spec = Manifest.model_validate({**manifest, "files": entries})
    except ValidationError as exc:
        raise _invalid(f"the manifest does not fit package format {FORMAT_VERSION}: {_brief(exc)}") from None
    document = {**dict(manifest), "files": entries}
    try:
        manifest_bytes = canonical_json(document)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"the manifest is not plain JSON data ({exc})") from None
    signature = signing.sign(private_key, manifest_bytes)
    kid = signing.key_id(private_key)
    sig_bytes = canonical_json({"algorithm": signing.ALGORITHM, "key_id": kid, "signature": signature})
    mtime = created_epoch(spec.created_at)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [(MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, sig_bytes), *files.items()]:
            tar.addfile(*_member(name, data, mtime))
    archive = out.getvalue()
    return Built(
        archive=archive,
        sha256=hashlib.sha256(archive).hexdigest(),
        manifest_bytes=manifest_bytes,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        signature=signature,
        key_id=kid,
    )


# -- open ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opened:
    """A package whose signature, manifest and files all checked out."""

    manifest: dict[str, Any]
    files: dict[str, bytes]
    key_id: str
    spec: Manifest
    """The manifest, validated and typed."""
    manifest_bytes: bytes
    signature: str

    @property
    def model(self) -> bytes:
        """The ONNX model bytes."""
        return self.files[self.spec.model_file]


def _members(archive: bytes) -> list[tuple[str, bytes]]:
    """The archive's members as (name, bytes), refusing anything but a small flat set of regular files."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(archive), mode="r:")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise _invalid(f"the package is not a tar archive ({exc})") from None
    members: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    try:
        with tar:
            for member in tar:
                if len(members) >= MAX_MEMBERS:
                    raise _invalid(f"the package has more than {MAX_MEMBERS} members")
                name = member.name
                if not _FILE_NAME.match(name):
                    raise _invalid(f"member {name[:120]!r} is not a plain file name (paths and traversal are refused)")
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    raise _invalid(f"member {name!r} is not a regular file (links, folders and devices are refused)")
                if name in seen:
                    raise _invalid(f"member {name!r} appears twice")
                seen.add(name)
                handle = tar.extractfile(member)
                data = handle.read(member.size) if handle is not None else b""
                if len(data) != member.size:
                    raise _invalid(f"member {name!r} is truncated ({len(data)} of {member.size} bytes)")
                members.append((name, data))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise _invalid(f"the package archive is damaged or truncated ({exc})") from None
    if not members:
        raise _invalid("the package archive is empty")
    return members


def open_package(archive: bytes, trust: TrustStore, *, max_bytes: int = MAX_ARCHIVE_BYTES) -> Opened:
    """Check a package completely and return its manifest and files; raise `PackageError` otherwise.

    Order: archive structure, signature (key known, signature valid over the exact manifest
    bytes), then the manifest's schema, then every payload file's size and SHA-256.
    """
    if len(archive) > max_bytes:
        raise _invalid(f"the package is {len(archive)} bytes, more than the {max_bytes} allowed")
    members = _members(archive)
    names = [name for name, _ in members]
    if names[:2] != [MANIFEST_NAME, SIGNATURE_NAME]:
        raise _invalid(f"a package starts with {MANIFEST_NAME} and {SIGNATURE_NAME}; this one has {names[:2]}")
    manifest_bytes, sig_bytes = members[0][1], members[1][1]
    if len(manifest_bytes) > MAX_MANIFEST_BYTES or len(sig_bytes) > MAX_SIGNATURE_BYTES:
        raise _invalid("the manifest or its signature is too large")
    kid, signature = _verified_signature(manifest_bytes, sig_bytes, trust)
    try:
        document = _strict_json(manifest_bytes)
        spec = Manifest.model_validate(document)
    except ValidationError as exc:
        raise _invalid(f"the signed manifest does not fit package format {FORMAT_VERSION}: {_brief(exc)}") from None
    except (ValueError, UnicodeError) as exc:
        raise _invalid(f"{MANIFEST_NAME} is not valid JSON ({exc})") from None
    listed = [f.name for f in spec.files]
    present = dict(members[2:])
    if extra := [n for n in names[2:] if n not in listed]:
        raise _invalid(f"the package holds files its manifest does not list: {', '.join(extra)}")
    if missing := [n for n in listed if n not in present]:
        raise _invalid(f"the package lacks files its manifest lists: {', '.join(missing)}")
    for entry in spec.files:
        data = present[entry.name]
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise PackageError(
                DeviceFailureReason.CHECKSUM_MISMATCH,
                f"{entry.name} does not match its manifest entry (size {len(data)} vs {entry.size}, or "
                "SHA-256): the file was altered or damaged",
            )
    return Opened(
        manifest=document,
        files={entry.name: present[entry.name] for entry in spec.files},
        key_id=kid,
        spec=spec,
        manifest_bytes=manifest_bytes,
        signature=signature,
    )


def _verified_signature(manifest_bytes: bytes, sig_bytes: bytes, trust: TrustStore) -> tuple[str, str]:
    """(key id, signature) of a signature file that verifies over the exact manifest bytes with a
    trusted key; `PackageError` otherwise."""
    try:
        sig = _strict_json(sig_bytes)
        kid, signature, algorithm = sig["key_id"], sig["signature"], sig["algorithm"]
        if not (isinstance(kid, str) and isinstance(signature, str) and algorithm == signing.ALGORITHM):
            raise ValueError("wrong types")
    except (ValueError, KeyError, TypeError, UnicodeError):
        raise _invalid(f"{SIGNATURE_NAME} is not {{algorithm: ed25519, key_id, signature}} JSON") from None
    public = trust.get(kid)
    if public is None:
        raise PackageError(
            DeviceFailureReason.UNKNOWN_KEY,
            f"the package is signed by key {kid[:32]!r}, which this device does not trust "
            f"(trusted: {', '.join(trust.key_ids) or 'none'}): add the packager's public key to the trust store",
        )
    if not signing.verify(public, manifest_bytes, signature):
        raise PackageError(
            DeviceFailureReason.BAD_SIGNATURE,
            f"the manifest's signature does not verify with key {kid}: the package was altered after signing",
        )
    return kid, signature


def _brief(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# -- rollout --------------------------------------------------------------------------------------------
def bucket(device_id: str) -> float:
    """A device's fixed place in [0, 100) for percentage rollouts: from SHA-256(device id) alone,
    so it is the same for every release and stages only ever add devices."""
    digest = hashlib.sha256(device_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def in_stage(device_id: str, stage: RolloutStage) -> bool:
    """Whether `stage` addresses `device_id`: listed explicitly, or (no list) its bucket is below the percent."""
    if stage.devices:
        return device_id in stage.devices
    return bucket(device_id) < stage.percent
