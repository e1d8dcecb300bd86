"""The gateway and a worker serve a request end to end as the least-privilege ACL users that the
Kubernetes Redis is configured with (deploy/k8s/base/redis/users.acl.tmpl): every command the
broker and its scripts run (TIME, APPEND, EXPIRE, ...) must be granted there."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from breakwater.config import GatewaySettings
from breakwater.redis_server import RedisServer
from tests.helpers import async_wait_for, expected_sim
from tests.inproc import inproc_gateway

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "redis" / "users.acl.tmpl"


async def _acl_users(redis: Redis, prefix: str) -> dict[str, tuple[str, str]]:
    """The template's users, for this test's key prefix and under unique names: role -> (user, pw)."""
    users: dict[str, tuple[str, str]] = {}
    for line in TEMPLATE.read_text().splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "user" or words[2] != "on":
            continue
        role, password = words[1], secrets.token_hex(16)
        name = f"{role}-{uuid.uuid4().hex[:8]}"
        rules = [f">{password}" if w.startswith(">@") else w.replace("bw:", f"{prefix}:") for w in words[2:]]
        await redis.execute_command("ACL", "SETUSER", name, "reset", *rules)  # type: ignore[no-untyped-call]
        users[role] = (name, password)
    return users


async def test_a_request_runs_as_the_kubernetes_acl_users(
    redis_server: RedisServer, redis: Redis, prefix: str
) -> None:
    users = await _acl_users(redis, prefix)
    gw_user, gw_pw = users["gateway"]
    wk_user, wk_pw = users["worker"]
    try:
        async with inproc_gateway(
            redis_server.url, prefix, redis_username=gw_user, redis_password=gw_pw
        ) as gw:
            await gw.add_worker(redis_username=wk_user, redis_password=wk_pw)
            body = {
                "model": "sim",
                "messages": [{"role": "user", "content": "acl"}],
                "max_tokens": 6,
                "seed": 1,
            }
            resp = await gw.http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            expected, _, _ = expected_sim(messages=body["messages"], seed=1, max_tokens=6)  # type: ignore[arg-type]
            assert resp.json()["choices"][0]["message"]["content"] == expected
            rid = resp.json()["id"]
            status = await gw.http.get(f"/v1/requests/{rid}")
            assert status.json()["status"] == "done"
    finally:
        for name, _ in users.values():
            await redis.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("gateway_login", ["settings", "url"])
async def test_an_embedded_worker_runs_as_the_worker_acl_user(
    redis_server: RedisServer, redis: Redis, prefix: str, tmp_path: Path, gateway_login: str
) -> None:
    """``--embed-engine`` in a gateway whose ACL user may not pull jobs: the embedded worker connects
    as the worker's user (its password from a Secret file), to the gateway's Redis and key prefix as
    the gateway was given them (none of them in this process's environment), also when the gateway's
    login is in its Redis URL (redis-py would let the URL's win over the worker's)."""
    users = await _acl_users(redis, prefix)
    gw_user, gw_pw = users["gateway"]
    wk_user, wk_pw = users["worker"]
    dry: Any = redis  # ACL DRYRUN: the gateway's user is refused the worker's pull
    refused = await dry.execute_command(
        "ACL", "DRYRUN", gw_user, "XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"
    )
    assert "no permissions" in str(refused)
    secret = tmp_path / "worker-password"
    secret.write_text(wk_pw + "\n")
    try:
        login = {"redis_username": gw_user, "redis_password": gw_pw}
        url = redis_server.url
        if gateway_login == "url":
            url, login = url.replace("redis://", f"redis://{gw_user}:{gw_pw}@", 1), {}
        async with inproc_gateway(
            url,
            prefix,
            **login,
            embed_engine="sim",
            embed_redis_username=wk_user,
            embed_redis_password_file=str(secret),
        ) as gw:

            async def serving() -> bool:
                models = (await gw.http.get("/v1/models")).json()["data"]
                return any(m["id"] == "sim" for m in models)

            await async_wait_for(serving, 20, what="the embedded worker's model")
            body = {"model": "sim", "prompt": "acl", "max_tokens": 6, "seed": 2}
            resp = await gw.http.post("/v1/completions", json=body)
            assert resp.status_code == 200, resp.text
            expected, _, _ = expected_sim(prompt="acl", seed=2, max_tokens=6)
            assert resp.json()["choices"][0]["text"] == expected
            clients = await redis.client_list()
            assert {c["user"] for c in clients} >= {gw_user, wk_user}
    finally:
        for name, _ in users.values():
            await redis.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]


def test_an_embedded_password_file_names_its_user() -> None:
    with pytest.raises(ValidationError, match="embed_redis_password_file needs embed_redis_username"):
        GatewaySettings(embed_engine="sim", embed_redis_password_file="/run/secrets/worker-password")
    assert GatewaySettings(embed_redis_username="worker").embed_redis_username == "worker"  # nopass user
