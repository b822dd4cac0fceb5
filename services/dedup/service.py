"""dedup/quality: step 2 of the loop. Only images worth a person's or a model's time go on.

Consumes `image ingested`; emits `image accepted` (with its hashes and quality) or `image
rejected` (`duplicate`, `near_duplicate`, `low_resolution`, `blurry`, `blob_missing`, `corrupt`).

Concurrency guarantee: decisions of one project are serialised across every replica by a
PostgreSQL advisory lock held for the decision's transaction, and each replica brings its
in-memory index up to date from the `hashes` table under that lock before it searches. So two
replicas never both accept the same image, nor two images within the near-duplicate radius of
each other: near-duplicate decisions are as if one consumer made them, in commit order. The
price is one decision at a time per project (about a millisecond each); projects proceed in
parallel.
"""

from __future__ import annotations

from pathlib import Path

from visionloop.contracts import ImageAccepted, ImageIngested, ImageRejected
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.dedup import handlers
from visionloop.services.dedup.config import DedupSettings
from visionloop.services.dedup.handlers import Context


def wire(runtime: Runtime, adapters: Adapters, config: DedupSettings) -> None:
    """Register dedup/quality's handler on the runtime."""
    ctx = Context(config=config, blobs=adapters.blobs)
    runtime.consume(ImageIngested, bound(handlers.on_ingested, ctx))
    runtime.produces(ImageAccepted, ImageRejected)


SPEC = ServiceSpec(
    name="dedup",
    description="Drops exact and near duplicates and images below the project's quality floors.",
    wire=wire,
    settings=DedupSettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
