-- A client starts (+1) or stops (-1) following a request; never recreates an expired record.
-- KEYS[1] request record
-- ARGV[1] +1 or -1, ARGV[2] 1 when the client came through the response cache ('shared' counts
-- those following now)
-- Returns 1 when the record exists, else 0.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'watchers', tonumber(ARGV[1]))
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[1], 'shared', tonumber(ARGV[1]))
end
if tonumber(ARGV[1]) < 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'detached_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
return 1
