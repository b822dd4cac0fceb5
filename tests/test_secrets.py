"""Secrets reach what needs them and nothing else: `visionloop config` and the logs never show a
secret value; PostgreSQL's TLS settings (in the URL, with the password from a file) reach asyncpg;
Kafka's TLS and SASL settings reach the clients."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from typer.testing import CliRunner

from visionloop.libs.settings import Settings

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
"""The first 8 bytes a PostgreSQL client sends when it asks for TLS."""


def _pem_body(pem: bytes) -> str:
    """A line from the middle of a PEM block: what would show if the key leaked."""
    lines = [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]
    return lines[len(lines) // 2] if lines else pem.decode()


def _secrets(tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """Environment with every kind of secret the settings take (variables and files), and the
    secret values themselves."""
    from visionloop.libs import signing

    private, _ = signing.generate()
    files = {"kafka": "kafka-file-s3cr3t-9f2a", "db": "db-file-s3cr3t-77c1", "s3": "s3-file-s3cr3t-51d0"}
    for name, value in files.items():
        (tmp_path / name).write_text(value + "\n")
    env = {
        "VL_KAFKA_SASL_USERNAME": "visionloop",
        "VL_KAFKA_SASL_PASSWORD": "kafka-var-s3cr3t-4c1e",
        "VL_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "kafka"),
        "VL_DATABASE_URL": "postgresql://visionloop:url-s3cr3t-0b3d@db:5432/visionloop?sslmode=verify-full&sslpassword=key-s3cr3t-e8f1"
                           "&password=qp-s3cr3t-1a2b",
        "VL_DATABASE_PASSWORD_FILE": str(tmp_path / "db"),
        "VL_INGEST_S3_SECRET_KEY": "s3-var-s3cr3t-a6b7",
        "VL_INGEST_S3_SECRET_KEY_FILE": str(tmp_path / "s3"),
        "VL_DISTRIBUTOR_RELEASE_TOKEN": "release-s3cr3t-3e5f",
        "VL_PACKAGER_SIGNING_KEY": private.decode(),
    }
    values = [*files.values(), "kafka-var-s3cr3t-4c1e", "url-s3cr3t-0b3d", "key-s3cr3t-e8f1", "qp-s3cr3t-1a2b", "s3-var-s3cr3t-a6b7",
              "release-s3cr3t-3e5f", _pem_body(private)]
    return env, values


def test_config_output_never_shows_a_secret(tmp_path: Path) -> None:
    from visionloop.cli import app

    env, values = _secrets(tmp_path)
    result = CliRunner().invoke(app, ["config"], env=env)
    assert result.exit_code == 0, result.output
    shown = result.output
    assert "db:5432" in shown and "visionloop" in shown  # the settings are there...
    leaked = [v for v in values if v in shown]
    assert not leaked, f"`visionloop config` shows {leaked}"  # ...their secrets are not
    assert "***" in shown


async def test_secrets_never_reach_the_logs(settings: Settings, pool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Services run at DEBUG with secrets in every form; no log line (nor traceback) holds one."""
    from visionloop.app import ServiceHost

    env, values = _secrets(tmp_path)
    for name in ("VL_DATABASE_URL", "VL_DATABASE_PASSWORD_FILE"):
        env.pop(name)
    # The real database: its own password if its URL has one, else one from a file (trust auth ignores it).
    assert settings.database_url is not None
    password = urlsplit(settings.database_url).password
    if password:
        values.append(password)
        secured = settings
    else:
        (tmp_path / "db").write_text("db-file-s3cr3t-77c1\n")
        secured = settings.model_copy(update={"database_password_file": str(tmp_path / "db")})
    secured = secured.model_copy(update={"kafka_sasl_username": "visionloop", "kafka_sasl_password_file": str(tmp_path / "kafka")})
    for name, value in {**env, "VL_DISTRIBUTOR_PORT": "0"}.items():
        if name.startswith(("VL_INGEST_", "VL_DISTRIBUTOR_", "VL_PACKAGER_")):
            monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    host = ServiceHost(secured, ["packager", "distributor"])
    await host.start()
    try:
        async with httpx.AsyncClient(base_url=host.endpoints["distributor"]) as http:
            refused = await http.get("/v1/releases", headers={"Authorization": "Bearer release-s3cr3t-3e5e"})
            assert refused.status_code == 401 and refused.json()["reason"] == "unauthorised"
            listed = await http.get("/v1/releases", headers={"Authorization": "Bearer release-s3cr3t-3e5f"})
            assert listed.status_code == 200
        logging.getLogger("visionloop.test").info("settings in force: %r", secured)
    finally:
        await host.stop()
    logged = caplog.text + "".join(str(r.args) + (r.exc_text or "") for r in caplog.records)
    assert len(caplog.records) > 10
    leaked = [v for v in values if v in logged]
    assert not leaked, f"the logs show {leaked}"


