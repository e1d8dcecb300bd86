-- Delete a stored file: at once, unless a download of it is under way, which then still gets all
-- of its bytes: the file is marked deleted (gone for every lookup) and its bytes lapse after
-- ARGV[1] seconds. KEYS[1] the file, KEYS[2] its readers (a count of downloads under way, with a
-- lapse of its own); ARGV[2] now (unix s). Returns 1 (kept for its readers), 0 (deleted) or -1
-- (gone already, or deleted before).
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'deleted') == 1 then
  return -1
end
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then
  redis.call('HSET', KEYS[1], 'deleted', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[1], 'LT')
  return 1
end
redis.call('DEL', KEYS[1])
return 0
