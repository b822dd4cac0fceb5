"""The test suite's detector: trained once from a yaml on synthetic scenes, cached across sessions.

`trained()` trains `libs.yolo.SYNTHETIC_RECIPE` (2-4 minutes on two cores the first time)
under `.visionloop/test/models/<recipe hash>/` and reuses it afterwards. Nothing is downloaded and
no model file is committed.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

from visionloop.libs.yolo import SyntheticDetector, synthetic_detector, synthetic_detector_cached

TEST_STATE = Path(__file__).resolve().parent.parent / ".visionloop" / "test"


def is_trained() -> bool:
    """Whether `trained()` will find its detector on disk (or already has it)."""
    return trained.cache_info().currsize > 0 or synthetic_detector_cached(TEST_STATE / "models")


@functools.cache
def trained() -> SyntheticDetector:
    """The cached synthetic-scene detector (classes circle, square, triangle)."""
    return synthetic_detector(TEST_STATE / "models", state_dir=TEST_STATE / "ultralytics")


@functools.cache
def onnx_bytes(imgsz: int = 128, dynamic: bool = True) -> bytes:
    """The detector exported to ONNX."""
    return trained().onnx(imgsz, dynamic=dynamic).read_bytes()


def variant(model: bytes, tag: str) -> bytes:
    """The same model with one more metadata entry: same answers, another SHA-256 (another "model")."""
    import onnx

    proto = onnx.load_from_string(model)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "visionloop.variant", tag
    return proto.SerializeToString()


def not_a_detector() -> bytes:
    """A valid ONNX classifier-shaped graph: image in, (batch, classes) out."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["output0"], axes=[2, 3], keepdims=0)],
        "classifier",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    out = io.BytesIO()
    onnx.save(model, out)
    return out.getvalue()


def wrong_head(channels: int = 9) -> bytes:
    """A graph shaped like a detection head but with `channels` per anchor: (batch, channels, anchors)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((channels, 3, 32, 32), np.float32) / 3072, "w")
    shape = numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w"], ["fm"], strides=[32, 32]),
            helper.make_node("Reshape", ["fm", "shape"], ["output0"]),
        ],
        "head",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", channels, "anchors"])],
        initializer=[weight, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()
