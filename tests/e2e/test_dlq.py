"""``breakwater dlq list|retry|purge`` against real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from redis.asyncio import Redis

from breakwater.broker import Broker
from breakwater.keys import Keys
from breakwater.redis_server import RedisServer


def cli(server: RedisServer, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BREAKWATER_REDIS_URL": server.url, "BREAKWATER_KEY_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "breakwater", "dlq", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def test_list_retry_purge(redis_server: RedisServer, redis: Redis, prefix: str) -> None:
    broker = Broker(redis, Keys(prefix))
    record = {
        "model": "sim", "lane": "batch", "status": "error", "attempt": "3", "seq": "1", "tokens": "0",
        "emitted": "", "watchers": "0", "kind": "completion", "prompt": "retry me", "seed": "5",
        "max_tokens": "7", "timeout_s": "60", "request_id": "req-1", "failures": "3",
    }  # fmt: skip
    for rid in ("cmpl-dead1", "cmpl-dead2"):
        await broker.enqueue(
            rid=rid, model="sim", lane="batch", record=record, max_queued=10, request_id="req-1", ttl_s=600
        )
        await broker.dead_letter("sim", rid, "gave up after 3 attempts", 3)
    await redis.delete(Keys(prefix).jobs("sim", "batch"))

    listed = cli(redis_server, prefix, "list", "--model", "sim")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [r[1] for r in rows] == ["cmpl-dead1", "cmpl-dead2"]
    assert all(r[2] == "attempts=3" and r[4] == "gave up after 3 attempts" for r in rows)

    retried = cli(redis_server, prefix, "retry", "--model", "sim", "cmpl-dead1")
    assert retried.returncode == 0, retried.stderr
    old, new = retried.stdout.split()
    assert old == "cmpl-dead1" and new.startswith("cmpl-") and new != old
    fresh = await broker.get_request(new)
    assert (fresh["status"], fresh["attempt"], fresh["prompt"], fresh["seed"]) == (
        "queued",
        "0",
        "retry me",
        "5",
    )
    assert fresh["retried_from"] == "cmpl-dead1" and "failures" not in fresh
    jobs: Any = await redis.xrange(Keys(prefix).jobs("sim", "batch"))
    assert [fields["rid"] for _, fields in jobs] == [new]  # enqueued once, on its lane
    assert [
        r[1]
        for r in (
            line.split("\t")
            for line in cli(redis_server, prefix, "list", "--model", "sim").stdout.splitlines()
        )
    ] == ["cmpl-dead2"]

    purged = cli(redis_server, prefix, "purge", "--model", "sim")
    assert purged.returncode == 0 and "purged 1" in purged.stderr
    assert await redis.xlen(Keys(prefix).dlq("sim")) == 0
