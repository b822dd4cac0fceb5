"""Claims of docs/security.md that no other test makes: the labelling gateway fetches Label Studio
task images only from public http(s) addresses (by default), whatever the URL or its DNS says; a
forged `model.packaged` event cannot release a package the distributor does not trust."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from examples import EXAMPLES
from helpers import Collector, Services, eventually, publish

from visionloop.contracts import DeadLetter, ModelPackaged, ModelRef, topic_of
from visionloop.libs import package, signing
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.fetch import Fetcher, FetchError, Origin


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",  # loopback
        "http://localhost:9/x.png",  # a name that resolves to loopback
        "http://169.254.169.254/latest/meta-data/",  # a cloud metadata service (link-local)
        "http://10.0.0.7/x.png",  # a private network
        "http://[::1]/x.png",  # IPv6 loopback
        "http://[::ffff:192.168.1.1]/x.png",  # an IPv4 private address in IPv6 clothes
        "http://0.0.0.0/x.png",  # unspecified
        "file:///etc/passwd",  # not http(s)
        "gopher://example.com/x",
        "/data/upload/1/x.png",  # relative, resolved against Label Studio's private address
    ],
)
async def test_gateway_fetches_only_public_http_addresses(url: str) -> None:
    fetcher = Fetcher(GatewaySettings(fetch_deadline_s=5))
    try:
        with pytest.raises(FetchError) as refused:
            await fetcher.fetch(url, Origin(base="http://192.168.0.10:8080", token="ls-token"))
    finally:
        await fetcher.close()
    assert refused.value.reason == "forbidden_source", refused.value.message


async def test_distributor_refuses_a_package_signed_by_an_unknown_key(settings, pool, tmp_path) -> None:  # noqa: ANN001
    """Whoever can publish `model.packaged` cannot release a model: the package must be signed by
    a key the distributor trusts (the edge agent checks again, tests/test_edge_agent.py)."""
    signing.ensure_key_pair(settings.state_dir / "keys")  # the distributor trusts this key pair only
    private, _ = signing.generate()  # ...and not this one
    manifest = package.make_manifest(
        model=ModelRef(model_id="forged", version=1), project="demo", target="edge", precision="fp32", classes=["car"],
        input_shape=[1, 3, 64, 64], created_at=datetime(2025, 1, 1, tzinfo=UTC), dataset_version="ds-1", metrics={}, fleets=[],
    )
    built = package.build(manifest, {"model.onnx": b"not a model"}, signing.load_private(private))
    example = next(p for p in EXAMPLES if isinstance(p, ModelPackaged))
    async with Services(settings, pool) as loop, Collector(settings, topic_of(DeadLetter, settings.topic_prefix)) as letters:
        await loop.start("distributor")
        ref = await loop.adapters.blobs.put(built.archive)
        forged = example.model_copy(update={
            "package_uri": ref.uri, "package_sha256": built.sha256, "size_bytes": len(built.archive),
            "manifest_sha256": hashlib.sha256(built.manifest_bytes).hexdigest(), "signature": built.signature, "key_id": built.key_id,
        })
        await publish(settings, forged, project="demo")
        [letter] = await eventually(lambda: [m["payload"] for m in letters.messages if m["payload"]["service"] == "distributor"])
        assert letter["reason"] == "handler_failed" and letter["message"].startswith("PermanentError: package_refused"), letter
        schema = settings.schema_for("distributor")
        assert await pool.fetchval(f'SELECT count(*) FROM "{schema}".releases') == 0
        assert await pool.fetchval(f'SELECT count(*) FROM "{schema}".packages') == 0


def test_every_test_docs_security_md_names_exists() -> None:
    """docs/security.md proves each claim with a `file::function`; each must be a test here."""
    import re
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", (tests.parent / "docs" / "security.md").read_text(encoding="utf-8")))
    assert len(named) >= 40
    missing = [
        f"{file}::{name}" for file, name in sorted(named)
        if not (tests / file).is_file() or not re.search(rf"^(async )?def {name}\(", (tests / file).read_text(encoding="utf-8"), re.M)
    ]
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"
