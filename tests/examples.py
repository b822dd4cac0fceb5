"""One valid example of every contract payload (used by the contract tests)."""

from __future__ import annotations

from datetime import UTC, datetime

from visionloop.contracts import (
    Alias,
    Artifact,
    Box,
    DeadLetter,
    DeadLetterReason,
    Detection,
    DeviceState,
    DeviceStatus,
    EdgeRelease,
    GateFailure,
    GateFailureReason,
    ImageAccepted,
    ImageHashes,
    ImageIngested,
    ImageRecognized,
    ImageRef,
    ImageRejected,
    ImageRejectReason,
    ImageSource,
    ImageSubmitted,
    ImageUnrecognized,
    Labeller,
    LabelRejected,
    LabelRejectReason,
    LabelSubmitted,
    LabelVerified,
    Lineage,
    Metrics,
    ModelConverted,
    ModelEvaluated,
    ModelPackaged,
    ModelRef,
    ModelRegistered,
    ModelRejudgeRequested,
    ModelTrained,
    OriginalMessage,
    Parity,
    Payload,
    PipelineStatus,
    Precision,
    Provenance,
    RecognitionMeta,
    ReleaseCommand,
    ReleaseCommandKind,
    RolloutStage,
    ServerRelease,
    Stage,
    StatusKind,
    Target,
    TaskKind,
    TrainingRequested,
    TrainMetrics,
    UnrecognizedReason,
    VerificationMethod,
)

SHA = "ab" * 32
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
IMAGE = ImageRef(image_id=SHA, blob_uri=f"file:///blobs/ab/ab/{SHA}", width=640, height=480, format="JPEG", byte_size=51234)
SOURCE = ImageSource(domain={"site": "plant-3", "camera": "gate-1"}, source_system="cams", captured_at=NOW, upstream_id="u-1")
MODEL = ModelRef(model_id="demo-detector", version=2)
LINEAGE = Lineage(model=MODEL, parent=ModelRef(model_id="demo-detector", version=1), dataset_version="ds-" + "0" * 16, class_names=["circle", "square"], imgsz=128)
METRICS = Metrics(map50_95=0.61, map50=0.9, precision=0.88, recall=0.8, per_class_ap={"circle": 0.6, "square": 0.62}, image_agreement=0.75, images=50)
BOX = Box(x1=10, y1=20, x2=110, y2=140.5, class_name="circle")
DET = Detection(x1=10, y1=20, x2=110, y2=140.5, class_name="circle", score=0.91)
RECOG = RecognitionMeta(model=MODEL, model_sha256=SHA, conf_threshold=0.5, uncertainty=0.1, inference_ms=12.5)
PARITY = Parity(max_abs_diff_px=0.001, map50_95=0.6, map50_95_delta=-0.01, tolerance=0.02, passed=True)

EXAMPLES: list[Payload] = [
    ImageSubmitted(submission_id="s1", inline_bytes=b"\x89PNG...", source=SOURCE),
    ImageSubmitted(submission_id="s2", source_uri="https://cams.example/img/1.jpg"),
    ImageIngested(submission_id="s1", image=IMAGE, source=SOURCE),
    ImageAccepted(submission_id="s1", image=IMAGE, source=SOURCE, hashes=ImageHashes(phash="0123456789abcdef", dhash="fedcba9876543210")),
    ImageRejected(submission_id="s1", stage=Stage.DEDUP, reason=ImageRejectReason.NEAR_DUPLICATE, message="near duplicate of ...", image_id=SHA, duplicate_of="cd" * 32, hamming_distance=4),
    ImageRecognized(image=IMAGE, source=SOURCE, prelabels=[DET], recognition=RECOG, class_names=["circle", "square"]),
    ImageUnrecognized(image=IMAGE, source=SOURCE, reason=UnrecognizedReason.UNCERTAIN, message="scores in the uncertainty band", uncertainty=0.7, recognition=RECOG, detections=[DET]),
    LabelSubmitted(submission_id="ls1", task_id="t1", task_kind=TaskKind.REVIEW, image=IMAGE, boxes=[BOX], labeller=Labeller(user_id="ann"), submitted_at=NOW, prelabel_model=MODEL, prelabels=[DET]),
    LabelVerified(label_id="l1", image=IMAGE, boxes=[BOX], provenance=Provenance(method=VerificationMethod.HUMAN, labellers=[Labeller(user_id="ann")])),
    LabelRejected(submission_id="ls1", task_id="t1", image=IMAGE, reason=LabelRejectReason.OUT_OF_BOUNDS, message="box 0 leaves the image"),
    TrainingRequested(requested_by="label-studio"),
    ModelRejudgeRequested(model=ModelRef(model_id="demo-detector", version=2), requested_by="cli"),
    ModelTrained(lineage=LINEAGE, run_id="r1", weights_uri=f"file:///blobs/{SHA}", weights_sha256=SHA, metrics=TrainMetrics(epochs=10, val=METRICS, train_images=160, val_images=40), duration_s=40.0),
    ModelEvaluated(lineage=LINEAGE, weights_uri=f"file:///blobs/{SHA}", weights_sha256=SHA, passed=False, failures=[GateFailure(reason=GateFailureReason.BELOW_FLOOR, message="mAP50-95 0.61 < floor 0.7", metric="map50_95", value=0.61, threshold=0.7)], test_set_version="ts-1", candidate=METRICS),
    ModelConverted(lineage=LINEAGE, metrics=METRICS, artifacts=[Artifact(target=Target.EDGE, precision=Precision.INT8, input_shape=[1, 3, 128, 128], uri=f"file:///blobs/{SHA}", sha256=SHA, size_bytes=3_000_000, parity=PARITY)]),
    ModelPackaged(lineage=LINEAGE, target=Target.EDGE, precision=Precision.INT8, package_uri=f"file:///blobs/{SHA}", package_sha256=SHA, size_bytes=3_100_000, manifest_sha256=SHA, signature="c2lnbmF0dXJl", key_id="k1", metrics=METRICS),
    ModelRegistered(lineage=LINEAGE, target=Target.SERVER, precision=Precision.FP32, artifact_uri=f"file:///blobs/{SHA}", artifact_sha256=SHA, aliases=[Alias.CANDIDATE], metrics=METRICS, registered_at=NOW),
    EdgeRelease(release_id="r1", fleet="edge-eu", target=Target.EDGE, model=MODEL, package_uri=f"file:///blobs/{SHA}", package_sha256=SHA, signature="c2ln", key_id="k1", stage=RolloutStage(index=0, percent=10)),
    ServerRelease(release_id="r2", fleet="servers", target=Target.SERVER, model=MODEL, package_uri=f"file:///blobs/{SHA}", package_sha256=SHA, signature="c2ln", key_id="k1", stage=RolloutStage(index=1, percent=100)),
    ReleaseCommand(command=ReleaseCommandKind.ROLLBACK, fleet="edge-eu", issued_by="ops", reason="canary failures"),
    DeviceStatus(fleet="edge-eu", device_id="d-01", state=DeviceState.ACTIVATED, release_id="r1", model=MODEL, active_model=MODEL),
    PipelineStatus(service="ingest", instance="host-1", kind=StatusKind.HEARTBEAT, counters={"handled": 3}),
    DeadLetter(reason=DeadLetterReason.NOT_JSON, message="not JSON", consumer_group="g", service="dedup", attempts=1, original=OriginalMessage(topic="vl.image.ingested.v1", partition=0, offset=5, value_base64="/w==")),
]
