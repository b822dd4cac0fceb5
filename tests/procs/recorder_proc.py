"""The recorder test service as its own OS process (settings from VL_* variables).

RECORDER_MODE=kill-after-effect: SIGKILL itself right after the first handler transaction
commits, before anything is published and before the offset is committed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recorder import recorder  # noqa: E402

from visionloop.libs.bus.outbox import Outbox  # noqa: E402
from visionloop.libs.db import create_pool  # noqa: E402
from visionloop.libs.settings import Settings  # noqa: E402


async def main() -> None:
    settings = Settings()
    pool = await create_pool(settings)
    runtime = recorder(settings, pool)
    if os.environ.get("RECORDER_MODE") == "kill-after-effect":
        async def die(self: Outbox, outgoing: list, **_: object) -> None:  # noqa: ARG001
            if outgoing:
                os.kill(os.getpid(), signal.SIGKILL)

        Outbox.publish_after_commit = die  # type: ignore[method-assign]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await runtime.start()
    await stop.wait()
    await runtime.stop()
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
