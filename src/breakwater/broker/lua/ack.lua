-- Acknowledge and delete a finished job's entry (queue memory stays bounded, XLEN exact), forget its
-- binding, and correct its tenant's virtual token counter from the estimate to the tokens it used.
-- KEYS[1] jobs stream, KEYS[2] bound entries, KEYS[3] fair-share hash, KEYS[4] backlogged tenants
-- ARGV[1] consumer group, ARGV[2] entry id, ARGV[3] tenant ('' : none), ARGV[4] counter correction
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[2])
local tenant, delta = ARGV[3], tonumber(ARGV[4])
if tenant ~= '' and delta ~= 0 then
  local counter = (tonumber(redis.call('HGET', KEYS[3], 'c:' .. tenant)) or 0) + delta
  redis.call('HSET', KEYS[3], 'c:' .. tenant, counter)
  if redis.call('ZSCORE', KEYS[4], tenant) then
    redis.call('ZADD', KEYS[4], counter, tenant)
  end
end
return 1
