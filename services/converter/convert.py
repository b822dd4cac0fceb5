"""Export, quantise and check: the converter's work, without the bus.

`convert(job)` turns PyTorch weights into the two artifacts of the loop and decides, with
`judge`, whether each may ship:

- **server**: ONNX FP32 with dynamic batch, height and width, exported by Ultralytics at the
  size the model was trained at;
- **edge**: ONNX with a static `1x3xSxS` input, then (by default) INT8: ONNX Runtime's static
  quantisation in QDQ form of the Conv layers only, calibrated on letterboxed training images.
  FP16 and FP32 are the other choices.

Parity, for each artifact:

1. Raw outputs: the same letterboxed images through PyTorch (`YOLO(pt).model`, eval, float32)
   and through ONNX Runtime; the largest difference of the box rows (the first four channels,
   input pixels) is recorded, and an FP32 artifact beyond `fp32_max_abs_diff_px` is refused
   (`parity_failed`). A reduced-precision artifact differs by design: its difference is recorded,
   its accuracy is what is judged.
2. Accuracy: the artifact's test-set mAP50-95 (`libs/inference.Detector` at confidence 0.001,
   NMS IoU 0.7, as the evaluator measures PyTorch) must be within the precision's tolerance of
   the PyTorch model's figure from the evaluator: below it is `accuracy_drop`, above it
   `parity_failed` (the artifact then does not reproduce the gated model, whatever its score).

Without a test set there is no accuracy to compare: an FP32 artifact ships on raw parity alone
(it computes what the gated model computes), a reduced-precision one is refused, since nothing
could show that quantisation kept it accurate.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from visionloop.contracts import (
    Box,
    ConversionFailureReason,
    Parity,
    Precision,
    RefusedArtifact,
    Target,
)
from visionloop.libs.detmetrics import evaluate
from visionloop.libs.inference import Detector, decode_image, letterbox, postprocess, to_tensor
from visionloop.services.converter.config import Policy
from visionloop.services.converter.decide import ConversionError, box_diff, judge

log = logging.getLogger(__name__)

PREDICT_CONF = 0.001
"""Lowest score kept for mAP (the evaluator's and Ultralytics' validator's value)."""
PREDICT_IOU = 0.7
"""NMS IoU of the evaluator's measurement."""
MAX_DET = 300

_lock = threading.Lock()
"""One conversion at a time per process: export and calibration already use every core."""


@dataclass(frozen=True)
class LabelledImage:
    """One test-set image: its id, its encoded bytes and its labels."""

    image_id: str
    data: bytes
    boxes: Sequence[Box]


@dataclass(frozen=True)
class Job:
    """Everything one conversion needs, already fetched."""

    weights: Path
    work_dir: Path
    """Scratch folder of this conversion (the artifacts are written here)."""
    state_dir: Path
    """Where Ultralytics keeps its private configuration."""
    imgsz: int
    class_names: Sequence[str]
    """The model's classes in head order (the lineage's)."""
    reference_map50_95: float
    """The PyTorch model's test-set mAP50-95 (the evaluator's figure)."""
    policy: Policy
    test_set: Sequence[LabelledImage] | None = None
    """None: the event named no test set (accuracy parity is skipped)."""
    metric_classes: Sequence[str] = ()
    """Classes mAP is averaged over (the test set's list); empty: `class_names`."""
    calibration: Sequence[bytes] = ()
    """Encoded training images for INT8 calibration."""
    model_tag: str = ""
    """Written to the artifacts' metadata (`visionloop.model`)."""


@dataclass
class Built:
    """One target's outcome: an artifact file that may ship, or the refusal."""

    target: Target
    precision: Precision
    parity: Parity
    path: Path | None = None
    input_shape: list[int | str] = field(default_factory=list)
    refusal: RefusedArtifact | None = None
    seconds: dict[str, float] = field(default_factory=dict)


# -- ONNX graphs ------------------------------------------------------------------------------
def dfl_convs(model: Any) -> list[str]:
    """Names of the Conv nodes that are a YOLO head's DFL projection: a fixed `1xCx1x1` weight 0..C-1."""
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        dims = list(w.dims)
        if len(dims) == 4 and dims[0] == 1 and dims[2:] == [1, 1] and dims[1] > 1:
            values = numpy_helper.to_array(w).reshape(-1)
            if np.allclose(values, np.arange(dims[1])):
                found.append(node.name)
    return found


@dataclass(frozen=True)
class QdqSummary:
    """Where a QDQ model's quantisation sits."""

    quantized: Counter[str]
    """Op types whose weights are stored quantised, and how many of each."""
    float_convs: list[str]
    """Conv nodes left in float."""
    stray: list[str]
    """Quantised activations that neither come from nor go into a Conv (none for Conv-only)."""


def qdq_summary(model: Any) -> QdqSummary:
    """Which ops a QDQ model quantised: what `op_types_to_quantize=["Conv"]` should leave is Conv alone."""
    initializers = {init.name for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    quantized: Counter[str] = Counter()
    quantized_nodes: set[str] = set()
    stray = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source, users = node.input[0], consumers.get(node.output[0], [])
        if source in initializers:  # a weight or bias
            for user in users:
                if user.name not in quantized_nodes:
                    quantized_nodes.add(user.name)
                    quantized[user.op_type] += 1
            continue
        q = producer.get(source)
        tensor = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else source
        origin = producer.get(tensor)
        if not (any(u.op_type == "Conv" for u in users) or (origin is not None and origin.op_type == "Conv")):
            stray.append(tensor)
    float_convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in quantized_nodes]
    return QdqSummary(quantized=quantized, float_convs=float_convs, stray=stray)


def input_shape(path: Path) -> list[int | str]:
    """The model input's NCHW shape: sizes, or the names of dynamic dimensions."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def stamp(path: Path, *, source: Path | None = None, **extra: str) -> None:
    """Make sure `path` carries Ultralytics' metadata (from `source`) and add `visionloop.*` entries.

    `libs/inference.Detector` reads `names`, `imgsz` and `stride` from there.
    """
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p for p in model.metadata_props}
    if source is not None:
        for p in onnx.load(str(source), load_external_data=False).metadata_props:
            if p.key not in props:
                entry = model.metadata_props.add()
                entry.key, entry.value = p.key, p.value
                props[p.key] = entry
    for key, value in extra.items():
        key = f"visionloop.{key}"
        entry = props.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def metadata_names(path: Path) -> list[str] | None:
    """Class names in an exported model's metadata, in head order."""
    import ast

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    raw = {p.key: p.value for p in model.metadata_props}.get("names")
    if not raw:
        return None
    parsed = ast.literal_eval(raw)
    return [str(parsed[k]) for k in sorted(parsed)] if isinstance(parsed, dict) else [str(n) for n in parsed]


# -- building ---------------------------------------------------------------------------------
def export(state_dir: Path, weights: Path, out: Path, *, imgsz: int, dynamic: bool, opset: int | None = None) -> Path:
    """Ultralytics' ONNX export of `weights` (next to it), moved to `out`."""
    from visionloop.libs.yolo import export_onnx

    try:
        exported = export_onnx(state_dir, weights, imgsz=imgsz, dynamic=dynamic, opset=opset)
    except Exception as exc:  # Ultralytics and torch raise many types
        raise ConversionError(
            ConversionFailureReason.EXPORT_FAILED,
            f"Ultralytics' ONNX export ({'dynamic' if dynamic else 'static'}, {imgsz} px) failed: "
            f"{type(exc).__name__}: {str(exc)[:300]}",
        ) from exc
    os.replace(exported, out)
    return out


class _Calibration:
    """ONNX Runtime's calibration reader over letterboxed images, one at a time."""

    def __init__(self, input_name: str, batch: np.ndarray) -> None:
        self._items = iter([{input_name: batch[i : i + 1]} for i in range(len(batch))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


class _NoPreprocessHint(logging.Filter):
    """ONNX Runtime's quantiser logs on the root logger that a model was not pre-processed;
    measured here, pre-processing changes nothing for YOLO graphs, so the hint is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


logging.getLogger().addFilter(_NoPreprocessHint())


def fold_weight_aliases(model: Any) -> int:
    """Point the consumers of an `Identity` of an initializer at the initializer itself and drop
    the `Identity`; the number dropped.

    The exporter writes such aliases when two layers hold bitwise-equal weights (it keeps one
    copy), as a barely trained model does. The quantiser takes an alias for an activation and
    quantises it a second time, so the result is no longer Conv-only."""
    initializers = {init.name for init in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    aliases = {n.output[0]: n.input[0] for n in model.graph.node
               if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in outputs}
    if not aliases:
        return 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in aliases:
                node.input[i] = aliases[name]
    kept = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in aliases)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(aliases)


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    method: str = "minmax",
    keep_dfl_float: bool = True,
) -> Path:
    """Static INT8 quantisation of the Conv layers of `src` (QDQ), calibrated on `calibration` (NCHW float32).

    Activations are uint8, weights int8 (ONNX Runtime's default on x86). `keep_dfl_float` leaves
    the head's DFL projection in float: it maps box distributions to pixels, and rounding its
    input costs box precision for no speed.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    if fold_weight_aliases(model):
        src = dst.with_name(f"{dst.stem}-folded.onnx")
        onnx.save(model, str(src))
    exclude = dfl_convs(model) if keep_dfl_float else []
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    try:
        quantize_static(
            str(src), str(dst), _Calibration(model.graph.input[0].name, calibration),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"], per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[method], nodes_to_exclude=exclude,
        )
    except Exception as exc:  # calibration runs the model: any ONNX Runtime error ends here
        raise ConversionError(
            ConversionFailureReason.CALIBRATION_FAILED,
            f"INT8 calibration on {len(calibration)} training image(s) failed: {type(exc).__name__}: {str(exc)[:300]}",
        ) from exc
    return dst


def to_fp16(src: Path, dst: Path) -> Path:
    """`src` with float16 weights and compute, float32 input and output (so callers feed it as before)."""
    import onnx

    try:
        from onnxconverter_common.float16 import convert_float_to_float16
    except ImportError:
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError:
            raise ConversionError(
                ConversionFailureReason.EXPORT_FAILED,
                "FP16 conversion needs onnxconverter-common (pip install onnxconverter-common) or ONNX "
                "Runtime's transformers tools, and neither is importable; install one or set edge_precision int8 or fp32",
            ) from None
    try:
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    except Exception as exc:
        raise ConversionError(
            ConversionFailureReason.EXPORT_FAILED, f"FP16 conversion failed: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    return dst


# -- measuring --------------------------------------------------------------------------------
def letterboxed(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """RGB images as the model input at `size`: Ultralytics' letterbox, NCHW float32 in [0, 1]."""
    return to_tensor([letterbox(image, size)[0] for image in images])


def torch_model(state_dir: Path, weights: Path) -> Any:
    """The PyTorch detection model of `weights`, float32, in eval mode."""
    from visionloop.libs.yolo import ultralytics

    return ultralytics(state_dir).YOLO(str(weights)).model.float().eval()


def torch_raw(model: Any, batch: np.ndarray) -> np.ndarray:
    """The raw head output `(n, 4 + nc, anchors)` of the PyTorch model."""
    import torch

    with torch.inference_mode():
        out = model(torch.from_numpy(batch))
    out = out[0] if isinstance(out, (list, tuple)) else out
    return out.float().cpu().numpy()


def onnx_raw(path: Path, batch: np.ndarray) -> np.ndarray:
    """The raw output of an ONNX model for `batch`: at once when the batch is dynamic, else image by image."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and fixed > 0:
        return np.concatenate([session.run(None, {name: batch[i : i + fixed]})[0] for i in range(0, len(batch), fixed)])
    return session.run(None, {name: batch})[0]


def measure_map(path: Path, images: Sequence[np.ndarray], test_set: Sequence[LabelledImage], class_names: Sequence[str],
                metric_classes: Sequence[str]) -> float:
    """Test-set mAP50-95 of an ONNX artifact, measured as the evaluator measures PyTorch."""
    detector = Detector(path.read_bytes(), class_names=list(class_names))
    try:
        found = detector.predict(images, conf=PREDICT_CONF, iou=PREDICT_IOU, max_det=MAX_DET, chunk=8)
    finally:
        detector.close()
    predictions = {}
    for item, dets in zip(test_set, found, strict=True):
        predictions[item.image_id] = [
            Box(x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3]), class_name=detector.class_names[int(c)],
                score=min(1.0, max(0.0, float(s))))
            for b, s, c in zip(dets.boxes, dets.scores, dets.classes, strict=True)
        ]
    truth = {item.image_id: list(item.boxes) for item in test_set}
    return evaluate(truth, predictions, list(metric_classes or class_names)).map50_95


def torch_map(model: Any, images: Sequence[np.ndarray], test_set: Sequence[LabelledImage], size: int,
              class_names: Sequence[str], metric_classes: Sequence[str]) -> float:
    """Test-set mAP50-95 of the PyTorch model through the artifacts' own pipeline: the same square
    letterbox at `size`, the same decoding and NMS (`libs/inference.py`), the same metric.

    This is the reference of the accuracy parity check: an artifact is compared with the model it
    was exported from under identical pre- and post-processing, so only the export (and the
    quantisation) can make them differ. The evaluator's figure (Ultralytics' predictor, which
    letterboxes each image to its own aspect) may differ from it by a few hundredths.
    """
    predictions = {}
    for start in range(0, len(images), 8):
        chunk = images[start:start + 8]
        placed = [letterbox(image, size) for image in chunk]
        raw = torch_raw(model, to_tensor([p[0] for p in placed]))
        for item, (_, placement), out in zip(test_set[start:start + 8], placed, raw, strict=True):
            dets = postprocess(out, placement, conf=PREDICT_CONF, iou=PREDICT_IOU, max_det=MAX_DET)
            predictions[item.image_id] = [
                Box(x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3]), class_name=class_names[int(c)],
                    score=min(1.0, max(0.0, float(sc))))
                for b, sc, c in zip(dets.boxes, dets.scores, dets.classes, strict=True)
            ]
    truth = {item.image_id: list(item.boxes) for item in test_set}
    return evaluate(truth, predictions, list(metric_classes or class_names)).map50_95


# -- the whole conversion ---------------------------------------------------------------------
@dataclass
class _Context:
    job: Job
    weights: Path
    model: Any
    test_images: list[np.ndarray] | None
    samples: list[np.ndarray] | None
    """Images for raw parity (None: seeded noise)."""
    references: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    reference_maps: dict[int, float] = field(default_factory=dict)

    def reference_map(self, size: int) -> float | None:
        """PyTorch's test-set mAP50-95 through the artifacts' pipeline at `size` (None without a test set)."""
        if self.test_images is None or not self.job.test_set:
            return self.job.reference_map50_95
        if size not in self.reference_maps:
            self.reference_maps[size] = torch_map(self.model, self.test_images, self.job.test_set, size,
                                                  self.job.class_names, self.job.metric_classes)
        return self.reference_maps[size]

    def reference(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(input batch, PyTorch raw output) for raw parity at `size`."""
        if size not in self.references:
            n = self.job.policy.parity_images
            if self.samples:
                batch = letterboxed(self.samples[:n], size)
            else:
                batch = np.random.default_rng(0).uniform(0, 1, (n, 3, size, size)).astype(np.float32)
            self.references[size] = (batch, torch_raw(self.model, batch))
        return self.references[size]


def convert(job: Job) -> list[Built]:
    """Build and check the server and edge artifacts of `job` (blocking; run it in a worker thread)."""
    with _lock:
        job.work_dir.mkdir(parents=True, exist_ok=True)
        weights = job.work_dir / "model.pt"  # Ultralytics exports next to the weights: keep that here
        shutil.copyfile(job.weights, weights)
        test_images = [decode_image(item.data) for item in job.test_set] if job.test_set else None
        samples = test_images
        if not samples and job.calibration:
            samples = [decode_image(data) for data in job.calibration[: job.policy.parity_images]]
        try:
            model = torch_model(job.state_dir, weights)
        except Exception as exc:  # weights Ultralytics cannot load: neither target can be built
            error = ConversionError(
                ConversionFailureReason.EXPORT_FAILED,
                f"Ultralytics cannot load the weights ({type(exc).__name__}: {str(exc)[:300]}); they are not a "
                "detection model this Ultralytics version reads: retrain, or install the version that trained them",
            )
            edge = Precision(job.policy.edge_precision)
            return [_refused(Target.SERVER, Precision.FP32, error, {}), _refused(Target.EDGE, edge, error, {})]
        ctx = _Context(job=job, weights=weights, model=model, test_images=test_images, samples=samples)
        return [_server(ctx), _edge(ctx)]


def _refused(target: Target, precision: Precision, error: ConversionError, seconds: dict[str, float]) -> Built:
    refusal = RefusedArtifact(target=target, precision=precision, reason=error.reason, message=str(error)[:1024])
    return Built(target=target, precision=precision, parity=Parity(passed=False), refusal=refusal, seconds=seconds)


def _check(ctx: _Context, built: Built, size: int) -> Built:
    """Raw parity and test-set accuracy of a built artifact, then the verdict."""
    job, path = ctx.job, built.path
    assert path is not None
    started = time.monotonic()
    batch, reference = ctx.reference(size)
    diff = box_diff(reference, onnx_raw(path, batch))
    built.seconds["raw_parity"] = time.monotonic() - started
    score = None
    if ctx.test_images is not None and job.test_set:
        started = time.monotonic()
        score = measure_map(path, ctx.test_images, job.test_set, job.class_names, job.metric_classes)
        built.seconds["map"] = time.monotonic() - started
    built.parity, built.refusal = judge(
        built.target, built.precision, job.policy, max_abs_diff_px=diff, map50_95=score,
        reference_map50_95=ctx.reference_map(size), parity_images=len(batch),
    )
    return built


def _exported(ctx: _Context, out: Path, *, size: int, dynamic: bool) -> Path:
    path = export(ctx.job.state_dir, ctx.weights, out, imgsz=size, dynamic=dynamic, opset=ctx.job.policy.opset)
    names = metadata_names(path)
    if names is not None and names != list(ctx.job.class_names):
        raise ConversionError(
            ConversionFailureReason.EXPORT_FAILED,
            f"the weights name their classes {names}, the event {list(ctx.job.class_names)}: the weights are not the "
            "model the event describes",
        )
    return path


def _server(ctx: _Context) -> Built:
    job, seconds = ctx.job, {}
    started = time.monotonic()
    try:
        path = _exported(ctx, job.work_dir / "server-fp32.onnx", size=job.imgsz, dynamic=True)
        stamp(path, model=job.model_tag, target="server", precision="fp32")
        seconds["export"] = time.monotonic() - started
        built = Built(Target.SERVER, Precision.FP32, Parity(passed=False), path=path, input_shape=input_shape(path), seconds=seconds)
        return _check(ctx, built, job.imgsz)
    except ConversionError as exc:
        return _refused(Target.SERVER, Precision.FP32, exc, seconds)


def _edge(ctx: _Context) -> Built:
    job, policy, seconds = ctx.job, ctx.job.policy, {}
    precision = Precision(policy.edge_precision)
    size = policy.edge_imgsz or job.imgsz
    if precision is not Precision.FP32 and not job.test_set:
        parity, refusal = judge(Target.EDGE, precision, policy, max_abs_diff_px=None, map50_95=None,
                                reference_map50_95=job.reference_map50_95)
        return Built(Target.EDGE, precision, parity, refusal=refusal, seconds=seconds)
    if precision is Precision.INT8 and not job.calibration:
        return _refused(Target.EDGE, precision, ConversionError(
            ConversionFailureReason.CALIBRATION_FAILED,
            "INT8 calibration needs training images and the event names no training dataset (or an empty one); "
            "retrain so that `model trained` carries its dataset, or set edge_precision fp16 or fp32",
        ), seconds)
    started = time.monotonic()
    try:
        base = _exported(ctx, job.work_dir / "edge-fp32.onnx", size=size, dynamic=False)
        seconds["export"] = time.monotonic() - started
        path = base
        if precision is Precision.INT8:
            started = time.monotonic()
            calibration = letterboxed([decode_image(data) for data in job.calibration], size)
            path = quantize_int8(base, job.work_dir / "edge-int8.onnx", calibration, per_channel=policy.int8_per_channel,
                                 method=policy.calibration_method, keep_dfl_float=policy.int8_keep_dfl_float)
            import onnx

            summary = qdq_summary(onnx.load(str(path)))
            if set(summary.quantized) - {"Conv"} or summary.stray:
                raise ConversionError(
                    ConversionFailureReason.CALIBRATION_FAILED,
                    f"the quantiser touched more than Conv layers ({dict(summary.quantized)}, {len(summary.stray)} other "
                    "activations): the installed ONNX Runtime does not honour op_types_to_quantize",
                )
            seconds["quantize"] = time.monotonic() - started
        elif precision is Precision.FP16:
            started = time.monotonic()
            path = to_fp16(base, job.work_dir / "edge-fp16.onnx")
            seconds["quantize"] = time.monotonic() - started
        stamp(path, source=base, model=job.model_tag, target="edge", precision=precision.value)
        built = Built(Target.EDGE, precision, Parity(passed=False), path=path, input_shape=input_shape(path), seconds=seconds)
        return _check(ctx, built, size)
    except ConversionError as exc:
        return _refused(Target.EDGE, precision, exc, seconds)
