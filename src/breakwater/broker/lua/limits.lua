-- Admit one request against its API key's limits, atomically (GCRA: a "theoretical arrival time"
-- per limit; a minute's allowance is spread over the minute, with a burst of BURST_MS of it).
-- Every key is on the tenant's hash slot ({tenant}).
-- KEYS[1] limiter hash of the API key (req_tat, tok_tat, tok_ms), KEYS[2] running set of the key
-- (rid -> deadline ms), KEYS[3] the tenant's usage hash of today, KEYS[4] ... of this month
-- ARGV[1] rpm, ARGV[2] tpm, ARGV[3] max concurrent (0: no limit), ARGV[4] tokens to reserve,
-- ARGV[5] rid, ARGV[6] deadline (ms), ARGV[7] key id, ARGV[8] usage TTL (s), ARGV[9] daily token
-- budget, ARGV[10] monthly token budget (0: none), ARGV[11] ms to the next UTC day, ARGV[12] ms to
-- the next UTC month
-- Returns {admitted, reason, retry_after_ms, req_remaining, req_reset_ms, tok_remaining, tok_reset_ms}
-- (reason: '' | 'requests' | 'tokens' | 'concurrency' | 'budget_day' | 'budget_month'; remaining -1
-- where there is no such limit). A budget is used up once the tokens metered reach it: requests
-- already running may take it past.
-- A refused request changes nothing but the tenant's count of refusals.
local BURST_MS = 1200  -- 2% of a minute
local rpm, tpm, max_running = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'req_tat', 'tok_tat')
local req_tat = math.max(tonumber(state[1]) or 0, now)
local tok_tat = math.max(tonumber(state[2]) or 0, now)
local req_ms = rpm > 0 and 60000 / rpm or 0
local tok_ms = tpm > 0 and 60000 / tpm or 0
local reason, wait = '', 0
-- A request may start when its limit's TAT is at most BURST_MS ahead of now; it moves TAT by its cost.
if rpm > 0 and req_tat - now > BURST_MS then
  reason, wait = 'requests', req_tat - now - BURST_MS
end
if tpm > 0 and tok_tat - now > BURST_MS then
  local w = tok_tat - now - BURST_MS
  if w > wait then reason, wait = 'tokens', w end
end
local budget_day, budget_month = tonumber(ARGV[9]), tonumber(ARGV[10])
if reason == '' and budget_day > 0 then
  local used = redis.call('HMGET', KEYS[3], ARGV[7] .. ':prompt_tokens', ARGV[7] .. ':completion_tokens')
  if (tonumber(used[1]) or 0) + (tonumber(used[2]) or 0) >= budget_day then
    reason, wait = 'budget_day', tonumber(ARGV[11])
  end
end
if reason == '' and budget_month > 0 then
  if (tonumber(redis.call('HGET', KEYS[4], ARGV[7] .. ':tokens')) or 0) >= budget_month then
    reason, wait = 'budget_month', tonumber(ARGV[12])
  end
end
if reason == '' and max_running > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)  -- past their deadline: surely over
  if redis.call('ZCARD', KEYS[2]) >= max_running then
    reason, wait = 'concurrency', 1000
  end
end
local function remaining(tat, ms)
  if ms == 0 then return -1 end
  return math.max(0, math.floor((now + BURST_MS - tat) / ms) + 1)
end
if reason ~= '' then
  redis.call('HINCRBY', KEYS[3], ARGV[7] .. ':rejected', 1)
  redis.call('EXPIRE', KEYS[3], ARGV[8])
  return {0, reason, math.ceil(wait), remaining(req_tat, req_ms), math.ceil(req_tat - now),
    remaining(tok_tat, tok_ms), math.ceil(tok_tat - now)}
end
if rpm > 0 then
  req_tat = req_tat + req_ms
  redis.call('HSET', KEYS[1], 'req_tat', req_tat)
end
if tpm > 0 then
  tok_tat = tok_tat + cost * tok_ms
  redis.call('HSET', KEYS[1], 'tok_tat', tok_tat, 'tok_ms', tok_ms)
end
redis.call('PEXPIRE', KEYS[1], 120000 + math.ceil(math.max(req_tat, tok_tat) - now))
if max_running > 0 then
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
  redis.call('PEXPIREAT', KEYS[2], redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2])
end
return {1, '', 0, remaining(req_tat, req_ms), math.ceil(req_tat - now), remaining(tok_tat, tok_ms),
  math.ceil(tok_tat - now)}
