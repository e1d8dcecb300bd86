"""Connecting as an ACL user with the password from a file (a mounted Secret); logs never show it."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from breakwater.broker import connect, connect_with, redacted
from breakwater.broker.connection import without_credentials
from breakwater.config import CommonSettings
from breakwater.redis_server import RedisServer


async def test_acl_user_with_password_file(redis_server: RedisServer, redis: Redis, tmp_path: Path) -> None:
    user, password = f"u{uuid.uuid4().hex[:8]}", secrets.token_hex(16)
    await redis.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["bw:*"], commands=["+@all"], reset=True
    )
    try:
        (tmp_path / "password").write_text(password + "\n")  # a trailing newline is not the password
        settings = CommonSettings(
            redis_url=redis_server.url,
            redis_username=user,
            redis_password="not-this-one",
            redis_password_file=str(tmp_path / "password"),
        )
        client = connect_with(settings)
        assert await client.set("bw:x", "1") and await client.get("bw:x") == "1"
        with pytest.raises(NoPermissionError):
            await client.get("other:x")  # keys outside the user's pattern
        await client.aclose()
        wrong = connect_with(settings.model_copy(update={"redis_password_file": None}))
        with pytest.raises(AuthenticationError):
            await wrong.ping()
        await wrong.aclose()
    finally:
        await redis.acl_deluser(user)
        await redis.delete("bw:x")


def test_redacted_hides_only_the_password() -> None:
    assert redacted("redis://gw:s3cret@redis:6379/0") == "redis://gw:***@redis:6379/0"
    assert redacted("redis://:s3cret@redis/0") == "redis://:***@redis/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    # A unix socket URL carries its password in the query.
    assert (
        redacted("unix:///run/redis.sock?db=0&password=s3cret") == "unix:///run/redis.sock?db=0&password=***"
    )
    assert redacted("unix:///run/redis.sock?db=0") == "unix:///run/redis.sock?db=0"
    assert redacted("unix://:s3cret@/run/redis.sock") == "unix://:***@/run/redis.sock"
    # A cluster's seeds, an IPv6 host, a port that is no number: masked, never raising.
    assert redacted("redis+cluster://gw:s3cret@h1:7000,h2:7001") == "redis+cluster://gw:***@h1:7000,h2:7001"
    assert redacted("redis://u:s3cret@[::1]:6379/0") == "redis://u:***@[::1]:6379/0"
    assert redacted("redis://:s3cret@h:port/0") == "redis://:***@h:port/0"


def test_without_credentials_drops_them_from_the_authority_and_the_query() -> None:
    assert without_credentials("redis://u:p@h:1/0") == "redis://h:1/0"
    assert without_credentials("unix://u:p@/run/redis.sock?db=2&password=p") == "unix:///run/redis.sock?db=2"
    assert without_credentials("redis://h:1/0?username=u&password=p&ssl=1") == "redis://h:1/0?ssl=1"


async def test_a_silent_redis_fails_the_command_instead_of_hanging() -> None:
    """A half-open connection (the peer accepts and never answers) must not hang a command forever,
    nor wait its timeout again on a new connection: a stalled Redis made a command take four socket
    timeouts (40 s) before its 503."""
    stop = asyncio.Event()
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await stop.wait()  # read nothing, answer nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.2)
    try:
        async with asyncio.timeout(10):  # retries included; without a socket timeout: never
            with pytest.raises(RedisTimeoutError):
                await client.ping()
        assert len(accepted) == 1  # it did connect, the reply is what never came; no retry waited again
    finally:
        await client.aclose()
        stop.set()
        server.close()
        await server.wait_closed()
