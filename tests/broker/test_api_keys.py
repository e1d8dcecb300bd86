"""API keys in a real Redis: rotation makes one successor, however many rotations race."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from breakwater.broker import Broker
from breakwater.broker.api_keys import KeyStore, RotatedAlready
from breakwater.cli import app
from breakwater.keys import Keys
from breakwater.redis_server import RedisServer
from breakwater.tenancy.apikeys import ApiKey

PEPPER = b"api-keys-test-pepper-0123456789ab"


@pytest.fixture
async def store(redis: Redis, prefix: str) -> AsyncIterator[KeyStore]:
    broker = Broker(redis, Keys(prefix))
    yield broker.api_keys(PEPPER)
    await broker.fast.aclose()


async def test_of_two_rotations_at_once_one_makes_a_key_and_the_other_none(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read the key live; before, each made a new key and the old one named the last as its
    successor, so a live key existed that neither the old key's work nor the operator followed.
    Now one rotation claims the key and the other's new key is removed before anyone uses it."""
    _, old = await store.create(ApiKey(id="", tenant="acme", rpm=60))
    # Both past their check of the key before either makes its new key: the claim decides.
    arrived, both = [], asyncio.Event()
    make = store.create

    async def create_together(template: ApiKey) -> tuple[str, ApiKey]:
        arrived.append(template.id)
        if len(arrived) == 2:
            both.set()
        await both.wait()
        return await make(template)

    monkeypatch.setattr(store, "create", create_together)
    results = await asyncio.gather(
        store.rotate(old.id, grace_s=3600), store.rotate(old.id, grace_s=3600), return_exceptions=True
    )
    made = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, RotatedAlready)]
    assert len(made) == 1 and len(refused) == 1, results
    secret, new = made[0]
    assert len(arrived) == 2 and refused[0].key_id == old.id and refused[0].successor == new.id
    ended = await store.get(old.id)
    assert ended is not None and ended.successor == new.id and ended.expires > 0
    live = [k.id for k in await store.list("acme")]
    assert sorted(live) == sorted([old.id, new.id])  # the loser's key is gone, index and record
    found = await store.lookup(secret)
    assert found is not None and found.id == new.id and found.rpm == 60


async def test_a_key_in_its_rotations_grace_is_not_rotated_again(store: KeyStore) -> None:
    """The old key still works in its grace, but its successor is the one to rotate: a second
    rotation names it and makes nothing; the successor rotates as any key."""
    _, old = await store.create(ApiKey(id="", tenant="acme"))
    rotated = await store.rotate(old.id, grace_s=3600)
    assert rotated is not None
    with pytest.raises(RotatedAlready) as refused:
        await store.rotate(old.id, grace_s=3600)
    assert refused.value.successor == rotated[1].id
    assert len(await store.list("acme")) == 2
    again = await store.rotate(rotated[1].id)
    assert again is not None
    assert (await store.get(rotated[1].id)) is not None
    assert len(await store.list("acme")) == 3


async def test_a_rotations_grace_never_extends_the_old_keys_life(store: KeyStore) -> None:
    """The old key ends at the end of the grace, or sooner if it was to expire sooner; without a
    grace it is revoked at once. Either way it names its successor."""
    _, soon = await store.create(ApiKey(id="", tenant="acme", expires=int(time.time()) + 60))
    _, later = await store.create(ApiKey(id="", tenant="acme"))
    _, now = await store.create(ApiKey(id="", tenant="acme"))
    for key, grace_s in ((soon, 3600), (later, 3600), (now, 0)):
        rotated = await store.rotate(key.id, grace_s=grace_s)
        assert rotated is not None
        ended = await store.get(key.id)
        assert ended is not None and ended.successor == rotated[1].id
        if key is soon:
            assert ended.expires == soon.expires and not ended.revoked
        elif key is later:
            assert time.time() + 3590 < ended.expires <= time.time() + 3600 and not ended.revoked
        else:
            assert ended.revoked and ended.usable(time.time()) is not None


