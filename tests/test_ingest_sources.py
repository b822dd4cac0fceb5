"""ingest's sources against real servers on loopback: pinned TLS, DNS rebinding, redirects,
content encodings and S3 (moto). The address policy is relaxed only where a test says so."""

from __future__ import annotations

import datetime as dt
import gzip
import ssl
import time
import uuid
from pathlib import Path

import hostile_images
import pytest
from hostile_http import HostileServer

from visionloop.contracts import ImageRejectReason, ImageSubmitted
from visionloop.services.ingest.config import IngestSettings
from visionloop.services.ingest.inspect import Refusal
from visionloop.services.ingest.sources import Sources

GOOD = hostile_images.good(11)


def _pinned(table: dict[str, list[str]], calls: list[str] | None = None):  # noqa: ANN202
    """A resolver that knows only `table` (and records what it was asked)."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return table[host]

    return resolve


async def _refused(sources: Sources, uri: str) -> Refusal:
    with pytest.raises(Refusal) as err:
        await sources.read(ImageSubmitted(submission_id="x", source_uri=uri), inline_max=1)
    assert err.value.message
    return err.value


async def test_a_fetch_connects_to_the_address_it_checked() -> None:
    """DNS rebinding: the name is resolved once per hop, checked, and the socket goes there."""
    calls: list[str] = []
    answers = iter([["127.0.0.1"], ["203.0.113.9"]])  # a second lookup would get another address

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    async with HostileServer() as server:
        server.serve("/a.jpg", GOOD)
        sources = Sources(IngestSettings(allow_private_addresses=True), resolve=rebinding)
        assert await sources.fetch(f"http://rebind.test:{server.port}/a.jpg") == GOOD
    assert calls == ["rebind.test"]
    assert server.requests == [("/a.jpg", f"rebind.test:{server.port}")]  # the name went as Host


async def test_private_answers_from_dns_are_refused_by_default() -> None:
    async with HostileServer() as server:
        server.serve("/a.jpg", GOOD)
        for table in ({"sneaky.test": ["127.0.0.1"]}, {"sneaky.test": ["93.184.216.34", "10.0.0.1"]}):
            sources = Sources(IngestSettings(), resolve=_pinned(table))
            refusal = await _refused(sources, f"http://sneaky.test:{server.port}/a.jpg")
            assert refusal.reason is ImageRejectReason.FORBIDDEN_SOURCE
        for literal in (f"http://127.0.0.1:{server.port}/a.jpg", f"http://[::1]:{server.port}/a.jpg",
                        f"http://[::ffff:127.0.0.1]:{server.port}/a.jpg", f"http://0.0.0.0:{server.port}/a.jpg",
                        # legacy spellings of 127.0.0.1: the resolver's answer is what gets checked
                        f"http://127.1:{server.port}/a.jpg", f"http://2130706433:{server.port}/a.jpg",
                        f"http://localhost:{server.port}/a.jpg"):
            refusal = await _refused(Sources(IngestSettings()), literal)
            assert refusal.reason is ImageRejectReason.FORBIDDEN_SOURCE, literal
    assert server.requests == []  # nothing ever connected


async def test_every_redirect_hop_is_checked_again() -> None:
    async with HostileServer() as server:
        server.serve("/final.jpg", GOOD)
        server.redirect("/hop", "/final.jpg")
        server.redirect("/to-file", "file:///etc/passwd")
        server.redirect("/to-stranger", f"http://stranger.test:{server.port}/final.jpg")
        server.redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/")
        server.redirect("/nowhere", "")
        table = {"images.test": ["127.0.0.1"], "stranger.test": ["127.0.0.1"]}
        config = IngestSettings(allow_private_addresses=True, allowed_hosts=["images.test"], fetch_max_redirects=2)
        sources = Sources(config, resolve=_pinned(table))
        base = f"http://images.test:{server.port}"
        assert await sources.fetch(f"{base}/hop") == GOOD
        expected = {
            "/to-file": ImageRejectReason.FORBIDDEN_SOURCE,  # not a scheme a fetch follows
            "/to-stranger": ImageRejectReason.FORBIDDEN_SOURCE,  # not on the allow-list
            "/to-metadata": ImageRejectReason.FORBIDDEN_SOURCE,  # an IP literal, not on the allow-list
            "/nowhere": ImageRejectReason.UNREACHABLE,
        }
        for path, reason in expected.items():
            assert (await _refused(sources, base + path)).reason is reason, path
        # the allow-list does not open non-public addresses: they are checked on every hop too
        strict = Sources(config.model_copy(update={"allow_private_addresses": False}), resolve=_pinned(table))
        refusal = await _refused(strict, f"{base}/final.jpg")
        assert refusal.reason is ImageRejectReason.FORBIDDEN_SOURCE and refusal.details["address_kind"] == "loopback"


async def test_redirect_loops_and_long_chains_give_up() -> None:
    async with HostileServer() as server:
        server.redirect("/loop", "/loop")
        for n in range(5):
            server.redirect(f"/chain{n}", f"/chain{n + 1}")
        server.serve("/chain5", GOOD)
        sources = Sources(IngestSettings(allow_private_addresses=True, fetch_max_redirects=3))
        refusal = await _refused(sources, f"{server.base}/loop")
        assert refusal.reason is ImageRejectReason.UNREACHABLE and refusal.details["redirects"] == 3
        assert (await _refused(sources, f"{server.base}/chain0")).reason is ImageRejectReason.UNREACHABLE
        assert len([p for p, _ in server.requests if p == "/loop"]) == 4  # the first try and 3 hops


async def test_trickling_and_endless_sources_are_cut_off() -> None:
    config = IngestSettings(allow_private_addresses=True, fetch_deadline_s=1.0, max_bytes=200_000)
    sources = Sources(config)
    async with HostileServer() as server:
        trickle = server.trickle("/slow.jpg", GOOD[:32], every_s=0.05)
        started = time.monotonic()
        refusal = await _refused(sources, trickle)
        assert time.monotonic() - started < 2.0
        assert refusal.reason is ImageRejectReason.UNREACHABLE and refusal.details["timed_out"] is True
        assert refusal.details["bytes_read"] >= 32
        endless = server.endless("/endless.jpg", GOOD[:32])
        refusal = await _refused(sources, endless)
        assert refusal.reason is ImageRejectReason.TOO_LARGE and refusal.details["limit"] == 200_000
        lying = server.endless("/lying.jpg", GOOD[:32], declared=10**10)
        refusal = await _refused(sources, lying)
        assert refusal.reason is ImageRejectReason.TOO_LARGE and refusal.details["bytes"] == 10**10


async def test_what_a_source_declares_and_sends_is_checked() -> None:
    sources = Sources(IngestSettings(allow_private_addresses=True, max_bytes=100_000))
    async with HostileServer() as server:
        cases = {
            server.serve("/page.jpg", hostile_images.HTML, "text/html; charset=utf-8"): ImageRejectReason.NOT_AN_IMAGE,
            server.serve("/svg.jpg", hostile_images.SVG, "image/jpeg"): ImageRejectReason.NOT_AN_IMAGE,
            server.serve("/vector.svg", hostile_images.SVG, "image/svg+xml"): ImageRejectReason.UNSUPPORTED_FORMAT,
            server.status("/gone.jpg", 404): ImageRejectReason.UNREACHABLE,
            server.serve("/brotli.jpg", GOOD, content_encoding="br"): ImageRejectReason.UNREACHABLE,
            f"http://127.0.0.1:{_closed_port()}/a.jpg": ImageRejectReason.UNREACHABLE,
        }
        for url, reason in cases.items():
            assert (await _refused(sources, url)).reason is reason, url
        # the magic bytes are judged as soon as they arrive: an endless HTML page stops there
        html_forever = server.endless("/forever.html", hostile_images.HTML)
        assert (await _refused(sources, html_forever)).reason is ImageRejectReason.NOT_AN_IMAGE


async def test_gzip_bodies_inflate_within_the_cap() -> None:
    sources = Sources(IngestSettings(allow_private_addresses=True, max_bytes=100_000))
    bomb = gzip.compress(b"\xff\xd8\xff" + b"\x00" * 50_000_000)  # 50 MB of zeros in ~50 KB
    async with HostileServer() as server:
        zipped = server.serve("/zipped.jpg", gzip.compress(GOOD), content_encoding="gzip")
        assert await sources.fetch(zipped) == GOOD
        refusal = await _refused(sources, server.serve("/bomb.jpg", bomb, content_encoding="gzip"))
        assert refusal.reason is ImageRejectReason.TOO_LARGE


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- https: the name is checked against the certificate while the socket goes to the pinned IP -


def _tls_pair(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A throwaway CA and a server certificate for `name`; returns the server context and the CA file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "visionloop test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return server, ca_file


async def test_https_sends_the_name_as_sni_and_verifies_it(tmp_path: Path) -> None:
    server_tls, ca_file = _tls_pair(tmp_path, "images.test")
    table = {"images.test": ["127.0.0.1"], "impostor.test": ["127.0.0.1"]}
    config = IngestSettings(allow_private_addresses=True, fetch_ca_file=ca_file)
    async with HostileServer(tls=server_tls) as server:
        server.serve("/a.jpg", GOOD)
        sources = Sources(config, resolve=_pinned(table))
        assert await sources.fetch(f"https://images.test:{server.port}/a.jpg") == GOOD
        assert server.requests == [("/a.jpg", f"images.test:{server.port}")]
        # the same socket under another name: the certificate does not name it, so no bytes
        refusal = await _refused(sources, f"https://impostor.test:{server.port}/a.jpg")
        assert refusal.reason is ImageRejectReason.UNREACHABLE and "certificate" in refusal.message.lower()
        # by address, the certificate (which names no IP) cannot match either
        refusal = await _refused(sources, f"https://127.0.0.1:{server.port}/a.jpg")
        assert refusal.reason is ImageRejectReason.UNREACHABLE
        # and a CA ingest does not trust fails the same way
        untrusted = Sources(IngestSettings(allow_private_addresses=True), resolve=_pinned(table))
        assert (await _refused(untrusted, f"https://images.test:{server.port}/a.jpg")).reason is ImageRejectReason.UNREACHABLE


# -- s3 ----------------------------------------------------------------------------------------


@pytest.fixture
def s3_source(s3_endpoint: str):  # noqa: ANN201
    """A fresh bucket on the moto server and a way to put objects in it."""
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    bucket = f"vl-src-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    config = IngestSettings(s3_endpoint=s3_endpoint, s3_region="us-east-1", s3_access_key="testing",
                            s3_secret_key="testing", max_bytes=100_000, s3_buckets=["*"])
    return client, bucket, config


async def test_s3_objects_are_read_within_the_cap(s3_source) -> None:  # noqa: ANN001
    client, bucket, config = s3_source
    client.put_object(Bucket=bucket, Key="photos/a b.jpg", Body=GOOD, ContentType="image/jpeg")
    client.put_object(Bucket=bucket, Key="big.jpg", Body=b"\xff\xd8\xff" + b"\x00" * 200_000)
    client.put_object(Bucket=bucket, Key="page.jpg", Body=hostile_images.HTML, ContentType="text/html")
    client.put_object(Bucket=bucket, Key="empty.jpg", Body=b"")
    sources = Sources(config)
    assert await sources.read_s3(f"s3://{bucket}/photos/a b.jpg") == GOOD
    assert await sources.read_s3(f"s3://{bucket}/empty.jpg") == b""  # zero bytes: inspect refuses them
    big = await _refused(sources, f"s3://{bucket}/big.jpg")
    assert big.reason is ImageRejectReason.TOO_LARGE and big.details["bytes"] == 200_003
    assert (await _refused(sources, f"s3://{bucket}/page.jpg")).reason is ImageRejectReason.NOT_AN_IMAGE
    assert (await _refused(sources, f"s3://{bucket}/missing.jpg")).reason is ImageRejectReason.UNREACHABLE
    assert (await _refused(sources, "s3://no-such-bucket-here/a.jpg")).reason is ImageRejectReason.UNREACHABLE
    assert (await _refused(sources, f"s3://{bucket}")).reason is ImageRejectReason.INVALID_SUBMISSION
    fenced = Sources(config.model_copy(update={"s3_buckets": ["another"]}))
    assert (await _refused(fenced, f"s3://{bucket}/photos/a b.jpg")).reason is ImageRejectReason.FORBIDDEN_SOURCE
    shut = Sources(config.model_copy(update={"s3_buckets": []}))  # the default: no bucket named, none read
    assert (await _refused(shut, f"s3://{bucket}/photos/a b.jpg")).reason is ImageRejectReason.FORBIDDEN_SOURCE


async def test_unknown_schemes_are_forbidden() -> None:
    for uri in ("ftp://example.com/a.jpg", "gopher://example.com/", "data:image/jpeg;base64,AAAA", "/etc/passwd"):
        assert (await _refused(Sources(IngestSettings()), uri)).reason is ImageRejectReason.FORBIDDEN_SOURCE, uri
    assert (await _refused(Sources(IngestSettings()), "http://[::1")).reason is ImageRejectReason.INVALID_SUBMISSION
