"""A worker's token writes: one engine step's appends, in one script call on one Redis, in one call
per node on a Redis Cluster (``append.lua``). Part of :class:`~breakwater.broker.Broker`."""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import NoScriptError, ResponseError

from breakwater.broker.cluster import Address, ClusterPipelinedRedis, Fast
from breakwater.broker.scripts import Call, Script
from breakwater.broker.types import Append
from breakwater.broker.wire import Arg
from breakwater.keys import Keys

log = logging.getLogger(__name__)


class Appends:
    """Part of :class:`~breakwater.broker.Broker`."""

    fast: Fast
    keys: Keys
    publish: str
    token_stream_maxlen: int
    _append: Script
    _append_node: Script
    _per_node = True  # one append call per node and step (False: per sequence, Redis < 7)

    async def append_step(self, appends: list[Append]) -> list[int]:
        """One engine step's deltas for all sequences, in one script call; each append is fenced and
        idempotent, so the call may be retried after a lost reply."""
        if not appends:
            return []
        if isinstance(self.fast, ClusterPipelinedRedis):
            if self._per_node:
                return await self._append_per_node(self.fast, appends)
            return await self._append_each(appends)
        keys: list[str] = []
        args: list[Arg] = [self.token_stream_maxlen, self.publish]
        for a in appends:
            keys += (self.keys.request(a.rid), self.keys.tokens(a.rid), self.keys.emitted(a.rid))
            self._append_args(a, args)
        return [int(x) for x in await self._append(keys, args)]

    async def _append_per_node(self, fast: ClusterPipelinedRedis, appends: list[Append]) -> list[int]:
        """On a cluster: each node's sequences in one call (append.lua's per-node form), all nodes at
        once. A node's call that fails (a slot moved or migrating, a lost connection, a script not
        loaded) wrote nothing, or only writes that are idempotent: its sequences are sent again one
        call each, where redirections and failovers are followed."""
        groups: dict[Address, list[int]] = {}
        for i, a in enumerate(appends):
            groups.setdefault(fast.address_of(self.keys.request(a.rid)), []).append(i)
        commands = []
        for ids in groups.values():
            args: list[Arg] = [self.token_stream_maxlen, self.publish]
            for i in ids:
                rid = appends[i].rid
                args += (self.keys.request(rid), self.keys.tokens(rid), self.keys.emitted(rid))
                self._append_args(appends[i], args)
            commands.append(self._append_node.evalsha([self.keys.request(appends[ids[0]].rid)], args))
        sent = await asyncio.gather(
            *(fast.pipeline_at(addr, [c]) for addr, c in zip(groups, commands, strict=True))
        )
        out: list[int] = [0] * len(appends)
        alone: list[int] = []
        for ids, (reply,) in zip(groups.values(), sent, strict=True):
            if isinstance(reply, Exception):
                if isinstance(reply, NoScriptError):
                    await self._load_per_node()
                alone += ids
                continue
            for i, seq in zip(ids, reply, strict=True):
                out[i] = int(seq)
        if alone:
            for i, seq in zip(alone, await self._append_each([appends[i] for i in alone]), strict=True):
                out[i] = seq
        return out

    async def _append_each(self, appends: list[Append]) -> list[int]:
        """One call per sequence, each routed to its slot (redirections and failovers followed)."""
        calls: list[Call] = [
            (
                [self.keys.request(a.rid), self.keys.tokens(a.rid), self.keys.emitted(a.rid)],
                self._append_args(a, [self.token_stream_maxlen, self.publish]),
            )
            for a in appends
        ]
        return [int(reply[0]) for reply in await self._append.many(calls)]

    async def _load_per_node(self) -> None:
        """Load the per-node form; a server that cannot run it (script flags are Redis 7's) keeps
        the one-call-per-sequence form from then on."""
        try:
            await self._append_node.load()
        except ResponseError as exc:
            self._per_node = False
            log.warning("appends go one call per sequence", extra={"fields": {"error": str(exc)}})

    def _append_args(self, a: Append, args: list[Arg]) -> list[Arg]:
        """``args`` + one sequence's arguments of ``append.lua``."""
        args += (a.attempt, self.keys.channel(a.rid), a.text, a.tokens, a.wseq, a.logprobs, a.at)
        return args
