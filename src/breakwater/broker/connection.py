"""Redis clients that reconnect with exponential backoff and jitter."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def connect(url: str, *, max_connections: int = 256) -> Redis:
    """A pooled client; commands retry transient connection errors with jittered backoff."""
    return Redis.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        retry=Retry(EqualJitterBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=15,
        socket_connect_timeout=2.0,
        socket_keepalive=True,
    )
