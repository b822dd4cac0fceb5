"""Ed25519 keys: the packager signs model packages, edge agents and the distributor verify them.

- A **key id** is the first 16 hex digits of the SHA-256 of the raw 32-byte public key: it names
  the key in every package signature and release, so a verifier picks the right public key.
- A **private key** comes from configuration only, as a PEM (PKCS#8) file, a PEM text, or the
  base64 of the raw 32-byte seed (or of its DER form). It is never logged: keep it in a
  `SecretStr` setting or a file with mode 0600.
- A **trust store** maps key ids to public keys; a device trusts exactly the keys it was given
  (PEM files, a folder of `*.pub`/`*.pem` files, or PEM texts). Rotating a key means adding the
  new public key to the devices first, then signing with the new private key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import SecretStr

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"
"""The one signature algorithm of packages."""

PRIVATE_KEY_FILE = "packager-ed25519.key"
PUBLIC_KEY_FILE = "packager-ed25519.pub"
"""Names of an auto-created key pair inside its folder (`<state_dir>/keys/` for the embedded stack)."""

_MAX_KEY_FILE = 64 * 1024


class SigningError(Exception):
    """A key that cannot be used: `reason` is a stable code, the message says what to do.

    Messages never contain key material.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


KeySource = bytes | str | os.PathLike[str] | SecretStr
"""Where a key comes from: PEM bytes or text, a file path, base64 of the raw key, or a SecretStr of any of these."""


# -- keys -------------------------------------------------------------------------------------------
def generate() -> tuple[bytes, bytes]:
    """A new key pair as `(private PEM (PKCS#8, unencrypted), public PEM (SubjectPublicKeyInfo))`."""
    private = Ed25519PrivateKey.generate()
    return private_pem(private), public_pem(private.public_key())


