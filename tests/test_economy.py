"""The labelling economy: per model version test mAP, human seconds, auto-accept rate and
precision, and the queue depth over time — assembled (pure), drawn as SVG for the dashboard,
written as Markdown and PNG by `visionloop report`, and read from the gateway's tables (one
test on PostgreSQL, through the HTTP endpoint and the report's loader)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from visionloop.contracts import Box, Detection, ImageRef, LabelActions, Metrics, ModelRef, Provenance, VerificationMethod
from visionloop.services.labeling_gateway.economy import (
    EconomyRows,
    Evaluation,
    HumanAnswer,
    QueueSpan,
    ServiceStart,
    SpotCheck,
    VerifiedLabel,
    assemble,
    in_service,
    queue_series,
    version_axis,
)
from visionloop.services.labeling_gateway.svg import category_chart, economy_plots, nice_ticks

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
V1, V2 = ("econ-detector", 1), ("econ-detector", 2)
IMG = {name: hashlib.sha256(name.encode()).hexdigest() for name in "ABCDI"}


def _at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def _rows() -> EconomyRows:
    """v1 enters service at minute 10, v2 at 60; work before 10 belongs to no model."""
    return EconomyRows(
        evaluations=[Evaluation(model=V1, map50_95=0.41, map50=0.7, passed=True, test_set_version="ts1", at=_at(9)),
                     Evaluation(model=V2, map50_95=0.55, map50=0.8, passed=True, test_set_version="ts1", at=_at(59)),
                     Evaluation(model=("econ-detector", 3), map50_95=0.5, map50=0.78, passed=False, test_set_version="ts1", at=_at(90))],
        service=[ServiceStart(model=V1, first_seen=_at(10)), ServiceStart(model=V2, first_seen=_at(60))],
        answers=[
            HumanAnswer(kind="annotate", seconds=90.0, answered_at=_at(5)),             # before any model
            HumanAnswer(kind="annotate", seconds=40.0, answered_at=_at(30)),            # no pre-labels: v1 in service
            HumanAnswer(kind="review", seconds=20.0, answered_at=_at(70), model=V1),    # v1's pre-labels, answered under v2
            HumanAnswer(kind="review", seconds=10.0, answered_at=_at(80), model=V2),
        ],
        verified=[
            VerifiedLabel(method="human", at=_at(6)),
            VerifiedLabel(method="auto", at=_at(20), model=V1),
            VerifiedLabel(method="human", at=_at(31)),
            VerifiedLabel(method="human", at=_at(71), model=V1),
            VerifiedLabel(method="auto", at=_at(75), model=V2),
            VerifiedLabel(method="auto", at=_at(76), model=V2),
            VerifiedLabel(method="consensus", at=_at(77), model=V2),
            VerifiedLabel(method="import", at=_at(1)),                                  # left out
            VerifiedLabel(method="human", at=_at(78), model=V2, for_test_set=True),     # left out
        ],
        spot_checks=[
            SpotCheck(model=V2, prelabels=4, deleted=1, relabelled=0, unchanged=2, drawn=1, at=_at(81)),
            SpotCheck(model=V2, prelabels=6, deleted=0, relabelled=1, unchanged=5, drawn=0, at=_at(82)),
        ],
        queue=[QueueSpan("annotate", _at(0), _at(5)), QueueSpan("annotate", _at(25), _at(30)),
               QueueSpan("review", _at(65), _at(70)), QueueSpan("review", _at(66), None)],
    )


# -- the assembly ------------------------------------------------------------------------------------


def test_in_service_is_the_newest_version_seen_by_then() -> None:
    starts = _rows().service
    assert in_service(starts, _at(5)) is None
    assert in_service(starts, _at(10)) == V1 and in_service(starts, _at(59)) == V1
    assert in_service(starts, _at(61)) == V2


def test_figures_per_version_follow_the_attribution_rule() -> None:
    economy = assemble("econ", _rows(), now=_at(100))
    by = {v.label: v for v in economy.versions}
    assert list(by) == ["no model", "econ-detector v1", "econ-detector v2", "econ-detector v3"]
    none, v1, v2, v3 = by.values()
    assert (none.human_tasks, none.human_seconds, none.verified, none.auto_accept_rate) == (1, 90.0, 1, 0.0)
    assert (v1.map50_95, v1.passed) == (0.41, True)
    assert (v1.human_tasks, v1.human_seconds, v1.seconds_per_task) == (2, 60.0, 30.0)
    assert v1.tasks_by_kind == {"annotate": 1, "review": 1}
    assert (v1.verified, v1.auto_accepted, v1.auto_accept_rate) == (3, 1, pytest.approx(1 / 3))
    assert (v2.verified, v2.auto_accepted, v2.auto_accept_rate) == (3, 2, pytest.approx(2 / 3))
    # spot checks: 10 boxes, 1 deleted, 1 relabelled -> 8 kept; 7 unchanged; 1 missed
    assert (v2.spot_checked_images, v2.spot_checked_boxes, v2.boxes_kept, v2.boxes_unchanged, v2.boxes_missed) == (2, 10, 8, 7, 1)
    assert v2.auto_accept_precision == pytest.approx(0.8)
    assert v1.auto_accept_precision is None and v1.spot_checked_boxes == 0
    assert (v3.map50_95, v3.passed, v3.human_tasks, v3.auto_accept_rate) == (0.5, False, 0, None)
    assert set(economy.rules) >= {"human_seconds", "attribution", "auto_accept_rate", "auto_accept_precision", "queue"}


def test_queue_depth_is_derived_from_task_spans() -> None:
    rows = _rows()
    series = queue_series(rows.queue, now=_at(100), samples=101)
    assert len(series.times) == 101 and series.times[0] == _at(0) and series.times[-1] == _at(100)
    assert list(series.depth) == ["annotate", "review", "all"]
    assert series.depth["annotate"][0] == 1 and series.depth["annotate"][5] == 0 and series.depth["annotate"][26] == 1
    assert series.depth["review"][67] == 2 and series.depth["review"][70] == 1 and series.depth["review"][100] == 1
    summary = {s.kind: s for s in series.summary}
    assert (summary["review"].now, summary["review"].peak, summary["review"].peak_at) == (1, 2, _at(66))
    assert (summary["annotate"].now, summary["annotate"].peak) == (0, 1)
    # annotate was open 10 of 100 minutes; review 5 + 34 task-minutes
    assert summary["annotate"].mean == pytest.approx(0.1) and summary["review"].mean == pytest.approx(0.39)
    assert queue_series([], now=_at(1)).times == []


# -- the SVG plots ---------------------------------------------------------------------------------------


def test_svg_plots_have_a_point_per_version_axis_titles_and_hover_values() -> None:
    plots = economy_plots(assemble("econ", _rows(), now=_at(100)))
    assert set(plots) == {"map50_95", "human_seconds", "seconds_per_task", "auto_accept", "queue"}
    accuracy = plots["map50_95"]
    assert accuracy.startswith("<svg") and 'role="img"' in accuracy and "<title" in accuracy and "<desc" in accuracy
    assert accuracy.count('class="point"') == 3 and 'class="line"' in accuracy  # three evaluated versions
    assert ">model version (econ-detector)</text>" in accuracy and ">mAP50-95</text>" in accuracy and ">v3</text>" in accuracy
    assert "econ-detector v3: mAP50-95 0.500, mAP50 0.780 (failed the gate; test set ts1)" in accuracy
    assert plots["human_seconds"].count('class="bar"') == 3  # no model, v1, v2 answered tasks
    assert plots["auto_accept"].count('class="point"') == 3 + 1  # rate: no model, v1, v2; precision: v2
    assert "80.0 % of 10 boxes kept on 2 spot-checked images" in plots["auto_accept"]
    assert plots["queue"].count('class="line"') == 3 and ">open tasks</text>" in plots["queue"]
    for svg in plots.values():
        assert "style=" not in svg and "<script" not in svg  # the dashboard's CSP allows neither


def test_svg_escapes_data_and_says_when_empty() -> None:
    two = assemble("econ", EconomyRows(evaluations=[Evaluation(("a", 1), 0.1, 0.2, True, "ts", _at(0)),
                                                    Evaluation(("b", 1), 0.1, 0.2, True, "ts", _at(0))]), now=_at(1))
    assert version_axis(two.versions) == (["a v1", "b v1"], "model version")
    svg = category_chart("A <b> chart", ["v<1>"], [], x_label="x & y", y_label="y")
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "x &amp; y" in svg and "no data yet" in svg
    empty = economy_plots(assemble("econ", EconomyRows(), now=_at(0)))
    assert "no model.evaluated event yet" in empty["map50_95"] and "no task yet" in empty["queue"]
    assert nice_ticks(0.61) == [0, 0.2, 0.4, 0.6, 0.8] and nice_ticks(1.0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


# -- the report -------------------------------------------------------------------------------------------


def test_report_writes_markdown_and_png_plots(tmp_path: Path) -> None:
    from visionloop.report import PLOTS, markdown, write_report

    economy = assemble("econ", _rows(), now=_at(100))
    path, text = write_report(economy, tmp_path / "out")
    assert path == tmp_path / "out" / "report.md" and path.read_text() == text
    for name in PLOTS:
        png = tmp_path / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"]({name}.png)" in text
    assert "| econ-detector v1 | 0.410 | passed | 2 | 60 | 30.0 | 3 | 1 | 33.3 % | 0 | 0 / 0 | – | 0 / 0 / 0 |" in text
    assert "| econ-detector v2 | 0.550 | passed | 1 | 10 | 10.0 | 3 | 2 | 66.7 % | 2 | 8 / 10 | 80.0 % | 1 / 1 / 1 |" in text
    assert "| review | 1 | 2 | 2025-03-01 09:06:00 | 0.4 |" in text
    assert "**auto_accept_precision**" in text
    nothing = markdown(assemble("econ", EconomyRows(), now=_at(0)))
    assert "Nothing yet" in nothing and "No task yet." in nothing


def test_report_is_a_command_of_the_cli() -> None:
    from typer.testing import CliRunner

    from visionloop.cli import app

    shown = CliRunner().invoke(app, ["report", "--help"])
    assert shown.exit_code == 0 and "--out" in shown.output and "PROJECT" in shown.output


# -- from the gateway's tables (PostgreSQL) -----------------------------------------------------------------


async def _scenario(pool, s: str) -> None:  # noqa: ANN001
    """Four tasks: A annotated before any model, B under v1, C a spot check of v1's pre-labels,
    D auto-accepted; their labels verified; v1 evaluated."""
    from visionloop.contracts import ModelEvaluated
    from visionloop.contracts.model import Lineage
    from visionloop.services.labeling_gateway import economy_store, store

    v1 = ModelRef(model_id="econ-detector", version=1)
    car = Detection(x1=1, y1=1, x2=20, y2=20, class_name="car", score=0.9)
    bus = Detection(x1=30, y1=30, x2=60, y2=60, class_name="car", score=0.8)
    async with pool.acquire() as conn:
        await store.ensure_project(conn, s, "econ", created_by="test", class_names=["car"])
        for name in "ABCD":
            await store.upsert_image(conn, s, "econ", ImageRef(image_id=IMG[name], blob_uri=f"file:///{name}.jpg", width=100, height=100,
                                                                format="jpeg", byte_size=10))
        await store.add_model_version(conn, s, "econ", v1)
        await conn.execute(f"UPDATE {s}.model_versions SET first_seen = $1", _at(10))
        tasks = [store.NewTask(project="econ", image_id=IMG["A"], kind="annotate", state="submitted", priority=1, task_id="A"),
                 store.NewTask(project="econ", image_id=IMG["B"], kind="annotate", state="submitted", priority=1, task_id="B"),
                 store.NewTask(project="econ", image_id=IMG["C"], kind="review", state="submitted", priority=1, task_id="C",
                               start_boxes=[car, bus], prelabel_model=v1),
                 store.NewTask(project="econ", image_id=IMG["D"], kind="review", state="done", priority=1, task_id="D",
                               start_boxes=[car], prelabel_model=v1)]
        await store.insert_tasks(conn, s, tasks)
        for task_id, created in (("A", 0), ("B", 20), ("C", 29), ("D", 40)):
            await conn.execute(f"UPDATE {s}.tasks SET created_at = $2, updated_at = $2 WHERE task_id = $1", task_id, _at(created))
        await conn.execute(f"UPDATE {s}.tasks SET spot_check = true WHERE task_id = 'C'")
        for task_id, outcome, at in (("C", "rejected", 30), ("D", "verified", 41)):
            await store.insert_submission(conn, s, store.SubmissionRow(
                submission_id=f"pre-{task_id}", task_id=task_id, project="econ", image_id=IMG[task_id], user_id="model", role="model",
                source="prelabel", kind="review", decision=None, boxes=[car], actions={}, opened_at=None, submitted_at=_at(at - 1), duration_s=None))
            await conn.execute(f"UPDATE {s}.submissions SET outcome = $2, outcome_at = $3 WHERE submission_id = $1", f"pre-{task_id}", outcome, _at(at))
        kept = LabelActions(prelabels_accepted=1, boxes_deleted=1, boxes_drawn=1).model_dump()
        for task_id, kind, answered, seconds, actions in (("A", "annotate", 5, 60.0, {}), ("B", "annotate", 25, 30.0, {}), ("C", "review", 32, 20.0, kept)):
            await store.insert_submission(conn, s, store.SubmissionRow(
                submission_id=f"s-{task_id}", task_id=task_id, project="econ", image_id=IMG[task_id], user_id="ann", role="annotator",
                source="gateway", kind=kind, decision=None, boxes=[Box(x1=1, y1=1, x2=20, y2=20, class_name="car")], actions=actions,
                opened_at=_at(answered) - timedelta(seconds=seconds), submitted_at=_at(answered), duration_s=seconds))
        for label, method, model, at in (("A", "human", None, 6), ("B", "human", None, 26), ("C", "human", v1, 33), ("D", "auto", v1, 41),
                                         ("I", "import", None, 1)):
            await economy_store.record_verified(conn, s, "econ", label_id=f"l-{label}", image_id=IMG[label], for_test_set=False,
                                                provenance=Provenance(method=VerificationMethod(method), prelabel_model=model), at=_at(at))
        lineage = Lineage(model=v1, dataset_version="d1", class_names=["car"], imgsz=64)
        evaluated = ModelEvaluated(lineage=lineage, weights_uri="file:///w.pt", weights_sha256="0" * 64, passed=True,
                                   test_set_version="ts1", candidate=Metrics(map50_95=0.42, map50=0.7, images=12))
        await economy_store.record_evaluation(conn, s, "econ", evaluated, _at(9))
        await economy_store.record_evaluation(conn, s, "econ", evaluated.model_copy(update={"candidate": Metrics(map50_95=0.1, map50=0.2)}), _at(8))


async def test_gateway_tables_feed_the_endpoint_and_the_report(database_url: str, tmp_path: Path) -> None:
    import asyncpg

    from visionloop.app import build_runtime
    from visionloop.libs.blob import LocalBlobStore
    from visionloop.libs.db import BUS_MIGRATIONS, discover, migrate, quote_ident
    from visionloop.libs.service import Adapters
    from visionloop.libs.settings import Settings
    from visionloop.report import ReportUnavailable, load, run_report
    from visionloop.services.labeling_gateway import store
    from visionloop.services.labeling_gateway.auth import Role
    from visionloop.services.labeling_gateway.service import SPEC

    tag = uuid.uuid4().hex[:8]
    settings = Settings(database_url=database_url, schema_prefix=f"t{tag}_", topic_prefix=f"t{tag}.", state_dir=tmp_path / "state",
                        kafka_bootstrap="127.0.0.1:9", instance=f"test-{tag}")
    schema = settings.schema_for("labeling-gateway")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    try:
        await migrate(pool, schema, discover("bus", BUS_MIGRATIONS) + SPEC.migrations)
        s = quote_ident(schema)
        await _scenario(pool, s)
        _, app = build_runtime(SPEC, settings, pool, Adapters(blobs=LocalBlobStore(tmp_path / "blobs")))
        async with pool.acquire() as conn:
            _, token = await store.create_token(conn, s, project="econ", role=Role.ANNOTATOR, user_id="ann", created_by="test")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            assert (await http.get("/v1/projects/econ/economy")).status_code == 401
            answer = await http.get("/v1/projects/econ/economy", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
            plots = await http.get("/v1/projects/econ/economy/plots", headers={"Authorization": f"Bearer {token}"})
            assert plots.status_code == 200 and plots.json()["plots"]["map50_95"].startswith("<svg")
        data = answer.json()
        by = {v["label"]: v for v in data["versions"]}
        assert list(by) == ["no model", "econ-detector v1"]
        none, v1 = by["no model"], by["econ-detector v1"]
        assert (none["human_tasks"], none["human_seconds"], none["verified"], none["auto_accepted"]) == (1, 60.0, 1, 0)
        assert (v1["map50_95"], v1["human_tasks"], v1["human_seconds"], v1["verified"], v1["auto_accepted"]) == (0.42, 2, 50.0, 3, 1)
        assert (v1["spot_checked_images"], v1["spot_checked_boxes"], v1["boxes_kept"], v1["boxes_missed"]) == (1, 2, 1, 1)
        assert v1["auto_accept_precision"] == 0.5
        summary = {k["kind"]: k for k in data["queue"]["summary"]}
        assert set(summary) == {"annotate", "review", "all"}  # D was auto-accepted: never in the people's queue
        assert (summary["annotate"]["peak"], summary["annotate"]["now"], summary["review"]["now"]) == (1, 0, 0)
        assert summary["review"]["peak_at"].startswith("2025-03-01T08:30:00")  # C joined when the verifier refused it
        # The CLI's loader reads the same tables into the same numbers.
        economy = await load(settings, "econ")
        assert json.loads(economy.model_dump_json(include={"versions"})) == {"versions": data["versions"]}
        # `visionloop report econ` prints the Markdown and writes it with the plots; an unknown project is refused.
        printed: list[str] = []
        assert await asyncio.to_thread(run_report, settings, "econ", tmp_path / "report", echo=printed.append) == 0
        assert (tmp_path / "report" / "report.md").read_text() == printed[0] and (tmp_path / "report" / "queue.png").is_file()
        assert "| econ-detector v1 | 0.420 | passed | 2 | 50 | 25.0 | 3 | 1 | 33.3 % | 1 | 1 / 2 | 50.0 % | 1 / 0 / 1 |" in printed[0]
        with pytest.raises(ReportUnavailable, match=r"knows no project 'nowhere' \(projects: econ\)"):
            await load(settings, "nowhere")
        assert await asyncio.to_thread(run_report, settings, "nowhere", tmp_path / "none") == 1
    finally:
        await pool.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
        await pool.close()

