"""distributor: step 10 of the loop. A signed package enters the model library, then the fleets.

Consumes `model packaged`, `release command` and `device status`; emits `model registered`
(through the model library, whose schema it owns), `release edge` and `release server`, keyed by
fleet; serves packages over HTTP.

- **Library first** (step 5 of the patent: the new model is in the library before it pre-labels
  anything). Each package is checked (its SHA-256, its signature against the trusted keys, its
  manifest) and registered with alias `candidate`. A server package then becomes `production`
  when the project's policy says so (the recognizer switches to it; `previous` keeps the one it
  replaced, for rollback) and is released to the server fleets.
- **Staged rollout** of edge packages per fleet (`decide.py`): the canary stage first; the next
  starts when enough of the stage's devices report `activated`; too many `failed` stops the
  release and rolls it back (a `rollback` release: devices return to their last-known-good model).
  A completed edge release makes the package the library's edge `production` model.
- **Commands** (`release command`): `promote` (next stage now), `pause`, `resume`, `rollback`.
- **Package server**: `GET /v1/packages/{sha256}` with range requests and `ETag` = the SHA-256,
  only for packages it released; `GET /v1/releases` for dashboards and `visionloop releases`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from visionloop.contracts import (
    DeviceStatus,
    EdgeRelease,
    ModelPackaged,
    ModelRegistered,
    ReleaseCommand,
    ServerRelease,
)
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.distributor import handlers
from visionloop.services.distributor.api import package_server
from visionloop.services.distributor.config import DistributorSettings
from visionloop.services.distributor.releases import Releases


def wire(runtime: Runtime, adapters: Adapters, config: DistributorSettings) -> FastAPI:
    """Register the distributor's handlers; return its package server."""
    ctx = Releases(runtime, config, adapters.blobs)
    runtime.consume(ModelPackaged, bound(handlers.on_packaged, ctx))
    runtime.consume(DeviceStatus, bound(handlers.on_device, ctx))
    runtime.consume(ReleaseCommand, bound(handlers.on_command, ctx))
    runtime.produces(ModelRegistered, EdgeRelease, ServerRelease)
    return package_server(runtime, adapters.blobs, config)


SPEC = ServiceSpec(
    name="distributor",
    description="Registers signed packages in the model library and releases them to fleets with staged rollout and rollback.",
    wire=wire,
    settings=DistributorSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
