"""Kafka authorisation for a deployment: one principal per service and per kind of outside client,
and exactly the ACLs each needs (`visionloop kafka acls`).

Read from the services as they are wired (the same source as the AsyncAPI document): each service
writes only the topics it produces (its events, its heartbeats, its dead letters) and reads only
the topics it consumes, in its own consumer groups. Outside the services: upstream systems write
the submit topic only; devices write their status topic (and their dead letters) and read the
release topics in groups named `<prefix>edge-agent.<fleet>.<device>`; operators' commands
(`visionloop trainer request`, `visionloop release ...`, `visionloop evaluator rejudge`) write the training, release-command and rejudge
topics. Every principal may describe what it touches (clients ask for metadata). Every service
also writes and reads the broker-epoch topic (`libs/bus/epoch.py`).

`setup_script` is what compose's `secured` profile runs once before the services start
(`docker/kafka/secured-setup.sh`, generated, checked current by a test): it creates every topic
(nobody else may: no principal has Create), one SCRAM-SHA-512 user per principal with the password
in the file named after the user, and the ACLs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visionloop.contracts import (
    DeadLetter,
    DeviceStatus,
    EdgeRelease,
    ImageSubmitted,
    ModelRejudgeRequested,
    ReleaseCommand,
    ServerRelease,
    TrainingRequested,
)
from visionloop.libs.kafka import EPOCH_TOPIC
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
        epoch = {settings.topic(EPOCH_TOPIC)}  # every service checks the broker's epoch (libs/bus/epoch.py)
        principal = f"{PRINCIPAL_PREFIX}{name}"
        own = f".{settings.instance}"  # a group per instance (the recognizer's reloads): named by prefix
        rules += _rules(principal, set(runtime.outbox.topics) | epoch, {t for t, _ in pairs} | epoch,
                        {g for _, g in pairs if not g.endswith(own)})
        rules += [Acl(principal, "Read", "Group", g.removesuffix(settings.instance), "PREFIXED") for _, g in pairs if g.endswith(own)]
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
        + _rules(f"{PRINCIPAL_PREFIX}operator", {topic(TrainingRequested), topic(ReleaseCommand), topic(ModelRejudgeRequested)}, set(), set())
    )


OBSERVERS = (f"{PRINCIPAL_PREFIX}labeling-gateway", f"{PRINCIPAL_PREFIX}operator")
"""Who reads the consumer lag of every group (the gateway's dashboard, `visionloop status`): they
may describe every topic and every service group (offsets, never records)."""


def observer_acls(settings: Settings, services: list[Acl]) -> list[Acl]:
    """Describe on every registry topic and every services' consumer group, for `OBSERVERS`."""
    from visionloop.contracts.topics import TOPICS

    topics = {settings.topic(spec.name) for spec in TOPICS.values()}
    groups = {(rule.name, rule.pattern) for rule in services if rule.resource == "Group"}
    return ([Acl(who, "Describe", "Topic", topic) for who in OBSERVERS for topic in topics]
            + [Acl(who, "Describe", "Group", group, pattern) for who in OBSERVERS for group, pattern in groups])


def all_acls(settings: Settings) -> list[Acl]:
    """Every rule of a deployment, sorted (principal, operation, resource, name)."""
    services = service_acls(settings)
    return sorted(set(services + outside_acls(settings) + observer_acls(settings, services)))


def users(rules: list[Acl]) -> list[str]:
    """The SCRAM user names of the principals (`User:vl-ingest` -> `vl-ingest`)."""
    return sorted({rule.principal.removeprefix("User:") for rule in rules})


def grouped_commands(rules: list[Acl], bootstrap: str, program: str = "kafka-acls.sh") -> list[str]:
    """`kafka-acls.sh` calls adding `rules`: one per principal, operation, resource type and
    pattern, naming every resource of that kind (each call starts a JVM)."""
    grouped: dict[tuple[str, str, str, str], list[str]] = {}
    for rule in sorted(rules):
        grouped.setdefault((rule.principal, rule.operation, rule.resource, rule.pattern), []).append(rule.name)
    commands = []
    for (principal, operation, resource, pattern), names in grouped.items():
        flag = {"Topic": "--topic", "Group": "--group"}[resource]
        named = " ".join(f"{flag} {name}" for name in names)
        commands.append(f"{program} --bootstrap-server {bootstrap} --add --allow-principal {principal} "
                        f"--operation {operation} {named} --resource-pattern-type {pattern.lower()}")
    return commands


def setup_script(settings: Settings) -> str:
    """The bash script that prepares a secured Apache Kafka for the loop (see the module's note)."""
    from visionloop.contracts.topics import TOPICS

    rules = all_acls(settings)
    topics = sorted({(settings.topic(spec.name), spec.partitions) for spec in TOPICS.values()} | {(settings.topic(EPOCH_TOPIC), 1)})
    lines = [
        "#!/usr/bin/env bash",
        "# Generated by `visionloop kafka acls --script`: do not edit (tests/test_acls.py checks it is current).",
        "# Compose's secured profile runs it once before the services start (kafka-secured-users), over the",
        "# broker's loopback admin listener: every topic, one SCRAM-SHA-512 user per principal (the password",
        "# is the file of that name in $USERS_DIR), and exactly the ACLs of `visionloop kafka acls`.",
        "set -euo pipefail",
        'BOOTSTRAP="${VL_KAFKA_ADMIN_BOOTSTRAP:-localhost:19092}"',
        'USERS_DIR="${VL_KAFKA_USERS_DIR:-/run/kafka-users}"',
        'BIN="${KAFKA_BIN:-/opt/kafka/bin}"',
        "",
        f"# {len(topics)} topics (no principal may create one)",
    ]
    lines += [f'"$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic {name} '
              f"--partitions {partitions} --replication-factor {settings.kafka_replication_factor}" for name, partitions in topics]
    lines += ["", f"# {len(users(rules))} users", f"for user in {' '.join(users(rules))}; do",
              '  [ -s "$USERS_DIR/$user" ] || { echo "no password file $USERS_DIR/$user (docs/secrets.md)" >&2; exit 1; }',
              '  "$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --alter --entity-type users --entity-name "$user" \\',
              '    --add-config "SCRAM-SHA-512=[password=$(cat "$USERS_DIR/$user")]"',
              "done", "", f"# {len(rules)} ACLs (ALLOW; with the authorizer on, nothing else is allowed)"]
    lines += grouped_commands(rules, '"$BOOTSTRAP"', '"$BIN/kafka-acls.sh"')
    return "\n".join(lines) + "\n"
