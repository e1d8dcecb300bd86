"""The gateway's fan-in on a Redis Cluster with sharded Pub/Sub: ``SSUBSCRIBE`` on the primary that
serves each channel's slot (a channel shares its request's hash tag, and ``append.lua`` publishes
with ``SPUBLISH`` there), one connection per primary that has subscribers.

A sharded message travels only within its shard, so token events cost one shard's CPU, not every
node's as classic Pub/Sub on a cluster does. In exchange the subscriptions follow the slots: when a
slot migrates, its node ends them (a ``sunsubscribe`` the gateway did not ask for), and a failover
closes the connection. Either way the channels are subscribed again where the refreshed slot map
says, and their readers re-read the durable stream for what they missed (as after any reconnect,
see :mod:`breakwater.broker.fanin`). Same interface as :class:`~breakwater.broker.fanin.Fanin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError

from breakwater.broker.cluster import Address, ClusterPipelinedRedis
from breakwater.broker.errors import UNREACHABLE, Backoff
from breakwater.broker.fanin import PING_EVERY_S, Channels, Subscription
from breakwater.broker.wire import Wire, command, open_wire
from breakwater.keys import Keys
from breakwater.stopping import stop_loops

log = logging.getLogger(__name__)


class ShardedFanin(Channels):
    """Routes sharded channel messages to subscriptions; many readers of one request are allowed."""

    def __init__(
        self,
        fast: ClusterPipelinedRedis,
        keys: Keys,
        buffer: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(keys, buffer, on_overflow)
        self.fast = fast
        self._shard_of: dict[str, Address] = {}  # channel -> the node it is subscribed on
        self._conns: dict[Address, Wire] = {}
        self._connecting: dict[Address, asyncio.Future[Wire]] = {}
        self._orphans: set[str] = set()  # channels to subscribe again (slot moved, node lost)
        self._repair = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(*UNREACHABLE):
            await asyncio.wait_for(self.fast.refresh(), timeout_s)
        self._spawn(self._resubscriber(), "fanin-resubscribe")

    async def close(self) -> None:
        try:
            # A connection still opening can run on past its cancellation and start a reader: stop
            # until none is left (ended ones leave these collections a loop turn later).
            while running := self._running():
                await stop_loops(running)
        finally:
            for conn in self._conns.values():
                conn.abort()

    def _running(self) -> list[asyncio.Future[Any]]:
        tasks: list[asyncio.Future[Any]] = [*self._connecting.values(), *self._tasks]
        return [task for task in tasks if not task.done()]

    async def open(self, rid: str, connect_timeout_s: float = 5.0) -> Subscription:
        """Send the SSUBSCRIBE without waiting for its confirmation (see :meth:`confirm`)."""
        channel = self.keys.channel(rid)
        sub = Subscription(rid, self.buffer, self.on_overflow)
        subs = self._subs.setdefault(channel, set())
        subs.add(sub)
        if len(subs) > 1:
            if not self._unconfirmed.get(channel) and channel not in self._orphans:
                sub.confirmed.set_result(None)
            return sub
        try:
            await asyncio.wait_for(self._subscribe(channel), connect_timeout_s)
        except BaseException:
            subs.discard(sub)
            if not subs:
                self._forget(channel)
            else:  # readers that joined meanwhile wait on it: subscribe it again in the background
                self._orphan([channel])
            raise
        return sub

    def _release(self, channel: str) -> None:
        addr = self._shard_of.get(channel)
        self._forget(channel)
        conn = self._conns.get(addr) if addr else None
        if conn is not None:
            conn.write(command("SUNSUBSCRIBE", channel))

    # -- subscriptions per shard ------------------------------------------------------------------
    def _forget(self, channel: str) -> None:
        self._subs.pop(channel, None)
        self._shard_of.pop(channel, None)
        self._unconfirmed.pop(channel, None)
        self._resubscribed.discard(channel)
        self._orphans.discard(channel)

    async def _subscribe(self, channel: str) -> None:
        # Counted before the first await: a reader that joins meanwhile waits for the confirmation.
        self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
        addr = self.fast.address_of(channel)
        try:
            conn = await self._conn(addr)
        except BaseException:
            left = self._unconfirmed.get(channel, 0) - 1
            if left > 0:
                self._unconfirmed[channel] = left
            else:
                self._unconfirmed.pop(channel, None)
            raise
        if channel not in self._subs:  # its last reader left meanwhile
            return
        self._shard_of[channel] = addr
        conn.write(command("SSUBSCRIBE", channel))

    async def _conn(self, addr: Address) -> Wire:
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed.done():
            return conn
        pending = self._connecting.get(addr)
        if pending is None:
            # Shared by every request from now on: never the context (request id, tenant) of the
            # request that happened to open it, which its log lines would name.
            pending = asyncio.get_running_loop().create_task(
                self._connect(addr), context=contextvars.Context()
            )
            self._connecting[addr] = pending
            pending.add_done_callback(lambda _: self._connecting.pop(addr, None))
        return await asyncio.shield(pending)

    async def _connect(self, addr: Address) -> Wire:
        endpoint = self.fast.endpoint_at(addr)
        try:
            conn = await open_wire(endpoint, functools.partial(self._on_reply, addr))
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to {addr[0]}:{addr[1]}: {exc}") from exc
        conn.write(b"".join([*(command(*c) for c in endpoint.hello), command("PING")]))
        self._conns[addr] = conn
        self._spawn(self._watch(addr, conn), f"fanin-{addr[1]}")
        return conn

    async def _watch(self, addr: Address, conn: Wire) -> None:
        """Until the connection closes (PING finds a half-open one); then its channels move."""
        while not conn.closed.done():
            done, _ = await asyncio.wait({conn.closed}, timeout=PING_EVERY_S)
            if done:
                break
            if time.monotonic() - conn.last_seen > 3 * PING_EVERY_S:
                conn.abort(TimeoutError("no reply from Redis on a sharded Pub/Sub connection"))
                break
            conn.write(command("PING"))
        if self._conns.get(addr) is conn:
            del self._conns[addr]
        lost = [ch for ch, a in self._shard_of.items() if a == addr]
        if lost:
            log.warning(
                "sharded pubsub connection lost; subscribing again",
                extra={"fields": {"node": f"{addr[0]}:{addr[1]}", "channels": len(lost)}},
            )
            self._orphan(lost)

    def _orphan(self, channels: list[str]) -> None:
        for channel in channels:
            self._shard_of.pop(channel, None)
            self._unconfirmed.pop(channel, None)
            self._orphans.add(channel)
            for sub in self._subs.get(channel, ()):
                sub.wake()  # follow the durable stream until subscribed again
        self._repair.set()

    async def _resubscriber(self) -> None:
        """Subscribe orphaned channels again where the refreshed slot map says, with backoff."""
        backoff = Backoff(base_s=0.05)
        while True:
            await self._repair.wait()
            self._repair.clear()
            try:
                await self.fast.refresh()
                for channel in list(self._orphans):
                    if channel in self._subs:
                        self._resubscribed.add(channel)
                        await self._subscribe(channel)
                    self._orphans.discard(channel)
                backoff.reset()
            except UNREACHABLE as exc:
                log.warning(
                    "sharded pubsub resubscribe failed; retrying", extra={"fields": {"error": str(exc)}}
                )
                await asyncio.sleep(backoff.next_delay())
                self._repair.set()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- replies ------------------------------------------------------------------------------------
    def _on_reply(self, addr: Address, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith(("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")):
                # An SSUBSCRIBE sent on a stale slot map: its channel goes where the new map says
                # (the reply does not name it: every channel still unconfirmed on this node).
                self._orphan(
                    [ch for ch, a in self._shard_of.items() if a == addr and ch in self._unconfirmed]
                )
                return
            log.error("sharded pubsub error from Redis: %s", reply)
            conn = self._conns.get(addr)
            if conn is not None:
                conn.abort(RedisConnectionError(str(reply)))
            return
        if not isinstance(reply, list) or len(reply) < 3:
            return  # +OK (AUTH), PONG
        kind, channel = reply[0], reply[1]
        if kind == "smessage":
            self._deliver(channel, reply[2])
        elif kind == "ssubscribe":
            self._on_subscribed(channel)
        elif kind == "sunsubscribe" and channel in self._subs and self._shard_of.get(channel) == addr:
            self._orphan([channel])  # not asked for: its slot moved to another node
