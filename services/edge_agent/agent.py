"""The edge agent: runs on one device of one fleet, installs signed model packages, serves predictions.

It reads edge releases (`vl.release.edge.v1`) with its own consumer group, and for each release of
its fleet that addresses it (`libs.package.in_stage`):

1. **activate**: the model already active is a no-op (reported `activated` again). Otherwise it
   downloads the package from `package_url` (timeout, size cap) → `downloaded`; checks the
   archive's SHA-256 against the release, then opens it with its trust store (signature, manifest,
   file checksums) and checks it fits the device: target, fleet, input size → `verified`; loads the
   model and runs a self-test (the class count of the head, a synthetic image, finite outputs);
   writes it into the inactive A/B slot under `home` and switches the pointer atomically, keeping
   the previous model as last-known-good; loads it again from disk and self-tests it → `activated`.
   A failure at any step is reported `failed` with its `DeviceFailureReason`, and nothing of that
   package runs (a failed self-test after the switch switches back).
2. **rollback**: a device running the release's model switches back to its last-known-good model
   (`rolled_back`); one not running it reports `rolled_back` at once (it already does not run it).

Every state goes to `vl.device.status.v1` as a `DeviceStatus` straight from an aiokafka producer
(a device has no database; reports that cannot be sent wait in a small queue), plus a periodic
`heartbeat`. The active model survives restarts: it is loaded (and fully re-verified) from `home`.
A malformed release (not JSON, not an envelope, another major version or event type, a schema
violation) is never acted on: it goes to `vl.message.deadlettered.v1` with its reason code, as
every service's consumer does (`libs.bus.parse_event`).

On disk, under `home`::

    current.json          {"active": "a", "last_known_good": "b"}   (replaced atomically)
    slots/a/package.tar   the verified package, as downloaded
    slots/a/slot.json     release id, package SHA-256, project, when installed
    slots/a/manifest.json the manifest, for people to read
    slots/b/...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from visionloop.contracts import (
    SYSTEM_PROJECT,
    DeadLetter,
    Detection,
    DeviceFailureReason,
    DeviceState,
    DeviceStatus,
    EdgeRelease,
    Envelope,
    ModelRef,
    Release,
    ReleaseAction,
    spec_for,
    topic_of,
)
from visionloop.libs import kafka
from visionloop.libs.bus import dead_letter, parse_event
from visionloop.libs.inference import Detector, InferenceError, decode_image
from visionloop.libs.package import Manifest, PackageError, in_stage, open_package
from visionloop.libs.settings import Settings
from visionloop.libs.signing import TrustStore
from visionloop.services.edge_agent.decide import check_fit
from visionloop.services.edge_agent.slots import DEFAULT_MAX_PACKAGE_BYTES, Installed, Refused, Running, Slots

log = logging.getLogger(__name__)

class EdgeError(Exception):
    """Something the agent cannot do: `reason` is a stable code, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


DOWNLOAD_ATTEMPTS = 4
"""Tries of a package download that failed in a way the server may recover from."""


class _Transient(Exception):
    """A download failure worth another try (no connection, a 5xx, a timeout)."""


def self_test(model: bytes, spec: Manifest, *, threads: int = 1) -> Detector:
    """Load the model as the manifest describes it and run it on a synthetic image; return the detector.

    Raises `Refused(self_test_failed)` when it does not load, its head does not give 4 + classes
    channels, its input is not the manifest's, or its outputs are not finite.
    """
    try:
        detector = Detector(model, class_names=spec.classes, imgsz=spec.input.height, threads=threads, spinning=False)
        if detector.input_hw != (spec.input.height, spec.input.width):
            raise Refused(
                DeviceFailureReason.SELF_TEST_FAILED,
                f"the model's input is {detector.input_hw}, the manifest says {spec.input.height}x{spec.input.width}",
            )
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(spec.input.height, spec.input.width, 3), dtype=np.uint8)
        letterboxed, _ = detector.prepare([image])
        out = detector.run(letterboxed)
    except InferenceError as exc:
        raise Refused(DeviceFailureReason.SELF_TEST_FAILED, f"the model does not load as a detector: {exc}") from None
    except Refused:
        raise
    except Exception as exc:  # ONNX Runtime raises its own types for graphs that fail at run time
        raise Refused(DeviceFailureReason.SELF_TEST_FAILED, f"the model fails on a test image ({type(exc).__name__}: {str(exc)[:300]})") from None
    expected = 4 + len(spec.classes)
    if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] != expected:
        raise Refused(DeviceFailureReason.SELF_TEST_FAILED, f"the head gives {list(out.shape)}, expected (1, {expected}, anchors)")
    if not np.isfinite(out).all():
        raise Refused(DeviceFailureReason.SELF_TEST_FAILED, "the model's output on a test image is not finite (NaN or infinity)")
    return detector


