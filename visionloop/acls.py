"""Kafka authorisation for a deployment: one principal per service and per kind of outside client,
and exactly the ACLs each needs (`visionloop kafka acls`).

Read from the services as they are wired (the same source as the AsyncAPI document): each service
writes only the topics it produces (its events, its heartbeats, its dead letters) and reads only
the topics it consumes, in its own consumer groups. Outside the services: upstream systems write
the submit topic only; devices write their status topic (and their dead letters) and read the
release topics in groups named `<prefix>edge-agent.<fleet>.<device>`; operators' commands
(`visionloop trainer request`, `visionloop release ...`) write the training and release-command
topics. Every principal may describe what it touches (clients ask for metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visionloop.contracts import DeadLetter, DeviceStatus, EdgeRelease, ImageSubmitted, ReleaseCommand, ServerRelease, TrainingRequested
from visionloop.libs.settings import Settings

PRINCIPAL_PREFIX = "User:vl-"


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW rule: who may do what on which resource (LITERAL, or PREFIXED for groups)."""

    principal: str
    operation: str
    resource: str
    name: str
    pattern: str = "LITERAL"

    def command(self, bootstrap: str) -> str:
        """The `kafka-acls.sh` call that adds it."""
        kind = {"Topic": "--topic", "Group": "--group"}[self.resource]
        return (f"kafka-acls.sh --bootstrap-server {bootstrap} --add --allow-principal {self.principal} "
                f"--operation {self.operation} {kind} {self.name} --resource-pattern-type {self.pattern.lower()}")


def _rules(principal: str, writes: set[str], reads: set[str], groups: set[str], *, group_pattern: str = "LITERAL") -> list[Acl]:
    rules = [Acl(principal, "Write", "Topic", t) for t in writes] + [Acl(principal, "Read", "Topic", t) for t in reads]
    rules += [Acl(principal, "Describe", "Topic", t) for t in writes | reads]
    rules += [Acl(principal, "Read", "Group", g, group_pattern) for g in groups]
    return rules


def service_acls(settings: Settings, names: list[str] | None = None) -> list[Acl]:
    """Each named service's rules (all services when None), from its wiring."""
    from visionloop import services
    from visionloop.app import build_runtime
    from visionloop.libs.blob import LocalBlobStore
    from visionloop.libs.service import Adapters

    adapters = Adapters(blobs=LocalBlobStore(settings.state_dir / "blobs"))
    rules: list[Acl] = []
    for name, spec in services.available().items():
        if names is not None and name not in names:
            continue
        runtime, _ = build_runtime(spec, settings, None, adapters)
        pairs = runtime.subscriptions
        rules += _rules(f"{PRINCIPAL_PREFIX}{name}", set(runtime.outbox.topics), {t for t, _ in pairs}, {g for _, g in pairs})
    return rules


def outside_acls(settings: Settings) -> list[Acl]:
    """Upstream systems, devices and operators."""
    def topic(payload: Any) -> str:
        from visionloop.contracts import topic_of

        return topic_of(payload, settings.topic_prefix)

    return (
        _rules(f"{PRINCIPAL_PREFIX}upstream", {topic(ImageSubmitted)}, set(), set())
        + _rules(f"{PRINCIPAL_PREFIX}device", {topic(DeviceStatus), topic(DeadLetter)}, {topic(EdgeRelease), topic(ServerRelease)},
                 {f"{settings.topic_prefix}edge-agent."}, group_pattern="PREFIXED")
        + _rules(f"{PRINCIPAL_PREFIX}operator", {topic(TrainingRequested), topic(ReleaseCommand)}, set(), set())
    )


def all_acls(settings: Settings) -> list[Acl]:
    """Every rule of a deployment, sorted (principal, operation, resource, name)."""
    return sorted(set(service_acls(settings) + outside_acls(settings)))
