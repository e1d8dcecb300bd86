-- Admit one request, or a group of them as one arrival (a request's choices: gateway.choices),
-- against the limits of its API key and of its tenant, atomically (GCRA: a "theoretical arrival
-- time" per limit; a minute's allowance is spread over the minute, with a burst of BURST_MS of it;
-- a group is let in as one request is, and moves the TAT on by all of its requests and tokens, so
-- what follows it waits that much longer). Every key is on the tenant's hash slot ({tenant}).
-- KEYS[1] the tenant's usage hash of today, KEYS[2] ... of this month, then per subject (the key,
-- then, if it has limits, the tenant): its limiter hash (req_tat, tok_tat, tok_ms) and its running set
-- (rid -> deadline ms)
-- ARGV[1] tokens to reserve, ARGV[2] rid (a group's: space-separated), ARGV[3] deadline (ms), ARGV[4] usage TTL (s), ARGV[5] ms to
-- the next UTC day, ARGV[6] ms to the next UTC month, ARGV[7] the key's id (its refusals are
-- counted), ARGV[8] tokens to hold against the budgets (ARGV[1], or more: docs/tenants.md), ARGV[9]
-- of those, what a group's choices before its last hold (0 for one request: a budget not used up
-- admits it; a group is admitted only if it would be choice by choice), then per subject: its id in the usage hash (key id, or '*' for the tenant), rpm, tpm, max concurrent, daily
-- token budget, monthly token budget (0: none)
-- Returns {admitted, reason, retry_after_ms, then per subject: req_remaining, req_reset_ms,
-- tok_remaining, tok_reset_ms} (reason: '' | requests | tokens | concurrency | budget_day |
-- budget_month, prefixed 'tenant_' when it is the tenant's; remaining -1 where there is no such
-- limit). A budget counts the tokens metered and the reservations of requests not yet metered
-- (`<id>:held`, released by meter.lua), so it is passed by one request's overrun at most (a request
-- holds its max_tokens, or the model's remaining context without one). A refused
-- request changes nothing but the count of refusals.
local BURST_MS = 1200  -- 2% of a minute
local cost, held, now_t = tonumber(ARGV[1]), tonumber(ARGV[8]), redis.call('TIME')
local rids, ahead = {}, tonumber(ARGV[9])
for rid in string.gmatch(ARGV[2], '%S+') do rids[#rids + 1] = rid end
if #rids == 0 then return redis.error_reply('limits.lua: no request id') end
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local subjects = {}
for s = 0, (#KEYS - 2) / 2 - 1 do
  local a = 10 + s * 6
  local state = redis.call('HMGET', KEYS[3 + 2 * s], 'req_tat', 'tok_tat')
  local sub = {limiter = KEYS[3 + 2 * s], running = KEYS[4 + 2 * s], id = ARGV[a],
    rpm = tonumber(ARGV[a + 1]), tpm = tonumber(ARGV[a + 2]), max_running = tonumber(ARGV[a + 3]),
    budget_day = tonumber(ARGV[a + 4]), budget_month = tonumber(ARGV[a + 5]),
    req_tat = math.max(tonumber(state[1]) or 0, now), tok_tat = math.max(tonumber(state[2]) or 0, now)}
  sub.req_ms = sub.rpm > 0 and 60000 / sub.rpm or 0
  sub.tok_ms = sub.tpm > 0 and 60000 / sub.tpm or 0
  subjects[#subjects + 1] = sub
end

local function refused(sub)
  -- A request may start when its limit's TAT is at most BURST_MS ahead of now.
  local reason, wait = '', 0
  if sub.rpm > 0 and sub.req_tat - now > BURST_MS then
    reason, wait = 'requests', sub.req_tat - now - BURST_MS
  end
  if sub.tpm > 0 and sub.tok_tat - now - BURST_MS > wait then
    reason, wait = 'tokens', sub.tok_tat - now - BURST_MS
  end
  if reason == '' and sub.budget_day > 0 then
    local used = redis.call('HMGET', KEYS[1], sub.id .. ':prompt_tokens', sub.id .. ':completion_tokens',
      sub.id .. ':held')
    -- A hold given back on the day after it was taken (across midnight) leaves this day's count
    -- below zero: never below what was metered.
    local spent = (tonumber(used[1]) or 0) + (tonumber(used[2]) or 0) + math.max(0, tonumber(used[3]) or 0)
    if spent + ahead >= sub.budget_day then
      reason, wait = 'budget_day', tonumber(ARGV[5])
    end
  end
  if reason == '' and sub.budget_month > 0 then
    local used = redis.call('HMGET', KEYS[2], sub.id .. ':tokens', sub.id .. ':held')
    if (tonumber(used[1]) or 0) + math.max(0, tonumber(used[2]) or 0) + ahead >= sub.budget_month then
      reason, wait = 'budget_month', tonumber(ARGV[6])
    end
  end
  if reason == '' and sub.max_running > 0 then
    redis.call('ZREMRANGEBYSCORE', sub.running, '-inf', now)  -- past their deadline: surely over
    if redis.call('ZCARD', sub.running) + #rids > sub.max_running then
      reason, wait = 'concurrency', 1000
    end
  end
  return reason, wait
end

local function remaining(tat, ms)
  if ms == 0 then return -1 end
  return math.max(0, math.floor((now + BURST_MS - tat) / ms) + 1)
end

local function answer(admitted, reason, wait)
  local out = {admitted, reason, math.ceil(wait)}
  for _, sub in ipairs(subjects) do
    out[#out + 1] = remaining(sub.req_tat, sub.req_ms)
    out[#out + 1] = math.ceil(sub.req_tat - now)
    out[#out + 1] = remaining(sub.tok_tat, sub.tok_ms)
    out[#out + 1] = math.ceil(sub.tok_tat - now)
  end
  return out
end

for i, sub in ipairs(subjects) do
  local reason, wait = refused(sub)
  if reason ~= '' then
    redis.call('HINCRBY', KEYS[1], ARGV[7] .. ':rejected', 1)
    redis.call('HINCRBY', KEYS[1], '*:rejected', 1)
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return answer(0, (i > 1 and 'tenant_' or '') .. reason, wait)
  end
end
for _, sub in ipairs(subjects) do
  if sub.rpm > 0 then
    sub.req_tat = sub.req_tat + #rids * sub.req_ms
    redis.call('HSET', sub.limiter, 'req_tat', sub.req_tat)
  end
  if sub.tpm > 0 then
    sub.tok_tat = sub.tok_tat + cost * sub.tok_ms
    redis.call('HSET', sub.limiter, 'tok_tat', sub.tok_tat, 'tok_ms', sub.tok_ms)
  end
  if sub.rpm > 0 or sub.tpm > 0 then
    redis.call('PEXPIRE', sub.limiter, 120000 + math.ceil(math.max(sub.req_tat, sub.tok_tat) - now))
  end
  if sub.max_running > 0 then
    for _, rid in ipairs(rids) do redis.call('ZADD', sub.running, ARGV[3], rid) end
    redis.call('PEXPIREAT', sub.running, redis.call('ZRANGE', sub.running, -1, -1, 'WITHSCORES')[2])
  end
end
if held > 0 then  -- held until metered (meter.lua releases what the request held)
  for _, id in ipairs({ARGV[7], '*'}) do
    redis.call('HINCRBY', KEYS[1], id .. ':held', held)
    redis.call('HINCRBY', KEYS[2], id .. ':held', held)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return answer(1, '', 0)
