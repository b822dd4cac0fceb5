"""`visionloop kafka acls` (issue 16, item 10): each principal gets exactly what its wiring needs."""

from __future__ import annotations

from visionloop.acls import all_acls
from visionloop.libs.settings import Settings


def test_each_principal_writes_what_it_produces_and_reads_what_it_consumes(tmp_path) -> None:  # noqa: ANN001
    rules = all_acls(Settings(state_dir=tmp_path))
    by = {}
    for rule in rules:
        by.setdefault(rule.principal, set()).add((rule.operation, rule.resource, rule.name))
    assert by["User:vl-upstream"] == {("Write", "Topic", "vl.image.submitted.v1"), ("Describe", "Topic", "vl.image.submitted.v1")}
    ingest = by["User:vl-ingest"]
    assert ("Read", "Topic", "vl.image.submitted.v1") in ingest and ("Write", "Topic", "vl.image.ingested.v1") in ingest
    assert ("Write", "Topic", "vl.image.submitted.v1") not in ingest  # a service never writes what it reads only
    assert ("Read", "Group", "ingest.image.submitted") in ingest
    assert not any(op == "Write" and name == "vl.model.trained.v1" for op, _, name in ingest)
    assert ("Write", "Topic", "vl.model.trained.v1") in by["User:vl-trainer"]
    device = by["User:vl-device"]
    assert {("Write", "Topic", "vl.device.status.v1"), ("Read", "Topic", "vl.release.edge.v1")} <= device
    assert not any(op == "Write" and name.startswith("vl.release") for op, _, name in device)
    assert all(rule.operation in ("Read", "Write", "Describe") for rule in rules)  # never All, Create or Alter
    assert len({r.principal for r in rules}) == 13  # ten services, upstream, devices, operators
    command = rules[0].command("kafka:9092")
    assert command.startswith("kafka-acls.sh --bootstrap-server kafka:9092 --add --allow-principal User:vl-")


def test_compose_runs_the_current_setup_script(tmp_path) -> None:  # noqa: ANN001
    """docker/kafka/secured-setup.sh is `visionloop kafka acls --script` as the wiring is now."""
    from pathlib import Path

    from visionloop.acls import setup_script

    committed = Path(__file__).resolve().parents[1] / "docker" / "kafka" / "secured-setup.sh"
    assert committed.read_text(encoding="utf-8") == setup_script(Settings(state_dir=tmp_path)), (
        "regenerate it: visionloop kafka acls --script > docker/kafka/secured-setup.sh")


def test_the_setup_script_adds_exactly_the_acls_and_creates_every_topic(tmp_path) -> None:  # noqa: ANN001
    import shlex

    from visionloop.acls import Acl, setup_script, users
    from visionloop.contracts.topics import TOPICS

    settings = Settings(state_dir=tmp_path)
    script = setup_script(settings)
    added, created = set(), {}
    for line in script.splitlines():
        words = shlex.split(line) if line.startswith('"$BIN/') else []
        if words and words[0].endswith("kafka-acls.sh"):
            principal, operation = words[words.index("--allow-principal") + 1], words[words.index("--operation") + 1]
            pattern = words[words.index("--resource-pattern-type") + 1].upper()
            for flag, name in zip(words, words[1:], strict=False):
                if flag in ("--topic", "--group"):
                    added.add(Acl(principal, operation, flag[2:].capitalize(), name, pattern))
        elif words and words[0].endswith("kafka-topics.sh"):
            created[words[words.index("--topic") + 1]] = int(words[words.index("--partitions") + 1])
    rules = all_acls(settings)
    assert added == set(rules)
    assert {settings.topic(spec.name): spec.partitions for spec in TOPICS.values()}.items() <= created.items()
    assert not any(rule.operation == "Create" for rule in rules)  # so the script creates them all
    assert f"for user in {' '.join(users(rules))}; do" in script
    recognizer = {r for r in rules if r.principal == "User:vl-recognizer" and r.resource == "Group"}
    assert Acl("User:vl-recognizer", "Read", "Group", "recognizer.model.registered.", "PREFIXED") in recognizer  # per instance


def test_each_secured_service_is_its_own_kafka_user(tmp_path) -> None:  # noqa: ANN001
    from pathlib import Path

    import yaml

    from visionloop.acls import users
    from visionloop.services import ALL_SERVICES

    root = Path(__file__).resolve().parents[1]
    compose = yaml.safe_load((root / "compose.yaml").read_text(encoding="utf-8"))
    names = users(all_acls(Settings(state_dir=tmp_path)))
    files = {name: secret["file"] for name, secret in compose["secrets"].items()}
    for service in ALL_SERVICES:
        definition = compose["services"][f"{service}-secured"]
        user = definition["environment"]["VL_KAFKA_SASL_USERNAME"]
        assert user == f"vl-{service}" and user in names
        password = [s for s in definition["secrets"] if isinstance(s, dict) and s["target"] == "kafka_sasl_password"]
        assert [files[s["source"]] for s in password] == [f"./secrets/kafka-users/{user}"]
        assert definition["environment"]["VL_KAFKA_SASL_PASSWORD_FILE"] == "/run/secrets/kafka_sasl_password"
    broker = compose["services"]["kafka-secured"]["environment"]
    assert broker["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert broker["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    setup = compose["services"]["kafka-secured-users"]
    assert "./docker/kafka/secured-setup.sh:/opt/visionloop/secured-setup.sh:ro" in setup["volumes"]
    assert setup["command"] == ["/opt/visionloop/secured-setup.sh"]
