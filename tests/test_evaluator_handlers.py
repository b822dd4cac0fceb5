"""The evaluator's run-time gate settings and `rejudge` on the in-memory bus (libs/bus/fake.py):
its own wiring, its SQL on PostgreSQL, no Kafka and no measuring (the figures are stored)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from visionloop.contracts import (
    DatasetRef,
    Envelope,
    GateFailure,
    GateFailureReason,
    Lineage,
    Metrics,
    ModelEvaluated,
    ModelRef,
    ModelRejudgeRequested,
    ModelTrained,
    TrainMetrics,
)
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus, FakeRuntime, of_type
from visionloop.libs.db import quote_ident
from visionloop.libs.service import Adapters
from visionloop.services.evaluator import decide, store
from visionloop.services.evaluator.config import EvaluatorSettings
from visionloop.services.evaluator.service import SPEC

REF = ModelRef(model_id="yard-detector", version=1)
TRAINED = ModelTrained(
    lineage=Lineage(model=REF, dataset_version="ds-1", class_names=["car"], imgsz=256),
    run_id="run-1", weights_uri="file:///w.pt", weights_sha256="0" * 64, metrics=TrainMetrics(epochs=8, train_images=474, val_images=0),
    hyperparameters={}, device="cpu", duration_s=960.0, dataset=DatasetRef(version="ds-1", uri="file:///m.json", images=474),
    test_set=DatasetRef(version="ts-1", uri="file:///t.json", images=100),
)
FIRST = Metrics(map50_95=0.035, map50=0.09, images=100, image_agreement=0.6)


async def evaluator(bus: FakeBus) -> FakeRuntime:
    runtime = bus.runtime("evaluator", pool=bus.pool)  # type: ignore[attr-defined]
    SPEC.wire(runtime, Adapters(blobs=LocalBlobStore(runtime.settings.state_dir / "blobs")), EvaluatorSettings())  # type: ignore[arg-type]
    await runtime.migrate(SPEC.migrations)
    return runtime


async def gated_once(runtime: FakeRuntime) -> None:
    """What the evaluator kept of a first model it failed at the default floor (0.30)."""
    s = quote_ident(runtime.schema)
    failure = GateFailure(reason=GateFailureReason.BELOW_FLOOR, message="below", metric="map50_95", value=0.035, threshold=0.3)
    async with runtime.pool.acquire() as conn:  # type: ignore[union-attr]
        await store.record_model(conn, s, "yard", TRAINED, passed=False, failures=[failure])
        await store.record_evaluation(conn, s, "yard", REF, "ts-1", FIRST, "file:///report.json")


async def test_a_floor_changed_at_run_time_lets_a_rejudge_pass_the_same_model(fake_bus: FakeBus) -> None:
    runtime = await evaluator(fake_bus)
    await gated_once(runtime)
    rejudge = Envelope.of(ModelRejudgeRequested(model=REF, requested_by="ann"), producer="cli", project="yard")
    (again,) = of_type(await fake_bus.deliver(rejudge), ModelEvaluated)
    assert not again.passed and [f.reason for f in again.failures] == [GateFailureReason.BELOW_FLOOR]  # nothing changed yet
    s = quote_ident(runtime.schema)
    merged = decide.changed_overrides(EvaluatorSettings().policy("yard"), {}, {"map50_95_floor": "0.03"})
    await store.set_gate_overrides(fake_bus.pool, s, "yard", merged, "ann")  # type: ignore[attr-defined]
    later = Envelope.of(ModelRejudgeRequested(model=REF, requested_by="ann"), producer="cli", project="yard")
    (passed,) = of_type(await fake_bus.deliver(later), ModelEvaluated)
    assert passed.passed and passed.candidate == FIRST and passed.report_uri == "file:///report.json"
    assert passed.lineage == TRAINED.lineage and passed.weights_uri == TRAINED.weights_uri  # the same model: no retraining
    row = await store.gated_model(fake_bus.pool, s, REF.model_id, None)  # type: ignore[attr-defined]
    assert (row["version"], row["passed"]) == (1, True)


async def test_a_rejudge_of_a_model_never_gated_emits_nothing(fake_bus: FakeBus) -> None:
    runtime = await evaluator(fake_bus)
    unknown = ModelRejudgeRequested(model=ModelRef(model_id="nobody", version=3))
    assert of_type(await fake_bus.publish(unknown, project="yard"), ModelEvaluated) == []
    assert runtime.counters["rejudge_unknown_model"] == 1


def test_run_time_settings_are_checked_by_name_and_range() -> None:
    base = EvaluatorSettings().policy("yard")
    assert decide.changed_overrides(base, {"agreement_floor": 0.2}, {"map50_95_floor": "0.05"}) == {"agreement_floor": 0.2, "map50_95_floor": 0.05}
    assert decide.changed_overrides(base, {"agreement_floor": 0.2}, {}, unset=["agreement_floor"]) == {}
    with pytest.raises(decide.SettingRefused, match="did you mean map50_95_floor") as unknown:
        decide.changed_overrides(base, {}, {"map_floor": "0.1"})
    assert unknown.value.reason == "unknown_setting"
    with pytest.raises(decide.SettingRefused) as out_of_range:
        decide.changed_overrides(base, {}, {"map50_95_floor": "1.5"})
    assert out_of_range.value.reason == "invalid_value"
    with pytest.raises(decide.SettingRefused, match="not a gate setting"):
        decide.changed_overrides(base, {}, {"device": "cuda"})
    assert decide.with_overrides(base, {"map50_95_floor": 0.05}).map50_95_floor == 0.05


def test_the_cli_sets_shows_and_refuses_gate_settings(database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """`visionloop evaluator set` / `show` on the database alone (no broker needed)."""
    import uuid

    from typer.testing import CliRunner

    from visionloop.cli import app

    monkeypatch.setenv("VL_DATABASE_URL", database_url)
    monkeypatch.setenv("VL_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    monkeypatch.setenv("VL_SCHEMA_PREFIX", prefix)
    monkeypatch.setenv("VL_STATE_DIR", str(tmp_path))
    runner = CliRunner()
    done = runner.invoke(app, ["evaluator", "set", "yard", "map50_95_floor=0.05"])
    assert done.exit_code == 0, done.output
    assert "map50_95_floor" in done.output and "0.05" in done.output and "set at run time" in done.output
    shown = runner.invoke(app, ["evaluator", "show", "yard"])
    assert shown.exit_code == 0 and "set at run time" in shown.output
    refused = runner.invoke(app, ["evaluator", "set", "yard", "map_floor=0.05"])
    assert refused.exit_code == 2 and "unknown_setting" in refused.output and "map50_95_floor" in refused.output
    unknown = runner.invoke(app, ["evaluator", "rejudge", "nobody@v1"])
    assert unknown.exit_code == 2 and "unknown_model" in unknown.output
    asyncio.run(_drop(database_url, f"{prefix}evaluator"))


async def _drop(database_url: str, schema: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