# -- TLS settings reach the clients -------------------------------------------------------------


def _ca_and_server_cert(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(f"{name} CA", ca_key, f"{name} CA", ca_key, ca=True)
    server = cert("127.0.0.1", server_key, f"{name} CA", ca_key, ca=False)
    paths = folder / f"{name}-ca.crt", folder / f"{name}-server.crt", folder / f"{name}-server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@contextlib.asynccontextmanager
async def _postgres_door(cert: Path, key: Path) -> AsyncIterator[tuple[int, list[str]]]:
    """A loopback port that speaks the first step of PostgreSQL's protocol: it notes whether the
    client asked for TLS and whether the handshake (with a certificate for 127.0.0.1) succeeded."""
    seen: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.readexactly(8)
            if first != SSL_REQUEST:
                seen.append("plaintext")
                return
            seen.append("ssl_request")
            writer.write(b"S")
            await writer.drain()
            try:
                await writer.start_tls(context)
            except (ssl.SSLError, ConnectionError, OSError):
                seen.append("handshake_failed")
                return
            seen.append("handshake_done")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()


async def test_postgres_tls_settings_reach_asyncpg(tmp_path: Path) -> None:
    """PostgreSQL TLS is configured in the URL (`sslmode`, `sslrootcert`, as compose's secured
    profile does) with the password from `VL_DATABASE_PASSWORD_FILE`; the merged URL keeps them
    and asyncpg asks for TLS and verifies the server against that CA."""
    from visionloop.libs.db import create_pool, database_url

    ca, cert, key = _ca_and_server_cert(tmp_path, "right")
    stranger, _, _ = _ca_and_server_cert(tmp_path, "stranger")
    (tmp_path / "password").write_text("p@ss/word\n")

    async def connect(query: str) -> tuple[list[str], BaseException | None]:
        async with _postgres_door(cert, key) as (port, seen):
            settings = Settings(database_url=f"postgresql://visionloop@127.0.0.1:{port}/visionloop?{query}",
                                database_password_file=str(tmp_path / "password"))
            url = database_url(settings)
            assert "p%40ss%2Fword@" in url and url.endswith(query), url
            try:
                await asyncio.wait_for(create_pool(settings, min_size=1, max_size=1), timeout=20)
            except Exception as exc:  # the door never lets anyone in
                return seen, exc
            return seen, None

    seen, error = await connect(f"sslmode=verify-full&sslrootcert={ca}")
    assert seen == ["ssl_request", "handshake_done"] and error is not None  # TLS with the right CA: handshake done
    seen, error = await connect(f"sslmode=verify-full&sslrootcert={stranger}")
    assert seen[0] == "ssl_request" and "handshake_done" not in seen  # a server the CA did not sign: refused
    assert isinstance(error, ssl.SSLCertVerificationError) or "certificate verify failed" in str(error), repr(error)
    seen, _ = await connect("sslmode=disable")
    assert seen == ["plaintext"]


def test_kafka_tls_and_sasl_settings_reach_the_clients(tmp_path: Path) -> None:
    from visionloop.libs.kafka import client_kwargs, security

    ca, _, _ = _ca_and_server_cert(tmp_path, "kafka")
    (tmp_path / "sasl").write_text("kafka-file-s3cr3t-9f2a\n")
    settings = Settings(
        kafka_bootstrap="kafka-secured:9094", kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="visionloop", kafka_sasl_password_file=str(tmp_path / "sasl"), kafka_ssl_cafile=str(ca),
    )
    kwargs = client_kwargs(settings)
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "kafka CA"),),)]
    assert (kwargs["security_protocol"], kwargs["sasl_mechanism"], kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == (
        "SASL_SSL", "SCRAM-SHA-512", "visionloop", "kafka-file-s3cr3t-9f2a")
    framework = security(settings)
    assert framework is not None and framework.use_ssl and framework.ssl_context is not None
