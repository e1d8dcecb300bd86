"""Redis clients that reconnect with exponential backoff and jitter."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from breakwater.config import CommonSettings


def connect(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    max_connections: int = 256,
    socket_timeout_s: float | None = 10.0,
) -> Redis:
    """A pooled client; commands retry transient connection errors with jittered backoff.
    ``username``/``password`` (an ACL user) override any given in the URL. ``socket_timeout_s``
    bounds every reply: a half-open connection fails the command instead of hanging it forever.
    When all ``max_connections`` are busy (a burst), a command waits for one (up to the socket
    timeout) instead of failing at once."""
    auth: dict[str, Any] = {k: v for k, v in (("username", username), ("password", password)) if v}
    pool = BlockingConnectionPool.from_url(
        url,
        **auth,
        timeout=socket_timeout_s,
        decode_responses=True,
        max_connections=max_connections,
        retry=Retry(EqualJitterBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=15,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout_s,
        socket_keepalive=True,
    )
    return Redis.from_pool(pool)


def connect_with(settings: CommonSettings) -> Redis:
    """The client a process's settings describe (URL, ACL user and password)."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    if settings.redis_password_file:  # a mounted Secret; it wins over the variable
        with open(settings.redis_password_file, encoding="utf-8") as f:
            password = f.read().strip()
    return connect(
        settings.redis_url,
        username=settings.redis_username,
        password=password,
        max_connections=settings.redis_max_connections,
        socket_timeout_s=settings.redis_socket_timeout_s,
    )


def redacted(url: str) -> str:
    """``url`` without a password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
