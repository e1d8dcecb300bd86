"""One Pub/Sub connection per gateway process, fanned in to bounded per-request buffers.

Pub/Sub is at-most-once and a slow client must not stall others, so a full buffer is not waited on:
the subscription is flagged ``overflowed`` and its reader catches up from the durable token stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from breakwater.broker.errors import UNREACHABLE, Backoff
from breakwater.keys import Keys
from breakwater.protocol.events import TokenEvent

log = logging.getLogger(__name__)
WAKE = TokenEvent(seq=0, kind="token")  # never delivered: readers skip seq <= the last they sent


class GatewayDraining(Exception):
    """This gateway is shutting down: end the client's stream so it resumes on another gateway."""


class Subscription:
    """Live events of one request; ``overflowed`` tells the reader to re-read the durable stream."""

    def __init__(self, rid: str, maxsize: int, on_overflow: Callable[[], None] | None = None) -> None:
        self.rid = rid
        self.on_overflow = on_overflow
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue(maxsize=maxsize)
        self.overflowed = False
        self.confirmed = asyncio.get_running_loop().create_future()

    def wake(self) -> None:
        """Make a waiting reader look at its flags now (gateway drain)."""
        self.overflowed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(WAKE)

    def offer(self, event: TokenEvent) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            if not self.overflowed and self.on_overflow is not None:
                self.on_overflow()
            self.overflowed = True

    def drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()


class Fanin:
    """Routes channel messages to subscriptions; many readers of one request are allowed."""

    def __init__(
        self, redis: Redis, keys: Keys, buffer: int, on_overflow: Callable[[], None] | None = None
    ) -> None:
        self.keys = keys
        self.buffer = buffer
        self.on_overflow = on_overflow  # counted: a slow reader fell back to the durable stream
        # A (re)connect reads the server's handshake: a SUBSCRIBE issued meanwhile would read on the
        # same socket from a second coroutine (RuntimeError, a 500 after a Redis restart).
        self._connecting = asyncio.Lock()
        self._pubsub: PubSub = redis.pubsub()
        self._subs: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self.draining = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fanin")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(*UNREACHABLE):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    def begin_drain(self) -> None:
        """Every reader stops at its next check; see :class:`GatewayDraining`."""
        self.draining = True
        for subs in self._subs.values():
            for sub in subs:
                sub.wake()

    @property
    def active(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def subscribe(self, rid: str, confirm_timeout_s: float = 5.0) -> Subscription:
        """Subscribe and wait until Redis confirms, so no event published afterwards is missed."""
        sub = Subscription(rid, self.buffer, self.on_overflow)
        channel = self.keys.channel(rid)
        first = channel not in self._subs
        self._subs.setdefault(channel, set()).add(sub)
        if first:
            try:
                async with self._connecting:  # never while the reader task is reconnecting
                    await self._pubsub.subscribe(channel)
                await asyncio.wait_for(asyncio.shield(sub.confirmed), confirm_timeout_s)
            except BaseException:
                await self.unsubscribe(sub)
                raise
        else:
            sub.confirmed.set_result(None)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        channel = self.keys.channel(sub.rid)
        subs = self._subs.get(channel)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[channel]
            with contextlib.suppress(*UNREACHABLE):
                await self._pubsub.unsubscribe(channel)

    async def _run(self) -> None:
        backoff = Backoff(base_s=0.05)
        while True:
            try:
                async with self._connecting:
                    await self._pubsub.connect()  # type: ignore[no-untyped-call]
                while True:
                    message = await self._pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._dispatch(message)
                    backoff.reset()
            except UNREACHABLE as exc:
                log.warning("pubsub connection lost; reconnecting", extra={"fields": {"error": str(exc)}})
                # Subscribers re-read their durable streams on the idle poll, so nothing is lost.
                await asyncio.sleep(backoff.next_delay())

    def _dispatch(self, message: dict[str, object]) -> None:
        channel = str(message.get("channel"))
        kind = message.get("type")
        subs = self._subs.get(channel)
        if not subs:
            return
        if kind == "subscribe":
            for sub in subs:
                if not sub.confirmed.done():
                    sub.confirmed.set_result(None)
            return
        if kind != "message":
            return
        try:
            event = TokenEvent.from_payload(str(message["data"]))
        except (ValueError, KeyError) as exc:
            log.error("bad event on %s: %s", channel, exc)
            return
        for sub in subs:
            sub.offer(event)
