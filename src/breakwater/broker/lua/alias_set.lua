-- Set (or, ARGV[2] == '', delete) an alias if its revision is still ARGV[3] (-1: whatever it is),
-- and log the change; both keys share the {rollout} slot.
-- KEYS: aliases hash, history stream. ARGV: name, record JSON ('' deletes), expected revision,
-- revision the record carries, by, note, ts_ms, history maxlen.
local current = redis.call('HGET', KEYS[1], ARGV[1])
local expected = tonumber(ARGV[3])
if expected >= 0 then
  local revision = 0
  if current then
    revision = tonumber(cjson.decode(current)['revision']) or 0
  end
  if revision ~= expected then
    return {0, revision}
  end
end
if ARGV[2] == '' then
  if not current then
    return {0, -1}
  end
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'alias', ARGV[1], 'revision', ARGV[4],
  'record', ARGV[2], 'by', ARGV[5], 'note', ARGV[6], 'ts_ms', ARGV[7])
return {1, tonumber(ARGV[4])}
