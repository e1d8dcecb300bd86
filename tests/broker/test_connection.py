"""Connecting as an ACL user with the password from a file (a mounted Secret); logs never show it."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError

from breakwater.broker import connect_with, redacted
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
