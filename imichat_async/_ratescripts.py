"""The fleet's rate in Redis (`_ratestore.py`): its Lua scripts, one atomic step each.

One hash per tenant key holds the token bucket (a GCRA: `z`, when it held no
token), the learned rate and its CUBIC curve (`rate`, `epoch`, `w_max`, `k`,
`c`, `t0`, `since`, `est`, `est_at`), the run of throttles being measured
(`run_*`) and fleet-wide counts per second (`ok*`, `sent*`, `thr*`); a sorted set
beside it (`KEY:members`) the clients present. Every script reads Redis' `TIME`:
one clock for the fleet. Numbers come back as strings (Lua numbers would be
truncated to integers). The math of the rate is not here: the members compute
it with `_rate.py` and the scripts only apply it, atomically, if no decrease
came first (`epoch`).
"""

from __future__ import annotations

_PRELUDE = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(field, default)
  local v = redis.call('HGET', key, field)
  if v then return tonumber(v) end
  return default
end
local function put(field, value) redis.call('HSET', key, field, tostring(value)) end
-- a fleet-wide count per second over about the last second (two one-second windows)
local function meter(name, add)
  local w = num(name .. 'w', now)
  local c, p = num(name .. 'c', 0), num(name .. 'p', 0)
  local first = num(name .. 'f', now)
  local age = now - w
  if age >= 2 then p = 0; c = 0; w = now; age = 0
  elseif age >= 1 then p = c; c = 0; w = w + 1; age = age - 1 end
  c = c + add
  put(name .. 'w', w); put(name .. 'c', c); put(name .. 'p', p); put(name .. 'f', first)
  return (p * (1 - age) + c) / math.min(1, math.max(now - first, 0.05))
end
-- the bucket: z is when it held no token; the level now is (now - z) * rate, at most depth
local function depth(rate, burst, slack) return math.max(burst, 1 + rate * slack) end
local function set_rate(new, burst, slack)
  local rate = num('rate', 0)
  local level = depth(new, burst, slack)
  if rate > 0 then level = math.min(depth(rate, burst, slack), (now - num('z', 0)) * rate) end
  put('z', now - level / new)
  put('rate', new)
end
local function state(extra)
  local out = {tostring(now)}
  for _, f in ipairs({'rate', 'epoch', 'w_max', 'k', 'c', 't0', 'since', 'est', 'est_at'}) do
    table.insert(out, tostring(num(f, 0)))
  end
  for _, v in ipairs(extra) do table.insert(out, tostring(v)) end
  return out
end
"""

#: KEYS: the tenant's hash, its members (a sorted set). ARGV: wanted, fixed rate (0: none),
#: ceiling (0: none), burst, slack, horizon, epoch seen, proposed rate (0: none; the curve's,
#: capped here at twice the accepted rate), accepted, sent (since the last call), ttl ms,
#: member id, member ttl s, the member's window (its concurrency; 0: no slow start), the slow
#: start's growth (permits per accepted answer), the seconds after which permits neither
#: used nor answered are taken as lost, and the grant numbers the member dropped unsent since
#: its last call, comma-separated (a decrease voids the slots leased at the old rate, and a
#: slot not taken in time is not used late).
#: Returns the state, then ok rate, sent rate, seconds until a slot is in the horizon, first
#: grant number, members present, slow start (1: permits gate the sends, 0: they do not), and
#: each slot's offset from now (a slow start's permits: 0, due now).
#:
#: The slow start, while no rate is in force (adaptive, never throttled): the fleet may
#: have been granted at most `window + growth x accepted` permits, so at most `window` +
#: (growth - 1) x accepted are in flight: the fleet starts as one client would, and grows by
#: a quarter per answer accepted, until the first throttle sets a rate, or until a window
#: of answers came back and the fleet's window passes the concurrency of all its members
#: (members x window): then no permit is needed, and the members send as they would alone.
LEASE = (
    _PRELUDE
    + """
local n, fixed, ceiling = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local burst, slack, horizon = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local seen, proposal = tonumber(ARGV[7]), tonumber(ARGV[8])
local ok_rate = meter('ok', tonumber(ARGV[9]))
local sent_rate = meter('sent', tonumber(ARGV[10]))
local rate = num('rate', 0)
if fixed > 0 then
  if rate ~= fixed then set_rate(fixed, burst, slack) end
elseif rate == 0 and ceiling > 0 then
  set_rate(ceiling, burst, slack)
elseif proposal > 0 and rate > 0 and seen == num('epoch', 0) then
  -- never above twice the rate the fleet accepts, the answers this lease reports counted
  -- (the member's last reply missed them: at a request a second, it read near nothing)
  proposal = math.min(proposal, math.max(num('w_max', 0), 2 * ok_rate))
  if proposal ~= rate then set_rate(proposal, burst, slack) end
end
rate = num('rate', 0)
local g = num('g', 0)
local first = g + 1
local slots = {}
local retry = 0
redis.call('ZADD', KEYS[2], now, ARGV[12])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[13]))
local members = redis.call('ZCARD', KEYS[2])
local window, growth, lost = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
-- grants dropped unsent: not counted as accepted by the throttles' measures (`THROTTLE`)
local run_g, last_g = num('run_g', -1), num('last_g', -1)
for d in string.gmatch(ARGV[17], '[^,]+') do
  d = tonumber(d)
  if run_g >= 0 and d > run_g then redis.call('HINCRBY', key, 'run_drop', 1) end
  if last_g >= 0 and d > last_g then redis.call('HINCRBY', key, 'last_drop', 1) end
