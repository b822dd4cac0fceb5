"""The `visionloop` command: one vocabulary for running, inspecting and measuring the loop.

The apps and shared helpers are in `common`; each command group has its module (`stack`, `demo`,
`data`, `admin`, `bench`, `model`, `evaluator`), imported here so that its commands are registered on the app.
"""

# isort: skip_file
# The modules register their commands in the order of these imports: the order `--help` lists them.
from __future__ import annotations

from visionloop.cli.common import app
from visionloop.cli import stack, demo, data, admin, bench, model, evaluator  # noqa: F401 - registers the commands

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `visionloop` script."""
    app()
