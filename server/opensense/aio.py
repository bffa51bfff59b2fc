"""asyncio helpers the server's background loops share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Stop background tasks: cancel them all, then wait until each has ended (so
    that nothing of theirs still runs when the caller goes on to close what they
    use). Their CancelledError is how they end, not an error; None is skipped."""
    running = [t for t in tasks if t is not None]
    for t in running:
        t.cancel()
    for t in running:
        with contextlib.suppress(asyncio.CancelledError):
            await t