def private_pem(private: Ed25519PrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """A public key (or a private key's public half) as SubjectPublicKeyInfo PEM."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def raw_public(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32 bytes of a public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key (a private key: of its public half)."""
    raw = key if isinstance(key, bytes) else raw_public(key)
    if len(raw) != 32:
        raise SigningError("key_invalid", "a raw Ed25519 public key has 32 bytes")
    return hashlib.sha256(raw).hexdigest()[:16]


def _material(source: KeySource, kind: str) -> bytes:
    """The bytes a key source stands for: a file's content, or the text itself."""
    if isinstance(source, SecretStr):
        source = source.get_secret_value()
    if isinstance(source, os.PathLike):
        return _read_key_file(Path(source), kind)
    if isinstance(source, str):
        text = source.strip()
        if text.startswith("-----BEGIN"):
            return text.encode()
        path = Path(text).expanduser() if len(text) < 4096 and "\n" not in text else None
        if path is not None and path.is_file():
            return _read_key_file(path, kind)
        if _b64(text) is not None:
            return text.encode()
        raise SigningError(
            "key_invalid",
            f"the {kind} key is neither PEM text, base64 of a raw key, nor a readable file: give a "
            "PEM file path or its content",
        )
    return bytes(source)


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        if path.stat().st_size > _MAX_KEY_FILE:
            raise SigningError("key_invalid", f"{path} is too large to be an Ed25519 {kind} key")
        return path.read_bytes()
    except OSError as exc:
        raise SigningError("key_unreadable", f"cannot read the {kind} key file {path}: {exc.strerror}") from None


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def load_private(source: KeySource) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (bytes or text), a file path, or base64 of the raw 32-byte seed / DER.

    Raises `SigningError("key_invalid" | "key_unreadable")`; the message never shows the key.
    """
    data = _material(source, "private")
    stripped = data.strip()
    try:
        if stripped.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(stripped, password=None)
        else:
            raw = stripped if len(stripped) == 32 else _b64(stripped.decode("ascii", "replace"))
            if raw is None:
                raise ValueError("not base64")
            key = Ed25519PrivateKey.from_private_bytes(raw) if len(raw) == 32 else serialization.load_der_private_key(raw, None)
    except SigningError:
        raise
    except (ValueError, TypeError, UnicodeError):
        raise SigningError(
            "key_invalid",
            "the private key does not parse as an unencrypted Ed25519 PEM, raw seed or DER key: "
            "make one with `openssl genpkey -algorithm ed25519`",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError("key_invalid", f"the private key is a {type(key).__name__}, not Ed25519")
    return key


def load_public(source: KeySource | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, a file path, or base64 of the raw 32 bytes / DER.

    A private key given here yields its public half.
    """
    if isinstance(source, Ed25519PublicKey):
        return source
    data = _material(source, "public")
    stripped = data.strip()
    try:
        if b"PRIVATE KEY-----" in stripped[:64]:
            return load_private(stripped).public_key()
        if stripped.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(stripped)
        else:
            raw = stripped if len(stripped) == 32 else _b64(stripped.decode("ascii", "replace"))
            if raw is None:
                raise ValueError("not base64")
            key = Ed25519PublicKey.from_public_bytes(raw) if len(raw) == 32 else serialization.load_der_public_key(raw)
    except SigningError:
        raise
    except (ValueError, TypeError, UnicodeError):
        raise SigningError(
            "key_invalid", "the public key does not parse as an Ed25519 PEM, raw or DER key"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError("key_invalid", f"the public key is a {type(key).__name__}, not Ed25519")
    return key


def write_key_pair(folder: Path, *, name: str = "packager-ed25519") -> tuple[Path, Path]:
    """Create a new key pair as `<folder>/<name>.key` (mode 0600) and `<name>.pub`; refuse to overwrite."""
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    private, public = generate()
    # O_EXCL: two processes creating the key at once must not end with two different keys.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
        f.flush()
        os.fsync(f.fileno())
    public_path.write_bytes(public)
    return private_path, public_path


def ensure_key_pair(folder: Path, *, name: str = "packager-ed25519") -> Path:
    """The private key file of `folder`, created (mode 0600, with its `.pub`) when there is none."""
    private_path = folder / f"{name}.key"
    if not private_path.exists():
        try:
            write_key_pair(folder, name=name)
            log.warning("created a new package signing key %s (trust %s on devices)", private_path, folder / f"{name}.pub")
        except FileExistsError:
            pass  # another process made it first: use that one
    public_path = folder / f"{name}.pub"
    if not public_path.exists():
        public_path.write_bytes(public_pem(load_private(private_path)))
    return private_path


# -- signatures ------------------------------------------------------------------------------------
def sign(private: Ed25519PrivateKey, data: bytes) -> str:
    """The Ed25519 signature of `data`, base64 (standard alphabet, padded)."""
    return base64.b64encode(private.sign(data)).decode("ascii")


def verify(public: Ed25519PublicKey, data: bytes, signature_b64: str) -> bool:
    """Whether `signature_b64` is `public`'s valid signature of `data` (malformed signatures: False)."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return False
    if len(signature) != 64:
        return False
    try:
        public.verify(signature, data)
    except InvalidSignature:
        return False
    return True


class TrustStore:
    """The public keys a verifier accepts, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            self.add(key)

    @classmethod
    def load(cls, sources: Iterable[KeySource | Ed25519PublicKey]) -> "TrustStore":
        """Trust every key of `sources`: PEM texts/bytes, public key files, or folders of them.

        A folder contributes its `*.pub` and `*.pem` files that hold public keys; private keys
        in it are skipped (a device never needs one). Raises `SigningError` for a named file or
        text that is not a key, or a path that does not exist.
        """
        store = cls()
        for source in sources:
            if isinstance(source, (str, os.PathLike)) and not (isinstance(source, str) and source.lstrip().startswith("-----BEGIN")):
                path = Path(source).expanduser()
                if path.is_dir():
                    store._add_folder(path)
                    continue
                if not path.exists():
                    raise SigningError("key_unreadable", f"trusted key {path} does not exist")
                store.add(load_public(path))
                continue
            store.add(load_public(source))  # type: ignore[arg-type]
        return store

    def _add_folder(self, folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.suffix not in (".pub", ".pem") or not path.is_file():
                continue
            head = path.read_bytes()[:64]
            if b"PRIVATE KEY" in head:
                log.warning("trust folder %s holds a private key (%s): skipped", folder, path.name)
                continue
            self.add(load_public(path))

    def add(self, key: Ed25519PublicKey | KeySource) -> str:
        """Trust one more public key; return its key id."""
        public = load_public(key)
        kid = key_id(public)
        self._keys[kid] = public
        return kid

    def get(self, kid: str) -> Ed25519PublicKey | None:
        """The public key with this id, or None when it is not trusted."""
        return self._keys.get(kid)

    def verify(self, kid: str, data: bytes, signature_b64: str) -> bool:
        """Whether a trusted key `kid` signed `data` (an untrusted id: False)."""
        public = self._keys.get(kid)
        return public is not None and verify(public, data, signature_b64)

    @property
    def key_ids(self) -> list[str]:
        """Trusted key ids, sorted."""
        return sorted(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_ids)

    def __repr__(self) -> str:
        return f"TrustStore({', '.join(self.key_ids)})"
