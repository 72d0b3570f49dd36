-- The bulk intake's take: up to ARGV[1] messages from a queue's lists (priority order),
-- each recorded in the same atomic step as kombu records a delivery (its unacked hash and
-- index: [message, exchange, routing_key], scored by the time of delivery), and with its
-- holder, this process's liveness id (ARGV[2]), so that survivors hand it back if this
-- process dies. A message without a readable delivery tag is taken unrecorded (the intake
-- refuses it).
-- KEYS: unacked, unacked_index, unacked_owner, then the queue's lists in priority order
-- Returns key index, message, delivery tag ('' when unrecorded), for each message taken.
local limit = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
local taken = 0
for k = 4, #KEYS do
  if taken >= limit then break end
  local got = redis.call('RPOP', KEYS[k], limit - taken)
  if got then
    for _, raw in ipairs(got) do
      local ok, msg = pcall(cjson.decode, raw)
      local props = ok and type(msg) == 'table' and msg['properties']
      local tag = type(props) == 'table' and props['delivery_tag']
      if type(tag) == 'string' and tag ~= '' then
        local info = props['delivery_info']
        if type(info) ~= 'table' then info = {} end
        local ex = type(info['exchange']) == 'string' and info['exchange'] or ''
        local rk = type(info['routing_key']) == 'string' and info['routing_key'] or ''
        redis.call('HSET', KEYS[1], tag, '[' .. raw .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
        redis.call('ZADD', KEYS[2], now, tag)
        redis.call('HSET', KEYS[3], tag, ARGV[2])
      else
        tag = ''
      end
      out[#out + 1] = k - 3
      out[#out + 1] = raw
      out[#out + 1] = tag
      taken = taken + 1
    end
  end
end
return out
