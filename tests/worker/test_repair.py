"""Writes lost in a Redis failover are sent again by the worker (worker/repair.py).

A promoted replica can lack the last writes its primary acknowledged. The test makes that loss
happen on a real Redis: mid-generation, one atomic script rewinds the request's record, token
stream and emitted text by the last writes, as a replica promoted before it received them would
hold them. The answer must still be exactly the undisturbed one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from breakwater.engines.options import SimOptions
from breakwater.engines.sim import SimEngine
from tests.helpers import async_wait_for, expected_sim
from tests.inproc import InProc

# KEYS record, token stream, emitted text; ARGV how many writes to lose. Returns the seq it left,
# or -1 if the request is no longer running (a loss after its end would be nobody's to repair).
REWIND = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local wseq = tonumber(redis.call('HGET', KEYS[1], 'wseq'))
local n = tonumber(ARGV[1])
local cut, tokens = 0, 0
for s = seq - n + 1, seq do
  local entry = redis.call('XRANGE', KEYS[2], s .. '-0', s .. '-0')[1][2]
  for i = 1, #entry, 2 do
    if entry[i] == 'text' then cut = cut + #entry[i + 1] end
    if entry[i] == 'n' then tokens = tokens + tonumber(entry[i + 1]) end
  end
end
-- As if never written, so the next seq's id is free: the stream rebuilt from what it kept (XDEL and
-- XSETID back would do on Redis, but Valkey refuses an XSETID below the last deleted id).
local kept = redis.call('XRANGE', KEYS[2], '-', (seq - n) .. '-0')
local ttl = redis.call('PTTL', KEYS[2])
redis.call('DEL', KEYS[2])
for _, e in ipairs(kept) do redis.call('XADD', KEYS[2], e[1], unpack(e[2])) end
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
local emitted = redis.call('GET', KEYS[3])
redis.call('SET', KEYS[3], string.sub(emitted, 1, #emitted - cut), 'KEEPTTL')
redis.call('HSET', KEYS[1], 'seq', seq - n, 'wseq', wseq - n)
redis.call('HINCRBY', KEYS[1], 'tokens', -tokens)
return seq - n
"""


async def test_writes_lost_in_a_failover_are_sent_again(gw_empty: InProc, redis: Redis) -> None:
    await gw_empty.add_worker(SimEngine(SimOptions(decode_base_ms=25, decode_per_seq_ms=0)))
    # 200 tokens of 25 ms: the loss comes ~4 s before the end, however slowly the test polls (a CI
    # run on a busy machine rewound a request of 60 tokens after it had ended).
    body = {"model": "sim", "prompt": "a failover", "seed": 7, "max_tokens": 200, "ignore_eos": True}
    answer = asyncio.create_task(gw_empty.http.post("/v1/completions", json=body))
    rid = ""

    async def midway() -> bool:
        nonlocal rid
        async for key in redis.scan_iter(match=gw_empty.keys.request("*")):
            rid = str(key).split("{")[1][:-1]
        return bool(rid) and int(await redis.hget(gw_empty.keys.request(rid), "seq") or 0) >= 10

    await async_wait_for(midway, 20, what="the request midway")
    keys = gw_empty.keys
    left = await redis.eval(REWIND, 3, keys.request(rid), keys.tokens(rid), keys.emitted(rid), "4")
    assert int(left) >= 6, f"the request was no longer running when its writes were lost ({left})"

    response = await answer
    text, finish_reason, _ = expected_sim(prompt="a failover", seed=7, max_tokens=200, ignore_eos=True)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (text, finish_reason)
    entries: Any = await redis.xrange(keys.tokens(rid))
    seqs = [int(fields["seq"]) for _, fields in entries]
    assert seqs == list(range(1, len(seqs) + 1))  # no hole, no duplicate
    assert "".join(fields.get("text", "") for _, fields in entries) == text
    assert await redis.get(keys.emitted(rid)) == text
