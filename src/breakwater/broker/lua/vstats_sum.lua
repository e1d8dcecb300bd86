-- Sum the per-version counts of the buckets in KEYS (one per second of the guard's window, all on
-- the {rollout} slot): one round trip however long the window.
-- ARGV[1] n, ARGV[2..n+1] the counters (`ok`, `err`, ...), then the versions.
-- Returns, per version in order, each counter's sum as a string (some are floats).
local n = tonumber(ARGV[1])
local out = {}
for i = n + 2, #ARGV do
  local fields, sums = {}, {}
  for j = 1, n do
    fields[j] = ARGV[i] .. ':' .. ARGV[j + 1]
    sums[j] = 0
  end
  for _, key in ipairs(KEYS) do
    local v = redis.call('HMGET', key, unpack(fields))
    for j = 1, n do
      sums[j] = sums[j] + (tonumber(v[j]) or 0)
    end
  end
  for j = 1, n do
    sums[j] = tostring(sums[j])
  end
  out[#out + 1] = sums
end
return out
