"""The converter: its graph helpers (quantisation, FP16) on real exports, then the service on the
in-memory bus with its SQL on PostgreSQL and real exports of the test suite's detector (`tests/detector.py`, 128 px).

The PyTorch figure the artifacts are held to is measured here as the evaluator measures it
(Ultralytics' predictor at confidence 0.001, `libs/detmetrics`), on 16 synthetic scenes drawn like
the detector's training data; INT8 calibrates on 32 more. Its decisions alone: converter/test_decide.py.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from detector import onnx_bytes, trained

from visionloop.contracts import (
    Box,
    ConversionFailureReason,
    DatasetRef,
    GateFailure,
    GateFailureReason,
    Lineage,
    Metrics,
    ModelConverted,
    ModelEvaluated,
    ModelRef,
    Precision,
    Target,
)
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus
from visionloop.libs.detmetrics import evaluate
from visionloop.libs.inference import Detector, decode_image, letterbox
from visionloop.libs.manifest import Member, manifest
from visionloop.libs.scenes import render_scene
from visionloop.libs.service import Adapters
from visionloop.services.converter.config import ConverterSettings, Policy
from visionloop.services.converter.convert import (
    Job,
    LabelledImage,
    convert,
    dfl_convs,
    input_shape,
    qdq_summary,
    quantize_int8,
    stamp,
    to_fp16,
)
from visionloop.services.converter.service import SPEC

CLASSES = ("circle", "square", "triangle")
TEST_SEEDS = range(7000, 7016)
CALIBRATION_SEEDS = range(8000, 8032)
R = ConversionFailureReason


def _scene(seed: int) -> Any:
    return render_scene(seed=seed, width=160, height=120, classes=CLASSES, objects=(1, 3), size=(0.25, 0.5))


# -- graph helpers on real exports ------------------------------------------------------------



def test_int8_quantises_conv_only_keeps_dfl_float_and_metadata(tmp_path: Path) -> None:
    src = tmp_path / "edge.onnx"
    src.write_bytes(onnx_bytes(128, dynamic=False))
    convs = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Conv"]
    assert len(dfl_convs(onnx.load(str(src)))) == 1
    images = [letterbox(np.asarray(_scene(s).image), 128)[0] for s in CALIBRATION_SEEDS[:8]]
    batch = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255
    out = quantize_int8(src, tmp_path / "int8.onnx", batch)
    stamp(out, source=src, precision="int8")
    model = onnx.load(str(out))
    summary = qdq_summary(model)
    assert summary.quantized == {"Conv": len(convs) - 1} and summary.float_convs == dfl_convs(onnx.load(str(src)))
    assert summary.stray == [], "every QuantizeLinear/DequantizeLinear pair sits on a Conv's input or output"
    assert not any(n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") for n in model.graph.node)
    assert out.stat().st_size < src.stat().st_size / 3
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["visionloop.precision"] == "int8" and meta["imgsz"] == "[128, 128]"
    detector = Detector(out.read_bytes())
    assert detector.class_names == list(CLASSES) and detector.input_hw == (128, 128)
    assert input_shape(out) == [1, 3, 128, 128]
    whole = quantize_int8(src, tmp_path / "all.onnx", batch, keep_dfl_float=False, per_channel=False)
    assert qdq_summary(onnx.load(str(whole))).float_convs == []


def test_int8_of_a_model_whose_layers_share_a_weight_stays_conv_only(tmp_path: Path) -> None:
    """A barely trained model has bitwise-equal weights; the exporter keeps one copy and feeds the
    other layer through an Identity, which the quantiser used to quantise as an activation (seen:
    a 1-epoch model refused as `calibration_failed`, {'Conv': 87, 'Identity': 1})."""
    model = onnx.load_from_string(onnx_bytes(128, dynamic=False))
    weights = {i.name: tuple(i.dims) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights]
    first, second = next((a, b) for a in convs for b in convs if a is not b and weights[a.input[1]] == weights[b.input[1]])
    model.graph.node.insert(0, onnx.helper.make_node("Identity", [first.input[1]], ["weight_alias"], name="alias"))
    second.input[1] = "weight_alias"
    src = tmp_path / "aliased.onnx"
    onnx.save(model, str(src))
    batch = np.random.default_rng(0).random((4, 3, 128, 128), dtype=np.float32)
    summary = qdq_summary(onnx.load(str(quantize_int8(src, tmp_path / "int8.onnx", batch))))
    assert set(summary.quantized) == {"Conv"} and summary.stray == []


def test_fp16_keeps_float32_input_and_class_names(tmp_path: Path) -> None:
    src = tmp_path / "edge.onnx"
    src.write_bytes(onnx_bytes(128, dynamic=False))
    out = to_fp16(src, tmp_path / "fp16.onnx")
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert out.stat().st_size < src.stat().st_size * 0.6
    detector = Detector(out.read_bytes())
    found = detector.predict([np.asarray(_scene(7000).image)], conf=0.25)
    assert detector.class_names == list(CLASSES) and len(found[0]) >= 1


def _labelled(seed: int) -> LabelledImage:
    scene = _scene(seed)
    return LabelledImage(str(seed), scene.encode("PNG"), [Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes])


def test_convert_builds_an_fp16_edge_artifact_at_its_own_size(tmp_path: Path) -> None:
    det = trained()
    policy = Policy(edge_precision="fp16", edge_imgsz=96, fp16_map_tolerance=0.2, parity_images=2)
    job = Job(weights=det.weights, work_dir=tmp_path / "work", state_dir=det.state_dir, imgsz=128, class_names=CLASSES,
              reference_map50_95=_pytorch_metrics().map50_95, policy=policy, test_set=[_labelled(s) for s in TEST_SEEDS])
    server, edge = convert(job)
    assert server.refusal is None and server.input_shape == ["batch", 3, "height", "width"] and server.parity.max_abs_diff_px <= 0.01
    assert edge.refusal is None and (edge.target, edge.precision, edge.input_shape) == (Target.EDGE, Precision.FP16, [1, 3, 96, 96])
    # The reference is PyTorch through the same pipeline at the edge's own 96 px: FP16 reproduces it closely.
    assert abs(edge.parity.map50_95_delta) <= 0.01 and edge.parity.tolerance == 0.2
    assert {"export", "quantize", "raw_parity", "map"} <= set(edge.seconds)
    meta = {p.key: p.value for p in onnx.load(str(edge.path)).metadata_props}
    assert meta["imgsz"] == "[96, 96]" and meta["visionloop.target"] == "edge" and "circle" in meta["names"]


def test_weights_ultralytics_cannot_load_refuse_both_targets(tmp_path: Path) -> None:
    weights = tmp_path / "broken.pt"
    weights.write_bytes(b"not a checkpoint")
    job = Job(weights=weights, work_dir=tmp_path / "work", state_dir=trained().state_dir, imgsz=128, class_names=CLASSES,
              reference_map50_95=0.5, policy=Policy())
    built = convert(job)
    assert [(b.target, b.refusal.reason) for b in built] == [(Target.SERVER, R.EXPORT_FAILED), (Target.EDGE, R.EXPORT_FAILED)]
    assert "cannot load the weights" in built[0].refusal.message


# -- the service ------------------------------------------------------------------------------
@functools.cache
def _pytorch_metrics() -> Metrics:
    """The candidate's test-set figures, measured as the evaluator measures them."""
    from visionloop.services.evaluator.predict import predict

    det = trained()
    scenes = [_scene(s) for s in TEST_SEEDS]
    found = predict(det.state_dir, det.weights, [s.image for s in scenes], imgsz=128, device="cpu")
    truth = {str(s.seed): [Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in s.boxes] for s in scenes}
    preds = {str(s.seed): boxes for s, boxes in zip(scenes, found, strict=True)}
    return evaluate(truth, preds, CLASSES).metrics()


