"""Stopping a background loop for sure, on Python 3.11 too.

Python 3.11's ``asyncio.wait_for`` drops a cancellation that arrives in the same loop turn as the
result it waits for: it returns the result, and the cancelled task runs on as if nothing happened
(CPython gh-86296; 3.12 rebuilt ``wait_for`` on ``asyncio.timeout``). redis-py wraps every
command's write in ``wait_for`` when a socket timeout is set (always, here: see
``broker.connection``), and the Pub/Sub wire connects through it. So a loop cancelled at that moment
goes on looping, and a shutdown that cancels it once and awaits it waits forever (seen: the gateway's
gauge loop, a stopped ``gateway --workers 2`` that never exited)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from typing import Any, TypeVar

AGAIN_AFTER_S = 0.1
T = TypeVar("T", bound="asyncio.Future[Any]")


async def stop_loop(task: asyncio.Task[Any], again_after_s: float = AGAIN_AFTER_S) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``again_after_s`` while
    it runs on. Raises what it ended with, unless that is its cancellation.

    For loops that do no awaiting cleanup on cancel: a repeated cancellation could cut one short."""
    await stop_loops([task], again_after_s=again_after_s)
    if not task.cancelled() and (failed := task.exception()) is not None:
        raise failed


async def stop_loops(
    tasks: Iterable[T], within_s: float = math.inf, again_after_s: float = AGAIN_AFTER_S
) -> set[T]:
    """Cancel ``tasks`` (at least once), again every ``again_after_s`` while some run on, for up to
    ``within_s`` (until they end, by default); returns the ones still running then (what they
    ended with is theirs to report). The caller's own cancellation goes on up (the tasks have been
    cancelled by then)."""
    if again_after_s <= 0:
        raise ValueError("again_after_s must be positive")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    running = {task for task in tasks if not task.done()}
    while running:
        for task in running:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, running = await asyncio.wait(running, timeout=min(again_after_s, left))
    return running


def report_stuck(log: logging.Logger, stuck: Iterable[asyncio.Task[Any]]) -> None:
    """An error line for each task that did not stop: its name and where it waits (innermost last)."""
    for task in stuck:
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in task.get_stack(limit=8))
        log.error("loop did not stop on cancel", extra={"fields": {"task": task.get_name(), "stack": where}})
