-- Finish a request that completed (finish.lua) and, when this call wrote its terminal event, settle
-- its job in the same round trip: meter it (meter.lua) and then acknowledge its entry (ack.lua), as
-- settle.lua does. One call instead of the finish, a read of the record and the settle. Only on a
-- single Redis: the record, the tenant's usage and the job are on three hash slots. A finish that
-- wrote nothing (fenced off, already terminal, behind its writes) settles nothing: the caller then
-- settles as before, from the record as it stands. A metering that fails (meter.lua checks its
-- arguments before it writes) leaves the finish written and the job pending: reclaimed, settled then.
-- KEYS[1..3] finish.lua's, KEYS[4..10] meter.lua's, KEYS[11..14] ack.lua's; ARGV[1..14] finish.lua's,
-- ARGV[15..23] meter.lua's, ARGV[24..27] ack.lua's.
-- Returns {finish.lua's reply, meter.lua's reply (1 metered now, 0 had been) or -1 when not settled}.
local function slice(t, first, last)
  local out = {}
  for i = first, last do
    out[#out + 1] = t[i]
  end
  return out
end
local seq = finish(slice(KEYS, 1, 3), slice(ARGV, 1, 14))
if type(seq) ~= 'number' then  -- an error reply
  return seq
end
if seq < 1 then
  return {seq, -1}
end
local metered = meter(slice(KEYS, 4, 10), slice(ARGV, 15, 23))
ack(slice(KEYS, 11, 14), slice(ARGV, 24, 27))
return {seq, metered}
