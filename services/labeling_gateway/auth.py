"""API tokens and roles: who may call which endpoint of which project.

A token is `vl_<token id>_<secret>`: the id is public (it names the token in listings and
revocations), the secret is 256 random bits. PostgreSQL keeps the SHA-256 of the whole token,
never the token; a presented token is looked up by its id and its hash compared in constant
time. Roles are ordered: `annotator` < `reviewer` < `admin`; a token belongs to one project,
or (admins only) to every project.

Credentials arrive as `Authorization: Bearer <token>` (the gateway's own clients and Label
Studio webhooks, whose headers are configurable), `Authorization: Token <token>`, or HTTP Basic
with the token as the password (Label Studio's ML-backend connection).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from enum import IntEnum

# The token format is shared with ingest (libs/tokens.py); the gateway's code names it from here.
from visionloop.libs.tokens import TOKEN_PREFIX, credentials, digest, matches, new_token, token_id_of  # noqa: F401



class Role(IntEnum):
    """Roles, ordered by what they may do; each includes the ones below it."""

    ANNOTATOR = 1
    REVIEWER = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> "Role":
        """A role from its name (`annotator`, `reviewer`, `admin`)."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}; roles are annotator, reviewer, admin") from None

    @property
    def label(self) -> str:
        """The role's name as the API and the CLI spell it."""
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for."""

    token_id: str
    user_id: str
    role: Role
    project: str | None
    """The token's project; None for an all-projects admin token."""


@dataclass(frozen=True)
class Denial:
    """Why a request is refused: HTTP status, reason code, a sentence."""

    status: int
    reason: str
    message: str


def authorize(principal: Principal | None, project: str | None, need: Role) -> Denial | None:
    """None when `principal` may act on `project` with role `need`; else why not.

    A wrong project is refused before the role is looked at, and before the project's
    existence is, so a token learns nothing about projects it does not belong to.
    """
    if principal is None:
        return Denial(
            401,
            "unauthenticated",
            "send an API token: `Authorization: Bearer <token>` (create one with "
            "`visionloop gateway token create --project P --role annotator`)",
        )
    if project is not None and principal.project is not None and principal.project != project:
        return Denial(403, "wrong_project", f"this token belongs to project {principal.project!r}, not {project!r}")
    if principal.role < need:
        return Denial(
            403,
            "insufficient_role",
            f"this endpoint needs role {need.label} or higher; the token's role is {principal.role.label}",
        )
    return None


class TokenCache:
    """Checked tokens for a few seconds, so each request does not cost a query.

    Keyed by the token's hash (the token itself is not kept). A revoked token keeps working
    here for at most `ttl_s`.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Principal | None]] = {}

    def get(self, token: str) -> tuple[bool, Principal | None]:
        """(found, principal) for a token checked less than `ttl_s` ago."""
        entry = self._entries.get(digest(token))
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, token: str, principal: Principal | None) -> None:
        """Remember the answer for `token` (None: not a valid token)."""
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest(token)] = (time.monotonic() + self.ttl_s, principal)

    def clear(self) -> None:
        """Forget every answer (after a revocation in this process)."""
        self._entries.clear()


def sign(key: bytes, project: str, image_id: str, expires: int) -> str:
    """Signature of an image URL valid until `expires` (Unix seconds)."""
    message = f"{project}/{image_id}/{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def signature_valid(key: bytes, project: str, image_id: str, expires: int, signature: str) -> bool:
    """Whether `signature` signs this image for this project and has not expired."""
    if expires < time.time():
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters (a 500 on a forged URL).
    return hmac.compare_digest(sign(key, project, image_id, expires).encode(), signature.encode("utf-8", "replace"))
