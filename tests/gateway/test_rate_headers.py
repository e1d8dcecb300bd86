"""The x-ratelimit-* headers say why a request was refused: the key's own limits, or its tenant's
where the key has none, and the tenant's when the tenant's limits refused it."""

from __future__ import annotations

import time

from breakwater.broker.ledger import day_of
from breakwater.redis_server import RedisServer
from breakwater.tenancy.apikeys import ApiKey
from breakwater.tenancy.limits import Limits
from tests.inproc import inproc_gateway

PEPPER = "rate-headers-pepper-0123456789ab"
BODY = {"model": "sim", "prompt": "hi", "max_tokens": 2}


async def test_a_refusal_by_the_tenants_limit_carries_the_tenants_headers(
    redis_server: RedisServer, prefix: str
) -> None:
    """A key of 600 requests a minute, its tenant's 3: the tenant's refusal said 600 and some
    remaining (the key's), telling the client it had room while refusing it."""
    async with inproc_gateway(
        redis_server.url, prefix, auth="keys", auth_pepper=PEPPER, auth_cache_s=0
    ) as gw:
        await gw.add_worker()
        broker = gw.app.state.service.broker
        await broker.ledger.set_tenant_limits("t", Limits(rpm=3))
        secret, _ = await broker.api_keys(PEPPER.encode()).create(ApiKey(id="", tenant="t", rpm=600))
        headers = {"Authorization": f"Bearer {secret}"}
        served = await gw.http.post("/v1/completions", json=BODY, headers=headers)
        assert served.status_code == 200 and served.headers["x-ratelimit-limit-requests"] == "600"
        for _ in range(5):
            resp = await gw.http.post("/v1/completions", json=BODY, headers=headers)
            if resp.status_code == 429:
                break
        assert resp.status_code == 429 and resp.headers["X-Breakwater-Reason"] == "rate_limit_tenant_requests"
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert int(resp.headers["retry-after-ms"]) > 1000


async def test_a_rotated_key_goes_on_with_its_predecessors_limits_and_budget(
    redis_server: RedisServer, prefix: str
) -> None:
    """Rotation started the new key's rates, concurrency and budgets afresh (they were counted under
    each key's own id): a key out of its day's budget, rotated, could spend it again, and in a
    rotation's grace the old and the new key each had the whole rate."""
    async with inproc_gateway(
        redis_server.url, prefix, auth="keys", auth_pepper=PEPPER, auth_cache_s=0
    ) as gw:
        await gw.add_worker()
        store = gw.app.state.service.broker.api_keys(PEPPER.encode())
        secret, key = await store.create(ApiKey(id="", tenant="t", rpm=2, budget_day=10**6))
        old = {"Authorization": f"Bearer {secret}"}
        for _ in range(3):
            resp = await gw.http.post("/v1/completions", json=BODY, headers=old)
            if resp.status_code == 429:
                break
        assert resp.status_code == 429 and resp.headers["X-Breakwater-Reason"] == "rate_limit_requests"
        rotated = await store.rotate(key.id, grace_s=3600)
        assert rotated is not None
        new_secret, new_key = rotated
        assert new_key.lineage == key.id
        new = {"Authorization": f"Bearer {new_secret}"}
        refused = await gw.http.post("/v1/completions", json=BODY, headers=new)  # the same rate
        assert refused.status_code == 429 and refused.headers["X-Breakwater-Reason"] == "rate_limit_requests"

        secret, key = await store.create(ApiKey(id="", tenant="t", budget_day=12))
        spent = {"Authorization": f"Bearer {secret}"}
        for _ in range(12):
            resp = await gw.http.post("/v1/completions", json=BODY, headers=spent)
            if resp.status_code == 429:
                break
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "insufficient_quota"
        rotated = await store.rotate(key.id)
        assert rotated is not None and rotated[1].lineage == key.id
        again = await gw.http.post(
            "/v1/completions", json=BODY, headers={"Authorization": f"Bearer {rotated[0]}"}
        )
        assert again.status_code == 429 and again.json()["error"]["code"] == "insufficient_quota"
        twice = await store.rotate(rotated[1].id)  # a rotation of a rotation: still the first key's
        assert twice is not None and twice[1].lineage == key.id

        secret, key = await store.create(ApiKey(id="", tenant="t"))
        rotated = await store.rotate(key.id)
        assert rotated is not None
        served = await gw.http.post(
            "/v1/completions", json=BODY, headers={"Authorization": f"Bearer {rotated[0]}"}
        )
        assert served.status_code == 200
        record = await gw.app.state.service.broker.get_record(served.headers["X-Breakwater-Request-Id"])
        assert record is not None  # made with the new key, counted under the first one's id
        assert (record.spec.key_id, record.spec.limit_id) == (rotated[1].id, key.id)
        usage = await gw.app.state.service.broker.ledger.usage("t", day_of(time.time()), day_of(time.time()))
        assert {row.key_id for row in usage if row.counts.get("completed")} >= {key.id}
        assert rotated[1].id not in {row.key_id for row in usage}
