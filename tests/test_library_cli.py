"""`visionloop library add | promote | list` against the real broker and PostgreSQL."""

from __future__ import annotations

import json

from detector import not_a_detector, onnx_bytes, variant
from typer.testing import CliRunner

from visionloop.cli import app


def _env(settings) -> dict[str, str]:  # noqa: ANN001
    return {
        "VL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "VL_KAFKA_EMBEDDED": "true",
        "VL_DATABASE_URL": settings.database_url, "VL_BLOB_URL": settings.blob_location,
        "VL_TOPIC_PREFIX": settings.topic_prefix, "VL_SCHEMA_PREFIX": settings.schema_prefix,
        "VL_STATE_DIR": str(settings.state_dir),
    }


def test_add_promote_and_list(settings, pool, tmp_path) -> None:  # noqa: ANN001
    runner = CliRunner()
    env = _env(settings)
    first, second, bad = tmp_path / "v1.onnx", tmp_path / "v2.onnx", tmp_path / "bad.onnx"
    first.write_bytes(onnx_bytes())
    second.write_bytes(variant(onnx_bytes(), "v2"))
    bad.write_bytes(not_a_detector())

    result = runner.invoke(app, ["library", "add", str(first), "--project", "yard", "--alias", "production", "--domain", "site=north"], env=env)
    assert result.exit_code == 0, result.output
    assert "yard-detector v1" in result.output and "3 classes" in result.output
    result = runner.invoke(app, ["library", "add", str(second), "--project", "yard", "--classes", "circle,square,triangle",
                                 "--imgsz", "128", "--alias", "candidate", "--domain", "site=north"], env=env)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["library", "promote", "yard-detector", "2"], env=env)
    assert result.exit_code == 0 and "now production" in result.output, result.output

    result = runner.invoke(app, ["library", "list", "--project", "yard", "--json"], env=env)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["version"], r["aliases"], r["domain"]) for r in rows] == [
        (1, ["previous"], {"site": "north"}), (2, ["production"], {"site": "north"}),
    ]
    table = runner.invoke(app, ["library", "list"], env=env)
    assert table.exit_code == 0 and "model library" in table.output

    refused = runner.invoke(app, ["library", "add", str(bad), "--project", "yard", "--classes", "a", "--imgsz", "64"], env=env)
    assert refused.exit_code == 1 and "not_a_detector" in refused.output
    wrong = runner.invoke(app, ["library", "add", str(first), "--project", "yard", "--classes", "a,b"], env=env)
    assert wrong.exit_code == 1 and "class_count_mismatch" in wrong.output
