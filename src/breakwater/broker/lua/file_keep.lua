-- Keep a file (KEYS[1]) at least ARGV[1] seconds from now, never shortening its life, unless it is
-- gone or deleted (a batch created meanwhile must not make a deleted file's bytes outlive their
-- quota hold). Returns 1 when kept, 0 when the file is gone or deleted.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return 0
end
local ttl = redis.call('TTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[1]) then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 1
