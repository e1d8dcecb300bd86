-- Keep running requests alive while their attempts run: extend the TTL of each one's record, emitted
-- text and token stream, but only for the attempt that owns it (a newer attempt elsewhere owns the
-- lease). One call for all of a worker's leases on one server (on a cluster, one call per request).
-- KEYS: per lease i (0-based) KEYS[3i+1] request record, KEYS[3i+2] emitted text, KEYS[3i+3] token stream
-- ARGV[1] the TTL to set (s), ARGV[2] extend a key whose TTL is below this (s); ARGV[i+3] lease i's attempt
-- Returns, per lease, 1 when the attempt still owns the running request, 0 when another attempt
-- owns it (fenced off: its worker must stop), -1 when it is not running (finished, cancelled or
-- gone: its worker acknowledges it as it would anyway).
local ttl, below = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 0, #KEYS / 3 - 1 do
  local cur = redis.call('HMGET', KEYS[3 * i + 1], 'attempt', 'status')
  if cur[1] ~= ARGV[i + 3] then
    out[i + 1] = cur[1] and 0 or -1
  elseif cur[2] ~= 'running' then
    out[i + 1] = -1
  else
    for k = 3 * i + 1, 3 * i + 3 do
      local left = redis.call('TTL', KEYS[k])  -- -2: no such key (nothing emitted yet); -1: no TTL
      if left ~= -2 and left < below then
        redis.call('EXPIRE', KEYS[k], ttl)
      end
    end
    out[i + 1] = 1
  end
end
return out
