"""What a service is, to the composition root: a name, its migrations and a wiring function.

A service module declares one `SPEC = ServiceSpec(...)`. Its `wire` function receives the
runtime (bus, schema), the shared adapters and the service's own settings, registers handlers
and emitted contracts, and may return an ASGI app that the root serves on `config.port`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionloop.libs.blob import BlobStore
from visionloop.libs.bus import Runtime
from visionloop.libs.db import Migration, discover
from visionloop.libs.settings import ServiceSettings


@dataclass(frozen=True)
class Adapters:
    """The I/O a service may use besides the bus; built once per process by the root."""

    blobs: BlobStore


@dataclass(frozen=True)
class ServiceSpec:
    """One of the loop's services."""

    name: str
    description: str
    wire: Callable[[Runtime, Adapters, Any], Any]
    """`wire(runtime, adapters, config)` registers handlers; returns an ASGI app, or None."""
    settings: type[ServiceSettings] | None = None
    """The service's own settings class (`VL_<SERVICE>_*`), if it has settings."""
    migrations_dir: Path | None = None

    @property
    def migrations(self) -> list[Migration]:
        """The service's own SQL migrations, in order."""
        return discover(self.name, self.migrations_dir) if self.migrations_dir else []


def bound(handler: Callable[..., Any], context: Any) -> Callable[..., Any]:
    """`handler` with its context as first argument, keeping its name and docstring (the AsyncAPI
    document describes each handler by them): how a service wires its module-level handlers."""
    return functools.update_wrapper(functools.partial(handler, context), handler)
