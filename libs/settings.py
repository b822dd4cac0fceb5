"""Configuration: environment variables with the `VL_` prefix, or a YAML/TOML file.

Precedence, highest first: explicit arguments, `VL_*` environment variables, the file named by
`VL_CONFIG` (or `--config`), built-in defaults. With `kafka_bootstrap` and `database_url` unset,
`visionloop up` starts the embedded broker and PostgreSQL and fills them in.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _FileSource(PydanticBaseSettingsSource):
    """Reads settings from the YAML or TOML file named by `VL_CONFIG`.

    Platform settings sit at the top level; a service's settings sit under its section
    (e.g. `ingest:`), named by the settings class's `section`.
    """

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
            if not isinstance(data, dict):
                raise ValueError(f"config file {path} must hold a mapping of settings")
            section = getattr(settings_cls, "section", None)
            if section:
                data = data.get(section) or {}
                if not isinstance(data, dict):
                    raise ValueError(f"section {section!r} of {path} must hold a mapping of settings")
            self._data = {str(k).lower(): v for k, v in data.items()}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


def _read_secret_file(path: str | None) -> SecretStr | None:
    if not path:
        return None
    return SecretStr(Path(path).read_text(encoding="utf-8").strip())


class _FileBacked(BaseSettings):
    """Environment first, then the `VL_CONFIG` file, then defaults."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config = os.environ.get("VL_CONFIG")
        return (init_settings, env_settings, _FileSource(settings_cls, Path(config) if config else None))


class ServiceSettings(_FileBacked):
    """Base of a service's own settings: `VL_<SECTION>_<NAME>`, or `<section>:` in the file.

    Subclasses set `section` and `model_config = service_config("<section>")`.
    """

    section: ClassVar[str] = ""


def service_config(section: str) -> SettingsConfigDict:
    """The pydantic-settings config of a service's settings class."""
    return SettingsConfigDict(env_prefix=f"VL_{section.upper()}_", extra="ignore", validate_default=True)


