"""Check compose's secured Kafka setup against a real Apache Kafka with its authorizer on.

Runs `docker/kafka/secured-setup.sh` (topics, one SCRAM user per principal, the ACLs of
`visionloop kafka acls`) through the broker's admin listener, starts the ten services as processes,
each logging in as its own user (`vl-<service>`) on an embedded PostgreSQL, and then:

- sends five images as `vl-upstream` and waits until ingest, dedup, the recognizer and the gateway
  have each handled all five (so every service hop is allowed what it needs);
- tries what must be refused: `vl-ingest` writing `model.trained`, `vl-upstream` writing a release
  command, `vl-device` writing verified labels or reading in a group that is not `edge-agent.*`;
- reads every group's lag as `vl-labeling-gateway` and `vl-operator` (the dashboard, `status`).

The broker needs a SCRAM-SHA-512 listener for clients, a PLAINTEXT admin listener whose principal
(ANONYMOUS) is a super user, `StandardAuthorizer` and `allow.everyone.if.no.acl.found=false`, as
compose's `kafka-secured` has. Usage:

    python scripts/secured_kafka_check.py --bootstrap 127.0.0.1:29092 --admin 127.0.0.1:29093 \\
        --kafka-bin /opt/kafka/bin [--protocol SASL_PLAINTEXT] [--skip-setup]

Exit status 0 when every check holds. Results: docs/security.md ("Kafka: who can publish ...").
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docker" / "kafka" / "secured-setup.sh"
SERVICES = ["ingest", "dedup", "recognizer", "labeling-gateway", "verifier", "trainer", "evaluator", "converter", "packager",
            "distributor"]


def setup(args: argparse.Namespace, users: Path) -> None:
    names = next(line.split("for user in ", 1)[1].split("; do")[0].split() for line in SCRIPT.read_text().splitlines()
                 if line.startswith("for user in "))
    users.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (users / name).exists():
            (users / name).write_text(secrets.token_hex(16))
    if args.skip_setup:
        return
    env = os.environ | {"VL_KAFKA_ADMIN_BOOTSTRAP": args.admin, "VL_KAFKA_USERS_DIR": str(users), "KAFKA_BIN": args.kafka_bin}
    began = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    print(f"setup script: exit {done.returncode} after {time.monotonic() - began:.0f} s", flush=True)
    if done.returncode:
        sys.exit(done.stderr[-2000:])


def settings_for(args: argparse.Namespace, user: str, users: Path, state: Path, database_url: str | None):  # noqa: ANN201
    from visionloop.libs.settings import Settings

    return Settings(kafka_bootstrap=args.bootstrap, kafka_security_protocol=args.protocol, kafka_sasl_mechanism="SCRAM-SHA-512",
                    kafka_sasl_username=user, kafka_sasl_password_file=str(users / user), state_dir=state,
                    database_url=database_url)


def service_env(args: argparse.Namespace, service: str, users: Path, state: Path, database_url: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {
        "VL_KAFKA_BOOTSTRAP": args.bootstrap, "VL_KAFKA_SECURITY_PROTOCOL": args.protocol,
        "VL_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "VL_KAFKA_SASL_USERNAME": f"vl-{service}",
        "VL_KAFKA_SASL_PASSWORD_FILE": str(users / f"vl-{service}"), "VL_STATE_DIR": str(state),  # one blob store
        "VL_DATABASE_URL": database_url, "VL_INGEST_PORT": "0", "VL_LABELING_GATEWAY_PORT": "0", "VL_DISTRIBUTOR_PORT": "0",
    }


async def produce(settings, topic: str, value: bytes, key: bytes | None = None) -> str:  # noqa: ANN001
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from visionloop.libs.kafka import client_kwargs

    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", request_timeout_ms=8000)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), 20)
        return "allowed"
    except (KafkaError, TimeoutError) as exc:
        return f"refused ({type(exc).__name__})"
    finally:
        await producer.stop()


async def consume(settings, topic: str, group: str) -> str:  # noqa: ANN001
    from aiokafka import AIOKafkaConsumer

    from visionloop.libs.kafka import client_kwargs

    consumer = AIOKafkaConsumer(topic, **client_kwargs(settings), group_id=group, auto_offset_reset="earliest")
    try:
        await asyncio.wait_for(consumer.start(), 30)
        await asyncio.wait_for(consumer.getmany(timeout_ms=2000), 30)
        return "allowed"
    except Exception as exc:  # noqa: BLE001 - the refusal is the answer
        return f"refused ({type(exc).__name__})"
    finally:
        await consumer.stop()


def image(n: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((320, 240), 40 + 7 * n).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


async def checks(as_user) -> dict[str, str]:  # noqa: ANN001
    from visionloop.contracts import Envelope, ImageSource, ImageSubmitted

    found = {
        "vl-ingest writes vl.model.trained.v1": await produce(as_user("vl-ingest"), "vl.model.trained.v1", b"{}"),
        "vl-upstream writes vl.release.command.v1": await produce(as_user("vl-upstream"), "vl.release.command.v1", b"{}"),
        "vl-device writes vl.label.verified.v1": await produce(as_user("vl-device"), "vl.label.verified.v1", b"{}"),
        "vl-device reads releases in group edge-agent.f.d1": await consume(as_user("vl-device"), "vl.release.edge.v1", "edge-agent.f.d1"),
        "vl-device reads releases in group ingest.image.submitted": await consume(as_user("vl-device"), "vl.release.edge.v1",
                                                                                  "ingest.image.submitted"),
    }
    sent = []
    for n in range(5):
        event = ImageSubmitted(submission_id=f"secured-{n}-{uuid.uuid4().hex[:6]}", inline_bytes=image(n),
                               source=ImageSource(domain={"site": "check"}, source_system="secured-check"))
        body = Envelope.of(event, producer="upstream", project="secured").model_dump_json().encode()
        sent.append(await produce(as_user("vl-upstream"), "vl.image.submitted.v1", body, event.submission_id.encode()))
    found["vl-upstream writes 5 images to vl.image.submitted.v1"] = "allowed" if set(sent) == {"allowed"} else str(sent)
    return found


async def handled(database_url: str, deadline_s: float = 120.0) -> dict[str, int]:
    import asyncpg

    queries = {"ingest": "SELECT count(*) FROM ingest.submissions", "dedup": "SELECT count(*) FROM dedup.decisions",
               "recognizer": "SELECT count(*) FROM recognizer.recognitions",
               "labeling-gateway": "SELECT count(*) FROM labeling_gateway.tasks"}
    counts: dict[str, int] = {}
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        conn = await asyncpg.connect(database_url)
        try:
            for name, query in queries.items():
                try:
                    counts[name] = int(await conn.fetchval(query))
                except asyncpg.PostgresError:
                    counts[name] = -1
        finally:
            await conn.close()
        if all(v == 5 for v in counts.values()):
            break
        await asyncio.sleep(2)
    return counts


async def lag(as_user, state: Path) -> dict[str, str]:  # noqa: ANN001
    from visionloop.app import consumer_groups
    from visionloop.libs.observe import snapshot
    from visionloop.libs.settings import Settings

    pairs = consumer_groups(Settings(state_dir=state))
    read = {}
    for user in ("vl-labeling-gateway", "vl-operator"):
        snap = await asyncio.wait_for(snapshot(as_user(user), pairs), 60)
        read[f"{user} reads the lag of every group"] = f"{len(snap.lags)} of {len(pairs)}"
    return read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True, help="The SCRAM listener (clients).")
    parser.add_argument("--admin", required=True, help="The PLAINTEXT admin listener (super user), for the setup script.")
    parser.add_argument("--kafka-bin", required=True, help="Folder with kafka-topics.sh, kafka-configs.sh, kafka-acls.sh.")
    parser.add_argument("--protocol", default="SASL_PLAINTEXT", choices=["SASL_PLAINTEXT", "SASL_SSL"])
    parser.add_argument("--skip-setup", action="store_true", help="The script ran already (users in --work/users).")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visionloop-secured-check")
    args = parser.parse_args()
    from visionloop.libs.embedded import EmbeddedPostgres

    users, state = args.work / "users", args.work / "state"
    setup(args, users)
    postgres = EmbeddedPostgres(args.work / f"pg-{uuid.uuid4().hex[:6]}")
    database_url = postgres.start()
    processes = {}
    try:
        for service in SERVICES:
            log = (args.work / f"{service}.log").open("w")
            processes[service] = subprocess.Popen([sys.executable, "-m", "visionloop.cli", "run", service],
                                                  env=service_env(args, service, users, state, database_url),
                                                  stdout=log, stderr=subprocess.STDOUT)
        time.sleep(45)

        def as_user(user: str):  # noqa: ANN202
            return settings_for(args, user, users, state, database_url)

        results = asyncio.run(checks(as_user))
        results |= {f"{name} handled the 5 images": f"{count} of 5" for name, count in asyncio.run(handled(database_url)).items()}
        results |= asyncio.run(lag(as_user, state))
        results["services still running"] = ", ".join(s for s, p in processes.items() if p.poll() is None) or "none"
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        postgres.stop()
    print(json.dumps(results, indent=1))
    expected = {"vl-ingest writes vl.model.trained.v1": "refused", "vl-upstream writes vl.release.command.v1": "refused",
                "vl-device writes vl.label.verified.v1": "refused", "vl-device reads releases in group edge-agent.f.d1": "allowed",
                "vl-device reads releases in group ingest.image.submitted": "refused",
                "vl-upstream writes 5 images to vl.image.submitted.v1": "allowed"}
    ok = (all(results[k].startswith(v) for k, v in expected.items())
          and all(v == "5 of 5" for k, v in results.items() if k.endswith("handled the 5 images"))
          and all(len(set(v.split(" of "))) == 1 for k, v in results.items() if k.endswith("lag of every group"))
          and results["services still running"] == ", ".join(SERVICES))
    print("every check holds" if ok else "a check failed", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
