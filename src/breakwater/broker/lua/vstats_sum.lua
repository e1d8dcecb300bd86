-- Sum the per-version counts of the buckets in KEYS (one per second of the guard's window, all on
-- the {rollout} slot) for the versions in ARGV: one round trip however long the window.
-- Returns, per version in order, {ok, err, ttft_n, ttft_ms (a string: a float)}.
local out = {}
for i, version in ipairs(ARGV) do
  local ok, err, n, ms = 0, 0, 0, 0.0
  local fields = {version .. ':ok', version .. ':err', version .. ':ttft_n', version .. ':ttft_ms'}
  for _, key in ipairs(KEYS) do
    local v = redis.call('HMGET', key, unpack(fields))
    ok = ok + (tonumber(v[1]) or 0)
    err = err + (tonumber(v[2]) or 0)
    n = n + (tonumber(v[3]) or 0)
    ms = ms + (tonumber(v[4]) or 0)
  end
  out[i] = {ok, err, n, tostring(ms)}
end
return out
