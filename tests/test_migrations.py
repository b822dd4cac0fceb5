"""Migrations against the real PostgreSQL: concurrent starts, edited files, bad names."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from visionloop.libs.db import MigrationError, discover, migrate


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql)
    return folder


SQL = {
    "0001_things.sql": "CREATE TABLE things (id int PRIMARY KEY); CREATE TABLE applied (n serial);"
    " INSERT INTO applied DEFAULT VALUES;",
    # pg_sleep widens the window in which a second process would race without the lock
    "0002_more.sql": "SELECT pg_sleep(0.5); ALTER TABLE things ADD COLUMN name text;"
    " INSERT INTO applied DEFAULT VALUES;",
}

RUNNER = textwrap.dedent(
    """
    import asyncio, sys, asyncpg
    from pathlib import Path
    from visionloop.libs.db import discover, migrate

    async def main():
        pool = await asyncpg.create_pool(sys.argv[1], min_size=1, max_size=2)
        applied = await migrate(pool, sys.argv[2], discover("svc", Path(sys.argv[3])))
        print(len(applied))
        await pool.close()

    asyncio.run(main())
    """
)


async def test_two_processes_migrating_at_once_apply_each_file_once(settings, pool, tmp_path) -> None:  # noqa: ANN001
    folder = _write(tmp_path / "migrations", SQL)
    schema = settings.schema_for("svc")
    procs = [
        subprocess.Popen([sys.executable, "-c", RUNNER, settings.database_url, schema, str(folder)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [await asyncio.to_thread(p.communicate, timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(int(out.strip()) for out, _ in outputs) == [0, 2]  # one applied both, the other none
    assert await pool.fetchval(f'SELECT count(*) FROM "{schema}".applied') == 2
    versions = await pool.fetch(f'SELECT version FROM "{schema}".schema_migrations ORDER BY version')
    assert [r["version"] for r in versions] == ["svc/0001_things.sql", "svc/0002_more.sql"]


async def test_an_edited_applied_migration_is_refused(settings, pool, tmp_path) -> None:  # noqa: ANN001
    folder = _write(tmp_path / "m", {"0001_a.sql": "CREATE TABLE a (id int);"})
    schema = settings.schema_for("edited")
    assert await migrate(pool, schema, discover("svc", folder)) == ["svc/0001_a.sql"]
    assert await migrate(pool, schema, discover("svc", folder)) == []
    (folder / "0001_a.sql").write_text("CREATE TABLE a (id bigint);")
    with pytest.raises(MigrationError, match="edited") as err:
        await migrate(pool, schema, discover("svc", folder))
    assert err.value.reason == "migration_edited"


async def test_a_failing_migration_leaves_nothing_half_applied(settings, pool, tmp_path) -> None:  # noqa: ANN001
    folder = _write(tmp_path / "m", {"0001_ok.sql": "CREATE TABLE ok (id int);", "0002_bad.sql": "CREATE TABLE half (id int); SELECT broken syntax here;"})
    schema = settings.schema_for("failing")
    with pytest.raises(Exception):
        await migrate(pool, schema, discover("svc", folder))
    tables = {r["tablename"] for r in await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)}
    assert tables == {"ok", "schema_migrations"}


def test_misnamed_migration_files_are_an_error(tmp_path) -> None:  # noqa: ANN001
    folder = _write(tmp_path / "m", {"init.sql": "SELECT 1;"})
    with pytest.raises(MigrationError) as err:
        discover("svc", folder)
    assert err.value.reason == "bad_migration_name"
