"""The raw pipelined connection against a real Redis: replies answer their own commands, in order,
for concurrent callers and across a connection that timed out and was replaced."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from breakwater.broker.wire import PipelinedRedis, Wire


async def test_concurrent_callers_get_their_own_replies(redis: Redis) -> None:
    raw = PipelinedRedis(redis)
    try:
        replies = await asyncio.gather(*(raw.execute("ECHO", f"r{i}") for i in range(200)))
        assert replies == [f"r{i}" for i in range(200)]
        batch = await raw.pipeline([("ECHO", "a"), ("EVALSHA", "0" * 40, 0), ("ECHO", "b")])
        assert batch[0] == "a" and isinstance(batch[1], NoScriptError) and batch[2] == "b"
    finally:
        await raw.aclose()


async def test_a_stalled_connection_fails_and_its_replacement_is_not_shifted(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stops answering for 1 s: the pending command fails after the 0.6 s timeout, and the
    commands sent right after, on a new connection, get their own replies, even when the old
    connection's close is reported late (as with TLS): it must not touch the new one's commands."""
    lost = Wire.connection_lost

    def late(self: Wire, exc: Exception | None) -> None:
        asyncio.get_running_loop().call_later(0.1, lost, self, exc)

    monkeypatch.setattr(Wire, "connection_lost", late)
    raw = PipelinedRedis(redis, timeout_s=0.6)
    try:
        assert await raw.execute("PING") == "PONG"
        await redis.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # type: ignore[no-untyped-call]
        with pytest.raises(RedisTimeoutError):
            await raw.execute("ECHO", "stalled")
        replies = await asyncio.gather(*(raw.execute("ECHO", f"n{i}") for i in range(20)))
        assert replies == [f"n{i}" for i in range(20)]
        assert await raw.execute("ECHO", "after") == "after"
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        await raw.aclose()


async def test_a_failed_pipelines_other_replies_are_not_left_unretrieved(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection stalls under a pipeline of three: the first reply's error is raised and the
    other two fail with it, unretrieved: asyncio logged each at ERROR as it was collected ("Future
    exception was never retrieved": 16 such lines per worker in a Redis stall)."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.Future[object]] = []
    create = loop.create_future

    def noted() -> asyncio.Future[object]:
        made.append(create())
        return made[-1]

    monkeypatch.setattr(loop, "create_future", noted)
    raw = PipelinedRedis(redis, timeout_s=0.3)
    try:
        assert await raw.execute("PING") == "PONG"
        await redis.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # type: ignore[no-untyped-call]
        made.clear()
        with pytest.raises(RedisTimeoutError):
            await raw.pipeline([("ECHO", "a"), ("ECHO", "b"), ("ECHO", "c")])
        await asyncio.sleep(0)  # (the failed futures' callbacks run)
        assert len(made) == 3 and all(f.done() for f in made)
        assert [f._log_traceback for f in made] == [False] * 3  # would be logged when collected
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        await raw.aclose()
