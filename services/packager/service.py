"""packager: step 9 of the loop. Nothing reaches a device unsigned.

Consumes `model converted`; for each artifact it builds one package (libs/package.py: the ONNX
file, a manifest with classes, input, decoding, metrics and lineage, and an Ed25519 signature
of the manifest), stores the archive in the blob store and emits one `model packaged`.

- A package is a pure function of the event: `created_at` is the event's `occurred_at` and the
  archive is deterministic, so packaging the same event twice gives the same bytes.
- One package per (model, version, target, precision), recorded in `packages`: an event for a
  model already packaged re-announces the stored `model packaged` (redelivery is harmless); an
  artifact whose bytes differ from the packaged one is a conflict and is dead-lettered.
- The artifact's bytes are checked against its SHA-256 and size before they are signed.
- Without a signing key (see config.py) every event is dead-lettered with `signing_key_missing`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from visionloop.contracts import ModelConverted, ModelPackaged
from visionloop.libs import signing
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.packager import handlers
from visionloop.services.packager.config import PackagerSettings
from visionloop.services.packager.handlers import Context

log = logging.getLogger(__name__)


def wire(runtime: Runtime, adapters: Adapters, config: PackagerSettings) -> None:
    """Register the packager's handler; the signing key is loaded when the runtime starts."""
    settings = runtime.settings
    ctx = Context(config=config, key=None, blobs=adapters.blobs, counters=runtime.counters)

    def load_key() -> None:
        """Read (or, on the embedded stack, create) the signing key, at start and not at wiring."""
        ctx.key, source = config.load_key(Path(settings.state_dir), embedded=settings.kafka_embedded or settings.embedded_kafka)
        if ctx.key is None:
            log.warning(
                "packager: no signing key configured (VL_PACKAGER_SIGNING_KEY_FILE): every model converted "
                "event will be dead-lettered with signing_key_missing"
            )
        else:
            log.info("packager: signing with key %s (from %s)", signing.key_id(ctx.key), source)

    runtime.on_start(load_key)
    runtime.consume(ModelConverted, bound(handlers.on_converted, ctx))
    runtime.produces(ModelPackaged)


SPEC = ServiceSpec(
    name="packager",
    description="Bundles each converted artifact with its manifest into a deterministic archive and signs it (Ed25519).",
    wire=wire,
    settings=PackagerSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
