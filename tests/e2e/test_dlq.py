"""``breakwater dlq list|retry|purge`` against real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from redis.asyncio import Redis

from breakwater.broker import Broker, RequestSpec, Status
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
    spec = RequestSpec(
        model="sim", lane="batch", kind="completion", request_id="req-1", timeout_s=60.0,
        prompt="retry me", seed=5, max_tokens=7,
    )  # fmt: skip
    for rid in ("cmpl-dead1", "cmpl-dead2"):
        await broker.enqueue(rid=rid, spec=spec, max_queued=10, result_ttl_s=600)
        await broker.dead_letter("sim", rid, "gave up after 3 attempts", 3)
    await broker.fast.aclose()
    keys = Keys(prefix)  # the two are dead, not queued: clear the lane (stream and waiting list)
    await redis.delete(
        keys.jobs("sim", "batch"),
        keys.waiting_prefix("sim", "batch") + "anonymous",
        keys.backlog("sim", "batch"),
    )

    listed = cli(redis_server, prefix, "list", "--model", "sim")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [r[1] for r in rows] == ["cmpl-dead1", "cmpl-dead2"]
    assert all(r[2] == "attempts=3" and r[4] == "gave up after 3 attempts" for r in rows)

    typo = cli(redis_server, prefix, "retry", "--model", "sim", "cmpl-dead9")  # no such letter: said
    assert typo.returncode == 1 and "no dead letter cmpl-dead9" in typo.stdout + typo.stderr, typo

    retried = cli(redis_server, prefix, "retry", "--model", "sim", "cmpl-dead1")
    assert retried.returncode == 0, retried.stderr
    old, new = retried.stdout.split()
    assert old == "cmpl-dead1" and new.startswith("cmpl-") and new != old
    fresh = await broker.get_record(new)
    assert fresh is not None
    assert (fresh.status, fresh.attempt, fresh.spec.prompt, fresh.spec.seed) == (
        Status.QUEUED,
        0,
        "retry me",
        5,
    )
    assert fresh.spec.retried_from == "cmpl-dead1" and fresh.failures == 0
    assert await redis.xlen(keys.jobs("sim", "batch")) == 1  # enqueued once, on its lane,
    tenant = fresh.spec.tenant or "anonymous"  # auth off: the one tenant
    waiting: Any = await redis.lrange(keys.waiting_prefix("sim", "batch") + tenant, 0, -1)
    assert [str(item).split("\t")[0] for item in waiting] == [new]  # as its (original) tenant's request
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


def test_list_refuses_a_count_under_one(redis_server: RedisServer, prefix: str) -> None:
    """`--count 0` (or less) was redis-py's DataError traceback."""
    for count in ("0", "-3"):
        listed = cli(redis_server, prefix, "list", "--model", "sim", "--count", count)
        assert listed.returncode == 2, listed.stderr
        assert "Invalid value for '--count'" in listed.stderr and "Traceback" not in listed.stderr, (
            listed.stderr
        )
