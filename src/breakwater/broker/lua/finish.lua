-- Terminal event: optional last text, then the done/error event, terminal status and retention TTLs.
-- KEYS[1] request record, KEYS[2] token stream, KEYS[3] emitted text
-- ARGV[1] attempt ('*' = any: cancellation and admin), ARGV[2] channel, ARGV[3] stream max length,
-- ARGV[4] kind ('done'|'error'), ARGV[5] last text, ARGV[6] its token count (those without text
-- counted too; their logprobs dropped: an entry is a token of the text), ARGV[7] finish_reason,
-- ARGV[8] usage JSON, ARGV[9] error JSON, ARGV[10] TTL (s), ARGV[11] terminal status,
-- ARGV[12] the last text's logprobs as JSON ('' when not asked for), ARGV[13] the attempt's last
-- write number ('' : not checked), ARGV[14] 'PUBLISH' (when absent) or 'SPUBLISH' (see append.lua),
-- ARGV[15] 'queued' (absent: not checked): only a request still queued past its deadline (Redis's
-- clock), as start.lua would find it: a gateway ends its client's wait at the deadline with it.
-- Returns the final seq, -1 when fenced off, -2 when already terminal, -3 when the record is gone,
-- -4 when ARGV[15] asked and the request is not queued or its deadline has not passed,
-- BEHIND - w when the record's last write is w, short of ARGV[13] (writes lost in a failover: the
-- worker sends them again first; see append.lua).
-- Idempotent: a retried call finds the request terminal (-2) and writes nothing.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -3
end
local publish = ARGV[14] or 'PUBLISH'
if publish ~= 'PUBLISH' and publish ~= 'SPUBLISH' then
  return redis.error_reply('ERR publish must be PUBLISH or SPUBLISH')
end
local cur = redis.call('HMGET', KEYS[1], 'attempt', 'status')
if ARGV[1] ~= '*' and cur[1] ~= ARGV[1] then
  return -1
end
if cur[2] == 'done' or cur[2] == 'error' or cur[2] == 'cancelled' then
  return -2
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if (ARGV[15] or '') == 'queued' then
  local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline_ms') or '0')
  if cur[2] ~= 'queued' or deadline <= 0 or now_ms <= deadline then
    return -4
  end
end
if (ARGV[13] or '') ~= '' then
  local last = tonumber(redis.call('HGET', KEYS[1], 'wseq') or '0')
  if last < tonumber(ARGV[13]) then
    return -1000 - last
  end
end
local seq
local n = tonumber(ARGV[6]) or 0
if n ~= 0 then  -- tokens without text too (an end-of-sequence token): counted, with no event
  redis.call('HINCRBY', KEYS[1], 'tokens', n)
end
if ARGV[5] ~= '' then
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('APPEND', KEYS[3], ARGV[5])
  if (ARGV[12] or '') ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'seq', seq, 'kind', 'token', 'text', ARGV[5],
      'n', ARGV[6], 'lp', ARGV[12])
    redis.call(publish, ARGV[2], cjson.encode({seq = tostring(seq), kind = 'token', text = ARGV[5], n = ARGV[6], lp = ARGV[12]}))
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'seq', seq, 'kind', 'token', 'text', ARGV[5], 'n', ARGV[6])
    redis.call(publish, ARGV[2], 't' .. seq .. ' ' .. ARGV[6] .. ' ' .. ARGV[5])
  end
end
seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local event = {seq = tostring(seq), kind = ARGV[4], at = tostring(now_ms)}
local fields = {'seq', seq, 'kind', ARGV[4], 'at', now_ms}
if ARGV[7] ~= '' then
  event.finish_reason = ARGV[7]
  fields[#fields + 1] = 'finish_reason'; fields[#fields + 1] = ARGV[7]
end
if ARGV[8] ~= '' then
  event.usage = ARGV[8]
  fields[#fields + 1] = 'usage'; fields[#fields + 1] = ARGV[8]
end
if ARGV[9] ~= '' then
  event.error = ARGV[9]
  fields[#fields + 1] = 'error'; fields[#fields + 1] = ARGV[9]
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', unpack(fields))
redis.call(publish, ARGV[2], cjson.encode(event))
redis.call('HSET', KEYS[1], 'status', ARGV[11], 'finish_reason', ARGV[7], 'usage', ARGV[8],
  'finished_ms', now_ms)
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ARGV[10])
end
return seq