async def _members(blobs: Any, seeds: range, split: str) -> list[Member]:
    members = []
    for seed in seeds:
        scene = _scene(seed)
        data = scene.encode("PNG")
        ref = await blobs.put(data)
        image = {"image_id": ref.sha256, "blob_uri": ref.uri, "width": 160, "height": 120, "format": "PNG", "byte_size": len(data)}
        boxes = [Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name).model_dump(mode="json") for b in scene.boxes]
        members.append(Member(image=image, boxes=boxes, label_hash=f"l{seed}", split=split))
    return members


async def _dataset(blobs: Any, version: str, members: list[Member]) -> DatasetRef:
    ref = await blobs.put(manifest("shapes", version, CLASSES, members), content_type="application/json")
    return DatasetRef(version=version, uri=ref.uri, images=len(members))


def _evaluated(weights: Any, model_id: str, *, passed: bool = True, dataset: DatasetRef | None = None,
               test_set: DatasetRef | None = None, sha256: str | None = None) -> ModelEvaluated:
    return ModelEvaluated(
        lineage=Lineage(model=ModelRef(model_id=model_id, version=1), dataset_version="ds-synthetic", class_names=list(CLASSES), imgsz=128),
        weights_uri=weights.uri, weights_sha256=sha256 or weights.sha256, passed=passed,
        failures=[] if passed else [GateFailure(reason=GateFailureReason.BELOW_FLOOR, message="below the floor")],
        test_set_version=test_set.version if test_set else "none", candidate=_pytorch_metrics(),
        dataset=dataset, test_set=test_set,
    )


