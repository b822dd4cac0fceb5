"""A service's start-up imports, done once in the background, and work that waits for them.

The converter and the evaluator import heavy packages (torch, Ultralytics, ONNX Runtime's
quantiser) in a warm-up thread at start, not when the first model waits. Work that arrives during
the warm-up must not import the same packages from a second thread at the same moment: two
threads importing ONNX Runtime's quantiser at once can see a half-initialised package (seen: `No
module named 'fusion_utils'` when a model arrived at a restarted converter during its warm-up).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class WarmUp:
    """`run(imports)` in the warm-up thread; `after(work, ...)` for work that may arrive during it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def run(self, imports: Callable[..., Any], *args: Any) -> None:
        """Do the start-up imports, holding back `after` until they are done."""
        with self._lock:
            imports(*args)

    def after(self, work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`work(*args, **kwargs)` once no warm-up is importing (at once when none is)."""
        with self._lock:
            pass
        return work(*args, **kwargs)
