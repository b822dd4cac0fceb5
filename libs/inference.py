"""Detector inference on ONNX Runtime, written once for the recognizer and the edge agent.

Everything an Ultralytics YOLO detection model needs around `session.run`, in numpy only (no
torch), matching Ultralytics' own `predict` step for step:

- **Preprocessing** is Ultralytics' `LetterBox`: scale to fit keeping the aspect ratio (rounded
  the same way), bilinear resize (OpenCV's `INTER_LINEAR` when `cv2` is importable, else an
  equivalent numpy resize within one grey level), pad with grey 114 split evenly around the
  image, RGB, CHW, divided by 255. `auto=True` pads only up to the stride (Ultralytics' `rect`
  inference of one image); batches use the fixed square size.
- **Decoding** reads the detection head's output `(batch, 4 + classes, anchors)`: centre
  `x, y, w, h` in input pixels, then one score per class. A box keeps its best class and counts
  when that score is above `conf` (strictly, as Ultralytics does).
- **NMS** is per class (boxes of different classes never suppress each other), greedy, IoU
  strictly above `iou` suppresses, at most `max_det` boxes, highest score first.
- **Boxes** go back to the original image's pixels (padding removed, divided by the per-axis
  gain) and are clipped to the image.

Sessions are cached by the artifact's SHA-256 (`SessionCache`), so a model is loaded once per
process however many library entries or projects point at it. `inspect_model` refuses ONNX files
that are not detectors, with a reason code and a sentence.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAD_VALUE = 114
"""Grey level of letterbox padding (Ultralytics' value)."""
MAX_WH = 7680
"""Offset between classes in class-aware NMS (Ultralytics' value): larger than any image side."""


class InferenceError(Exception):
    """A model or an image inference cannot use: `reason` is a stable code, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


# -- images -------------------------------------------------------------------------------------
def decode_image(data: bytes) -> np.ndarray:
    """Image bytes as an RGB `uint8` array `(height, width, 3)`, EXIF orientation applied.

    Raises `InferenceError("image_undecodable")` for bytes that are not a readable image.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except Exception as exc:  # Pillow raises many types for broken files
        raise InferenceError(
            "image_undecodable",
            f"the image bytes do not decode ({type(exc).__name__}: {exc}); the stored blob is "
            "damaged or not an image: submit the original file again",
        ) from None


@dataclass(frozen=True)
class Letterbox:
    """How one image was placed into the model input: what maps boxes back to its pixels."""

    orig_shape: tuple[int, int]
    """(height, width) of the original image."""
    new_unpad: tuple[int, int]
    """(width, height) the image was resized to before padding."""
    left: int
    top: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Input-pixel `xyxy` boxes to original-image pixels, clipped to the image (in place)."""
        h0, w0 = self.orig_shape
        gain_x, gain_y = self.new_unpad[0] / w0, self.new_unpad[1] / h0
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - self.left) / gain_x
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - self.top) / gain_y
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w0)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h0)
        return boxes


def _resize_numpy(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing, like OpenCV's INTER_LINEAR."""
    h0, w0 = image.shape[:2]

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, fy = axis(height, h0)
    x0, x1, fx = axis(width, w0)
    img = image.astype(np.float32)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bottom = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    out = top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        return _resize_numpy(image, width, height)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def letterbox(
    image: np.ndarray,
    new_shape: int | tuple[int, int],
    *,
    auto: bool = False,
    stride: int = 32,
    scaleup: bool = True,
) -> tuple[np.ndarray, Letterbox]:
    """Resize and pad an `(h, w, 3)` image into `new_shape` (height, width) as Ultralytics does.

    `auto` pads only to a multiple of `stride` (the smallest rectangle), as Ultralytics' single
    image `predict` does; otherwise the result is exactly `new_shape`.
    """
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    h0, w0 = image.shape[:2]
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    if not scaleup:
        r = min(r, 1.0)
    new_unpad = (max(round(w0 * r), 1), max(round(h0 * r), 1))
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if (w0, h0) != new_unpad:
        image = _resize(image, *new_unpad)
    out = np.full((new_unpad[1] + top + bottom, new_unpad[0] + left + right, 3), PAD_VALUE, dtype=np.uint8)
    out[top : top + new_unpad[1], left : left + new_unpad[0]] = image
    return out, Letterbox(orig_shape=(h0, w0), new_unpad=new_unpad, left=left, top=top)


def to_tensor(images: Sequence[np.ndarray]) -> np.ndarray:
    """Letterboxed RGB `uint8` images of one shape as the model's `float32` NCHW input in [0, 1]."""
    batch = np.stack(images)  # n, h, w, 3
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


# -- outputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detections:
    """One image's detections in original-image pixels, highest score first."""

    boxes: np.ndarray
    """`(n, 4)` float32 `x1, y1, x2, y2`."""
    scores: np.ndarray
    """`(n,)` float32."""
    classes: np.ndarray
    """`(n,)` int64 indices into the model's class names."""

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> "Detections":
        """No detections."""
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, highest score first; IoU strictly above `iou` suppresses."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter + 1e-12)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    prediction: np.ndarray,
    box: Letterbox,
    *,
    conf: float,
    iou: float,
    max_det: int = 300,
    agnostic: bool = False,
) -> Detections:
    """One image's raw head output `(4 + nc, anchors)` to detections in original pixels."""
    scores_all = prediction[4:]
    classes = scores_all.argmax(0)
    scores = scores_all[classes, np.arange(scores_all.shape[1])]
    keep = scores > conf
    if not keep.any():
        return Detections.empty()
    xywh = prediction[:4, keep].T
    scores, classes = scores[keep], classes[keep]
    boxes = np.empty_like(xywh)
    boxes[:, 0] = xywh[:, 0] - xywh[:, 2] / 2
    boxes[:, 1] = xywh[:, 1] - xywh[:, 3] / 2
    boxes[:, 2] = xywh[:, 0] + xywh[:, 2] / 2
    boxes[:, 3] = xywh[:, 1] + xywh[:, 3] / 2
    offset = 0 if agnostic else classes[:, None].astype(boxes.dtype) * MAX_WH
    kept = nms(boxes + offset, scores, iou)[:max_det]
    return Detections(
        boxes=box.to_original(boxes[kept].astype(np.float32)),
        scores=scores[kept].astype(np.float32),
        classes=classes[kept].astype(np.int64),
    )