def _converted(bus: FakeBus, project: str) -> list[ModelConverted]:
    return [e.payload for e in bus.log if isinstance(e.payload, ModelConverted) and e.project == project]


async def test_passing_model_ships_server_fp32_and_edge_int8_and_parity_refuses_the_rest(fake_bus: FakeBus, tmp_path: Path) -> None:
    """The converter's own wiring on the in-memory bus (libs/bus/fake.py), its SQL on PostgreSQL,
    real exports; the batch consumer's delivery over Kafka is proven in test_bus_batch.py."""
    config = ConverterSettings(projects={"strict": {"int8_map_tolerance": 0.0, "fp32_max_abs_diff_px": 1e-9}})
    pytorch = _pytorch_metrics()
    converter = fake_bus.runtime("converter", pool=fake_bus.pool)  # type: ignore[attr-defined]
    blobs = LocalBlobStore(tmp_path / "blobs")
    SPEC.wire(converter, Adapters(blobs=blobs), config)  # type: ignore[arg-type]
    await converter.migrate(SPEC.migrations)
    pool = fake_bus.pool  # type: ignore[attr-defined]
    weights = await blobs.put(trained().weights.read_bytes())
    test_set = await _dataset(blobs, "ts-synthetic", await _members(blobs, TEST_SEEDS, "test"))
    dataset = await _dataset(blobs, "ds-synthetic", await _members(blobs, CALIBRATION_SEEDS[:24], "train")
                             + await _members(blobs, CALIBRATION_SEEDS[24:], "val"))
    await fake_bus.publish(_evaluated(weights, "gated-detector", passed=False), project="shapes")
    await fake_bus.publish(_evaluated(weights, "broken-detector", sha256="0" * 64, dataset=dataset, test_set=test_set), project="broken")
    for project in ("shapes", "strict"):
        await fake_bus.publish(_evaluated(weights, f"{project}-detector", dataset=dataset, test_set=test_set), project=project)
    await fake_bus.publish(_evaluated(weights, "bare-detector", dataset=dataset), project="bare")
    schema = converter.schema

    # A candidate that failed the gate is recorded and skipped: nothing is built or emitted for it.
    assert converter.counters["skipped_failed_gate"] == 1
    skipped = await pool.fetchrow(f'SELECT * FROM "{schema}".models WHERE model_id = $1', "gated-detector")
    assert skipped["outcome"] == "skipped_failed_gate" and not skipped["passed_gate"]
    # Weights that are not the ones the event names can never convert: dead-lettered at once.
    ((dead, why),) = converter.dead_letters
    assert dead.project == "broken" and "hash to" in str(why)

    (shapes,) = _converted(fake_bus, "shapes")
    assert shapes.refused == [] and shapes.metrics == pytorch and shapes.lineage.model.model_id == "shapes-detector"
    server, edge = sorted(shapes.artifacts, key=lambda a: a.target.value != "server")
    assert (server.target, server.precision, server.input_shape) == (Target.SERVER, Precision.FP32, ["batch", 3, "height", "width"])
    assert (edge.target, edge.precision, edge.input_shape) == (Target.EDGE, Precision.INT8, [1, 3, 128, 128])
    assert server.parity.passed and server.parity.max_abs_diff_px <= 0.01
    assert abs(server.parity.map50_95_delta) <= 0.01 and server.parity.tolerance == 0.01
    assert edge.parity.passed and abs(edge.parity.map50_95_delta) <= 0.02 and edge.parity.tolerance == 0.02
    # Both artifacts are compared with PyTorch through their own pipeline at 128 px: one reference.
    reference = server.parity.map50_95 - server.parity.map50_95_delta
    assert edge.parity.map50_95 - edge.parity.map50_95_delta == pytest.approx(reference, abs=2e-4)
    assert abs(reference - pytorch.map50_95) <= 0.03, "the pipeline's PyTorch figure is near the evaluator's"

    # The server artifact takes any batch; the edge one is INT8 (Conv only), smaller than its FP32 export.
    images = [decode_image(_scene(s).encode("PNG")) for s in TEST_SEEDS[:3]]
    served = Detector(await blobs.get(server.uri), imgsz=128)
    assert served.max_batch is None and served.class_names == list(CLASSES)
    assert served.run(served.prepare(images)[0]).shape[:2] == (3, 7)
    assert all(len(found) >= 1 for found in served.predict(images, conf=0.25))
    edge_bytes = await blobs.get(edge.uri)
    assert edge.size_bytes == len(edge_bytes) < len(onnx_bytes(128, dynamic=False)) / 3
    summary = qdq_summary(onnx.load_from_string(edge_bytes))
    assert set(summary.quantized) == {"Conv"} and summary.stray == [] and len(summary.float_convs) == 1
    on_edge = Detector(edge_bytes)
    assert on_edge.class_names == list(CLASSES) and on_edge.input_hw == (128, 128) and on_edge.max_batch == 1
    rows = await pool.fetch(f'SELECT * FROM "{schema}".conversions WHERE model_id = $1 ORDER BY target', "shapes-detector")
    assert [(r["target"], r["outcome"], r["artifact_sha256"]) for r in rows] == [("edge", "shipped", edge.sha256), ("server", "shipped", server.sha256)]
    assert json.loads(rows[0]["input_shape"]) == [1, 3, 128, 128] and "quantize" in json.loads(rows[0]["seconds"])

    # Tolerances nothing can meet: both refused, with reasons and numbers; the event still goes out.
    (strict,) = _converted(fake_bus, "strict")
    assert strict.artifacts == []
    refused = {r.target: r for r in strict.refused}
    assert refused[Target.SERVER].reason is R.PARITY_FAILED and "fp32_max_abs_diff_px 1e-09" in refused[Target.SERVER].message
    assert refused[Target.EDGE].precision is Precision.INT8
    assert refused[Target.EDGE].reason in (R.ACCURACY_DROP, R.PARITY_FAILED) and "int8_map_tolerance 0.0000" in refused[Target.EDGE].message
    assert "PyTorch's 0." in refused[Target.EDGE].message
    rows = await pool.fetch(f'SELECT * FROM "{schema}".conversions WHERE project = $1', "strict")
    assert {r["outcome"] for r in rows} == {"refused"} and all(r["map50_95"] is not None for r in rows)

    # No test set: the server artifact ships on raw parity alone; INT8 has nothing to prove its accuracy on.
    (bare,) = _converted(fake_bus, "bare")
    (only,) = bare.artifacts
    assert only.target is Target.SERVER and only.parity.passed and only.parity.map50_95 is None
    assert only.parity.max_abs_diff_px <= 0.01
    (no_edge,) = bare.refused
    assert no_edge.target is Target.EDGE and no_edge.reason is R.PARITY_FAILED and "no test set" in no_edge.message

    assert converter.counters["converted"] == 3
    assert converter.counters["refused_parity_failed"] + converter.counters["refused_accuracy_drop"] == 3
    assert not list((converter.settings.state_dir / "converter" / "work").iterdir()), "scratch folders are removed"


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


