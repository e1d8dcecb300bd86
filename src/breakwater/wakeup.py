"""A wait of at most some seconds that a callback can end early: one future and one timer handle,
no task and no ``asyncio.wait_for`` (the fan-in's readers and the streaming engines' steps wait
this way once per token or per step)."""

from __future__ import annotations

import asyncio


class Wakeup:
    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    async def wait(self, timeout_s: float) -> None:
        """Until :meth:`wake` or ``timeout_s``; cancelling the caller cancels only the wait."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def wake(self) -> None:
        """End the wait in progress, if any."""
        if self._waiter is not None:
            _resolve(self._waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
