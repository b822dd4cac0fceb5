"""The device's two model slots on disk (A/B), the pointer that says which one is active and
which was last known good, and the running model. Every write is synced before the pointer moves,
so a power cut leaves either the old or the new model active, never half of one."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from visionloop.contracts import SYSTEM_PROJECT, DeviceFailureReason, ModelRef
from visionloop.libs.inference import Detector
from visionloop.libs.package import Manifest, Opened, open_package
from visionloop.libs.signing import TrustStore

log = logging.getLogger("visionloop.services.edge_agent.agent")

SLOTS = ("a", "b")
POINTER = "current.json"
ARCHIVE = "package.tar"
SLOT_META = "slot.json"

DEFAULT_MAX_PACKAGE_BYTES = 512 * 1024 * 1024
"""Largest package a device downloads by default."""


class Refused(Exception):
    """A release the device refuses or fails, with the reason it reports."""

    def __init__(self, reason: DeviceFailureReason | None, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Installed:
    """A verified package in a slot."""

    slot: str
    opened: Opened
    package_sha256: str
    release_id: str | None
    project: str
    installed_at: str

    @property
    def spec(self) -> Manifest:
        """The manifest."""
        return self.opened.spec

    @property
    def model(self) -> ModelRef:
        """The model it holds."""
        return self.opened.spec.ref


@dataclass(frozen=True)
class Pointer:
    """Which slot runs, and which holds the last-known-good model."""

    active: str | None = None
    last_known_good: str | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Slots:
    """The A/B slots under `home`: a new package goes into the inactive slot, then one atomic
    `os.replace` of `current.json` switches to it. A crash at any moment leaves a consistent
    pointer to complete slots."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.root = self.home / "slots"

    def pointer(self) -> Pointer:
        """The pointer in force (no file: nothing installed)."""
        path = self.home / POINTER
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Pointer()
        except ValueError:
            log.error("edge agent: %s is damaged; starting without an active model", path)
            return Pointer()
        active, lkg = data.get("active"), data.get("last_known_good")
        return Pointer(active if active in SLOTS else None, lkg if lkg in SLOTS and lkg != active else None)

    def switch(self, active: str | None, last_known_good: str | None) -> None:
        """Point at `active` (and `last_known_good`) atomically and durably."""
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.home / f".{POINTER}.tmp"
        _write_synced(tmp, json.dumps({"active": active, "last_known_good": last_known_good}).encode())
        os.replace(tmp, self.home / POINTER)
        _fsync_dir(self.home)

    def install(self, archive: bytes, opened: Opened, *, package_sha256: str, release_id: str | None, project: str) -> str:
        """Write a verified package into the inactive slot (not yet active); return the slot's name."""
        pointer = self.pointer()
        slot = "b" if pointer.active == "a" else "a"
        if pointer.last_known_good == slot:
            # The slot about to be overwritten must not stay named as last-known-good meanwhile.
            self.switch(pointer.active, None)
        self.root.mkdir(parents=True, exist_ok=True)
        final, tmp = self.root / slot, self.root / f".{slot}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {
            "package_sha256": package_sha256,
            "release_id": release_id,
            "project": project,
            "installed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_synced(tmp / ARCHIVE, archive)
        _write_synced(tmp / "manifest.json", opened.manifest_bytes)
        _write_synced(tmp / SLOT_META, json.dumps(meta, indent=1).encode())
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        return slot

    def load(self, slot: str, trust: TrustStore, *, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> Installed:
        """A slot's package, fully verified again (archive SHA-256, signature, checksums).

        Raises `PackageError` (or `Refused(manifest_invalid)` for a damaged slot).
        """
        folder = self.root / slot
        try:
            meta = json.loads((folder / SLOT_META).read_text(encoding="utf-8"))
            archive = (folder / ARCHIVE).read_bytes()
        except (OSError, ValueError) as exc:
            raise Refused(DeviceFailureReason.MANIFEST_INVALID, f"slot {slot} is damaged ({exc})") from None
        if hashlib.sha256(archive).hexdigest() != meta.get("package_sha256"):
            raise Refused(DeviceFailureReason.CHECKSUM_MISMATCH, f"slot {slot}'s package no longer matches its SHA-256")
        opened = open_package(archive, trust, max_bytes=max_bytes)
        return Installed(
            slot=slot,
            opened=opened,
            package_sha256=meta["package_sha256"],
            release_id=meta.get("release_id"),
            project=meta.get("project") or SYSTEM_PROJECT,
            installed_at=meta.get("installed_at", ""),
        )


@dataclass(frozen=True)
class Running:
    """The model serving now: its package and its loaded detector."""

    installed: Installed
    detector: Detector
