-- Acknowledge and delete a finished job's entry (queue memory stays bounded, XLEN exact), forget its
-- binding, and correct its tenant's virtual token counter from the estimate to the tokens it used --
-- once: a second ack of the same entry (a retry after a lost reply, or two attempts that both ended
-- it) changes nothing.
-- KEYS[1] jobs stream, KEYS[2] bound entries, KEYS[3] fair-share hash, KEYS[4] backlogged tenants
-- ARGV[1] consumer group, ARGV[2] entry id, ARGV[3] tenant ('' : none), ARGV[4] counter correction
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local forgotten = redis.call('HDEL', KEYS[2], ARGV[2])
local tenant, delta = ARGV[3], tonumber(ARGV[4])
if forgotten == 1 and tenant ~= '' and delta ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[3], 'c:' .. tenant, delta)
  if redis.call('ZSCORE', KEYS[4], tenant) then
    redis.call('ZINCRBY', KEYS[4], delta, tenant)
  end
end
return 1
