"""Follow one request's events in seq order: live from the fan-in, gaps and backlog from the stream.

Every reader drops a seq it has already delivered and fills any gap from the durable stream, so the
client sees each event exactly once, in order, whatever Pub/Sub dropped or duplicated.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from breakwater.broker import Broker
from breakwater.gateway.fanin import Fanin, GatewayDraining, Subscription
from breakwater.protocol.events import TokenEvent


class RequestGone(Exception):
    """The request record and its stream no longer exist (never existed or expired)."""


async def follow_events(
    broker: Broker,
    fanin: Fanin,
    rid: str,
    after: int,
    *,
    idle_poll_s: float,
    subscription: Subscription | None = None,
) -> AsyncIterator[TokenEvent]:
    """Yield events with seq > ``after`` until the terminal one (inclusive)."""
    sub = subscription or await fanin.subscribe(rid)
    last = after
    try:
        while True:
            _stop_if_draining(fanin, rid)
            # Catch up from the durable stream: at start, after an overflow, a gap or an idle spell.
            backlog = await broker.read_events(rid, last)
            while backlog:
                for event in backlog:
                    if event.seq != last + 1:
                        continue
                    last = event.seq
                    yield event
                    if event.terminal:
                        return
                backlog = await broker.read_events(rid, last)
            if last == after:
                await _ensure_exists(broker, rid)
            sub.overflowed = False
            async for event in _live(sub, idle_poll_s):
                if event.seq <= last:
                    continue
                if event.seq > last + 1:
                    break  # gap: re-read the stream
                last = event.seq
                yield event
                if event.terminal:
                    return
    finally:
        if subscription is None:
            await fanin.unsubscribe(sub)


def _stop_if_draining(fanin: Fanin, rid: str) -> None:
    if fanin.draining:
        raise GatewayDraining(rid)


async def _ensure_exists(broker: Broker, rid: str) -> None:
    if not await broker.redis.exists(broker.keys.request(rid)):
        raise RequestGone(rid)


async def _live(sub: Subscription, idle_poll_s: float) -> AsyncIterator[TokenEvent]:
    """Live events until the buffer overflows or nothing arrives for ``idle_poll_s``."""
    while not sub.overflowed:
        try:
            event = sub.queue.get_nowait()
        except asyncio.QueueEmpty:
            try:
                event = await asyncio.wait_for(sub.queue.get(), idle_poll_s)
            except TimeoutError:
                return
        yield event
    sub.drain()
