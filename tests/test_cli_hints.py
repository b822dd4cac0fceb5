"""The CLI refuses an unknown `--set NAME=VALUE` with the close matches (as Ultralytics does)."""

from __future__ import annotations

from typer.testing import CliRunner

from visionloop.cli import app


def test_an_unknown_training_argument_is_refused_with_the_close_matches(tmp_path) -> None:  # noqa: ANN001
    result = CliRunner().invoke(app, ["trainer", "request", "yard", "--set", "epoch=5", "--set", "lr0=0.01",
                                      "--set", "zzz=1"], env={"VL_STATE_DIR": str(tmp_path)})
    assert result.exit_code == 2
    said = result.output
    assert "'epoch' is not a training argument; did you mean epochs?" in said
    assert "'zzz' is not a training argument; allowed: " in said and "epochs" in said.split("'zzz'")[1]
    assert "'lr0'" not in said  # a known one is not named
