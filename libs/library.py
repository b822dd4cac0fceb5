"""The model library: which model versions exist, and which one looks at a given picture.

A registry in PostgreSQL, in the schema `<schema_prefix>library`, owned by the distributor (until
it exists, `visionloop library add` writes it). Two faces:

- **Read** (`ModelLibrary`): the recognizer and the gateway ask `select(project, domain_tags,
  target)` and get a `Selection` of the production entry and the candidate entry that serve
  that picture (either may be None). They never write.
- **Write** (`register`, `set_alias`): only the distributor and the CLI. Each runs inside a
  `Runtime` transaction of the `library` service and emits `model registered` through its
  outbox, so the entry and the event commit together.

Selection "according to the picture": among the entries of the image's project and the wanted
target that hold the alias, those whose domain tags are all among the image's tags match (an
entry with no tags serves the whole project, so it matches every image of the project). The most
specific match wins: the most tags. Ties go to the entry whose alias was set most recently,
then to the smaller model id, then the higher version, so the choice is deterministic. An image
whose tags match no tagged entry therefore falls back to the project-wide entry, if there is one;
with no match at all the answer is "no model".

Aliases live per (project, model line, target, domain scope): `production` and `candidate`
each name at most one version there, and promoting a version to `production` moves the
version it replaces to `previous` in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from visionloop.contracts import (
    Alias,
    Lineage,
    Metrics,
    ModelRef,
    ModelRegistered,
    Precision,
    Target,
)
from visionloop.libs.db import discover, quote_ident

SERVICE = "library"
"""The name the library's schema and runtime go by (`<schema_prefix>library`)."""
MIGRATIONS = Path(__file__).parent / "library_migrations"
"""The library's tables."""


def migrations() -> list[Any]:
    """The library's SQL migrations, in order."""
    return discover(SERVICE, MIGRATIONS)


