"""``stop_loop``: a background loop stops even when a cancellation is dropped on the way, as Python
3.11's ``asyncio.wait_for`` drops one inside redis-py's command write (see ``breakwater.stopping``)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import uuid

import pytest
from redis.asyncio import Redis

from breakwater.stopping import stop_loop, stop_loops


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12 rebuilt wait_for: it no longer drops one")
async def test_python_311_wait_for_drops_a_cancellation_and_stop_loop_ends_the_loop() -> None:
    """The bug itself: the awaited result and the cancellation in the same loop turn."""
    result: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    ran_on = asyncio.Event()

    async def gauge() -> None:
        await asyncio.wait_for(result, 10)
        ran_on.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(gauge())
    await asyncio.sleep(0)  # it waits in wait_for
    result.set_result(1)
    task.cancel()
    await asyncio.wait_for(ran_on.wait(), 5)
    assert not task.done() and task.cancelling() == 1  # cancelled once, running on
    await asyncio.wait_for(stop_loop(task), 5)
    assert task.cancelled()


async def test_a_dropped_cancellation_is_sent_again() -> None:
    waiting = asyncio.Event()

    async def drops_the_first() -> None:
        try:
            waiting.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # what 3.11's wait_for does when its result arrives in the same turn
        while True:
            await asyncio.sleep(3600)

    task = asyncio.create_task(drops_the_first())
    await waiting.wait()
    await asyncio.wait_for(stop_loop(task, again_after_s=0.01), 5)
    assert task.cancelled()


async def test_what_the_loop_failed_with_is_raised() -> None:
    async def fails() -> None:
        raise ValueError("the loop's own error")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="the loop's own error"):
        await stop_loop(task)


async def test_loops_are_stopped_within_a_bound_and_the_stuck_ones_named() -> None:
    async def drops_the_first() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    released = asyncio.Event()

    async def ignores_cancelling() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    loops = [asyncio.create_task(c()) for c in (drops_the_first, plain_loop, ignores_cancelling)]
    dropping, plain, stubborn = loops
    await asyncio.sleep(0)
    try:
        stuck = await asyncio.wait_for(stop_loops(loops, within_s=2.0, again_after_s=0.05), 10)
        assert stuck == {stubborn}
        assert dropping.cancelled() and plain.cancelled() and not stubborn.done()
    finally:
        released.set()
    await asyncio.wait_for(stubborn, 5)


async def plain_loop() -> None:
    while True:
        await asyncio.sleep(3600)


async def test_redis_loops_cancelled_at_any_moment_stop(redis: Redis) -> None:
    """The gateway's gauge loop, in small: redis-py commands (socket timeout set), then a pause. Each
    of 200 copies is stopped a random moment after it starts, often in the middle of a command. With
    one plain ``cancel()`` some of them ran on past it on Python 3.11 (about 1 in 10 here)."""
    key = f"bw:stopping:{uuid.uuid4().hex}"
    await redis.hset(key, mapping={"a": "1"})

    async def gauges() -> None:
        while True:
            await redis.hgetall(key)
            await redis.get(f"{key}:x")
            await asyncio.sleep(1.0)

    moments = random.Random(7)
    try:
        for _ in range(200):
            task = asyncio.create_task(gauges())
            await asyncio.sleep(moments.uniform(0, 0.002))
            await asyncio.wait_for(stop_loop(task, again_after_s=0.2), 5)
            assert task.cancelled()
    finally:
        await redis.delete(key)