class Settings(_FileBacked):
    """Everything the platform (bus, state, embedded stack, HTTP) can be told: `VL_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="VL_", extra="ignore", validate_default=True)

    # -- where state lives ----------------------------------------------------------------
    state_dir: Path = Field(
        default=Path(".visionloop"),
        description="Project-local folder for the embedded PostgreSQL data, blobs and logs.",
    )
    blob_url: str | None = Field(
        default=None,
        description="Blob store: `file:///path` (default `<state_dir>/blobs`) or `s3://bucket/prefix`.",
    )

    # -- Kafka ---------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        default=None, description="`host:port[,host:port]`; unset means the embedded broker."
    )
    kafka_embedded: bool = Field(
        default=False,
        description=(
            "The broker at `kafka_bootstrap` is the embedded one (set by `visionloop up` for the "
            "processes it starts): short group timeouts, memory-only topics."
        ),
    )
    kafka_port: int = Field(default=0, ge=0, le=65535, description="Embedded broker port; 0 = free.")
    kafka_max_message_bytes: int = Field(
        default=1024 * 1024, ge=1024,
        description="Largest record clients send (Kafka's default `message.max.bytes` is about 1 MB; raise both together).",
    )
    kafka_client_id: str = Field(default="visionloop", description="Prefix of every Kafka client id.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="Kafka transport: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="SCRAM-SHA-512", description="SASL mechanism when the protocol is SASL_*."
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (prefer the _FILE variant); never printed."
    )
    kafka_sasl_password_file: str | None = Field(
        default=None, description="File holding the SASL password (preferred over the variable)."
    )
    kafka_ssl_cafile: str | None = Field(default=None, description="CA bundle that signs the brokers' certificates.")
    kafka_ssl_certfile: str | None = Field(default=None, description="Client certificate (mutual TLS).")
    kafka_ssl_keyfile: str | None = Field(default=None, description="Client private key (mutual TLS).")
    kafka_session_timeout_ms: int | None = Field(
        default=None,
        description="Consumer session timeout; default 2000 on the embedded broker, 10000 elsewhere.",
    )
    kafka_heartbeat_interval_ms: int | None = Field(
        default=None, description="Default 500 on the embedded broker, 3000 elsewhere."
    )
    kafka_fetch_max_wait_ms: int | None = Field(
        default=None,
        description=(
            "Longest a consumer's fetch waits for data; default 50 on the embedded broker (its "
            "long polls delay a consumer's other requests), 500 elsewhere."
        ),
    )
    kafka_replication_factor: int = Field(default=1, ge=1, description="For topics created at start.")
    topic_prefix: str = Field(
        default="", description="Prepended to every topic name (isolation of tests or tenants)."
    )

    # -- PostgreSQL ----------------------------------------------------------------------
    database_url: str | None = Field(
        default=None, description="`postgresql://...`; unset means the embedded PostgreSQL."
    )
    database_password_file: str | None = Field(
        default=None, description="File holding the database password, merged into the URL."
    )
    db_pool_min: int = Field(default=1, ge=0, description="Connections each process keeps open.")
    db_pool_max: int = Field(default=8, ge=1, description="Most connections each process opens.")
    schema_prefix: str = Field(
        default="", description="Prepended to each service's schema name (isolation of tests)."
    )

    # -- consumer policy -------------------------------------------------------------------
    handler_max_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts of a failing handler before dead-lettering."
    )
    retry_backoff_ms: int = Field(default=200, ge=0, description="First retry delay; doubles.")
    retry_backoff_max_ms: int = Field(default=5000, ge=0, description="Longest retry delay.")
    outbox_relay_interval_s: float = Field(
        default=1.0, gt=0, description="How often unpublished outbox rows are swept."
    )
    embedded_broker_max_mb: float = Field(
        default=512.0,
        ge=0,
        description=(
            "`visionloop up` restarts the embedded broker when its memory passes this many MB (Tansu keeps every record "
            "in memory), holding produce requests and writing the unread records back; 0: never. Not used with an "
            "external Kafka."
        ),
    )
    outbox_retention_s: float = Field(
        default=3600.0,
        ge=0,
        description="Published events kept this long so a fresh broker can be re-fed (replay).",
    )
    inbox_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description=(
            "Ids of handled events kept this long to skip redeliveries, then pruned (otherwise the "
            "inbox grows forever). Must outlive any redelivery: the broker's retention (Kafka's "
            "default is 7 days) and `outbox_retention_s` (a re-fed broker replays events that old)."
        ),
    )
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="How often each service publishes its status (heartbeat)."
    )

    # -- HTTP ------------------------------------------------------------------------------
    http_host: str = Field(default="127.0.0.1", description="Bind address of the HTTP services.")
    http_reuse_port: bool = Field(
        default=False,
        description="Bind HTTP ports with SO_REUSEPORT, so replicas of a service share one port (set by `up --replicas`).",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Port of this process's Prometheus endpoint (`/metrics`, every service it runs); unset: none; 0: any free port.",
    )

    instance: str = Field(default_factory=socket.gethostname, description="Names this process.")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")

    @field_validator("topic_prefix", "schema_prefix")
    @classmethod
    def _safe_prefix(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "._-" for c in value):
            raise ValueError("prefixes may hold letters, digits, '.', '_' and '-' only")
        return value

    @model_validator(mode="after")
    def _inbox_outlives_outbox(self) -> "Settings":
        # A re-fed broker replays outbox events up to outbox_retention_s old; their consumers
        # must still find them in the inbox, or the effects would happen twice.
        if self.inbox_retention_s < self.outbox_retention_s:
            raise ValueError(
                f"inbox_retention_s ({self.inbox_retention_s:g}) must be at least outbox_retention_s "
                f"({self.outbox_retention_s:g}): replayed events must still be recognised as handled"
            )
        return self

    # -- derived values --------------------------------------------------------------------
    @property
    def embedded_kafka(self) -> bool:
        """True when no external broker is configured."""
        return self.kafka_bootstrap is None

    @property
    def session_timeout_ms(self) -> int:
        """Consumer session timeout in force (the embedded broker joins in half of it)."""
        if self.kafka_session_timeout_ms is not None:
            return self.kafka_session_timeout_ms
        return 2000 if self._tansu else 10000

    @property
    def heartbeat_interval_ms(self) -> int:
        """Consumer heartbeat interval in force."""
        if self.kafka_heartbeat_interval_ms is not None:
            return self.kafka_heartbeat_interval_ms
        return 500 if self._tansu else 3000

    @property
    def fetch_max_wait_ms(self) -> int:
        """Consumer fetch long-poll limit in force."""
        if self.kafka_fetch_max_wait_ms is not None:
            return self.kafka_fetch_max_wait_ms
        return 50 if self._tansu else 500

    @property
    def _tansu(self) -> bool:
        return self.embedded_kafka or self.kafka_embedded

    @property
    def sasl_password(self) -> SecretStr | None:
        """The SASL password, from its file when one is named."""
        return _read_secret_file(self.kafka_sasl_password_file) or self.kafka_sasl_password

    @property
    def blob_location(self) -> str:
        """The blob store URL in force."""
        return self.blob_url or (self.state_dir.resolve() / "blobs").as_uri()

    def schema_for(self, service: str) -> str:
        """PostgreSQL schema owned by `service` (hyphens become underscores)."""
        return f"{self.schema_prefix}{service}".replace("-", "_").lower()

    def topic(self, name: str) -> str:
        """A registry topic name with this deployment's prefix."""
        return f"{self.topic_prefix}{name}"

    def __repr_args__(self) -> Any:
        # repr() of settings ends up in logs and tracebacks: never show secrets there.
        yield from self.redacted().items()

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with secrets and URL passwords masked, safe to print or log."""
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        data = self.model_dump(mode="json")
        for key in ("kafka_sasl_password",):
            if data.get(key):
                data[key] = "***"
        url = data.get("database_url")
        if url:
            parts = urlsplit(url)
            if parts.password:
                netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
                parts = parts._replace(netloc=netloc)
            # libpq also takes the password (and the client key's) as query parameters.
            query = parse_qsl(parts.query, keep_blank_values=True)
            if any(name in ("password", "sslpassword") for name, _ in query):
                masked = [(name, "***" if name in ("password", "sslpassword") else value) for name, value in query]
                parts = parts._replace(query=urlencode(masked, safe="/*"))
            data["database_url"] = urlunsplit(parts)
        return data


def settings_reference(classes: list[type[BaseSettings]] | None = None) -> str:
    """Markdown tables of every setting: variable, default, meaning (docs/configuration.md).

    Platform settings first, then each service's section.
    """
    classes = classes or [Settings]
    return "\n\n".join(_reference_table(cls) for cls in classes)


def _reference_table(cls: type[BaseSettings]) -> str:
    section = getattr(cls, "section", "")
    prefix = f"VL_{section.upper()}_" if section else "VL_"
    title = f"### `{section}` (file section `{section}:`)" if section else "### Platform"
    lines = [
        title,
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, field in cls.model_fields.items():
        if field.default_factory is not None:
            default = "(computed)" if name == "instance" else str(field.default_factory())  # type: ignore[call-arg]
        else:
            default = "" if field.default is None else str(field.default)
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        shown = f"`{default}`" if default else ""
        lines.append(f"| `{prefix}{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(lines)
