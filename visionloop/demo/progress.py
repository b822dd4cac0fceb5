"""The demo's live progress on a rich console: a timestamped line per milestone, and one bar per
step of each round (images decided, labels verified, training epochs, edge agents on the new model).

The lines are printed above the bars. On a terminal the bars are redrawn a few times a second;
on anything else (CI, a pipe, a file) rich does not redraw them: the lines come out as they
happen and the bars once, as they stand at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

@dataclass(frozen=True)
class Step:
    """One step of a round as it stands: `completed` of `total` (None while the total is unknown)."""

    key: str
    description: str
    completed: int
    total: int | None


class LiveProgress:
    """`line` for the milestones, `update` for the steps (what `Demo` calls `progress` and `on_steps`)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=32), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, refresh_per_second=4,
            # Only stderr is redirected above the bars; stdout is left alone (`--json` prints its line there).
            redirect_stdout=False, redirect_stderr=True,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> LiveProgress:
        self.bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.bars.stop()

    def line(self, message: str) -> None:
        """One timestamped line of the log (never wrapped, so a link stays whole)."""
        self.console.print(f"[bold cyan]demo[/] {time.strftime('%H:%M:%S')} {escape(message)}", soft_wrap=True)

    def update(self, steps: Iterable[Step]) -> None:
        """Add the steps not shown yet; move the others. A step without a total pulses."""
        for step in steps:
            task = self._tasks.get(step.key)
            if task is None:
                self._tasks[step.key] = self.bars.add_task(step.description, total=step.total, completed=step.completed)
            else:
                self.bars.update(task, description=step.description, total=step.total, completed=step.completed)
                if step.total is not None and step.completed < step.total:
                    # A total that grew (the next wave's images) reopens a step rich had marked finished.
                    for shown in self.bars.tasks:
                        if shown.id == task:
                            shown.finished_time = None
