"""The gateway's Pub/Sub fan-in against a real Redis: routing to every reader, bounded buffers, and
recovery after Redis restarts (readers are re-subscribed and told to re-read what they missed)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.broker.fanin import LEAVE_EVERY_S, Fanin, Subscription
from breakwater.keys import Keys
from breakwater.protocol.events import TokenEvent
from breakwater.redis_server import RedisServer


async def _until(check: object, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _subscribe(fanin: Fanin, rid: str) -> Subscription:
    """Subscribe once the fan-in has (re)connected."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await fanin.subscribe(rid)
        except RedisConnectionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture
async def fanin(redis: Redis, prefix: str) -> AsyncIterator[Fanin]:
    overflows: list[int] = []
    fanin = Fanin(redis, Keys(prefix), buffer=3, on_overflow=lambda: overflows.append(1))
    fanin.overflows = overflows  # type: ignore[attr-defined]
    await fanin.start()
    yield fanin
    await fanin.close()


async def test_events_reach_every_reader_in_order(fanin: Fanin, redis: Redis) -> None:
    a, b = await _subscribe(fanin, "r"), await _subscribe(fanin, "r")
    channel = fanin.keys.channel("r")
    await redis.publish(channel, "t1 1 Hello")
    await redis.publish(channel, "t2 2  big world")  # the text keeps its spaces
    await redis.publish(channel, '{"seq": "3", "kind": "done", "finish_reason": "stop"}')
    await _until(lambda: len(a.events) == 3 and len(b.events) == 3, "three events each")
    for sub in (a, b):
        assert list(sub.events) == [
            TokenEvent(1, "token", "Hello", 1),
            TokenEvent(2, "token", " big world", 2),
            TokenEvent(3, "done", finish_reason="stop"),
        ]
    await fanin.unsubscribe(a)
    a.drain()
    b.drain()
    await redis.publish(channel, "t4 1 !")
    await _until(lambda: len(b.events) == 1, "the remaining reader's event")
    assert not a.events and fanin.active == 1


async def test_a_full_buffer_is_flagged_not_waited_on(fanin: Fanin, redis: Redis) -> None:
    sub = await _subscribe(fanin, "slow")
    for seq in range(1, 6):
        await redis.publish(fanin.keys.channel("slow"), f"t{seq} 1 x")
    await _until(lambda: sub.overflowed, "overflow")
    assert [e.seq for e in sub.events] == [1, 2, 3]
    assert fanin.overflows == [1]  # type: ignore[attr-defined]


async def test_wait_ends_on_an_event_on_timeout_and_on_cancel(fanin: Fanin, redis: Redis) -> None:
    sub = await _subscribe(fanin, "w")
    started = time.monotonic()
    await sub.wait(0.2)  # nothing came
    assert not sub.events and time.monotonic() - started >= 0.19
    waiting = asyncio.create_task(sub.wait(30))
    await redis.publish(fanin.keys.channel("w"), "t1 1 a")
    await asyncio.wait_for(waiting, 5)
    assert len(sub.events) == 1
    sub.drain()
    waiting = asyncio.create_task(sub.wait(30))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await redis.publish(fanin.keys.channel("w"), "t2 1 b")  # a cancelled wait does not eat events
    await _until(lambda: len(sub.events) == 1, "the next event")


async def test_readers_are_resubscribed_and_woken_after_redis_restarts(
    own_redis: tuple[RedisServer, Redis], prefix: str
) -> None:
    server, client = own_redis
    fanin = Fanin(client, Keys(prefix), buffer=8)
    await fanin.start()
    try:
        sub = await _subscribe(fanin, "r")
        server.stop(kill=True)
        server.start()
        # Events published while it was gone are lost to Pub/Sub: the reader is told to re-read.
        await _until(lambda: sub.overflowed, "the reader woken after the reconnect", 20)
        sub.overflowed = False
        await _until(lambda: fanin.active == 1, "still subscribed")
        await client.publish(fanin.keys.channel("r"), "t7 1 again")
        await _until(lambda: [e.seq for e in sub.events] == [7], "a live event after the restart")
        other = await _subscribe(fanin, "s")  # and new subscriptions work
        assert other.confirmed.done()
    finally:
        await fanin.close()


