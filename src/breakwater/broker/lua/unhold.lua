-- Give back the budget hold limits.lua took for a request that was never queued (its lane was
-- full: enqueue.lua wrote nothing), which meter.lua will therefore never give back.
-- KEYS[1] the tenant's usage hash of the day, KEYS[2] ... of the month (both on {tenant})
-- ARGV[1] the API key's id, ARGV[2] the tokens held
local held = tonumber(ARGV[2])
if not held or held <= 0 then
  return 0
end
for _, id in ipairs({ARGV[1], '*'}) do
  redis.call('HINCRBY', KEYS[1], id .. ':held', -held)
  redis.call('HINCRBY', KEYS[2], id .. ':held', -held)
end
return 1
