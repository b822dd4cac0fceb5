"""The model library: selection by picture (pure), registration and alias moves (real PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from detector import not_a_detector, onnx_bytes, variant
from helpers import read_topic

from visionloop.contracts import Alias, Envelope, Metrics, ModelRegistered, Precision, Target, topic_of
from visionloop.libs.library import (
    Entry,
    LibraryError,
    LibraryWriter,
    ModelLibrary,
    select,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _entry(model_id: str, version: int = 1, *, project: str = "p", domain: dict[str, str] | None = None,
           aliases: dict[Alias, int] | None = None, target: Target = Target.SERVER) -> Entry:
    return Entry(
        id=hash((model_id, version)) & 0xFFFF, model_id=model_id, version=version, target=target, project=project,
        domain=domain or {}, class_names=["a"], input_size=128, precision=Precision.FP32,
        artifact_uri=f"file:///{model_id}", artifact_sha256="0" * 64, dataset_version="d",
        registered_at=T0, aliases={a: T0 + timedelta(seconds=s) for a, s in (aliases or {}).items()},
    )


def test_the_most_specific_production_entry_serves_the_picture() -> None:
    wide = _entry("wide", domain={}, aliases={Alias.PRODUCTION: 0})
    site = _entry("site", domain={"site": "a"}, aliases={Alias.PRODUCTION: 0})
    camera = _entry("cam", domain={"site": "a", "camera": "gate"}, aliases={Alias.PRODUCTION: 0})
    other = _entry("other", project="q", aliases={Alias.PRODUCTION: 0})
    entries = [wide, site, camera, other]
    assert select(entries, "p", {"site": "a", "camera": "gate"}, Target.SERVER).production is camera
    assert select(entries, "p", {"site": "a", "camera": "dock"}, Target.SERVER).production is site
    assert select(entries, "p", {"site": "b"}, Target.SERVER).production is wide  # unknown domain: project-wide
    assert select(entries, "p", {}, Target.SERVER).production is wide
    assert select(entries, "q", {"site": "a"}, Target.SERVER).production is other
    assert select(entries, "r", {}, Target.SERVER).production is None  # no model
    assert select(entries, "p", {}, Target.EDGE).production is None  # no edge artifact


def test_entries_without_the_alias_never_serve_and_candidates_are_chosen_alike() -> None:
    old = _entry("m", 1, aliases={Alias.PREVIOUS: 0})
    prod = _entry("m", 2, aliases={Alias.PRODUCTION: 1})
    cand = _entry("m", 3, aliases={Alias.CANDIDATE: 2})
    unaliased = _entry("m", 4)
    chosen = select([old, prod, cand, unaliased], "p", {"site": "x"}, Target.SERVER)
    assert chosen.production is prod and chosen.candidate is cand
    assert select([old, unaliased], "p", {}, Target.SERVER).production is None


def test_ties_go_to_the_latest_promotion_then_the_model_id() -> None:
    # equally specific (one tag each), both matching: the one promoted last wins
    by_site = _entry("b-site", domain={"site": "a"}, aliases={Alias.PRODUCTION: 10})
    by_scene = _entry("a-scene", domain={"scene": "night"}, aliases={Alias.PRODUCTION: 20})
    picture = {"site": "a", "scene": "night"}
    assert select([by_site, by_scene], "p", picture, Target.SERVER).production is by_scene
    same_time = _entry("a-site", domain={"site": "a"}, aliases={Alias.PRODUCTION: 10})
    assert select([by_site, same_time], "p", picture, Target.SERVER).production is same_time
    assert select([same_time, by_site], "p", picture, Target.SERVER).production is same_time  # order-free


async def test_register_promote_and_previous(settings, pool) -> None:  # noqa: ANN001
    model = onnx_bytes()
    async with LibraryWriter(settings, pool=pool) as library:
        first = await library.add(model, project="parking", alias=Alias.PRODUCTION)
        assert (first.model_id, first.version, first.class_names) == ("parking-detector", 1, ["circle", "square", "triangle"])
        assert first.input_size == 128 and set(first.aliases) == {Alias.PRODUCTION}
        second = await library.add(variant(model, "v2"), project="parking", alias=Alias.CANDIDATE,
                                   metrics=Metrics(map50_95=0.7, map50=0.9, images=40), dataset_version="ds-2")
        assert second.version == 2 and set(second.aliases) == {Alias.CANDIDATE}
        reader = ModelLibrary(pool, settings.schema_for("library"))
        chosen = await reader.select("parking", {"site": "x"})
        assert chosen.production.version == 1 and chosen.candidate.version == 2

        promoted = await library.promote("parking-detector", 2)
        assert set(promoted.aliases) == {Alias.PRODUCTION}
        by_version = {e.version: set(e.aliases) for e in await reader.entries("parking")}
        assert by_version == {1: {Alias.PREVIOUS}, 2: {Alias.PRODUCTION}}
        # promoting the previous version back is a rollback: the two swap
        await library.promote("parking-detector", 1)
        by_version = {e.version: set(e.aliases) for e in await reader.entries("parking")}
        assert by_version == {1: {Alias.PRODUCTION}, 2: {Alias.PREVIOUS}}
        assert (await reader.get("parking-detector", 2)).metrics.map50 == 0.9

        with pytest.raises(LibraryError) as caught:
            await library.add(model, project="other", model_id="parking-detector")
        assert caught.value.reason == "model_in_other_project"
        with pytest.raises(LibraryError) as caught:
            await library.add(model, project="parking", version=2)
        assert caught.value.reason == "version_exists"
        with pytest.raises(LibraryError) as caught:
            await library.add(not_a_detector(), project="parking", class_names=["a"], input_size=64)
        assert caught.value.reason == "not_a_detector"
        with pytest.raises(LibraryError) as caught:
            await library.add(model, project="parking", validate=False, class_names=["square", "circle", "triangle"], input_size=128)
        assert caught.value.reason == "class_order_changed"
        with pytest.raises(LibraryError) as caught:
            await library.promote("parking-detector", 1, Alias.PREVIOUS)
        assert caught.value.reason == "alias_managed"
        with pytest.raises(LibraryError):
            await library.promote("parking-detector", 9)
    # every registration and move was announced through the outbox, keyed by model id
    events = await read_topic(settings, topic_of(ModelRegistered, settings.topic_prefix), 6)
    parsed = [Envelope[ModelRegistered].model_validate(e) for e in events]
    assert {p.project for p in parsed} == {"parking"}
    assert [(p.payload.lineage.model.version, p.payload.aliases) for p in parsed[:2]] == [(1, ["production"]), (2, ["candidate"])]
    assert parsed[0].payload.metrics.images == 0  # registered by hand: not measured
    assert parsed[1].payload.lineage.dataset_version == "ds-2"


async def test_an_empty_library_selects_nothing(settings, pool) -> None:  # noqa: ANN001
    reader = ModelLibrary(pool, settings.schema_for("library"))  # schema never created
    assert (await reader.select("p", {})).production is None
    assert await reader.entries() == []
