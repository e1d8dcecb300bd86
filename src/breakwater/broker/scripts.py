"""The broker's Lua scripts, called by SHA with one round trip each.

redis-py's registered scripts send ``SCRIPT EXISTS`` before every pipeline (one more round trip per
engine step) and cannot recover a pipeline whose ``EVALSHA`` meets an empty script cache (Redis
restarted between the check and the call). Here a call is always ``EVALSHA``; on ``NOSCRIPT`` the
script is loaded and the call, or the whole pipeline, is sent again. Every script is idempotent or
fenced, so sending a pipeline twice is safe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

Arg = str | int | float


class Script:
    """One Lua script from ``broker/lua/<name>.lua``."""

    def __init__(self, redis: Redis, name: str) -> None:
        self.redis = redis
        self.name = name
        self.source = resources.files("breakwater.broker").joinpath("lua", f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await self.redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load()
            return await self.redis.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Add a call to ``pipe`` (run it with :func:`run_pipeline`)."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    async def load(self) -> None:
        await self.redis.script_load(self.source)


async def run_pipeline(
    redis: Redis, scripts: Sequence[Script], build: Callable[[Pipeline], None], *, transaction: bool = False
) -> list[Any]:
    """Build and send one pipeline; when Redis lost its script cache, load ``scripts`` and resend."""
    for attempt in (1, 2):
        async with redis.pipeline(transaction=transaction) as pipe:
            build(pipe)
            try:
                return list(await pipe.execute())
            except NoScriptError:
                if attempt == 2:
                    raise
        for script in scripts:
            await script.load()
    raise AssertionError("unreachable")
