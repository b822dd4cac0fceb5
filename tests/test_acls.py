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
