"""compose.yaml runs every service of the loop on Apache Kafka in KRaft mode, and validates."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionloop.services import ALL_SERVICES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
SERVICES = list(ALL_SERVICES)
HTTP_PORTS = {"ingest": 8081, "labeling-gateway": 8080, "distributor": 8082}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """compose.yaml as plain data, with anchors and merge keys resolved."""
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("profile", [None, "secured"])
def test_compose_file_validates(profile: str | None) -> None:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose is not on PATH (Debian: apt-get install docker-compose)")
    command = [docker_compose, "-f", str(COMPOSE_FILE)]
    if profile:
        command += ["--profile", profile]
    result = subprocess.run(
        [*command, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_runs_from_the_one_image(compose: dict[str, Any], service: str) -> None:
    definition = compose["services"][service]

    assert definition["command"] == ["run", service]
    assert definition["build"]["dockerfile"] == "docker/Dockerfile"
    assert "profiles" not in definition
    assert {"kafka", "postgres"} <= set(definition["depends_on"])
    environment = definition["environment"]
    assert environment["VL_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert environment["VL_DATABASE_URL"].startswith("postgresql://")
    assert environment["VL_BLOB_URL"].startswith("s3://")
    assert environment["VL_STATE_DIR"] == "/var/lib/visionloop"


@pytest.mark.parametrize("service", SERVICES)
def test_secured_profile_has_every_service(compose: dict[str, Any], service: str) -> None:
    definition = compose["services"][f"{service}-secured"]

    assert definition["command"] == ["run", service]
    assert definition["profiles"] == ["secured"]
    environment = definition["environment"]
    assert environment["VL_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert environment["VL_KAFKA_SASL_PASSWORD_FILE"].startswith("/run/secrets/")
    assert "sslmode=verify-full" in environment["VL_DATABASE_URL"]
    assert not any("PASSWORD=" in f"{k}={v}" for k, v in environment.items())


def test_http_services_publish_their_ports(compose: dict[str, Any]) -> None:
    for service, port in HTTP_PORTS.items():
        assert compose["services"][service]["ports"] == [f"{port}:{port}"]


def test_kafka_runs_kraft_without_zookeeper(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka = services["kafka"]["environment"]

    assert not any("zookeeper" in name for name in services)
    assert not any("ZOOKEEPER" in key for key in kafka)
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{kafka['KAFKA_NODE_ID']}@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1


def test_secret_files_stay_out_of_git_and_images(compose: dict[str, Any]) -> None:
    files = [secret["file"] for secret in compose["secrets"].values()]
    assert all(file.startswith("./secrets/") for file in files)
    assert "secrets" in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()

    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout, so git's ignore rules cannot be asked")
    unignored = [
        file
        for file in files
        if subprocess.run([git, "check-ignore", "-q", file], cwd=ROOT).returncode != 0
    ]
    assert unignored == [], "secret files that git would commit"


def test_services_without_a_published_port_can_run_replicas(compose: dict[str, Any]) -> None:
    """`REPLICAS_DEDUP=2 docker compose up`: more processes in the service's consumer groups; the
    HTTP services (one published port each) stay single."""
    for service in SERVICES:
        definition = compose["services"][service]
        if service in HTTP_PORTS or service == "trainer":
            assert "deploy" not in definition
        else:
            env = service.upper().replace("-", "_")
            assert definition["deploy"]["replicas"] == f"${{REPLICAS_{env}:-1}}"
