"""labeling-gateway: step 4 of the loop. People label what no model recognises and review what
models pre-labelled; Label Studio can do the same through the ML-backend endpoints.

Consumes:
- `image unrecognized` → an *annotate* task (starting from whatever the model found);
- `image recognized` → a *review* task carrying the pre-labels; with auto-accept on, the
  pre-labels first go to the verifier as `label submitted` (source `prelabel`) and the task
  joins the queue only if the verifier answers `label rejected` (`needs_review`, `spot_check`,
  or a check the model's boxes failed);
- `label rejected` of a person's submission → a *re-annotate* task;
- `label verified` → the label set kept for export; the task is done.

Emits `label submitted` (every answer, through the outbox) and `training requested` (Label
Studio's "Start Training"). Serves the HTTP API on `port` (api.py, labelstudio.py) and the
dashboard (dashboard.py), whose read model the handlers keep from `pipeline status`, `release
edge`, `release server`, `device status` and `model evaluated`, in tables of the gateway's own.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI

from visionloop.contracts import (
    DeviceStatus,
    EdgeRelease,
    ImageRecognized,
    ImageUnrecognized,
    LabelRejected,
    LabelSubmitted,
    LabelVerified,
    ModelEvaluated,
    PipelineStatus,
    ServerRelease,
    TrainingRequested,
)
from visionloop.libs.bus import Runtime
from visionloop.libs.service import Adapters, ServiceSpec, bound
from visionloop.services.labeling_gateway import api, dashboard, handlers, labelstudio, store
from visionloop.services.labeling_gateway.auth import TokenCache
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.http import Gateway, install_errors, install_openapi

log = logging.getLogger(__name__)

DESCRIPTION = """Step 4 of the visionloop loop: the labelling queue and everything around it.

- **Tasks**: `POST /v1/projects/{project}/tasks/next` leases the most informative task; renew,
  release, skip; `submit` answers it (pixels or percent, classes of the project's taxonomy,
  review decisions). Two labellers never hold the same task; an expired lease returns it.
- **Auth**: `Authorization: Bearer <token>` (tokens per project, roles annotator < reviewer <
  admin; `visionloop gateway token create`). `x-required-role` on each operation names its role.
- **Label Studio**: `/health`, `/setup`, `/predict`, `/webhook`, `/versions` make the gateway a
  Label Studio ML backend.
- **Datasets**: export and import in COCO, YOLO and Label Studio JSON.

Every refusal is `{"reason": "<code>", "message": "...", "details": {...}}`.
"""


def wire(runtime: Runtime, adapters: Adapters, config: GatewaySettings) -> FastAPI:
    """Register the gateway's handlers; return its HTTP app."""
    gw = Gateway(runtime=runtime, blobs=adapters.blobs, config=config, tokens=TokenCache(config.token_cache_s))
    app = FastAPI(title="visionloop labeling-gateway", description=DESCRIPTION, version="1")
    install_errors(app)
    api.register(app, gw)
    ls = labelstudio.register(app, gw)
    dashboard.register(app, gw)
    install_openapi(app, gw)
    runtime.background("webhooks", ls.work)

    async def queue_gauges() -> None:
        """Tasks by project and state in every heartbeat (`visionloop status`, dashboards)."""
        while True:
            if runtime.pool is not None:
                rows = await store.open_task_counts(runtime.pool, gw.s)
                for key in [k for k in runtime.gauges if k.startswith("queue.")]:
                    runtime.gauges[key] = 0.0
                runtime.gauges.update({f"queue.{r['project']}.{r['state']}": float(r["n"]) for r in rows})
            await asyncio.sleep(10)

    runtime.background("queue-gauges", queue_gauges)

    for payload, handler in ((ImageUnrecognized, handlers.on_unrecognized), (ImageRecognized, handlers.on_recognized),
                             (LabelRejected, handlers.on_rejected), (LabelVerified, handlers.on_verified)):
        runtime.consume(payload, bound(handler, gw))
    # The dashboard's read model (dashboard.py serves it).
    for payload, plain in ((PipelineStatus, handlers.on_status), (EdgeRelease, handlers.on_release),
                           (ServerRelease, handlers.on_release), (DeviceStatus, handlers.on_device),
                           (ModelEvaluated, handlers.on_evaluated)):
        runtime.consume(payload, plain)
    runtime.produces(LabelSubmitted, TrainingRequested)
    return app


SPEC = ServiceSpec(
    name=handlers.SERVICE,
    description="Labelling tasks for people and Label Studio; answers go to the verifier.",
    wire=wire,
    settings=GatewaySettings,
    migrations_dir=Path(__file__).parent / "migrations",
)
