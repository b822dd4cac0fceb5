"""Session fixtures: one real Tansu broker and one real PostgreSQL for the whole test run.

Each test gets its own topic prefix and schema prefix, so tests never see each other's
messages or tables. Everything listens on loopback or a Unix socket.

`VL_TEST_DATABASE_URL` points the suite at an existing PostgreSQL (CI may start Debian's)
instead of the embedded pgserver.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from visionloop.libs.embedded import EmbeddedBroker, EmbeddedPostgres
from visionloop.libs.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TEST_STATE = REPO / ".visionloop" / "test"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real Kafka-protocol broker (Tansu) on a free loopback port, for the whole session."""
    broker = EmbeddedBroker(TEST_STATE / "logs" / f"broker-{os.getpid()}.log")
    yield broker.start()
    broker.stop()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A real PostgreSQL: VL_TEST_DATABASE_URL, or pgserver under the project's state folder."""
    external = os.environ.get("VL_TEST_DATABASE_URL")
    if external:
        yield external
        return
    postgres = EmbeddedPostgres(TEST_STATE / "postgres")
    yield postgres.start()
    postgres.stop()


@pytest.fixture
def settings(kafka_bootstrap: str, database_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: own topics, own schemas, own blob folder, fast retries."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        state_dir=tmp_path / "state",
        kafka_bootstrap=kafka_bootstrap,
        kafka_embedded=True,
        database_url=database_url,
        blob_url=(tmp_path / "blobs").as_uri(),
        topic_prefix=f"t{tag}.",
        schema_prefix=f"t{tag}_",
        retry_backoff_ms=20,
        retry_backoff_max_ms=200,
        outbox_relay_interval_s=0.2,
        heartbeat_interval_s=1.0,
        instance=f"test-{tag}",
    )


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool on the test database; drops this test's schemas afterwards."""
    p = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10)
    assert p is not None
    yield p
    schemas = await p.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", settings.schema_prefix + "%"
    )
    for row in schemas:
        await p.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
    await p.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto) on a free loopback port, for the whole session."""
    moto_server = pytest.importorskip("moto.server", reason="S3 tests need moto[server]")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Train the suite's shared detector (tests/detector.py) before the first test, when a test
    that will run uses it and this checkout has not trained it yet: on a fresh clone that is one
    to five minutes on two cores, which no single test's timeout should pay for (the first one
    that asked for it used to: seen, a 300 s timeout on a slow machine)."""
    import sys

    detector = sys.modules.get("detector")
    if detector is None or session.config.option.collectonly:
        return
    users = any(getattr(value, "__module__", None) == "detector"
                for item in session.items if (module := getattr(item, "module", None)) is not None
                for value in vars(module).values())
    if not users or detector.is_trained():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("training the test suite's detector once for this checkout (a few minutes; cached after)")
    detector.trained()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """With VL_DOORS_SUMMARY set (`make doors`), one last line `doors: N passed, M failed` (zeros included)."""
    import os

    if not os.environ.get("VL_DOORS_SUMMARY"):
        return
    stats = terminalreporter.stats
    failed = len(stats.get("failed", [])) + len(stats.get("error", []))
    terminalreporter.write_line(f"doors: {len(stats.get('passed', []))} passed, {failed} failed")


@pytest.fixture
async def fake_bus(database_url: str) -> AsyncIterator[Any]:
    """An in-memory bus (libs/bus/fake.py) whose runtimes get a schema each on the test database:
    handler tests with their SQL and without Kafka. `fake_bus.pool` is the pool; the schemas are
    dropped afterwards."""
    from visionloop.libs.bus.fake import FakeBus

    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert p is not None
    bus = FakeBus()
    bus.pool = p  # type: ignore[attr-defined]
    yield bus
    for runtime in bus.runtimes:
        await p.execute(f'DROP SCHEMA IF EXISTS "{runtime.schema}" CASCADE')
    await p.close()
