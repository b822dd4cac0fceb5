"""API tokens shared by the services that take them (the gateway, ingest): `vl_<id>_<secret>`.

The id is public (it names the token in listings and revocations), the secret is 256 random
bits. Only the SHA-256 of the whole token is stored; a presented token is looked up by its id and
its hash compared in constant time. Credentials arrive as `Authorization: Bearer <token>`,
`Authorization: Token <token>`, or HTTP Basic with the token as the password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

TOKEN_PREFIX = "vl_"


def new_token() -> tuple[str, str, bytes]:
    """A fresh token: (token id, the token to hand out once, its SHA-256 to store)."""
    token_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    return token_id, token, digest(token)


def digest(token: str) -> bytes:
    """SHA-256 of a token (what the database keeps)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def token_id_of(token: str) -> str | None:
    """The public id inside a token, or None when it is not shaped like one."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX):].partition("_")
    if not sep or len(token_id) != 12 or not secret:
        return None
    return token_id


def matches(token: str, stored: bytes) -> bool:
    """Whether `token` hashes to `stored`, compared in constant time."""
    return hmac.compare_digest(digest(token), bytes(stored))


def credentials(authorization: str | None) -> str | None:
    """The token an `Authorization` header carries (Bearer, Token, or Basic password)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme in ("bearer", "token"):
        return value or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None
