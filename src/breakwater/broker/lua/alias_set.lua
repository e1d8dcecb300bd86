-- Set (or, ARGV[2] == '', delete) an alias if its revision is still ARGV[3], and log the change.
-- KEYS: aliases hash, history stream, revisions hash (alias -> last revision; kept when the alias
-- is deleted, so a name's revisions never repeat); all on the {rollout} slot.
-- ARGV: name, record JSON ('' deletes), expected revision, new revision (expected + 1), by, note,
-- ts_ms, history maxlen, then the versions the record names.
-- Returns {1, revision} when written, {0, revision} when the revision moved on (a conflict),
-- {-1, why} when the record is refused: it names an alias, or an alias names it (no chains).
-- Sent again after a lost reply, a write that was applied answers {1, revision} again.
local revision = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local new = tonumber(ARGV[4])
if revision == new then
  local current = redis.call('HGET', KEYS[1], ARGV[1])
  if (ARGV[2] == '' and not current) or current == ARGV[2] then
    return {1, revision}
  end
end
if revision ~= tonumber(ARGV[3]) then
  return {0, revision}
end
if ARGV[2] == '' then
  if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
    return {0, revision}
  end
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  for i = 9, #ARGV do
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      return {-1, 'the version `' .. ARGV[i] .. '` is an alias; an alias names versions or models'}
    end
  end
  -- No alias may name this one as a version, in its split or in a tenant's (a record that does
  -- not decode, written by another release, is passed over: the gateways skip it too).
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local fine, other = pcall(cjson.decode, all[i + 1])
    if all[i] ~= ARGV[1] and fine and type(other) == 'table' then
      local splits = {other['weights']}
      if type(other['tenants']) == 'table' then
        for _, split in pairs(other['tenants']) do
          splits[#splits + 1] = split
        end
      end
      for _, split in ipairs(splits) do
        for _, pair in ipairs(split or {}) do
          if pair[1] == ARGV[1] then
            return {-1, 'the alias `' .. all[i] .. '` names `' .. ARGV[1] .. '` as a version'}
          end
        end
      end
    end
  end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('HSET', KEYS[3], ARGV[1], new)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'alias', ARGV[1], 'revision', new,
  'record', ARGV[2], 'by', ARGV[5], 'note', ARGV[6], 'ts_ms', ARGV[7])
return {1, new}
