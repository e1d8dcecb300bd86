-- Meter a request that ended, exactly once, and give back what its admission held: its place among
-- the running requests of its key and tenant, and the tokens reserved beyond what it used. Every key
-- is on the tenant's hash slot ({tenant}); called again for the same request it changes nothing.
-- KEYS[1] the tenant's usage hash of the request's day, KEYS[2] the set of requests metered that day,
-- KEYS[3] the tenant's usage hash of the request's month, then the limiter hash and running set of
-- the API key (KEYS[4], KEYS[5]) and of the tenant (KEYS[6], KEYS[7])
-- ARGV[1] rid, ARGV[2] key id, ARGV[3] outcome (completed | error | cancelled), ARGV[4] prompt
-- tokens, ARGV[5] completion tokens, ARGV[6] tokens reserved at admission, ARGV[7] usage TTL (s),
-- ARGV[8] metered-set TTL (s), ARGV[9] tokens held against the budgets at admission (absent: ARGV[6])
-- Usage is counted under the key's id and under '*' (the tenant's total, for its budgets).
-- Returns 1 when metered now, 0 when it had been already.
-- Every argument is checked before the first write: the request is marked metered first, so a
-- script that failed after that would have counted part of its usage and never be repeated. (An
-- error raised, not returned: a script composed from this one stops there too.)
local function count(v)
  local n = tonumber(v)
  if n and n == math.floor(n) then return n end
end
local prompt, completion, reserved = count(ARGV[4]), count(ARGV[5]), count(ARGV[6])
local held = count(ARGV[9] or ARGV[6])
if not (prompt and completion and reserved and held and count(ARGV[7]) and count(ARGV[8])) then
  error({err = 'ERR invalid token counts or TTLs'})
end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('EXPIRE', KEYS[2], ARGV[8])
for _, id in ipairs({ARGV[2], '*'}) do
  redis.call('HINCRBY', KEYS[1], id .. ':' .. ARGV[3], 1)
  redis.call('HINCRBY', KEYS[1], id .. ':prompt_tokens', prompt)
  redis.call('HINCRBY', KEYS[1], id .. ':completion_tokens', completion)
  redis.call('HINCRBY', KEYS[3], id .. ':tokens', prompt + completion)
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[3], ARGV[7])
if held > 0 then  -- what limits.lua held against the budgets
  for _, id in ipairs({ARGV[2], '*'}) do
    redis.call('HINCRBY', KEYS[1], id .. ':held', -held)
    redis.call('HINCRBY', KEYS[3], id .. ':held', -held)
  end
end
local now
for i = 4, 6, 2 do
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
  local tok = redis.call('HMGET', KEYS[i], 'tok_tat', 'tok_ms')
  local tat, ms = tonumber(tok[1]), tonumber(tok[2])
  if reserved > 0 and tat and ms then
    -- The reservation becomes the real cost: refund what was not used (or charge what was over).
    if not now then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    tat = math.max(now, tat - (reserved - prompt - completion) * ms)
    redis.call('HSET', KEYS[i], 'tok_tat', tat)
    redis.call('PEXPIRE', KEYS[i], 120000 + math.ceil(tat - now))  -- an overcharge is not forgiven
  end
end
return 1