# -- the agent ------------------------------------------------------------------------------------------
class EdgeAgent:
    """One device's agent: release consumer, installer, status reporter and predictor."""

    def __init__(
        self,
        settings: Settings,
        fleet: str,
        device_id: str,
        home: Path,
        trust: TrustStore,
        *,
        target: str = "edge",
        max_input_size: int = 640,
        http: httpx.AsyncClient | None = None,
        download_timeout_s: float = 60.0,
        max_package_bytes: int = DEFAULT_MAX_PACKAGE_BYTES,
        heartbeat_s: float | None = None,
        threads: int = 1,
    ) -> None:
        """`home` holds the slots; `trust` the public keys packages must be signed with;
        `threads` ONNX Runtime threads per prediction; `heartbeat_s` defaults to the platform's."""
        self.settings = settings
        self.fleet = fleet
        self.device_id = device_id
        self.home = Path(home)
        self.trust = trust
        self.target = target
        self.max_input_size = max_input_size
        self.download_timeout_s = download_timeout_s
        self.max_package_bytes = max_package_bytes
        self.heartbeat_s = heartbeat_s or settings.heartbeat_interval_s
        self.threads = threads
        self.slots = Slots(self.home)
        self.topic = topic_of(EdgeRelease, settings.topic_prefix)
        self.status_topic = topic_of(DeviceStatus, settings.topic_prefix)
        self.group = f"{settings.topic_prefix}edge-agent.{fleet}.{device_id}"
        self.producer_name = f"edge-agent/{device_id}"
        self.counters: Counter[str] = Counter()
        self.history: deque[DeviceStatus] = deque(maxlen=200)
        """The latest reports, newest last."""
        self.listeners: list[Callable[[DeviceStatus], None]] = []
        """Called with every report (tests, local dashboards)."""
        self._http = http
        self._own_http = http is None
        self._running: Running | None = None
        self._lock = asyncio.Lock()
        self._sending = asyncio.Lock()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unsent: deque[tuple[str, bytes, bytes]] = deque(maxlen=500)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def active(self) -> Installed | None:
        """The package serving now, or None."""
        running = self._running
        return running.installed if running else None

    @property
    def last_known_good(self) -> ModelRef | None:
        """The model a rollback would go back to, when one is installed."""
        slot = self.slots.pointer().last_known_good
        if slot is None:
            return None
        try:
            return Manifest.model_validate_json((self.slots.root / slot / "manifest.json").read_bytes()).ref
        except (OSError, ValueError):
            return None

    def load(self) -> Installed | None:
        """Load the active model from `home` (verified again), falling back to last-known-good."""
        pointer = self.slots.pointer()
        for slot in (pointer.active, pointer.last_known_good):
            if slot is None:
                continue
            try:
                installed = self.slots.load(slot, self.trust, max_bytes=self.max_package_bytes)
                detector = self_test(installed.opened.model, installed.spec, threads=self.threads)
            except (PackageError, Refused) as exc:
                reason = exc.reason.value if getattr(exc, "reason", None) else "failed"
                log.error("edge agent: the model in slot %s does not load (%s: %s)", slot, reason, exc)
                self.counters["load_failures"] += 1
                continue
            if slot != pointer.active:
                self.slots.switch(slot, None)
                log.warning("edge agent: back on the last-known-good model %s", installed.model)
            self._running = Running(installed, detector)
            log.info("edge agent: serving %s v%s from slot %s", installed.model.model_id, installed.model.version, slot)
            return installed
        self._running = None
        return None

    async def start(self) -> None:
        """Load the active model, connect to Kafka and start consuming releases and heartbeating."""
        await asyncio.to_thread(self.load)
        try:
            await self._connect()
        except BaseException:
            await self.stop()
            raise
        await self.report(DeviceState.HEARTBEAT)

    async def _connect(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.download_timeout_s, follow_redirects=True)
        try:
            await kafka.ensure_topics(self.settings, [spec_for(EdgeRelease), spec_for(DeviceStatus)])
        except Exception as exc:  # a device's Kafka user may not create topics: they exist already then
            log.warning("edge agent: could not ensure topics (%s); assuming they exist", exc)
        self._producer = AIOKafkaProducer(**kafka.client_kwargs(self.settings), acks="all")  # type: ignore[arg-type]
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            self.topic,
            group_id=self.group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
            **kafka.consumer_kwargs(self.settings),  # type: ignore[arg-type]
        )
        await self._consumer.start()
        self._tasks = [
            asyncio.create_task(self._keep(self._consume, "releases"), name=f"edge-{self.device_id}-releases"),
            asyncio.create_task(self._keep(self._heartbeats, "heartbeat"), name=f"edge-{self.device_id}-heartbeat"),
        ]

    async def stop(self) -> None:
        """Stop consuming, send what is queued, disconnect."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._flush()
                await self._producer.stop()
            self._producer = None
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None
        running, self._running = self._running, None
        if running is not None:
            running.detector.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Start, run until `stop` is set, stop."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _keep(self, work: Callable[[], Any], name: str) -> None:
        while True:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("edge agent: %s loop failed; restarting it in 1 s", name)
                self.counters[f"loop_failures.{name}"] += 1
            await asyncio.sleep(1.0)

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    await self._on_record(record)
                    await consumer.commit({tp: record.offset + 1})

    async def _on_record(self, record: Any) -> None:
        # The consumer policy of every service (libs/bus/): malformed messages, unknown majors
        # and other event types are dead-lettered with a reason code, never acted on.
        envelope, reason, problem = parse_event(spec_for(EdgeRelease), Envelope[EdgeRelease], record.value)
        if envelope is None:
            assert reason is not None
            self.counters["malformed"] += 1
            self.counters[f"dead_lettered.{reason.value}"] += 1
            log.warning("edge agent: dead-lettered a release at %s/%s (%s): %s", record.partition, record.offset, reason.value, problem[:300])
            letter = dead_letter(record, reason, problem, consumer_group=self.group, service="edge-agent")
            out = Envelope.of(letter, producer=self.producer_name, project=SYSTEM_PROJECT)
            key = spec_for(DeadLetter).key_of(out).encode()
            self._unsent.append((topic_of(DeadLetter, self.settings.topic_prefix), key, out.model_dump_json().encode()))
            await self._flush()
            return
        await self.handle(envelope.payload, project=envelope.project, correlation_id=envelope.correlation_id)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.report(DeviceState.HEARTBEAT)

    # -- releases -------------------------------------------------------------------------------
    async def handle(
        self, release: Release, *, project: str = SYSTEM_PROJECT, correlation_id: str | None = None
    ) -> DeviceState | None:
        """Act on one release: the state reached, or None when it is not for this device."""
        if release.fleet != self.fleet:
            self.counters["other_fleet"] += 1
            return None
        if not in_stage(self.device_id, release.stage):
            self.counters["not_addressed"] += 1
            return None
        async with self._lock:
            context = {"release": release, "project": project, "correlation_id": correlation_id}
            try:
                if release.action is ReleaseAction.ROLLBACK:
                    return await self._rollback(**context)
                return await self._activate(**context)
            except Refused as exc:
                self.counters[f"failed.{exc.reason.value if exc.reason else 'other'}"] += 1
                await self.report(DeviceState.FAILED, reason=exc.reason, message=str(exc), **context)
                return DeviceState.FAILED
            except Exception as exc:  # a disk or runtime fault: report it, keep the device going
                log.exception("edge agent: release %s failed unexpectedly", release.release_id)
                self.counters["failed.unexpected"] += 1
                await self.report(DeviceState.FAILED, message=f"{type(exc).__name__}: {exc}", **context)
                return DeviceState.FAILED

    async def _activate(self, release: Release, project: str, correlation_id: str | None) -> DeviceState:
        context = {"release": release, "project": project, "correlation_id": correlation_id}
        active = self.active
        if active is not None and active.package_sha256 == release.package_sha256:
            self.counters["already_active"] += 1
            await self.report(DeviceState.ACTIVATED, message="already active", **context)
            return DeviceState.ACTIVATED
        if release.target.value != self.target:
            raise Refused(DeviceFailureReason.WRONG_TARGET, f"the release is for {release.target.value} devices, this one runs {self.target} models")
        archive = await self._download(release)
        await self.report(DeviceState.DOWNLOADED, **context)
        actual = hashlib.sha256(archive).hexdigest()
        if actual != release.package_sha256:
            raise Refused(
                DeviceFailureReason.CHECKSUM_MISMATCH,
                f"the downloaded package has SHA-256 {actual}, the release says {release.package_sha256}",
            )
        try:
            opened = await asyncio.to_thread(open_package, archive, self.trust, max_bytes=self.max_package_bytes)
        except PackageError as exc:
            raise Refused(exc.reason, exc.message) from None
        if opened.key_id != release.key_id or opened.signature != release.signature:
            raise Refused(DeviceFailureReason.BAD_SIGNATURE, "the package's signature is not the one the release names")
        misfit = check_fit(opened.spec, release, fleet=self.fleet, target=self.target, max_input_size=self.max_input_size)
        if misfit is not None:
            raise Refused(*misfit)
        await self.report(DeviceState.VERIFIED, **context)
        # Self-test before the switch: a model that cannot run never becomes active.
        tested = await asyncio.to_thread(self_test, opened.model, opened.spec, threads=self.threads)
        tested.close()
        before = self.slots.pointer()
        slot = await asyncio.to_thread(
            self.slots.install, archive, opened, package_sha256=actual, release_id=release.release_id, project=project
        )
        await asyncio.to_thread(self.slots.switch, slot, before.active)
        try:
            running = await asyncio.to_thread(self._load_slot, slot)
        except (Refused, PackageError) as exc:
            await asyncio.to_thread(self.slots.switch, before.active, before.last_known_good if before.last_known_good != slot else None)
            raise Refused(
                DeviceFailureReason.SELF_TEST_FAILED,
                f"the installed model failed its self-test after the switch ({exc}); switched back",
            ) from None
        previous, self._running = self._running, running
        if previous is not None:
            previous.detector.close()
        self.counters["activated"] += 1
        await self.report(DeviceState.ACTIVATED, **context)
        return DeviceState.ACTIVATED

    def _load_slot(self, slot: str) -> Running:
        installed = self.slots.load(slot, self.trust, max_bytes=self.max_package_bytes)
        return Running(installed, self_test(installed.opened.model, installed.spec, threads=self.threads))

    async def _rollback(self, release: Release, project: str, correlation_id: str | None) -> DeviceState:
        context = {"release": release, "project": project, "correlation_id": correlation_id}
        active = self.active
        if active is None or active.model != release.model:
            self.counters["rollback_not_running"] += 1
            await self.report(DeviceState.ROLLED_BACK, message=f"not running {release.model.model_id} v{release.model.version}", **context)
            return DeviceState.ROLLED_BACK
        pointer = self.slots.pointer()
        if pointer.last_known_good is None:
            raise Refused(None, "no last-known-good model to roll back to; release an earlier model instead")
        try:
            running = await asyncio.to_thread(self._load_slot, pointer.last_known_good)
        except PackageError as exc:
            raise Refused(exc.reason, f"the last-known-good model does not verify: {exc.message}") from None
        goal = release.rollback_to
        if goal is not None and running.installed.model != goal:
            running.detector.close()
            raise Refused(
                None,
                f"the last-known-good model is {running.installed.model.model_id} v{running.installed.model.version}, "
                f"not {goal.model_id} v{goal.version}; release that model instead",
            )
        # The rolled-back model is no longer good: nothing is last-known-good until the next activation.
        await asyncio.to_thread(self.slots.switch, pointer.last_known_good, None)
        previous, self._running = self._running, running
        if previous is not None:
            previous.detector.close()
        self.counters["rolled_back"] += 1
        await self.report(DeviceState.ROLLED_BACK, **context)
        return DeviceState.ROLLED_BACK

    async def _download(self, release: Release) -> bytes:
        """The release's package; a failure the server may recover from (no connection, a 5xx, a
        timeout: the package server restarting, a flaky link) is tried again after 1, 2 and 4 s
        before the device reports `download_failed`."""
        url = release.package_url
        if not url or not url.startswith(("http://", "https://")):
            raise Refused(DeviceFailureReason.DOWNLOAD_FAILED, "the release carries no http(s) package_url to download from")
        for attempt in range(DOWNLOAD_ATTEMPTS):
            try:
                return await self._download_once(url)
            except _Transient as exc:
                if attempt == DOWNLOAD_ATTEMPTS - 1:
                    raise Refused(DeviceFailureReason.DOWNLOAD_FAILED, f"{exc} ({DOWNLOAD_ATTEMPTS} attempts)") from None
                self.counters["download_retries"] += 1
                await asyncio.sleep(2.0**attempt)
        raise AssertionError("unreachable")

    async def _download_once(self, url: str) -> bytes:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.download_timeout_s, follow_redirects=True)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.download_timeout_s):
                async with self._http.stream("GET", url) as response:
                    if response.status_code >= 500 or response.status_code == 429:
                        raise _Transient(f"GET {url} answered HTTP {response.status_code}")
                    if response.status_code != 200:
                        raise Refused(DeviceFailureReason.DOWNLOAD_FAILED, f"GET {url} answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.max_package_bytes:
                        raise Refused(DeviceFailureReason.DOWNLOAD_FAILED, f"the package is {declared} bytes, more than {self.max_package_bytes}")
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.max_package_bytes:
                            raise Refused(DeviceFailureReason.DOWNLOAD_FAILED, f"the package is larger than {self.max_package_bytes} bytes")
                        chunks.append(chunk)
        except TimeoutError:
            raise _Transient(f"downloading {url} took longer than {self.download_timeout_s:g} s") from None
        except httpx.TransportError as exc:
            raise _Transient(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise Refused(DeviceFailureReason.DOWNLOAD_FAILED, f"GET {url} failed: {type(exc).__name__}: {exc}") from None
        self.counters["downloaded_bytes"] += size
        return b"".join(chunks)

    # -- predictions ----------------------------------------------------------------------------
    def predict(self, image: bytes) -> list[Detection]:
        """Boxes of the active model on image bytes, decoded as the recognizer decodes them.

        Raises `EdgeError("no_model")` when nothing is active and `InferenceError("image_undecodable")`.
        Blocking: call it from a worker thread in async code.
        """
        return self.predict_with_model(image)[1]

    def predict_with_model(self, image: bytes) -> tuple[ModelRef, list[Detection]]:
        """`predict`, with the model that answered (a release may switch models meanwhile)."""
        running = self._running
        if running is None:
            raise EdgeError("no_model", "no model is active on this device yet: release one to its fleet")
        pixels = decode_image(image)
        decoding = running.installed.spec.decoding
        detector = running.detector
        found = detector.predict([pixels], conf=decoding.conf, iou=decoding.iou, max_det=decoding.max_det)[0]
        self.counters["predictions"] += 1
        return running.installed.model, [
            Detection(
                x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3]),
                class_name=detector.class_names[int(c)], score=min(max(float(s), 0.0), 1.0),
            )
            for b, s, c in zip(found.boxes, found.scores, found.classes, strict=True)
        ]

    # -- reports --------------------------------------------------------------------------------
    async def report(
        self,
        state: DeviceState,
        *,
        release: Release | None = None,
        reason: DeviceFailureReason | None = None,
        message: str | None = None,
        project: str | None = None,
        correlation_id: str | None = None,
    ) -> DeviceStatus:
        """Publish a `DeviceStatus` (queued when the broker is unreachable); return it."""
        active = self.active
        status = DeviceStatus(
            fleet=self.fleet,
            device_id=self.device_id,
            state=state,
            release_id=release.release_id if release else (active.release_id if active else None),
            model=release.model if release else None,
            active_model=active.model if active else None,
            package_sha256=release.package_sha256 if release else (active.package_sha256 if active else None),
            reason=reason,
            message=message[:1024] if message else None,
        )
        self.history.append(status)
        for listener in self.listeners:
            listener(status)
        if state is not DeviceState.HEARTBEAT:
            log.info("edge agent %s: %s %s%s", self.device_id, state.value, release.release_id if release else "",
                     f" ({reason.value}: {message})" if reason else "")
        envelope = Envelope.of(
            status,
            producer=self.producer_name,
            project=project or (active.project if active else SYSTEM_PROJECT),
            correlation_id=correlation_id,
        )
        key = spec_for(DeviceStatus).key_of(envelope).encode()
        self._unsent.append((self.status_topic, key, envelope.model_dump_json().encode()))
        await self._flush()
        return status

    async def _flush(self) -> None:
        """Send queued reports in order; one flush at a time (heartbeats and releases both report)."""
        async with self._sending:
            producer = self._producer
            while producer is not None and self._unsent:
                topic, key, value = self._unsent[0]
                try:
                    await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), timeout=10)
                except Exception as exc:
                    self.counters["reports_deferred"] += 1
                    log.warning("edge agent: status report deferred (%s)", exc)
                    return
                self._unsent.popleft()
                self.counters["reports_sent"] += 1

    def summary(self) -> dict[str, Any]:
        """What `GET /v1/model` shows: the active model and its manifest, or None."""
        active = self.active
        if active is None:
            return {}
        spec = active.spec
        lkg = self.last_known_good
        return {
            "model": spec.model.model_dump(),
            "project": spec.project,
            "target": spec.target.value,
            "precision": spec.precision.value,
            "classes": spec.classes,
            "input": spec.input.model_dump(),
            "decoding": spec.decoding.model_dump(),
            "metrics": spec.metrics,
            "created_at": spec.created_at,
            "fleets": spec.fleets,
            "package_sha256": active.package_sha256,
            "key_id": active.opened.key_id,
            "release_id": active.release_id,
            "slot": active.slot,
            "installed_at": active.installed_at,
            "last_known_good": lkg.model_dump() if lkg else None,
        }
