-- Bind an Idempotency-Key (or a response-cache entry) to a request id, or release it; atomic
-- compare-and-set on one key.
-- KEYS[1] the idempotency key or cache entry
-- ARGV[1] 'claim' | 'rebind' | 'release', ARGV[2] rid, ARGV[3] TTL (s) (claim, rebind),
-- ARGV[4] the rid it must still hold (rebind)
-- claim: returns false when bound now, else the rid it was already bound to.
-- rebind: bind to ARGV[2] if still bound to ARGV[4] (its request expired); returns 1 or 0.
-- release: delete if still bound to ARGV[2]; returns 1 or 0.
local op = ARGV[1]
if op == 'claim' then
  local existing = redis.call('GET', KEYS[1])
  if existing then
    return existing
  end
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return false
elseif op == 'rebind' then
  if redis.call('GET', KEYS[1]) == ARGV[4] then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
    return 1
  end
  return 0
end
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
