"""Label Studio's access token at rest: encrypted with a key from a file (docs/secrets.md's pattern).

The token lets the gateway fetch task images from Label Studio, so the database holds it sealed
(Fernet: AES-128-CBC with an HMAC-SHA256, from the `cryptography` package): `fernet:<token>`. The
key comes from `VL_LABELING_GATEWAY_LS_TOKEN_KEY_FILE`; unset, from
`<state_dir>/keys/gateway-ls-token.key`, created (mode 0600) at first use. A value stored before
sealing existed (no prefix) is read as it is and sealed at the next `/setup`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

PREFIX = "fernet:"


class SealError(Exception):
    """A sealed value that this key cannot open (another key, or tampered)."""


def load_key(path: Path) -> bytes:
    """The key in `path`, made there (0600) when the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes().strip()
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    return path.read_bytes().strip()


def seal(key: bytes, value: str | None) -> str | None:
    """`value` encrypted for the database (None stays None)."""
    return None if value is None else PREFIX + Fernet(key).encrypt(value.encode()).decode()


def unseal(key: bytes, stored: str | None) -> str | None:
    """The value `seal` stored (a value stored unsealed, before sealing existed, as it is)."""
    if stored is None or not stored.startswith(PREFIX):
        return stored
    try:
        return Fernet(key).decrypt(stored[len(PREFIX):].encode()).decode()
    except InvalidToken:
        raise SealError("the stored Label Studio token does not open with this key (VL_LABELING_GATEWAY_LS_TOKEN_KEY_FILE)") from None
