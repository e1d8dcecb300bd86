"""The broker's Lua scripts, called by SHA on the pipelined raw connection (one round trip each).

redis-py's registered scripts send ``SCRIPT EXISTS`` before every pipeline (one more round trip per
engine step) and cannot recover a pipeline whose ``EVALSHA`` meets an empty script cache (Redis
restarted between the check and the call). Here a call is always ``EVALSHA``; on ``NOSCRIPT`` the
script is loaded and the call, or the whole batch, is sent again. Every script is idempotent or
fenced, so sending a call twice is safe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from breakwater.broker.cluster import Fast
from breakwater.broker.wire import Arg, raise_errors

Call = tuple[Sequence[str], Sequence[Arg]]  # (keys, args)


def _text(name: str) -> str:
    return resources.files("breakwater.broker").joinpath("lua", f"{name}.lua").read_text()


class Script:
    """One Lua script from ``broker/lua/<name>.lua``."""

    def __init__(self, client: Fast, name: str, flags: str = "", parts: Sequence[str] = ()) -> None:
        """``flags``: Redis 7 script flags (``allow-cross-slot-keys``), declared in a shebang line.
        ``parts``: other scripts this one calls, each as a local function of (KEYS, ARGV) named after
        it (their text is not repeated in ``<name>.lua``)."""
        self.client = client
        self.name = name
        self.source = "".join(
            f"local function {part}(KEYS, ARGV)\n{_text(part)}\nend\n" for part in parts
        ) + _text(name)
        if flags:
            self.source = f"#!lua flags={flags}\n{self.source}"
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def evalsha(self, keys: Sequence[str], args: Sequence[Arg]) -> tuple[Arg, ...]:
        """The command that calls the script (for a caller that sends it itself)."""
        return self._evalsha(keys, args)

    def _evalsha(self, keys: Sequence[str], args: Sequence[Arg]) -> tuple[Arg, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def _eval(self, keys: Sequence[str], args: Sequence[Arg]) -> tuple[Arg, ...]:
        return ("EVAL", self.source, len(keys), *keys, *args)

    async def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        return (await self.many([(keys, args)]))[0]

    async def many(self, calls: Sequence[Call]) -> list[Any]:
        """Several calls in one write; raises the first error reply. A server without the script
        gets it loaded; one that still lacks it (a cluster node not yet in the slot map, importing
        a slot) gets the call as EVAL, which loads it there."""
        replies = await self.client.pipeline([self._evalsha(k, a) for k, a in calls])
        if any(isinstance(r, NoScriptError) for r in replies):
            await self.load()
            replies = await self.client.pipeline([self._evalsha(k, a) for k, a in calls])
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            evals = await self.client.pipeline([self._eval(*calls[i]) for i in missing])
            for i, reply in zip(missing, evals, strict=True):
                replies[i] = reply
        return raise_errors(replies)

    async def load(self) -> None:
        await self.client.broadcast("SCRIPT", "LOAD", self.source)
