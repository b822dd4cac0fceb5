"""labeling-gateway settings: `VL_LABELING_GATEWAY_<NAME>`, or the `labeling_gateway:` section
of the config file.

Task policy values have a default for all projects and may be overridden per project in the
file's `labeling_gateway.projects` mapping, e.g.::

    labeling_gateway:
      lease_s: 600
      projects:
        parking: {consensus_labellers: 3, lease_s: 900}

Whether a project's pre-labels may be auto-accepted is the verifier's one setting
(`verifier.auto_accept`, per project under `verifier.projects`): the gateway offers every
recognised image's pre-labels to the verifier and makes a review task of what it does not accept.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from visionloop.contracts.label import MAX_BOXES
from visionloop.libs.settings import ServiceSettings, service_config


class Policy(BaseModel):
    """How one project's tasks are handed out and answered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _auto_accept_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "auto_accept" in data:
            raise ValueError(
                "auto_accept is the verifier's setting (VL_VERIFIER_AUTO_ACCEPT, or verifier.projects.<project>.auto_accept): "
                "the gateway offers every project's pre-labels to the verifier, which accepts them or sends them to people"
            )
        return data

    lease_s: float = Field(
        default=300.0, gt=0, le=86_400, description="How long a leased task stays with its labeller unless renewed."
    )
    consensus_labellers: int = Field(
        default=1,
        ge=1,
        le=16,
        description="People who label each annotate / re-annotate task; above 1 the verifier votes (consensus).",
    )
    max_boxes: int = Field(default=MAX_BOXES, ge=1, le=MAX_BOXES, description="Most boxes one submission may carry (the verifier's default too).")
    box_tolerance_px: float = Field(
        default=2.0,
        ge=0,
        description="How far a submitted box may leave the image before it is refused; within it, boxes are clipped.",
    )


class GatewaySettings(ServiceSettings, Policy):
    """The gateway's HTTP server, its limits, and the per-project task policy."""

    section = "labeling_gateway"
    model_config = service_config("labeling_gateway")

    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port of the gateway's API (0 = free).")
    projects: dict[str, dict[str, int | float | bool | None]] = Field(
        default_factory=dict, description="Per-project overrides of the task policy values above."
    )
    review_role: str = Field(
        default="reviewer",
        pattern="^(annotator|reviewer|admin)$",
        description="Lowest role that is handed review tasks (pre-labels to accept, correct or reject).",
    )
    body_max_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest JSON body of a submission or any other JSON request."
    )
    ls_token_key_file: Path | None = Field(
        default=None,
        description=(
            "Key (a Fernet key in a file) that encrypts Label Studio access tokens in the database; unset: "
            "`<state_dir>/keys/gateway-ls-token.key`, created (0600) at first use."
        ),
    )
    token_cache_s: float = Field(
        default=5.0, ge=0, description="How long a checked API token is trusted without asking PostgreSQL (revocation delay)."
    )
    signed_url_ttl_s: int = Field(
        default=7 * 86_400, ge=60, description="Lifetime of signed image URLs in Label Studio exports."
    )

    # -- Label Studio ML backend -------------------------------------------------------------------
    predict_max_concurrent: int = Field(
        default=4, ge=1, description="`/predict` requests worked on at once; more are refused with 503 `over_capacity`."
    )
    predict_max_tasks: int = Field(default=256, ge=1, description="Most tasks one `/predict` request may carry.")
    predict_deadline_s: float = Field(
        default=20.0, gt=0, description="Budget of one `/predict` request; tasks not resolved by then get empty predictions."
    )
    predict_fetch_concurrency: int = Field(
        default=8, ge=1, description="Task images one `/predict` request fetches at once."
    )
    webhook_max_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest webhook body accepted (it is stored as it came)."
    )
    webhook_max_attempts: int = Field(
        default=5, ge=1, description="Attempts at processing a stored webhook before it is marked failed."
    )
    fetch_max_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1, description="Largest task image fetched from Label Studio (or elsewhere)."
    )
    fetch_connect_timeout_s: float = Field(default=5.0, gt=0, description="Connect timeout of image fetches.")
    fetch_read_timeout_s: float = Field(default=10.0, gt=0, description="Read timeout of image fetches.")
    fetch_deadline_s: float = Field(default=30.0, gt=0, description="Whole budget of one image fetch, redirects included.")
    fetch_max_redirects: int = Field(default=3, ge=0, le=10, description="Redirects followed per image fetch.")
    fetch_allow_private_addresses: bool = Field(
        default=False,
        description=(
            "Let image fetches reach loopback and private addresses (a Label Studio on the same "
            "host or network). Only on a trusted network."
        ),
    )

    # -- import / export ---------------------------------------------------------------------------
    import_max_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=1, description="Largest import body (a zip of images and labels, or JSON)."
    )
    import_max_files: int = Field(default=200_000, ge=1, description="Most files an import archive may hold.")
    export_val_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Share of non-test images exported as `val` (fixed per image by its id)."
    )

    def policy(self, project: str) -> Policy:
        """The task policy in force for `project`."""
        defaults = {name: getattr(self, name) for name in Policy.model_fields}
        return Policy.model_validate({**defaults, **self.projects.get(project, {})})
