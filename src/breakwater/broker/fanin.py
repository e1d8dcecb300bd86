"""One Pub/Sub connection per gateway process, fanned in to bounded per-request buffers.

Pub/Sub is at-most-once and a slow client must not stall others, so a full buffer is not waited on:
the subscription is flagged ``overflowed`` and its reader catches up from the durable token stream.

The connection is read by an :class:`asyncio.Protocol` and parsed by hiredis: every message that
arrived in one socket read is routed in one callback, with no coroutine, task or timer per message
(redis-py's ``PubSub.get_message`` costs several times more per token).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.broker.errors import UNREACHABLE, Backoff
from breakwater.broker.wire import Endpoint, Wire, command, open_wire
from breakwater.keys import Keys
from breakwater.protocol.events import TokenEvent
from breakwater.stopping import stop_loop
from breakwater.wakeup import Wakeup

log = logging.getLogger(__name__)
PING_EVERY_S = 5.0  # a connection silent for 3 of these (no reply to PING) is half-open: reconnect
LEAVE_EVERY_S = 0.05  # channels let go within this go in one UNSUBSCRIBE (Fanin)


class FanIn(Protocol):
    """What the gateway uses of its Pub/Sub fan-in: :class:`Fanin` (one connection), or
    :class:`~breakwater.broker.sharded_fanin.ShardedFanin` (a cluster's sharded Pub/Sub)."""

    draining: bool

    @property
    def active(self) -> int: ...
    async def start(self, timeout_s: float = 5.0) -> None: ...
    async def close(self) -> None: ...
    def begin_drain(self) -> None: ...
    async def subscribe(self, rid: str, confirm_timeout_s: float = 5.0) -> Subscription: ...
    async def open(self, rid: str, connect_timeout_s: float = 5.0) -> Subscription: ...
    async def confirm(self, sub: Subscription, timeout_s: float = 5.0) -> bool: ...
    async def unsubscribe(self, sub: Subscription) -> None: ...


class GatewayDraining(Exception):
    """This gateway is shutting down: end the client's stream so it resumes on another gateway."""


class Subscription:
    """Live events of one request for one reader; ``overflowed`` tells it to re-read the durable
    stream (its buffer filled, the connection was re-established, or the gateway drains).

    A reader may set a ``sink``: while it is ``parked`` (waiting, with everything it took handed on)
    the next event in seq order goes to the sink from the fan-in's callback, without waking the
    reader, if the sink takes it (returns True); the reader then goes on after ``delivered``."""

    __slots__ = (
        "_wakeup",
        "confirmed",
        "delivered",
        "events",
        "maxsize",
        "on_overflow",
        "overflowed",
        "parked",
        "rid",
        "sink",
    )

    def __init__(self, rid: str, maxsize: int, on_overflow: Callable[[], None] | None = None) -> None:
        self.rid = rid
        self.maxsize = maxsize
        self.on_overflow = on_overflow
        self.events: deque[TokenEvent] = deque()
        self.overflowed = False
        self.delivered = 0  # the last seq its reader (or its sink) handed on
        self.sink: Callable[[TokenEvent], bool] | None = None
        self.parked = False
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wakeup = Wakeup()

    def wake(self) -> None:
        """Make a waiting reader look at the durable stream now."""
        self.overflowed = True
        self._notify()

    def offer(self, event: TokenEvent) -> None:
        if (
            self.parked
            and self.sink is not None
            and event.seq == self.delivered + 1
            and not self.events
            and not self.overflowed
            and self._hand_on(self.sink, event)
        ):
            self.delivered = event.seq
            return
        if len(self.events) >= self.maxsize:
            if not self.overflowed and self.on_overflow is not None:
                self.on_overflow()
            self.overflowed = True
            return
        self.events.append(event)
        self._notify()

    def _hand_on(self, sink: Callable[[TokenEvent], bool], event: TokenEvent) -> bool:
        try:
            return sink(event)
        except Exception:  # the reader renders it again and meets the error itself
            log.exception("a stream's sink failed; its reader takes over", extra={"rid": self.rid})
            self.sink = None
            return False

    def drain(self) -> None:
        self.events.clear()

    def next_is_ready(self) -> bool:
        """The reader's next event is buffered: it will be handed on without waiting."""
        return not self.overflowed and bool(self.events) and self.events[0].seq == self.delivered + 1

    async def wait(self, timeout_s: float) -> None:
        """Until an event is buffered, the reader is woken, or ``timeout_s`` passes. One future and
        one timer handle: cancelling the caller cancels only the wait."""
        if self.events or self.overflowed:
            return
        await self._wakeup.wait(timeout_s)

    def _notify(self) -> None:
        self._wakeup.wake()


class Channels:
    """A gateway process's subscriptions by channel, and what every fan-in does with Redis's replies:
    a message goes to each reader's buffer; a confirmed subscription releases its readers (and, when
    it was subscribed again after a loss, makes them re-read the durable stream). The connections
    are the subclass's: :class:`Fanin` (one) or
    :class:`~breakwater.broker.sharded_fanin.ShardedFanin` (one per shard)."""

    def __init__(self, keys: Keys, buffer: int, on_overflow: Callable[[], None] | None) -> None:
        self.keys = keys
        self.buffer = buffer
        self.on_overflow = on_overflow  # counted: a slow reader fell back to the durable stream
        self._subs: dict[str, set[Subscription]] = {}
        self._unconfirmed: dict[str, int] = {}  # SUBSCRIBE commands sent and not yet answered
        self._resubscribed: set[str] = set()  # channels subscribed again after a loss
        self.draining = False

    async def open(self, rid: str, connect_timeout_s: float = 5.0) -> Subscription:
        raise NotImplementedError

    async def unsubscribe(self, sub: Subscription) -> None:
        """``sub``'s reader is done; the channel is let go with its last reader."""
        channel = self.keys.channel(sub.rid)
        subs = self._subs.get(channel)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            self._release(channel)

    def _release(self, channel: str) -> None:
        """Stop listening to ``channel`` (its last reader left)."""
        raise NotImplementedError

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
        sub = await self.open(rid, confirm_timeout_s)
        try:
            if not await self.confirm(sub, confirm_timeout_s):
                raise RedisConnectionError("Redis did not confirm the subscription in time")
        except BaseException:
            await self.unsubscribe(sub)
            raise
        return sub

    async def confirm(self, sub: Subscription, timeout_s: float = 5.0) -> bool:
        """Wait until Redis confirmed ``sub``'s subscription; False after ``timeout_s``."""
        if not sub.confirmed.done():
            await asyncio.wait({sub.confirmed}, timeout=timeout_s)
        return sub.confirmed.done()

    def _deliver(self, channel: str, payload: str) -> None:
        subs = self._subs.get(channel)
        if not subs:
            return
        try:
            event = TokenEvent.from_payload(payload)
        except (ValueError, KeyError) as exc:
            log.error("bad event on %s: %s", channel, exc)
            return
        for sub in subs:
            sub.offer(event)

    def _on_subscribed(self, channel: str) -> None:
        left = self._unconfirmed.get(channel, 0) - 1
        if left > 0:
            self._unconfirmed[channel] = left
            return
        self._unconfirmed.pop(channel, None)
        # Subscribed again after a loss: every reader of it may have missed events (also one whose
        # first subscription was never answered), so each re-reads the durable stream.
        missed = channel in self._resubscribed
        self._resubscribed.discard(channel)
        for sub in self._subs.get(channel, ()):
            if not sub.confirmed.done():
                sub.confirmed.set_result(None)
            if missed:
                sub.wake()


class Fanin(Channels):
    """Routes channel messages to subscriptions; many readers of one request are allowed."""

    def __init__(
        self,
        target: Redis | Endpoint | Callable[[], Endpoint],
        keys: Keys,
        buffer: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(keys, buffer, on_overflow)
        # Where each (re)connection goes: one server, or on a cluster the next node of its map
        # (classic Pub/Sub messages reach every node of a cluster).
        if callable(target) and not isinstance(target, Redis):
            self._endpoint: Callable[[], Endpoint] = target
        else:
            endpoint = target if isinstance(target, Endpoint) else Endpoint.of(target)
            self._endpoint = lambda: endpoint
        self._conn: Wire | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()  # set while connected
        # Channels let go and not yet unsubscribed: one UNSUBSCRIBE for all of them every
        # LEAVE_EVERY_S instead of one write (and one Redis command) per request.
        self._leaving: set[str] = set()
        self._leave: asyncio.TimerHandle | None = None

    async def start(self, timeout_s: float = 5.0) -> None:
        """Connect in the background; wait a little for the first connection (not an error if not)."""
        self._task = asyncio.create_task(self._run(), name="fanin")
        await self._until_up(timeout_s)

    async def _until_up(self, timeout_s: float) -> Wire | None:
        if self._conn is None:
            up = asyncio.ensure_future(self._up.wait())
            try:
                await asyncio.wait({up}, timeout=timeout_s)
            finally:
                up.cancel()
        return self._conn

    async def close(self) -> None:
        if self._leave is not None:
            self._leave.cancel()
        if self._task:
            await stop_loop(self._task)
        if self._conn is not None:
            self._conn.abort()

    async def open(self, rid: str, connect_timeout_s: float = 5.0) -> Subscription:
        """Send the SUBSCRIBE without waiting for Redis's confirmation (see :meth:`confirm`), so that
        a caller can overlap it with another round trip. Raises when the connection is down."""
        conn = self._conn or await self._until_up(connect_timeout_s)
        if conn is None:
            raise RedisConnectionError("the Pub/Sub connection is down")
        sub = Subscription(rid, self.buffer, self.on_overflow)
        channel = self.keys.channel(rid)
        subs = self._subs.setdefault(channel, set())
        subs.add(sub)
        if len(subs) == 1 and channel in self._leaving:
            self._leaving.discard(channel)  # still subscribed: it was about to be let go
        elif len(subs) == 1:
            self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
            conn.write(command("SUBSCRIBE", channel))
            return sub
        if not self._unconfirmed.get(channel):
            sub.confirmed.set_result(None)
        return sub

    def _release(self, channel: str) -> None:
        del self._subs[channel]
        if self._conn is None:
            return
        self._leaving.add(channel)
        if self._leave is None:
            self._leave = asyncio.get_running_loop().call_later(LEAVE_EVERY_S, self._unsubscribe)

    def _unsubscribe(self) -> None:
        self._leave = None
        leaving, self._leaving = self._leaving, set()
        if leaving and self._conn is not None:
            self._conn.write(command("UNSUBSCRIBE", *leaving))

    async def _run(self) -> None:
        backoff = Backoff(base_s=0.05)
        while True:
            try:
                conn = await self._connect()
            except UNREACHABLE as exc:
                log.warning("pubsub connect failed; retrying", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(backoff.next_delay())
                continue
            self._conn = conn
            self._up.set()
            began = time.monotonic()
            try:
                await self._watch(conn)
            finally:
                self._conn = None
                self._up.clear()
                conn.abort()
                self._unconfirmed.clear()
                self._resubscribed.clear()
                self._leaving.clear()  # a new connection starts without them
            if time.monotonic() - began > PING_EVERY_S:
                backoff.reset()  # it worked for a while; a refused AUTH, say, keeps backing off
            why = conn.closed.result() if conn.closed.done() else None
            log.warning("pubsub connection lost; reconnecting", extra={"fields": {"error": str(why)}})
            await asyncio.sleep(backoff.next_delay())

    async def _connect(self) -> Wire:
        endpoint = self._endpoint()
        conn = await open_wire(endpoint, self._on_reply)
        hello = [command(*c) for c in endpoint.hello]
        channels = list(self._subs)
        if channels:  # re-subscribe after a reconnect; the readers re-read what they missed
            for channel in channels:
                self._unconfirmed[channel] = 1
            self._resubscribed.update(channels)
            hello.append(command("SUBSCRIBE", *channels))
        hello.append(command("PING"))  # a reply proves the connection (and AUTH) works
        conn.write(b"".join(hello))
        return conn

    async def _watch(self, conn: Wire) -> None:
        """Until the connection closes; a PING every few seconds finds a half-open one."""
        while not conn.closed.done():
            done, _ = await asyncio.wait({conn.closed}, timeout=PING_EVERY_S)
            if done:
                return
            if time.monotonic() - conn.last_seen > 3 * PING_EVERY_S:
                conn.abort(TimeoutError("no reply from Redis on the Pub/Sub connection"))
                return
            conn.write(command("PING"))

    def _on_reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):  # a refused AUTH, say: reconnect with backoff
            log.error("pubsub error from Redis: %s", reply)
            if self._conn is not None:
                self._conn.abort(RedisConnectionError(str(reply)))
            return
        if not isinstance(reply, list) or len(reply) < 3:
            return  # +OK (AUTH), PONG
        kind, channel = reply[0], reply[1]
        if kind == "message":
            self._deliver(channel, reply[2])
        elif kind == "subscribe":
            self._on_subscribed(channel)
