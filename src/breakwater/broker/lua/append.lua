-- Fenced, idempotent appends of one engine step: one call for all of a worker's sequences (one
-- script run and one reply per step, not one per sequence). For each sequence only the request's
-- current attempt may write, and a write it retries (its first reply lost) is applied once.
-- KEYS: per sequence i (0-based) KEYS[3i+1] request record, KEYS[3i+2] token stream, KEYS[3i+3] emitted text
-- ARGV[1] stream max length, ARGV[2] 'PUBLISH', or 'SPUBLISH' (sharded Pub/Sub, on a cluster: the
-- channel shares its request's slot); per sequence ARGV[7i+3] attempt, ARGV[7i+4] channel,
-- ARGV[7i+5] text, ARGV[7i+6] token count, ARGV[7i+7] the attempt's own write number (1, 2, ...),
-- ARGV[7i+8] the tokens' logprobs as JSON ('' when the request did not ask), ARGV[7i+9] where the
-- write starts: the record's token count the attempt has seen so far (-1: not checked)
-- Returns, per sequence, the new seq (or, for a repeated write, the current one), -1 when fenced off
-- (another attempt owns the request), -2 when not running, -3 when the write does not start where
-- the record's text ends (a worker out of step with the record: it must not write), and BEHIND - w
-- when the record's last
-- write is w, before this one's predecessor: writes acknowledged to the worker were lost (a
-- primary failed over before its replica had them). The worker sends them again, from w + 1, so
-- every seq keeps its text (see worker.repair).
local BEHIND = -1000
local MISALIGNED = -3
local maxlen, publish = ARGV[1], ARGV[2]
if publish ~= 'PUBLISH' and publish ~= 'SPUBLISH' then
  return redis.error_reply('ERR publish must be PUBLISH or SPUBLISH')
end

local function append(record, stream, emitted, attempt, channel, text, n, wseq, lp, at)
  local cur = redis.call('HMGET', record, 'attempt', 'status', 'wseq', 'seq', 'tokens')
  if cur[1] ~= attempt then
    return -1
  end
  if cur[2] ~= 'running' then
    return -2
  end
  local last = tonumber(cur[3] or '0')
  if tonumber(wseq) <= last then
    return tonumber(cur[4] or '0')
  end
  if tonumber(wseq) > last + 1 then
    return BEHIND - last
  end
  local have = tonumber(cur[5] or '0')
  local from = tonumber(at)
  if from >= 0 and from ~= have then
    return MISALIGNED
  end
  local seq = tonumber(cur[4] or '0') + 1
  -- Each number is made a string once: Lua formats a number with sprintf wherever it becomes one
  -- (in '..', and in every numeric argument of redis.call), ~0.5 us each, five times per token.
  local s = tostring(seq)
  local tokens = tostring(have + tonumber(n))
  if seq == 1 then
    local t = redis.call('TIME')
    local first = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
    redis.call('HSET', record, 'seq', s, 'tokens', tokens, 'wseq', wseq, 'first_token_ms', first)
  else
    redis.call('HSET', record, 'seq', s, 'tokens', tokens, 'wseq', wseq)
  end
  redis.call('APPEND', emitted, text)
  if lp ~= '' then  -- rare: logprobs were asked for; the payload is then a JSON object
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, s .. '-0', 'seq', s, 'kind', 'token', 'text', text,
      'n', n, 'lp', lp)
    redis.call(publish, channel, cjson.encode({seq = s, kind = 'token', text = text, n = n, lp = lp}))
    return seq
  end
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, s .. '-0', 'seq', s, 'kind', 'token', 'text', text, 'n', n)
  -- A token's live payload is 't<seq> <n> <text>': no JSON to build here or to parse in the gateway.
  redis.call(publish, channel, 't' .. s .. ' ' .. n .. ' ' .. text)
  return seq
end

local out = {}
if #KEYS == 1 then
  -- A Redis Cluster node's share of a step, in one call instead of one per sequence: KEYS[1] (a
  -- record of the batch) routes it, and each sequence's keys ride in ARGV, 10 values per sequence
  -- from ARGV[3]: record, token stream, emitted text, then the 7 arguments above. Their slots
  -- differ, all on this node: the script is loaded with the allow-cross-slot-keys flag (scripts.py).
  -- Every key is touched before anything is written, so a call that meets a key this node does not
  -- serve (a slot moved, or migrating and the key gone) writes nothing and fails: the caller then
  -- sends each sequence on its own, where redirections are followed.
  local n = (#ARGV - 2) / 10
  for i = 0, n - 1 do
    for k = 3, 5 do
      local probe = redis.pcall('EXISTS', ARGV[10 * i + k])
      if type(probe) == 'table' and probe.err then
        return redis.error_reply('NONLOCAL ' .. probe.err)
      end
    end
  end
  for i = 0, n - 1 do
    local a = 10 * i + 2
    out[i + 1] = append(ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
      ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9], ARGV[a + 10])
  end
  return out
end
for i = 0, #KEYS / 3 - 1 do
  local a = 7 * i + 2
  out[i + 1] = append(KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3],
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7])
end
return out