async def test_revoking_a_revoked_key_keeps_when_it_was_revoked(store: KeyStore, redis: Redis) -> None:
    """The first revocation's time is the record of when the key stopped working (an audit asks
    it); revoking it again overwrote it."""
    _, key = await store.create(ApiKey(id="", tenant="acme"))
    first = await store.revoke(key.id)
    assert first is not None and first.revoked
    digest = await store._digest(key.id)
    assert digest is not None
    await redis.hset(store.keys.api_key(digest), "revoked", "1700000000")  # as if revoked long ago
    again = await store.revoke(key.id)
    assert again is not None and again.revoked == 1700000000


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--tenant", "t", "--expires-in", "0s"], "from 1s"),  # expired as it is made
        (["--tenant", "t", "--expires-in", "99999999999d"], "to 36500d"),
        (["--tenant", "Anonymous"], "anonymous"),  # the owner of requests with auth off, by another case
    ],
)
def test_keys_create_refuses_a_key_of_no_life_or_of_forever_and_a_tenant_named_as_auth_offs(
    args: list[str], said: str
) -> None:
    """Refused before anything is written (no Redis is reached: none is configured here)."""
    result = CliRunner().invoke(app, ["keys", "create", *args])
    assert result.exit_code == 2 and said in result.output, result.output


def test_keys_rotate_refuses_a_grace_of_forever() -> None:
    result = CliRunner().invoke(app, ["keys", "rotate", "key_x", "--grace", "40000d"])
    assert result.exit_code == 2 and "to 36500d" in result.output, result.output


@pytest.mark.parametrize("tenant", ["no such tenant!", "anonymous", "x" * 65])
def test_tenants_set_refuses_a_tenant_no_key_can_belong_to(tenant: str) -> None:
    """As ``keys create`` names tenants: limits set for a name no key can have would limit no one."""
    result = CliRunner().invoke(app, ["tenants", "set", tenant, "--rpm", "5"])
    assert result.exit_code == 2 and "1-64 of" in result.output, result.output


def test_usage_refuses_a_range_that_ends_before_it_starts() -> None:
    result = CliRunner().invoke(app, ["usage", "--start-date", "2026-12-08", "--end-date", "2026-12-01"])
    assert result.exit_code == 2 and "on or after --start-date" in result.output, result.output


def _json(output: str) -> dict[str, Any]:
    """The JSON object a keys command printed (before its note for people, if any)."""
    start, end = output.index("{"), output.rindex("}")
    data: dict[str, Any] = orjson.loads(output[start : end + 1])
    return data


def test_keys_rotate_gives_the_new_key_a_lifetime_of_its_own_when_asked(
    redis_server: RedisServer, prefix: str
) -> None:
    """A rotated key kept its predecessor's expiry time: a key rotated the day before it expired
    (a 90-day key, as a policy rotates it) lived one more day, and nothing could say otherwise."""
    env = {
        "BREAKWATER_REDIS_URL": redis_server.url,
        "BREAKWATER_KEY_PREFIX": prefix,
        "BREAKWATER_AUTH_PEPPER": PEPPER.decode(),
    }

    def run(*args: str) -> dict[str, Any]:
        result = CliRunner().invoke(app, ["keys", *args], env=env)
        assert result.exit_code == 0, result.output
        return _json(result.output)

    created = run("create", "--tenant", "acme", "--expires-in", "1d")
    kept = run("rotate", created["id"])
    assert kept["expires"] == created["expires"]  # by default as before: the old key's end
    longer = run("rotate", kept["id"], "--expires-in", "90d")
    assert abs(longer["expires"] - (time.time() + 90 * 86400)) < 60
    assert run("rotate", longer["id"], "--expires-in", "never")["expires"] is None
    result = CliRunner().invoke(app, ["keys", "rotate", "key_x", "--expires-in", "0s"], env=env)
    assert result.exit_code == 2 and "from 1s" in result.output, result.output
