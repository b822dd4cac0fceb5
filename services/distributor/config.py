"""distributor settings: `VL_DISTRIBUTOR_<NAME>`, or the `distributor:` section of the config file.

The release policy has defaults for every project and may be overridden per project in the
file's `distributor.projects` mapping, e.g.::

    distributor:
      public_url: https://models.example.com
      projects:
        parking: {edge_fleets: [gates, cams], stages: [5, 25, 100], canary_devices: [gate-1]}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from visionloop.libs.settings import ServiceSettings, service_config


class Policy(BaseModel):
    """How one project's packages reach the library and the fleets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    promote_server: bool = Field(
        default=True, description="Make a new server package the library's `production` model at once (the recognizer switches to it)."
    )
    server_fleets: list[str] = Field(default_factory=lambda: ["server"], description="Fleets that get a server release (`vl.release.server.v1`).")
    edge_fleets: list[str] = Field(default_factory=lambda: ["edge"], description="Fleets that get an edge release (`vl.release.edge.v1`).")
    stages: list[float] = Field(
        default_factory=lambda: [10.0, 50.0, 100.0],
        description="Staged rollout: the share of a fleet (percent, by a hash of the device id) each stage reaches; the last must be 100.",
    )
    canary_devices: list[str] = Field(
        default_factory=list, description="Devices that form the first stage instead of its percentage (the canary group)."
    )
    min_activated_fraction: float = Field(
        default=0.9, gt=0, le=1, description="Share of a stage's known devices that must report `activated` before the next stage starts."
    )
    max_failure_rate: float = Field(
        default=0.2, ge=0, lt=1, description="Share of a stage's devices that may report `failed` before the release stops and rolls back."
    )
    auto_rollback: bool = Field(default=True, description="Roll back by itself when the failure rate passes `max_failure_rate` (else: pause).")

    @field_validator("stages")
    @classmethod
    def _ends_at_all(cls, value: list[float]) -> list[float]:
        if not value or value[-1] != 100.0 or any(not 0 < v <= 100 for v in value) or value != sorted(value):
            raise ValueError("stages must be increasing percentages in (0, 100] ending with 100")
        return value


class DistributorSettings(ServiceSettings, Policy):
    """Defaults for every project, plus per-project overrides and the package server."""

    section = "distributor"
    model_config = service_config("distributor")

    port: int = Field(default=8082, ge=0, le=65535, description="HTTP port of the package server (0: any free port).")
    public_url: str | None = Field(
        default=None, description="Base URL devices download packages from (default: http://<http_host>:<port>)."
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Public keys (PEM text or file paths) whose packages may be released; empty: the keys under `<state_dir>/keys/`.",
    )
    release_token: SecretStr | None = Field(
        default=None, description="Bearer token the package server requires (unset: packages are public to whoever reaches the port)."
    )
    projects: dict[str, dict[str, int | float | bool | str | list[str] | list[float] | None]] = Field(
        default_factory=dict, description="Per-project overrides of the policy values above."
    )

    def policy(self, project: str) -> Policy:
        """The policy in force for `project`."""
        defaults = {name: getattr(self, name) for name in Policy.model_fields}
        return Policy.model_validate({**defaults, **self.projects.get(project, {})})
