-- Keep a running request alive while its attempt runs: extend the TTL of its record, emitted text and
-- token stream, but only for the attempt that owns it (a newer attempt elsewhere owns the lease).
-- KEYS[1] request record, KEYS[2] emitted text, KEYS[3] token stream
-- ARGV[1] attempt, ARGV[2] minimum TTL (s)
-- Returns 1 when the attempt still owns the running request, 0 when another attempt owns it
-- (fenced off: its worker must stop), -1 when it is not running (finished, cancelled or gone: its
-- worker acknowledges it as it would anyway).
local cur = redis.call('HMGET', KEYS[1], 'attempt', 'status')
if cur[1] ~= ARGV[1] then
  return cur[1] and 0 or -1
end
if cur[2] ~= 'running' then
  return -1
end
local ttl = tonumber(ARGV[2])
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('TTL', KEYS[i]) < ttl then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
return 1
