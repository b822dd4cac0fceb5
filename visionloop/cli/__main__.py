"""`python -m visionloop.cli ...`: the `visionloop` command."""

from visionloop.cli import main

main()