async def _unsubscribes(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_unsubscribe", {}).get("calls", 0))


async def test_channels_let_go_together_leave_in_one_unsubscribe(fanin: Fanin, redis: Redis) -> None:
    subs = [await _subscribe(fanin, f"r{i}") for i in range(5)]
    channels = [fanin.keys.channel(f"r{i}") for i in range(5)]
    assert [n for _, n in await redis.pubsub_numsub(*channels)] == [1] * 5
    before = await _unsubscribes(redis)
    for sub in subs:
        await fanin.unsubscribe(sub)

    async def subscribed() -> list[int]:
        return [n for _, n in await redis.pubsub_numsub(*channels)]

    deadline = time.monotonic() + 10
    while await subscribed() != [0] * 5:
        assert time.monotonic() < deadline, "the channels were not unsubscribed"
        await asyncio.sleep(0.02)
    assert await _unsubscribes(redis) == before + 1


async def test_a_channel_taken_again_while_being_let_go_keeps_its_subscription(
    fanin: Fanin, redis: Redis
) -> None:
    first = await _subscribe(fanin, "r")
    await fanin.unsubscribe(first)
    again = await _subscribe(fanin, "r")  # within the same window: the subscription is kept
    assert again.confirmed.done()
    before = await _unsubscribes(redis)
    await asyncio.sleep(4 * LEAVE_EVERY_S)  # past the window in which a pending UNSUBSCRIBE would go
    assert await _unsubscribes(redis) == before
    channel = fanin.keys.channel("r")
    assert (await redis.pubsub_numsub(channel))[0][1] == 1
    await redis.publish(channel, "t1 1 still here")
    await _until(lambda: len(again.events) == 1, "the event")
    assert list(again.events) == [TokenEvent(1, "token", "still here", 1)]


def _token(seq: int) -> TokenEvent:
    return TokenEvent(seq, "token", f"w{seq}", 1)


async def test_a_parked_reader_s_sink_takes_the_next_event_in_order() -> None:
    """A sink gets an event only while its reader is parked, only the next seq, and only with
    nothing buffered before it; whatever it refuses (or fails on) is buffered and wakes the reader."""
    taken: list[int] = []
    sub = Subscription("r", maxsize=8)
    sub.sink = lambda e: e.kind == "token" and not taken.append(e.seq)  # type: ignore[func-returns-value]
    sub.offer(_token(1))  # not parked: the reader takes it
    assert [e.seq for e in sub.events] == [1] and taken == []
    sub.events.clear()
    sub.delivered = 1
    sub.parked = True
    sub.offer(_token(2))
    sub.offer(_token(3))
    assert taken == [2, 3] and sub.delivered == 3 and not sub.events
    sub.offer(_token(5))  # a gap: the reader sees it and re-reads the stream
    sub.offer(_token(4))  # the next seq, but something is buffered before it
    assert taken == [2, 3] and [e.seq for e in sub.events] == [5, 4]
    sub.events.clear()
    sub.offer(TokenEvent(4, "done", finish_reason="stop"))  # refused: buffered, the reader woken
    assert [e.kind for e in sub.events] == ["done"] and sub.delivered == 3
    waited = asyncio.ensure_future(sub.wait(5))
    await asyncio.wait_for(waited, 1)  # returns at once: an event is buffered

    def broken(event: TokenEvent) -> bool:
        raise RuntimeError("render failed")

    fresh = Subscription("r2", maxsize=8)
    fresh.sink, fresh.parked = broken, True
    fresh.offer(_token(1))
    assert [e.seq for e in fresh.events] == [1] and fresh.sink is None  # the reader takes over


@dataclass
class Following:
    """A reader following request ``r`` (gateway.following) whose subscription's sink takes the
    tokens ``takes`` accepts; what each handed on, in order."""

    sub: Subscription
    reader: asyncio.Task[None]
    taken: list[int] = field(default_factory=list)
    yielded: list[int] = field(default_factory=list)


@contextlib.asynccontextmanager
async def _following(
    fanin: Fanin, url: str, prefix: str, after: int, takes: Callable[[int], bool], **how: Any
) -> AsyncIterator[Following]:
    from breakwater.broker import Broker
    from breakwater.config import GatewaySettings
    from breakwater.gateway.following import follow_events

    broker = Broker.connect(GatewaySettings(redis_url=url, key_prefix=prefix))
    sub = await _subscribe(fanin, "r")
    yielded: list[int] = []

    async def read() -> None:
        async for event in follow_events(broker, fanin, "r", after, subscription=sub, **how):
            yielded.append(event.seq)

    following = Following(sub, asyncio.create_task(read()), yielded=yielded)
    sub.sink = lambda e: e.kind == "token" and takes(e.seq) and not following.taken.append(e.seq)  # type: ignore[func-returns-value]
    try:
        yield following
    finally:
        following.reader.cancel()
        await asyncio.wait({following.reader}, timeout=10)  # ended before its broker closes
        await broker.aclose()


async def test_follow_events_goes_on_after_what_the_sink_handed_on(
    fanin: Fanin, redis: Redis, redis_server: RedisServer, prefix: str
) -> None:
    """The reader yields only what its sink did not take, in seq order, with no re-read of the
    durable stream (there is none here: a re-read would end in RequestGone), and a sink that keeps
    taking tokens for longer than the idle poll is not idleness."""
    channel = fanin.keys.channel("r")
    # The first token goes through the reader, as a test of the reader's own path.
    async with _following(
        fanin, redis_server.url, prefix, 0, lambda seq: seq > 1, idle_poll_s=0.5, fresh=True
    ) as f:
        await _until(lambda: f.sub.parked, "the reader to wait")
        await redis.publish(channel, "t1 1 a")
        await _until(lambda: f.yielded == [1] and f.sub.parked, "the first token through the reader")
        for seq in range(2, 14):  # 12 tokens over ~0.6 s, longer than the idle poll
            await redis.publish(channel, f"t{seq} 1 w")
            await _until(lambda: f.taken[-1:] == [seq], f"token {seq} taken by the sink")  # noqa: B023
            await asyncio.sleep(0.05)
        await redis.publish(channel, '{"seq": "14", "kind": "done", "finish_reason": "stop"}')
        await asyncio.wait_for(f.reader, 10)
    assert f.yielded == [1, 14] and f.taken == list(range(2, 14))


async def test_a_resumed_reader_s_sink_does_not_hand_on_what_the_client_has(
    fanin: Fanin, redis: Redis, redis_server: RedisServer, prefix: str
) -> None:
    """Resumed after seq 5 with nothing newer stored, the reader waits; a replayed seq 1 (a worker
    re-sending after a failover) must not reach the sink as "the next": the client has it."""
    await redis.hset(Keys(prefix).request("r"), "status", "running")  # the request exists
    channel = fanin.keys.channel("r")
    async with _following(fanin, redis_server.url, prefix, 5, lambda seq: True, idle_poll_s=5) as f:
        witness = await _subscribe(fanin, "r")  # offered each event in the same callback as f.sub
        await _until(lambda: f.sub.parked, "the resumed reader to wait")
        await redis.publish(channel, "t1 1 old")
        await _until(lambda: [e.seq for e in witness.events] == [1], "the replayed seq to arrive")
        await _until(lambda: not f.sub.events and f.sub.parked, "the replayed seq dropped by the reader")
        await redis.publish(channel, "t6 1 new")
        await _until(lambda: f.taken == [6], "seq 6 taken by the sink")
        await redis.publish(channel, '{"seq": "7", "kind": "done", "finish_reason": "stop"}')
        await asyncio.wait_for(f.reader, 10)
    assert f.yielded == [7] and f.taken == [6]
