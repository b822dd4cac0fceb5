"""The loop's services. Each is a package with a `service.SPEC`; this registry lists them in loop order.

A service never imports another service: contracts are the only coupling.
"""

from __future__ import annotations

import importlib

from visionloop.libs.service import ServiceSpec

ALL_SERVICES: tuple[str, ...] = (
    "ingest",
    "dedup",
    "recognizer",
    "labeling-gateway",
    "verifier",
    "trainer",
    "evaluator",
    "converter",
    "packager",
    "distributor",
)
"""Every service of the design, in loop order."""


def available() -> dict[str, ServiceSpec]:
    """The services built so far, by name, in loop order."""
    specs = {}
    for name in ALL_SERVICES:
        module = f"visionloop.services.{name.replace('-', '_')}.service"
        try:
            specs[name] = importlib.import_module(module).SPEC
        except ModuleNotFoundError as exc:
            if exc.name not in (module, module.rsplit(".", 1)[0]):
                raise
    return specs


def get(name: str) -> ServiceSpec:
    """One service by name, with a clear error for names that do not exist (yet)."""
    specs = available()
    if name not in specs:
        known = ", ".join(specs) or "none"
        raise KeyError(f"no service named {name!r}; available: {known}")
    return specs[name]
