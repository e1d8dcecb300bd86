-- Meter a request that ended, exactly once, and give back what its admission held: its place among
-- the key's running requests and the tokens reserved beyond what it used. Every key is on the
-- tenant's hash slot ({tenant}); called again for the same request it changes nothing.
-- KEYS[1] the tenant's usage hash of the request's day, KEYS[2] the set of requests metered that day,
-- KEYS[3] limiter hash of the API key, KEYS[4] running set of the key, KEYS[5] the tenant's usage
-- hash of the request's month (monthly budgets)
-- ARGV[1] rid, ARGV[2] key id, ARGV[3] outcome (completed | error | cancelled), ARGV[4] prompt
-- tokens, ARGV[5] completion tokens, ARGV[6] tokens reserved at admission, ARGV[7] usage TTL (s),
-- ARGV[8] metered-set TTL (s)
-- Returns 1 when metered now, 0 when it had been already.
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('EXPIRE', KEYS[2], ARGV[8])
local key = ARGV[2]
local prompt, completion = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HINCRBY', KEYS[1], key .. ':' .. ARGV[3], 1)
redis.call('HINCRBY', KEYS[1], key .. ':prompt_tokens', prompt)
redis.call('HINCRBY', KEYS[1], key .. ':completion_tokens', completion)
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('HINCRBY', KEYS[5], key .. ':tokens', prompt + completion)
redis.call('EXPIRE', KEYS[5], ARGV[7])
redis.call('ZREM', KEYS[4], ARGV[1])
local reserved = tonumber(ARGV[6])
local tok = redis.call('HMGET', KEYS[3], 'tok_tat', 'tok_ms')
local tat, ms = tonumber(tok[1]), tonumber(tok[2])
if reserved > 0 and tat and ms then
  -- The reservation becomes the real cost: refund what was not used (or charge what was over).
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  tat = math.max(now, tat - (reserved - prompt - completion) * ms)
  redis.call('HSET', KEYS[3], 'tok_tat', tat)
end
return 1