# -- models -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What an ONNX detector declares about itself."""

    input_name: str
    batch: int | None
    """Fixed batch size, or None when the batch dimension is dynamic."""
    input_hw: tuple[int, int] | None
    """Fixed (height, width), or None when the spatial dimensions are dynamic."""
    num_outputs: int
    output_channels: int | None
    """`4 + classes` when the exported graph says so statically."""
    metadata: dict[str, str] = field(default_factory=dict)
    """The ONNX metadata (Ultralytics writes `names`, `imgsz`, `stride`, `task`)."""

    @property
    def names(self) -> list[str] | None:
        """Class names from Ultralytics' metadata, in head order, when present."""
        raw = self.metadata.get("names")
        if not raw:
            return None
        try:
            import ast

            parsed = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return None
        if isinstance(parsed, dict):
            return [str(parsed[k]) for k in sorted(parsed)]
        return [str(n) for n in parsed] if isinstance(parsed, list) else None

    @property
    def imgsz(self) -> int | None:
        """Square input size from the graph or Ultralytics' metadata, when known."""
        if self.input_hw and self.input_hw[0] == self.input_hw[1]:
            return self.input_hw[0]
        raw = self.metadata.get("imgsz")
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            return None
        if isinstance(value, list) and value and value[0] == value[-1]:
            return int(value[0])
        return int(value) if isinstance(value, int) else None

    @property
    def stride(self) -> int:
        """The model's largest stride (Ultralytics' metadata), 32 by default."""
        try:
            return int(self.metadata.get("stride", 32))
        except ValueError:
            return 32


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _session_options(threads: int, spinning: bool | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if spinning is not None:
        # Idle pool threads spin for more work by default: fastest alone, but it burns CPU that
        # a service's other work (decoding, the broker, the database) needs on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


def _open_session(model: bytes, threads: int, providers: Sequence[str] | None, spinning: bool | None = None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise InferenceError(
            "onnxruntime_missing",
            "ONNX Runtime is not installed: pip install 'visionloop[cpu]' (or [gpu], never both)",
        ) from None
    try:
        return ort.InferenceSession(
            model, _session_options(threads, spinning), providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:
        raise InferenceError(
            "model_unloadable",
            f"ONNX Runtime cannot load the model ({type(exc).__name__}: {str(exc)[:300]}); "
            "export it again with `yolo export format=onnx`",
        ) from None


def inspect_model(session: Any) -> ModelInfo:
    """Read a session's input, outputs and metadata; refuse what is not a detector.

    A detector here has one image input of rank 4 with 3 channels (NCHW) and a first output of
    rank 3 (batch, 4 + classes, anchors).
    """
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    if len(inputs) != 1:
        raise InferenceError(
            "not_a_detector",
            f"the model has {len(inputs)} inputs; a YOLO detector has one image input (NCHW)",
        )
    shape = list(inputs[0].shape)
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise InferenceError(
            "not_a_detector",
            f"the model's input has shape {shape}; a detector takes images as (batch, 3, height, width)",
        )
    if not outputs or len(outputs[0].shape) != 3:
        got = outputs[0].shape if outputs else "no outputs"
        raise InferenceError(
            "not_a_detector",
            f"the model's first output has shape {got}; a YOLO detection head gives "
            "(batch, 4 + classes, anchors). Export a detection model (task=detect)",
        )
    meta = session.get_modelmeta().custom_metadata_map or {}
    task = meta.get("task")
    if task and task != "detect":
        raise InferenceError(
            "not_a_detector", f"the model was exported for task {task!r}; the recognizer runs detect models"
        )
    hw = (_dim(shape[2]), _dim(shape[3]))
    return ModelInfo(
        input_name=inputs[0].name,
        batch=_dim(shape[0]),
        input_hw=(hw[0], hw[1]) if hw[0] and hw[1] else None,
        num_outputs=len(outputs),
        output_channels=_dim(outputs[0].shape[1]),
        metadata=dict(meta),
    )


class Detector:
    """One ONNX detector: letterbox, batched `run`, decode, NMS, boxes in original pixels.

    Thread-safe for `predict` (ONNX Runtime sessions are); meant to be called from a worker
    thread so the event loop keeps going while the model runs.
    """

    def __init__(
        self,
        model: bytes,
        *,
        class_names: Sequence[str] | None = None,
        imgsz: int | None = None,
        threads: int = 0,
        providers: Sequence[str] | None = None,
        spinning: bool | None = None,
        workers: int = 1,
    ) -> None:
        """Load and validate `model` (ONNX bytes); `class_names` and `imgsz` default to its metadata.

        `threads` is ONNX Runtime's intra-op thread count per run (0: its default, one per core);
        `workers` how many runs go at once (chunks of one `predict` in parallel). On CPU,
        `threads=1, workers=N` (N images at once, one thread each) is markedly faster than
        `threads=N, workers=1` (one image split over N threads); it is what `parallel` sets up.
        `spinning` whether idle pool threads spin for work (None: ONNX Runtime's default, yes).

        Raises `InferenceError` with reason `model_unloadable`, `not_a_detector`,
        `class_count_mismatch` or `input_size_unknown`.
        """
        self.sha256 = hashlib.sha256(model).hexdigest()
        self.session = _open_session(model, threads, providers, spinning)
        self.info = inspect_model(self.session)
        names = list(class_names) if class_names else self.info.names
        if not names:
            raise InferenceError(
                "class_names_unknown",
                "the model carries no class names and none were given: pass them in head order",
            )
        self.class_names = names
        size = self.info.input_hw or ((imgsz, imgsz) if imgsz else None)
        if size is None and self.info.imgsz:
            size = (self.info.imgsz, self.info.imgsz)
        if size is None:
            raise InferenceError(
                "input_size_unknown", "the model's input size is dynamic and none was given: pass imgsz"
            )
        if self.info.input_hw and imgsz and self.info.input_hw != (imgsz, imgsz):
            raise InferenceError(
                "input_size_mismatch",
                f"the model's input is fixed at {self.info.input_hw[0]}x{self.info.input_hw[1]}, not "
                f"{imgsz}x{imgsz}: register it with its own input size",
            )
        self.input_hw: tuple[int, int] = size
        self.stride = self.info.stride
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ort") if self.workers > 1 else None
        self._check_head()

    @classmethod
    def parallel(cls, model: bytes, *, threads: int = 0, **options: Any) -> "Detector":
        """A CPU detector that runs `threads` images at once with one ONNX Runtime thread each
        (0: one per core): the fastest use of a CPU's cores for throughput."""
        total = threads or os.cpu_count() or 1
        return cls(model, threads=1, workers=total, **options)

    def _check_head(self) -> None:
        """Run the model once on a grey image: its head must give 4 + len(class_names) channels."""
        expected = 4 + len(self.class_names)
        channels = self.info.output_channels
        if channels is None:
            probe = np.full((self.info.batch or 1, 3, *self.input_hw), PAD_VALUE / 255, dtype=np.float32)
            try:
                out = self.session.run(None, {self.info.input_name: probe})[0]
            except Exception as exc:
                raise InferenceError(
                    "not_a_detector",
                    f"the model fails on a {self.input_hw[0]}x{self.input_hw[1]} image "
                    f"({type(exc).__name__}: {str(exc)[:200]})",
                ) from None
            if out.ndim != 3:
                raise InferenceError(
                    "not_a_detector", f"the model's output has shape {list(out.shape)}, not (batch, 4 + classes, anchors)"
                )
            channels = int(out.shape[1])
        if channels != expected:
            raise InferenceError(
                "class_count_mismatch",
                f"the model's head gives {channels} channels per anchor, which is 4 + {channels - 4} "
                f"classes, but {len(self.class_names)} class names were given "
                f"({', '.join(self.class_names[:8])}): register it with its own classes in head order",
            )

    @property
    def max_batch(self) -> int | None:
        """The fixed batch size of the graph, or None when any batch size works."""
        return self.info.batch

    def prepare(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[Letterbox]]:
        """Letterbox every image to the model's input size."""
        boxed = [letterbox(image, self.input_hw, stride=self.stride) for image in images]
        return [b[0] for b in boxed], [b[1] for b in boxed]

    def _step(self, count: int, chunk: int | None) -> int:
        return self.max_batch or max(1, min(chunk or count, count))

    def _run_chunk(self, letterboxed: Sequence[np.ndarray]) -> np.ndarray:
        part = list(letterboxed)
        real = len(part)
        if self.max_batch and real < self.max_batch:  # a static graph needs its full batch
            part += [part[-1]] * (self.max_batch - real)
        return self.session.run(None, {self.info.input_name: to_tensor(part)})[0][:real]

    def _map(self, fn: Callable[[int], Any], starts: range) -> list[Any]:
        pool = self._pool
        if pool is not None and len(starts) > 1:
            return list(pool.map(fn, starts))
        return [fn(start) for start in starts]

    def close(self) -> None:
        """Let the worker threads go (runs already started finish; later ones run serially)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def run(self, letterboxed: Sequence[np.ndarray], *, chunk: int | None = None) -> np.ndarray:
        """The raw head output `(n, 4 + nc, anchors)` for letterboxed images.

        The images go through `session.run` `chunk` at a time (all at once by default), up to
        `workers` chunks in parallel; a graph with a fixed batch size always gets exactly that
        many (the last chunk padded).
        """
        step = self._step(len(letterboxed), chunk)
        outputs = self._map(lambda start: self._run_chunk(letterboxed[start : start + step]), range(0, len(letterboxed), step))
        return np.concatenate(outputs) if len(outputs) > 1 else outputs[0]

    def predict(
        self,
        images: Sequence[np.ndarray],
        *,
        conf: float | Sequence[float] = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        chunk: int | None = None,
    ) -> list[Detections]:
        """Detections for RGB images; `conf` may differ per image; `chunk` as in `run`.

        Each chunk is letterboxed, run and decoded by one worker, so with `workers` > 1 the
        whole per-image work proceeds in parallel.
        """
        if not images:
            return []
        confs = [conf] * len(images) if isinstance(conf, (int, float)) else list(conf)
        step = self._step(len(images), chunk)

        def work(start: int) -> list[Detections]:
            part = images[start : start + step]
            letterboxed, placements = self.prepare(part)
            raw = self._run_chunk(letterboxed)
            return [
                postprocess(raw[i], placements[i], conf=confs[start + i], iou=iou, max_det=max_det)
                for i in range(len(part))
            ]

        return [found for chunk_found in self._map(work, range(0, len(images), step)) for found in chunk_found]

    @property
    def on_gpu(self) -> bool:
        """Whether the session runs on a GPU provider (batches pay off there, not on CPU)."""
        return any(p not in ("CPUExecutionProvider",) for p in self.session.get_providers())


class SessionCache:
    """Detectors by key (the artifact's SHA-256, or a key starting with it), least recently used
    evicted beyond `capacity`.

    Loading happens outside the lock's critical path per key, so two different models load in
    parallel and one model is loaded once.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Detector] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def get(self, sha256: str, load: Callable[[], Detector]) -> Detector:
        """The cached detector for `sha256`, loading it with `load()` the first time."""
        with self._lock:
            if sha256 in self._items:
                self._items.move_to_end(sha256)
                return self._items[sha256]
            key_lock = self._loading.setdefault(sha256, threading.Lock())
        with key_lock:
            with self._lock:
                if sha256 in self._items:
                    return self._items[sha256]
            detector = load()
            self.loads += 1
            with self._lock:
                self._items[sha256] = detector
                self._loading.pop(sha256, None)
                while len(self._items) > self.capacity:
                    _, evicted = self._items.popitem(last=False)
                    evicted.close()
            return detector

    def peek(self, sha256: str) -> Detector | None:
        """The cached detector for `sha256`, or None; never loads."""
        with self._lock:
            detector = self._items.get(sha256)
            if detector is not None:
                self._items.move_to_end(sha256)
            return detector

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._items

    def __len__(self) -> int:
        return len(self._items)

