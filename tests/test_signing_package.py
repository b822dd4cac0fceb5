"""Keys, signatures and the package format: deterministic archives and every tampering refused."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr

from visionloop.contracts import DeviceFailureReason, ModelRef, RolloutStage
from visionloop.libs import package, signing
from visionloop.libs.package import PackageError

CREATED = datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
MODEL = b"\x08\x01onnx-bytes" * 500


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return signing.generate()


def manifest(**changes: object) -> dict:
    values = dict(
        model=ModelRef(model_id="demo-detector", version=3),
        project="demo",
        target="edge",
        precision="fp32",
        classes=["circle", "square", "triangle"],
        input_shape=["batch", 3, 128, 128],
        created_at=CREATED,
        dataset_version="ds-1",
        metrics={"map50_95": 0.5, "map50": 0.8},
        parent=ModelRef(model_id="demo-detector", version=2),
        fleets=["lab"],
    )
    values.update(changes)
    return package.make_manifest(**values)  # type: ignore[arg-type]


def built(keys: tuple[bytes, bytes], **changes: object) -> package.Built:
    return package.build(manifest(**changes), {package.MODEL_FILE: MODEL}, signing.load_private(keys[0]))


def trust(keys: tuple[bytes, bytes]) -> signing.TrustStore:
    return signing.TrustStore.load([keys[1]])


def tar_of(members: list[tuple[str, bytes]], **info: object) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            for key, value in info.items():
                setattr(member, key, value)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


def members_of(archive: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def refused(archive: bytes, store: signing.TrustStore) -> DeviceFailureReason:
    with pytest.raises(PackageError) as caught:
        package.open_package(archive, store)
    return caught.value.reason


# -- keys -------------------------------------------------------------------------------------------------
def test_keys_load_from_every_form_and_key_id_is_stable(tmp_path, keys) -> None:
    private_pem, public_pem = keys
    private = signing.load_private(private_pem)
    seed = private.private_bytes_raw()
    kid = signing.key_id(private)
    assert len(kid) == 16 and kid == signing.key_id(signing.load_public(public_pem))
    path = tmp_path / "k.pem"
    path.write_bytes(private_pem)
    for source in (private_pem.decode(), path, str(path), base64.b64encode(seed).decode(), SecretStr(private_pem.decode())):
        assert signing.key_id(signing.load_private(source)) == kid
    assert signing.key_id(signing.load_public(base64.b64encode(signing.raw_public(private)).decode())) == kid
    with pytest.raises(signing.SigningError) as caught:
        signing.load_private("not a key at all")
    assert caught.value.reason == "key_invalid" and "not a key" not in str(caught.value)


def test_sign_and_verify(keys) -> None:
    private, public = signing.load_private(keys[0]), signing.load_public(keys[1])
    signature = signing.sign(private, b"manifest")
    assert signing.verify(public, b"manifest", signature)
    assert not signing.verify(public, b"manifest!", signature)
    assert not signing.verify(public, b"manifest", "not base64!")
    assert not signing.verify(signing.load_public(signing.generate()[1]), b"manifest", signature)


def test_trust_store_from_a_folder_skips_private_keys(tmp_path, keys) -> None:
    private_path = signing.ensure_key_pair(tmp_path / "keys")
    assert os.stat(private_path).st_mode & 0o777 == 0o600
    assert signing.ensure_key_pair(tmp_path / "keys") == private_path  # created once
    (tmp_path / "keys" / "other.pem").write_bytes(keys[1])
    store = signing.TrustStore.load([tmp_path / "keys"])
    assert set(store.key_ids) == {signing.key_id(signing.load_private(private_path)), signing.key_id(signing.load_public(keys[1]))}
    with pytest.raises(signing.SigningError):
        signing.TrustStore.load([tmp_path / "missing.pub"])


# -- the format -----------------------------------------------------------------------------------------
def test_archives_are_deterministic_and_round_trip(keys) -> None:
    first, second = built(keys), built(keys)
    assert first.archive == second.archive and first.sha256 == second.sha256
    assert built(keys, created_at=datetime(2025, 3, 4, 5, 6, 8, tzinfo=UTC)).sha256 != first.sha256
    with tarfile.open(fileobj=io.BytesIO(first.archive)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["manifest.json", "manifest.sig", "model.onnx"]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (int(CREATED.timestamp()), 0o644, 0, 0, "", "")
    }
    opened = package.open_package(first.archive, trust(keys))
    assert opened.model == MODEL and opened.key_id == first.key_id
    assert opened.manifest_bytes == first.manifest_bytes == package.canonical_json(json.loads(first.manifest_bytes))
    spec = opened.spec
    assert spec.created_at == "2025-03-04T05:06:07Z" and spec.input.shape == ["batch", 3, 128, 128]
    assert spec.decoding.model_dump() == {"format": "ultralytics-detect", "conf": 0.25, "iou": 0.7, "max_det": 300}
    assert spec.files[0].sha256 == hashlib.sha256(MODEL).hexdigest() and spec.fleets == ["lab"]
    assert spec.parent is not None and spec.parent.version == 2 and spec.ref == ModelRef(model_id="demo-detector", version=3)


def test_build_refuses_an_invalid_manifest(keys) -> None:
    with pytest.raises(PackageError) as caught:
        package.build(manifest(classes=[]), {package.MODEL_FILE: MODEL}, signing.load_private(keys[0]))
    assert caught.value.reason is DeviceFailureReason.MANIFEST_INVALID
    with pytest.raises(PackageError):
        package.build(manifest(), {"../model.onnx": MODEL}, signing.load_private(keys[0]))


def test_flipped_model_byte_is_a_checksum_mismatch(keys) -> None:
    archive = bytearray(built(keys).archive)
    start = archive.index(MODEL[:40])
    archive[start + 100] ^= 0x01
    assert refused(bytes(archive), trust(keys)) is DeviceFailureReason.CHECKSUM_MISMATCH


def test_manifest_edited_after_signing_is_a_bad_signature(keys) -> None:
    members = members_of(built(keys).archive)
    edited = members[0][1].replace(b'"fleets":["lab"]', b'"fleets":[]')
    assert edited != members[0][1]
    archive = tar_of([("manifest.json", edited), *members[1:]])
    assert refused(archive, trust(keys)) is DeviceFailureReason.BAD_SIGNATURE


def test_signature_by_an_unknown_key(keys) -> None:
    stranger = signing.generate()
    assert refused(built(stranger).archive, trust(keys)) is DeviceFailureReason.UNKNOWN_KEY
    # A valid signature by the stranger's key, relabelled with the trusted key's id, fails to verify.
    members = members_of(built(stranger).archive)
    sig = json.loads(members[1][1])
    sig["key_id"] = signing.key_id(signing.load_public(keys[1]))
    forged = tar_of([members[0], ("manifest.sig", package.canonical_json(sig)), members[2]])
    assert refused(forged, trust(keys)) is DeviceFailureReason.BAD_SIGNATURE


@pytest.mark.parametrize("cut", [0, 100, 700, 1536, 2048, 3000])
def test_truncated_archive_is_invalid(keys, cut: int) -> None:
    assert refused(built(keys).archive[:cut], trust(keys)) is DeviceFailureReason.MANIFEST_INVALID


def test_structural_tampering_is_invalid(keys) -> None:
    good = members_of(built(keys).archive)
    store = trust(keys)
    cases = {
        "extra member": tar_of([*good, ("evil.sh", b"#!/bin/sh\n")]),
        "path traversal": tar_of([*good[:2], ("../model.onnx", good[2][1])]),
        "absolute path": tar_of([*good[:2], ("/etc/model.onnx", good[2][1])]),
        "duplicate member": tar_of([*good, good[2]]),
        "missing model": tar_of(good[:2]),
        "wrong order": tar_of([good[1], good[0], good[2]]),
        "not a tar": b"PK\x03\x04" + b"\x00" * 2000,
        "garbage signature": tar_of([good[0], ("manifest.sig", b"{not json"), good[2]]),
        "too many members": tar_of([*good, *[(f"f{i}.bin", b"x") for i in range(10)]]),
    }
    for case, archive in cases.items():
        assert refused(archive, store) is DeviceFailureReason.MANIFEST_INVALID, case
    symlink = io.BytesIO()
    with tarfile.open(fileobj=symlink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in good[:2]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("model.onnx")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert refused(symlink.getvalue(), store) is DeviceFailureReason.MANIFEST_INVALID
    with pytest.raises(PackageError) as caught:
        package.open_package(built(keys).archive, store, max_bytes=1000)
    assert caught.value.reason is DeviceFailureReason.MANIFEST_INVALID


def test_signed_but_malformed_manifest_is_invalid(keys) -> None:
    private = signing.load_private(keys[0])
    good = members_of(built(keys).archive)
    for text in (b'{"format_version": 2}', b'{"a": 1, "a": 2}', b"[NaN]"):
        sig = package.canonical_json({"algorithm": "ed25519", "key_id": signing.key_id(private), "signature": signing.sign(private, text)})
        archive = tar_of([("manifest.json", text), ("manifest.sig", sig), good[2]])
        assert refused(archive, trust(keys)) is DeviceFailureReason.MANIFEST_INVALID, text


def test_rollout_buckets() -> None:
    devices = [f"cam-{i}" for i in range(2000)]
    assert all(0 <= package.bucket(d) < 100 for d in devices)
    canary = [d for d in devices if package.in_stage(d, RolloutStage(index=0, percent=10))]
    half = [d for d in devices if package.in_stage(d, RolloutStage(index=1, percent=50))]
    assert 120 < len(canary) < 280 and set(canary) <= set(half)  # stages only ever add devices
    assert all(package.in_stage(d, RolloutStage(index=2, percent=100)) for d in devices)
    explicit = RolloutStage(index=0, percent=1, devices=["cam-7"])
    assert package.in_stage("cam-7", explicit) and not package.in_stage("cam-8", explicit)
