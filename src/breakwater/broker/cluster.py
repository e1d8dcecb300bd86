"""The hot path's raw connections on a Redis Cluster: one :class:`PipelinedRedis` per primary, each
command routed by its key's hash slot.

Every script Breakwater runs touches one slot (docs/architecture.md, "Redis Cluster"), so a command
goes to the primary that serves its first key. A batch is split per primary and sent to all of
them at once: one round trip per node. Redirections are followed as redis-py's cluster client
follows them: ``MOVED`` updates the slot map (and refreshes the whole map in the background),
``ASK`` sends ``ASKING`` and the command to the importing node once, ``TRYAGAIN`` and
``CLUSTERDOWN`` (a slot mid-migration, a failover under way) and a lost connection wait a little and
retry after refreshing the map. Retrying is safe: every script is idempotent or fenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from breakwater.broker.wire import Arg, Endpoint, PipelinedRedis
from breakwater.stopping import stop_loops

log = logging.getLogger(__name__)
SLOTS = 16384
KEYLESS = frozenset({"SCRIPT", "PING", "TIME", "INFO", "CLUSTER", "ASKING", "FUNCTION"})
RETRY_FOR_S = 15.0  # a failover takes cluster-node-timeout (15 s by default) plus an election
#: A node is down, failing over, or its slot is moving: wait, re-read the slot map, send again.
TRANSIENT = (TryAgainError, ClusterDownError, RedisConnectionError, RedisTimeoutError)
Address = tuple[str, int]
NON_LOCAL = "non local key"  # Redis's refusal of a script's undeclared key that lives on another node


def routing_key(args: Sequence[Arg]) -> str | None:
    """The key a command is routed by (None: any primary will do)."""
    name = str(args[0]).upper()
    if name in KEYLESS:
        return None
    if name in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL"):
        return str(args[3]) if int(args[2]) > 0 else None
    if name in ("XREADGROUP", "XREAD"):
        upper = [str(a).upper() for a in args]
        return str(args[upper.index("STREAMS") + 1])
    return str(args[1]) if len(args) > 1 else None


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


class ClusterPipelinedRedis:
    """:class:`PipelinedRedis`'s interface over every primary of a cluster."""

    cluster = True

    def __init__(self, seeds: Sequence[Endpoint], timeout_s: float | None = 10.0) -> None:
        if not seeds:
            raise ValueError("a cluster needs at least one seed node")
        self.seeds = list(seeds)
        self.timeout_s = timeout_s
        self._slots: list[Address | None] = [None] * SLOTS
        self._primaries: list[Address] = []
        self._nodes: dict[Address, PipelinedRedis] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._refreshed_at = -1e9
        self._failed: dict[Address, float] = {}  # node -> when a connection to it last failed
        self._closing: set[asyncio.Task[None]] = set()
        self.refreshes = 0

    # -- the PipelinedRedis interface -------------------------------------------------------------
    async def execute(self, *args: Arg) -> Any:
        (reply,) = await self.pipeline([args])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Send ``commands``, split per primary, at once; their replies in order, an error reply as
        its exception (not raised). Redirections and failovers are retried within RETRY_FOR_S."""
        if not self._primaries:
            await self.refresh()
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asking: dict[int, Address] = {}
        deadline = time.monotonic() + RETRY_FOR_S
        delay = 0.02
        rounds = 0
        while todo:
            rounds += 1
            groups: dict[Address, list[int]] = {}
            for i in todo:
                groups.setdefault(asking.get(i) or self._address(commands[i]), []).append(i)
            sent = await asyncio.gather(
                *(self._send(addr, ids, commands, asking) for addr, ids in groups.items()),
            )
            retry: list[int] = []
            wait = False
            for ids, got in zip(groups.values(), sent, strict=True):
                for i, reply in zip(ids, got, strict=True):
                    again, pause = self._settle(i, reply, replies, asking)
                    if again:
                        retry.append(i)
                    wait = wait or pause
            if retry and time.monotonic() + delay > deadline:
                for i in retry:
                    if replies[i] is None:  # only ever redirected
                        replies[i] = ClusterDownError("the cluster's slot map did not settle in time")
                return replies
            if wait or rounds > 3:  # a redirection loop (a migration settling) also pauses
                failed_at = time.monotonic()
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                with contextlib.suppress(RedisConnectionError, TimeoutError):
                    left = max(0.1, deadline - time.monotonic())
                    await asyncio.wait_for(self.refresh(since=failed_at), left)
            todo = retry
        return replies

    def _settle(
        self, i: int, reply: Any, replies: list[Any], asking: dict[int, Address]
    ) -> tuple[bool, bool]:
        """File command ``i``'s reply; (send it again, after a pause)."""
        asking.pop(i, None)
        if isinstance(reply, MovedError):
            self._slots[int(reply.slot_id)] = (reply.host, int(reply.port))
            self._refresh_soon()
            return True, False
        if isinstance(reply, AskError):
            asking[i] = (reply.host, int(reply.port))
            return True, False
        if isinstance(reply, ResponseError) and NON_LOCAL in str(reply):
            # A key a script names itself (a tenant's wait list) moved ahead of its slot: the slot is
            # migrating. Not sent again (the script may have written before it met the key): a
            # transient error, which the caller answers with a 503 and cleans up after (it was a 500).
            replies[i] = TryAgainError(f"a slot is migrating: {reply}")
            return False, False
        replies[i] = reply
        return isinstance(reply, TRANSIENT), isinstance(reply, TRANSIENT)

    async def broadcast(self, *args: Arg) -> None:
        """A command for every primary (``SCRIPT LOAD``)."""
        if not self._primaries:
            await self.refresh()
        replies = await asyncio.gather(
            *(self._node(addr).execute(*args) for addr in self._primaries), return_exceptions=True
        )
        errors = [r for r in replies if isinstance(r, BaseException)]
        if errors and len(errors) == len(replies):
            raise errors[0]

    async def execute_at(self, key: str, *args: Arg) -> Any:
        """A command on the connection to ``key``'s primary (``WAIT`` after writes to that key)."""
        if not self._primaries:
            await self.refresh()
        return await self._node(self._slots[slot_of(key)] or self._primaries[0]).execute(*args)

    async def pipeline_at(self, addr: Address, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """``commands`` on ``addr``'s connection as they are: no redirection followed, no retry; an
        error reply or a lost connection is returned as its exception."""
        return await self._send(addr, list(range(len(commands))), commands, {})

    def address_of(self, key: str) -> Address:
        """The primary that serves ``key``'s slot, as the map says now."""
        return self._address(("GET", key))

    def endpoint_at(self, addr: Address) -> Endpoint:
        return self.seeds[0].at(*addr)

    async def aclose(self) -> None:
        if self._refreshing is not None:
            await stop_loops([self._refreshing])  # it would open nodes again after this
        nodes, self._nodes = self._nodes, {}
        for node in nodes.values():
            await node.aclose()

    # -- topology ---------------------------------------------------------------------------------
    @property
    def primaries(self) -> list[Endpoint]:
        return [self.seeds[0].at(host, port) for host, port in self._primaries]

    async def refresh(self, since: float | None = None) -> None:
        """Read the slot map (``CLUSTER SLOTS``) from the first node that answers; nodes that failed
        lately are asked last. ``since``: skip it if another caller refreshed after that moment
        (callers that met the same failover share one refresh)."""
        async with self._refresh_lock:
            if since is not None and self._refreshed_at > since:
                return
            now = time.monotonic()
            candidates = [*self._primaries, *((s.host, s.port) for s in self.seeds)]
            candidates.sort(key=lambda a: now - self._failed.get(a, -1e9) < 10.0)  # stable: healthy first
            last: Exception | None = None
            for addr in dict.fromkeys(candidates):
                try:
                    reply = await asyncio.wait_for(self._node(addr).execute("CLUSTER", "SLOTS"), 2.0)
                except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
                    self._failed[addr] = time.monotonic()
                    last = exc
                    continue
                except Exception as exc:  # an error reply (a node still loading, say)
                    last = exc
                    continue
                self._apply(reply, addr)
                self.refreshes += 1
                self._refreshed_at = time.monotonic()
                return
            raise RedisConnectionError(f"no cluster node answered CLUSTER SLOTS: {last}")

    def _apply(self, reply: Any, seen_from: Address) -> None:
        slots: list[Address | None] = [None] * SLOTS
        primaries: list[Address] = []
        for row in reply:
            start, end, primary = int(row[0]), int(row[1]), row[2]
            host = str(primary[0]) or seen_from[0]  # '' or '?' : the node we asked
            addr = (seen_from[0] if host == "?" else host, int(primary[1]))
            if addr not in primaries:
                primaries.append(addr)
            for slot in range(start, end + 1):
                slots[slot] = addr
        self._slots, self._primaries = slots, primaries
        for addr in [a for a in self._nodes if a not in primaries]:
            task = asyncio.get_running_loop().create_task(self._nodes.pop(addr).aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._quiet_refresh())

    async def _quiet_refresh(self) -> None:
        with contextlib.suppress(Exception):
            await self.refresh()

    def _address(self, command: Sequence[Arg]) -> Address:
        key = routing_key(command)
        if key is not None:
            addr = self._slots[slot_of(key)]
            if addr is not None:
                return addr
        return self._primaries[0] if self._primaries else (self.seeds[0].host, self.seeds[0].port)

    def _node(self, addr: Address) -> PipelinedRedis:
        node = self._nodes.get(addr)
        if node is None:
            node = self._nodes[addr] = PipelinedRedis(self.seeds[0].at(*addr), self.timeout_s)
        return node

    async def _send(
        self, addr: Address, ids: list[int], commands: Sequence[Sequence[Arg]], asking: dict[int, Address]
    ) -> list[Any]:
        """One node's share of a batch; a lost connection is every command's reply."""
        wire: list[Sequence[Arg]] = []
        for i in ids:
            if i in asking:
                wire.append(("ASKING",))
            wire.append(commands[i])
        try:
            got = await self._node(addr).pipeline(wire)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._failed[addr] = time.monotonic()
            log.warning("lost a cluster node; retrying", extra={"fields": {"node": f"{addr[0]}:{addr[1]}"}})
            return [exc] * len(ids)
        out: list[Any] = []
        k = 0
        for i in ids:
            if i in asking:
                k += 1  # ASKING's +OK
            out.append(got[k])
            k += 1
        return out


#: The hot path's client: one server's pipelined connection, or a cluster's, routed by slot.
Fast = PipelinedRedis | ClusterPipelinedRedis