class LibraryError(Exception):
    """A write the library refuses: `reason` is a stable code, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def domain_key(domain: Mapping[str, str]) -> str:
    """Canonical text of a domain tag set (sorted keys): the alias scope and a stable sort key."""
    return json.dumps(dict(sorted(domain.items())), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Entry:
    """One model version for one target, as the library holds it."""

    id: int
    model_id: str
    version: int
    target: Target
    project: str
    domain: dict[str, str]
    class_names: list[str]
    input_size: int
    precision: Precision
    artifact_uri: str
    artifact_sha256: str
    dataset_version: str
    registered_at: datetime
    artifact_bytes: int | None = None
    metrics: Metrics | None = None
    parent: ModelRef | None = None
    package_uri: str | None = None
    package_sha256: str | None = None
    aliases: dict[Alias, datetime] = field(default_factory=dict)
    """The aliases this entry holds, with when each was set."""

    @property
    def ref(self) -> ModelRef:
        """The model version as contracts name it."""
        return ModelRef(model_id=self.model_id, version=self.version)

    @property
    def label(self) -> str:
        """`model_id v<version>` for messages."""
        return f"{self.model_id} v{self.version}"

    def matches(self, project: str, domain: Mapping[str, str], target: Target) -> bool:
        """Whether this entry may look at an image of `project` with these domain tags."""
        return (
            self.project == project
            and self.target == target
            and all(domain.get(k) == v for k, v in self.domain.items())
        )


@dataclass(frozen=True)
class Selection:
    """The entries that serve one picture: production answers, candidate runs in shadow."""

    production: Entry | None = None
    candidate: Entry | None = None


def _rank(entry: Entry, alias: Alias) -> tuple[int, float, str, int]:
    set_at = entry.aliases[alias]
    # sorted() ascending: negate what should come first when larger
    return (-len(entry.domain), -set_at.timestamp(), entry.model_id, -entry.version)


def select(entries: Iterable[Entry], project: str, domain: Mapping[str, str], target: Target) -> Selection:
    """The most specific matching `production` and `candidate` entries (module docstring)."""
    found: dict[Alias, Entry | None] = {}
    pool = [e for e in entries if e.matches(project, domain, target)]
    for alias in (Alias.PRODUCTION, Alias.CANDIDATE):
        holders = sorted((e for e in pool if alias in e.aliases), key=lambda e: _rank(e, alias))
        found[alias] = holders[0] if holders else None
    return Selection(production=found[Alias.PRODUCTION], candidate=found[Alias.CANDIDATE])


@dataclass(frozen=True)
class Snapshot:
    """The aliased entries at one moment; `select` on it is pure and fast (no database)."""

    entries: tuple[Entry, ...] = ()
    taken_at: float = 0.0
    """`time.monotonic()` when it was read."""

    def select(self, project: str, domain: Mapping[str, str], target: Target) -> Selection:
        """See the module docstring."""
        return select(self.entries, project, domain, target)


_ENTRY_COLUMNS = """e.id, e.model_id, e.version, e.target, e.project, e.domain, e.class_names,
    e.input_size, e.precision, e.artifact_uri, e.artifact_sha256, e.artifact_bytes,
    e.package_uri, e.package_sha256, e.metrics, e.parent_model_id, e.parent_version,
    e.dataset_version, e.registered_at"""


def _entry(row: Mapping[str, Any], aliases: dict[Alias, datetime] | None = None) -> Entry:
    parent = (
        ModelRef(model_id=row["parent_model_id"], version=row["parent_version"])
        if row["parent_model_id"]
        else None
    )
    return Entry(
        id=row["id"],
        model_id=row["model_id"],
        version=row["version"],
        target=Target(row["target"]),
        project=row["project"],
        domain=json.loads(row["domain"]),
        class_names=json.loads(row["class_names"]),
        input_size=row["input_size"],
        precision=Precision(row["precision"]),
        artifact_uri=row["artifact_uri"],
        artifact_sha256=row["artifact_sha256"],
        artifact_bytes=row["artifact_bytes"],
        package_uri=row["package_uri"],
        package_sha256=row["package_sha256"],
        metrics=Metrics.model_validate_json(row["metrics"]) if row["metrics"] else None,
        parent=parent,
        dataset_version=row["dataset_version"],
        registered_at=row["registered_at"],
        aliases=aliases or {},
    )


async def _schema_exists(conn: asyncpg.Connection | asyncpg.Pool, schema: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(schema)}.aliases"
        )
    )


async def _load(conn: asyncpg.Connection | asyncpg.Pool, schema: str, *, aliased_only: bool, project: str | None = None) -> list[Entry]:
    if not await _schema_exists(conn, schema):
        return []  # nothing was ever registered: an empty library
    q = quote_ident(schema)
    rows = await conn.fetch(
        f"""SELECT {_ENTRY_COLUMNS},
                   coalesce(jsonb_object_agg(a.alias, a.set_at) FILTER (WHERE a.alias IS NOT NULL), '{{}}') AS aliases
            FROM {q}.entries e LEFT JOIN {q}.aliases a ON a.entry_id = e.id
            WHERE ($1::text IS NULL OR e.project = $1)
            GROUP BY e.id
            {"HAVING count(a.alias) > 0" if aliased_only else ""}
            ORDER BY e.project, e.model_id, e.version, e.target""",
        project,
    )
    entries = []
    for row in rows:
        aliases = {Alias(k): datetime.fromisoformat(v) for k, v in json.loads(row["aliases"]).items()}
        entries.append(_entry(row, aliases))
    return entries


class ModelLibrary:
    """The read-only face of the library, for the recognizer and the gateway."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        """Read the library in `schema` (the library service's: `settings.schema_for("library")`)."""
        self.pool = pool
        self.schema = schema

    async def snapshot(self) -> Snapshot:
        """Every entry that holds an alias, read in one query."""
        return Snapshot(tuple(await _load(self.pool, self.schema, aliased_only=True)), time.monotonic())

    async def select(self, project: str, domain: Mapping[str, str], target: Target = Target.SERVER) -> Selection:
        """The production and candidate entries that serve a picture (module docstring)."""
        return (await self.snapshot()).select(project, domain, target)

    async def entries(self, project: str | None = None) -> list[Entry]:
        """Every entry (of one project), aliased or not, in model and version order."""
        return await _load(self.pool, self.schema, aliased_only=False, project=project)

    async def get(self, model_id: str, version: int, target: Target = Target.SERVER) -> Entry | None:
        """One entry, or None."""
        for entry in await self.entries():
            if (entry.model_id, entry.version, entry.target) == (model_id, version, target):
                return entry
        return None


# -- writing: the distributor and the CLI only ----------------------------------------------------
@dataclass(frozen=True)
class NewEntry:
    """What `register` needs to know about a model version."""

    model_id: str
    project: str
    class_names: Sequence[str]
    input_size: int
    artifact_uri: str
    artifact_sha256: str
    target: Target = Target.SERVER
    precision: Precision = Precision.FP32
    domain: Mapping[str, str] = field(default_factory=dict)
    version: int | None = None
    """None: the line's next version."""
    artifact_bytes: int | None = None
    metrics: Metrics | None = None
    parent: ModelRef | None = None
    dataset_version: str = "manual"
    """Content hash of the dataset it was trained on; `manual` for hand registrations."""
    package_uri: str | None = None
    package_sha256: str | None = None


UNMEASURED = Metrics(map50_95=0.0, map50=0.0, images=0)
"""What `model registered` carries for an entry registered without metrics: measured on 0 images."""


def _lock_key(model_id: str) -> int:
    digest = hashlib.sha256(f"visionloop.library.{model_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def _aliases_of(conn: asyncpg.Connection, q: str, entry_id: int) -> dict[Alias, datetime]:
    rows = await conn.fetch(f"SELECT alias, set_at FROM {q}.aliases WHERE entry_id = $1", entry_id)
    return {Alias(r["alias"]): r["set_at"] for r in rows}


async def _entry_by_id(conn: asyncpg.Connection, q: str, entry_id: int) -> Entry:
    row = await conn.fetchrow(f"SELECT {_ENTRY_COLUMNS} FROM {q}.entries e WHERE e.id = $1", entry_id)
    return _entry(row, await _aliases_of(conn, q, entry_id))


def announce(unit: Any, entry: Entry) -> None:
    """Emit `model registered` for `entry` as it stands (its aliases included)."""
    unit.emit(
        ModelRegistered(
            lineage=Lineage(
                model=entry.ref,
                parent=entry.parent,
                dataset_version=entry.dataset_version,
                class_names=entry.class_names,
                imgsz=entry.input_size,
            ),
            target=entry.target,
            precision=entry.precision,
            domain=entry.domain,
            artifact_uri=entry.artifact_uri,
            artifact_sha256=entry.artifact_sha256,
            package_uri=entry.package_uri,
            package_sha256=entry.package_sha256,
            aliases=sorted(entry.aliases),
            metrics=entry.metrics or UNMEASURED,
            registered_at=entry.registered_at,
        ),
        project=entry.project,
        correlation_id=f"{entry.model_id}:{entry.version}",
    )


def _schema(unit: Any, schema: str | None) -> str:
    return quote_ident(schema) if schema else unit.schema


async def register(unit: Any, new: NewEntry, *, alias: Alias | None = None, schema: str | None = None) -> Entry:
    """Add a model version to the library (and give it `alias`); emits `model registered`.

    `unit` is a runtime transaction (`Runtime.transaction()`); the library's tables are in
    `schema` (default: the unit's own, as for `Runtime("library", ...)`). Refuses, with a
    `LibraryError`: a model line already used by another project (`model_in_other_project`),
    a version that exists for this target (`version_exists`), and a class list that reorders or
    drops the line's earlier classes (`class_order_changed`: new classes may only be appended).
    """
    conn: asyncpg.Connection = unit.conn
    q = _schema(unit, schema)
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(new.model_id))
    other = await conn.fetchval(
        f"SELECT project FROM {q}.entries WHERE model_id = $1 AND project <> $2 LIMIT 1", new.model_id, new.project
    )
    if other:
        raise LibraryError(
            "model_in_other_project",
            f"model line {new.model_id!r} belongs to project {other!r}; use another model id for {new.project!r}",
        )
    last = await conn.fetchrow(
        f"SELECT version, class_names FROM {q}.entries WHERE model_id = $1 ORDER BY version DESC, id DESC LIMIT 1",
        new.model_id,
    )
    version = new.version or ((last["version"] + 1) if last else 1)
    if last is not None:
        earlier = json.loads(last["class_names"])
        if list(new.class_names[: len(earlier)]) != earlier:
            raise LibraryError(
                "class_order_changed",
                f"{new.model_id} v{last['version']} has classes {earlier}; a later version must keep them "
                f"in that order (new classes may only be appended), got {list(new.class_names)}",
            )
    row = await conn.fetchrow(
        f"""INSERT INTO {q}.entries (model_id, version, target, project, domain, domain_key, class_names,
                input_size, precision, artifact_uri, artifact_sha256, artifact_bytes, package_uri,
                package_sha256, metrics, parent_model_id, parent_version, dataset_version)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7::jsonb, $8, $9, $10, $11, $12, $13, $14, $15::jsonb, $16, $17, $18)
            ON CONFLICT (model_id, version, target) DO NOTHING
            RETURNING id""",
        new.model_id, version, Target(new.target).value, new.project, json.dumps(dict(new.domain)),
        domain_key(new.domain), json.dumps(list(new.class_names)), new.input_size, Precision(new.precision).value,
        new.artifact_uri, new.artifact_sha256, new.artifact_bytes, new.package_uri, new.package_sha256,
        new.metrics.model_dump_json() if new.metrics else None,
        new.parent.model_id if new.parent else None, new.parent.version if new.parent else None,
        new.dataset_version,
    )
    if row is None:
        raise LibraryError(
            "version_exists",
            f"{new.model_id} v{version} is already registered for target {Target(new.target).value}; "
            "register the next version (leave the version out)",
        )
    if alias is not None:
        return await _move_alias(unit, q, row["id"], alias)
    entry = await _entry_by_id(conn, q, row["id"])
    announce(unit, entry)
    return entry


async def set_alias(
    unit: Any, model_id: str, version: int, alias: Alias, *, target: Target = Target.SERVER, schema: str | None = None
) -> Entry:
    """Point `alias` at a registered version; emits `model registered` for every entry it touched.

    `production`: the version that held it becomes `previous` (the old `previous` loses that
    alias); a version promoted from `candidate` stops being the candidate. `candidate`: replaces
    the current candidate. `previous` is managed by promotions and cannot be set directly.
    """
    q = _schema(unit, schema)
    entry_id = await unit.conn.fetchval(
        f"SELECT id FROM {q}.entries WHERE model_id = $1 AND version = $2 AND target = $3",
        model_id, version, Target(target).value,
    )
    if entry_id is None:
        raise LibraryError(
            "no_such_model",
            f"{model_id} v{version} ({Target(target).value}) is not in the library; `visionloop library list` shows what is",
        )
    return await _move_alias(unit, q, entry_id, alias)


@dataclass
class _AliasScope:
    """The aliases of one (project, model, target, domain), locked for a transaction, and the
    entries a move touched (each is announced again)."""

    conn: asyncpg.Connection
    q: str
    scope: tuple[str, str, str, str]
    held: dict[Alias, int | None]
    touched: set[int] = field(default_factory=set)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    async def locked(cls, conn: asyncpg.Connection, q: str, entry_id: int) -> _AliasScope:
        row = await conn.fetchrow(f"SELECT project, model_id, target, domain_key FROM {q}.entries WHERE id = $1", entry_id)
        scope = (row["project"], row["model_id"], row["target"], row["domain_key"])
        # Lock the scope's alias rows so concurrent moves of the same scope serialise.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key("alias:" + "|".join(scope)))
        rows = await conn.fetch(
            f"""SELECT alias, entry_id FROM {q}.aliases
                WHERE project = $1 AND model_id = $2 AND target = $3 AND domain_key = $4""",
            *scope,
        )
        return cls(conn, q, scope, {Alias(r["alias"]): r["entry_id"] for r in rows}, {entry_id})

    async def put(self, name: Alias, target_id: int | None) -> None:
        """Point `name` at `target_id` (None: remove it), recording the move."""
        q, scope, before = self.q, self.scope, self.held.get(name)
        if before == target_id:
            return
        if target_id is None:
            await self.conn.execute(
                f"DELETE FROM {q}.aliases WHERE project = $1 AND model_id = $2 AND target = $3 AND domain_key = $4 AND alias = $5",
                *scope, name.value,
            )
        else:
            await self.conn.execute(
                f"""INSERT INTO {q}.aliases (project, model_id, target, domain_key, alias, entry_id, set_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7)
                    ON CONFLICT (project, model_id, target, domain_key, alias)
                    DO UPDATE SET entry_id = EXCLUDED.entry_id, set_at = EXCLUDED.set_at""",
                *scope, name.value, target_id, self.now,
            )
        await self.conn.execute(
            f"""INSERT INTO {q}.alias_moves (project, model_id, target, domain_key, alias, entry_id, from_entry)
                VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            *scope, name.value, target_id, before,
        )
        self.held[name] = target_id
        self.touched.update(i for i in (before, target_id) if i is not None)


async def _move_alias(unit: Any, q: str, entry_id: int, alias: Alias) -> Entry:
    if alias == Alias.PREVIOUS:
        raise LibraryError(
            "alias_managed", "`previous` is set by promotions; promote a version to production instead"
        )
    conn: asyncpg.Connection = unit.conn
    aliases = await _AliasScope.locked(conn, q, entry_id)
    held = aliases.held
    if alias == Alias.PRODUCTION:
        old = held.get(Alias.PRODUCTION)
        if old != entry_id:
            if held.get(Alias.CANDIDATE) == entry_id:
                await aliases.put(Alias.CANDIDATE, None)
            if held.get(Alias.PREVIOUS) == entry_id:
                await aliases.put(Alias.PREVIOUS, None)
            if old is not None:
                await aliases.put(Alias.PREVIOUS, old)
            await aliases.put(Alias.PRODUCTION, entry_id)
    else:  # candidate
        if held.get(Alias.PRODUCTION) == entry_id:
            raise LibraryError(
                "alias_conflict", "this version is the production model; a candidate must be another version"
            )
        await aliases.put(Alias.CANDIDATE, entry_id)
    entry = None
    for touched_id in sorted(aliases.touched):
        current = await _entry_by_id(conn, q, touched_id)
        if touched_id == entry_id:
            entry = current
        announce(unit, current)
    assert entry is not None
    return entry


class LibraryWriter:
    """The library's write face for the CLI (and tests and benchmarks): a `library` runtime.

    ::

        async with LibraryWriter(settings) as library:
            entry = await library.add(Path("model.onnx").read_bytes(), project="parking", alias=Alias.PRODUCTION)

    Opens the blob store and a runtime of the `library` service (its schema migrated, its outbox
    publishing `model registered`); `add` validates the artifact as a detector, stores it in the
    blob store and registers it; `promote` moves an alias.
    """

    def __init__(self, settings: Any, *, pool: asyncpg.Pool | None = None, blobs: Any = None, runtime: Any = None) -> None:
        """`runtime`: a `library` runtime to write through instead of one of its own (handler tests
        give a `libs.bus.fake.FakeRuntime` on the same pool; it is neither started nor stopped here)."""
        self.settings = settings
        self._pool = pool
        self._own_pool = pool is None
        self._blobs = blobs
        self.runtime: Any = None
        self._given = runtime

    async def __aenter__(self) -> "LibraryWriter":
        from visionloop.libs.blob import open_blob_store
        from visionloop.libs.bus import Runtime
        from visionloop.libs.db import create_pool

        if self._pool is None:
            self._pool = await create_pool(self.settings, min_size=1, max_size=2)
        if self._blobs is None:
            self._blobs = open_blob_store(self.settings.blob_location)
        if self._given is not None:
            self.runtime = self._given
            self.runtime.produces(ModelRegistered)
            await self.runtime.migrate(migrations())
            return self
        self.runtime = Runtime(
            SERVICE, self.settings, pool=self._pool, migrations=migrations(),
            description="The model library (written by the CLI until the distributor exists).",
        )
        self.runtime.produces(ModelRegistered)
        try:
            await self.runtime.start()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runtime is not None and self.runtime is not self._given:
            await self.runtime.stop()
        self.runtime = None
        if self._own_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def reader(self) -> ModelLibrary:
        """The read face on the same database."""
        assert self._pool is not None
        return ModelLibrary(self._pool, self.settings.schema_for(SERVICE))

    async def add(
        self,
        artifact: bytes,
        *,
        project: str,
        class_names: Sequence[str] | None = None,
        input_size: int | None = None,
        model_id: str | None = None,
        domain: Mapping[str, str] | None = None,
        alias: Alias | None = None,
        target: Target = Target.SERVER,
        precision: Precision = Precision.FP32,
        version: int | None = None,
        dataset_version: str = "manual",
        parent: ModelRef | None = None,
        metrics: Metrics | None = None,
        validate: bool = True,
    ) -> Entry:
        """Validate, store and register an ONNX detector; class names and input size default to its metadata.

        `model_id` defaults to `<project>-detector`. Raises `LibraryError` (reason codes of
        `register`, or the inference library's: `not_a_detector`, `class_count_mismatch`, ...).
        """
        if validate:
            from visionloop.libs.inference import Detector, InferenceError

            try:
                detector = Detector(artifact, class_names=class_names, imgsz=input_size, threads=1)
            except InferenceError as exc:
                raise LibraryError(exc.reason, f"the artifact is not a usable detector: {exc.args[0]}") from None
            class_names, input_size = detector.class_names, detector.input_hw[0]
        if not class_names or not input_size:
            raise LibraryError("metadata_missing", "pass the class names (in head order) and the input size")
        ref = await self._blobs.put(artifact, content_type="application/onnx")
        new = NewEntry(
            model_id=model_id or f"{project}-detector", project=project, class_names=list(class_names),
            input_size=input_size, artifact_uri=ref.uri, artifact_sha256=ref.sha256, target=target,
            precision=precision, domain=dict(domain or {}), version=version, artifact_bytes=ref.size,
            metrics=metrics, parent=parent, dataset_version=dataset_version,
        )
        async with self.runtime.transaction() as unit:
            return await register(unit, new, alias=alias)

    async def promote(self, model_id: str, version: int, alias: Alias = Alias.PRODUCTION, *, target: Target = Target.SERVER) -> Entry:
        """Point `alias` at a registered version (see `set_alias`)."""
        async with self.runtime.transaction() as unit:
            return await set_alias(unit, model_id, version, alias, target=target)
