"""Redis errors classified once, and the one backoff helper every retry loop uses."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The connection broke or a reply did not come in time: retry (the writes are idempotent).
UNREACHABLE: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


class ReplicaAckError(RedisError):
    """Too few replicas acknowledged an admission in time (``BREAKWATER_REPLICA_ACK``); the request
    was cancelled, so the client may retry it."""


#: Redis answers but cannot write now: full (``maxmemory`` + ``noeviction``), a read-only replica
#: during failover, loading its data, or a cluster slot moving or without a primary. Retry later;
#: nothing was written.
CANNOT_WRITE: tuple[type[Exception], ...] = (
    OutOfMemoryError,
    ReadOnlyError,
    BusyLoadingError,
    TryAgainError,
    ClusterDownError,
    SlotNotCoveredError,  # redis-py's cluster client: a slot without a primary (failover under way)
    ClusterError,  # redis-py's cluster client gave up its retries ("TTL exhausted")
)
#: Everything a caller should back off from and retry, never crash on.
TRANSIENT = UNREACHABLE + CANNOT_WRITE + (ReplicaAckError,)


def reason(exc: BaseException) -> str:
    """A short, stable name for a transient error (a header and a metric label)."""
    if isinstance(exc, OutOfMemoryError):
        return "redis_oom"
    if isinstance(exc, ReadOnlyError):
        return "redis_readonly"
    if isinstance(exc, BusyLoadingError | TryAgainError | ClusterDownError):
        return "redis_loading"
    if isinstance(exc, ReplicaAckError):
        return "redis_replica_ack"
    return "redis_unavailable"


class Backoff:
    """Exponential backoff with full jitter: 0.1 s, 0.2 s, ... capped at ``cap_s``."""

    def __init__(self, base_s: float = 0.1, cap_s: float = 2.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.base_s * (2**self.failures))
        self.failures += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


async def until_redis(write: Callable[[], Awaitable[T]], what: str, *, cap_s: float = 2.0) -> T:
    """Retry ``write`` through transient Redis errors until it succeeds; work in hand is never dropped.
    ``write`` must be idempotent (the broker's scripts are)."""
    backoff = Backoff(cap_s=cap_s)
    while True:
        try:
            return await write()
        except TRANSIENT as exc:
            delay = backoff.next_delay()
            log.warning(
                "%s failed; retrying", what, extra={"fields": {"error": str(exc), "retry_in_s": delay}}
            )
            await asyncio.sleep(delay)
