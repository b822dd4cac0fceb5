"""Who may submit images over ingest's HTTP API: tokens per upstream system, bound to projects.

The token format and its checks are shared with the gateway (`libs/tokens.py`): only the
SHA-256 of a token is stored, it is shown once, and it can be revoked. A token names the upstream
system it was made for and the projects it may submit to (`*`: every project). The decision
(`denial`) is pure; the SQL is in `store.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


EVERY_PROJECT = "*"


@dataclass(frozen=True)
class Submitter:
    """Who a valid token speaks for."""

    token_id: str
    name: str
    projects: tuple[str, ...]


@dataclass(frozen=True)
class Denial:
    """Why a submission over HTTP is refused: status, reason code, a sentence."""

    status: int
    reason: str
    message: str


UNAUTHENTICATED = Denial(401, "unauthenticated", (
    "send an ingest token: `Authorization: Bearer <token>` (create one with "
    "`visionloop ingest token create --name SYSTEM --project P`)"))


def denial(submitter: Submitter | None, project: str | None) -> Denial | None:
    """None when `submitter` may submit to `project` (None: not known yet); else why not."""
    if submitter is None:
        return UNAUTHENTICATED
    if project is None or EVERY_PROJECT in submitter.projects or project in submitter.projects:
        return None
    return Denial(403, "wrong_project", f"this token may submit to {', '.join(submitter.projects)}, not to {project!r}")
