-- End an API key by rotation, in one step: claim it for its new key (a key is rotated once), name
-- that key its successor, and revoke it now or expire it at the end of its grace (never later than
-- it would have expired). A key claimed already is left as it is.
-- KEYS[1] the old key's record (a hash by its digest)
-- ARGV[1] the new key's id, ARGV[2] now (unix s), ARGV[3] the end of the grace (unix s; 0: none)
-- Returns '' when rotated, else the id it was rotated to before (or '?' for a key with no record).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return '?'
end
local before = redis.call('HGET', KEYS[1], 'rotated_to')
if before then
  return before
end
redis.call('HSET', KEYS[1], 'rotated_to', ARGV[1], 'successor', ARGV[1])
local until_s = tonumber(ARGV[3])
if until_s > 0 then
  local expires = tonumber(redis.call('HGET', KEYS[1], 'expires')) or 0
  if expires == 0 or until_s < expires then
    redis.call('HSET', KEYS[1], 'expires', until_s)
  end
else
  redis.call('HSET', KEYS[1], 'revoked', ARGV[2])
end
return ''
