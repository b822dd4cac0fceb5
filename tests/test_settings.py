"""Settings: environment, files, secrets from files, and nothing secret printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionloop.libs.db import database_url
from visionloop.libs.kafka import client_kwargs, security
from visionloop.libs.settings import Settings


def test_environment_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "vl.yaml"
    config.write_text("kafka_bootstrap: kafka-from-file:9092\nhandler_max_attempts: 7\n")
    monkeypatch.setenv("VL_CONFIG", str(config))
    monkeypatch.setenv("VL_HANDLER_MAX_ATTEMPTS", "4")
    s = Settings()
    assert s.kafka_bootstrap == "kafka-from-file:9092"  # from the file
    assert s.handler_max_attempts == 4  # the environment wins over the file


def test_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "vl.toml"
    config.write_text('topic_prefix = "staging."\n')
    monkeypatch.setenv("VL_CONFIG", str(config))
    assert Settings().topic("vl.image.ingested.v1") == "staging.vl.image.ingested.v1"


def test_timeouts_follow_the_broker_kind() -> None:
    assert Settings().session_timeout_ms == 2000  # embedded
    external = Settings(kafka_bootstrap="kafka:9092")
    assert (external.session_timeout_ms, external.heartbeat_interval_ms) == (10000, 3000)
    marked = Settings(kafka_bootstrap="127.0.0.1:1234", kafka_embedded=True)
    assert marked.session_timeout_ms == 2000


def test_secrets_come_from_files_and_are_never_printed(tmp_path: Path) -> None:
    (tmp_path / "kafka").write_text("s3cr3t-kafka\n")
    (tmp_path / "db").write_text("p@ss/word\n")
    s = Settings(
        kafka_bootstrap="kafka:9093",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_username="vl",
        kafka_sasl_password_file=str(tmp_path / "kafka"),
        database_url="postgresql://visionloop:placeholder@db:5432/visionloop",
        database_password_file=str(tmp_path / "db"),
    )
    assert client_kwargs(s)["sasl_plain_password"] == "s3cr3t-kafka"
    assert security(s) is not None
    assert database_url(s) == "postgresql://visionloop:p%40ss%2Fword@db:5432/visionloop"
    shown = str(s.redacted()) + repr(s)
    assert "s3cr3t" not in shown and "p@ss" not in shown and "placeholder" not in shown


def test_sasl_without_credentials_is_a_clear_error() -> None:
    s = Settings(kafka_bootstrap="kafka:9093", kafka_security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="VL_KAFKA_SASL_USERNAME"):
        security(s)


def test_prefixes_are_validated() -> None:
    with pytest.raises(ValueError):
        Settings(schema_prefix='x"; DROP SCHEMA public; --')
    assert Settings(schema_prefix="t1_").schema_for("labeling-gateway") == "t1_labeling_gateway"


def test_configuration_reference_is_current() -> None:
    from visionloop import services
    from visionloop.libs.settings import settings_reference

    classes = [Settings] + [s.settings for s in services.available().values() if s.settings]
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert settings_reference(classes) in doc, "regenerate docs/configuration.md with `visionloop config --docs`"


def test_service_settings_read_their_own_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from visionloop.services.ingest.config import IngestSettings

    config = tmp_path / "vl.yaml"
    config.write_text("topic_prefix: x.\ningest:\n  max_frames: 3\n  formats: [PNG]\n")
    monkeypatch.setenv("VL_CONFIG", str(config))
    monkeypatch.setenv("VL_INGEST_MAX_FRAMES", "5")
    ingest = IngestSettings()
    assert ingest.max_frames == 5 and ingest.formats == ["PNG"]
    assert Settings().topic_prefix == "x."