end
local gating = 0
if rate == 0 and window > 0 then
  local accepted = num('ss_ok', 0) + tonumber(ARGV[9])
  put('ss_ok', accepted)
  if accepted < window or window + (growth - 1) * accepted < members * window then
    gating = 1
    local granted, most = num('ss_g', 0), window + growth * accepted
    -- permits a member took and never used (it ended, or died): forgiven after `lost` s
    -- with none granted and nothing accepted, so the fleet never waits on them for ever
    if granted + 1 > most and now - num('ss_t', now) > lost then granted = most - window end
    for _ = 1, n do
      if granted + 1 > most then break end
      granted = granted + 1
      g = g + 1
      table.insert(slots, '0')
    end
    if #slots > 0 or tonumber(ARGV[9]) > 0 or num('ss_t', 0) == 0 then put('ss_t', now) end
    put('ss_g', granted)
    put('g', g)
  end
end
if rate > 0 then
  local step = 1 / rate
  local z = math.max(num('z', 0), now - depth(rate, burst, slack) * step)
  for _ = 1, n do
    local slot = math.max(now, z + step)
    if slot - now > horizon then break end
    z = z + step
    g = g + 1
    table.insert(slots, tostring(slot - now))
  end
  retry = math.max(0, z + step - now - horizon)
  put('z', z)
  put('g', g)
end
redis.call('PEXPIRE', key, ARGV[11])
redis.call('PEXPIRE', KEYS[2], ARGV[11])
local out = state({ok_rate, sent_rate, retry, first, members, gating})
for _, s in ipairs(slots) do table.insert(out, s) end
return out
"""
)

#: ARGV: the throttled request's send time (Redis clock), its grant number (-1: none),
#: accepted, sent (since the last call), window, cluster gap, ttl ms.
#: Returns the state, then the rate sent and not refused, stale (1/0), accepted between this
#: throttle and the first of its run, and the seconds between their sends (-1, 0: no run),
#: then the same between this throttle and the fleet's previous one (-1, 0: none before).
#: Accepted between: the grants between the two, less the throttled ones of the run and the
#: grants members reported dropped unsent meanwhile (else each decrease of the run, which
#: voids the slots leased ahead, made the fleet's measured rate 10-20 % too high: issue #20).
#: Between a throttle and the previous one the server's bucket went from empty to empty, so
#: what it accepted is its rate x the time, less what it could not keep while full: a lower
#: bound of the tenant's rate, exact while the fleet kept sending.
THROTTLE = (
    _PRELUDE
    + """
local sent, g = tonumber(ARGV[1]), tonumber(ARGV[2])
meter('ok', tonumber(ARGV[3]))
-- offered: sent and not refused
local offered = math.max(0, meter('sent', tonumber(ARGV[4])) - meter('thr', 1))
local window, gap = tonumber(ARGV[5]), tonumber(ARGV[6])
local run_t, run_last = num('run_t', -1), num('run_last', -1)
local between, span = -1, 0
if run_t < 0 or sent - run_last > gap or sent - run_t > window or g < 0 or num('run_g', -1) < 0 then
  put('run_t', sent); put('run_last', sent); put('run_g', g); put('run_n', 0)
  put('run_drop', 0)
else
  local run_n = num('run_n', 0)
  between = g - num('run_g', 0) - 1 - run_n - num('run_drop', 0)
  span = sent - run_t
  put('run_n', run_n + 1)
  put('run_last', math.max(run_last, sent))
end
local since_last, last_span = -1, 0
local last_t, last_g = num('last_t', -1), num('last_g', -1)
if g >= 0 and (last_g < 0 or g > last_g) then
  if last_g >= 0 and sent > last_t then
    since_last = g - last_g - 1 - num('last_drop', 0)
    last_span = sent - last_t
  end
  put('last_t', sent); put('last_g', g); put('last_drop', 0)
end
local stale = 0
if sent < num('since', 0) then stale = 1 end
redis.call('HINCRBY', key, 'throttles', 1)
redis.call('PEXPIRE', key, ARGV[7])
return state({offered, stale, between, span, since_last, last_span})
"""
)

#: ARGV: epoch computed from, rate, w_max, k, c, grace (s; 0: a re-aim within the grace,
#: which keeps it), estimate and its time (0: none), burst, slack, ttl ms.
#: Returns 1 (set) or 0 (another decrease came first), then the state.
DECREASE = (
    _PRELUDE
    + """
if tonumber(ARGV[1]) ~= num('epoch', 0) then
  local out = state({})
  table.insert(out, 1, '0')
  return out
end
set_rate(tonumber(ARGV[2]), tonumber(ARGV[9]), tonumber(ARGV[10]))
put('w_max', ARGV[3]); put('k', ARGV[4]); put('c', ARGV[5]); put('t0', now)
put('epoch', num('epoch', 0) + 1)
if tonumber(ARGV[6]) > 0 then
  put('since', now + tonumber(ARGV[6]))
  redis.call('HINCRBY', key, 'decreases', 1)
end
if tonumber(ARGV[7]) > 0 then put('est', ARGV[7]); put('est_at', ARGV[8]) end
redis.call('PEXPIRE', key, ARGV[11])
local out = state({})
table.insert(out, 1, '1')
return out
"""
)
