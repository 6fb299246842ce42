"""The redis strategy's keys of a name and the Lua scripts that take, renew and release them
(``redisholders.py`` says how a name's holders are kept; ``redis.py`` runs the scripts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

#: A wake-up nobody consumed is dropped after this long.
WAKE_TTL_MS = 5000
#: The longest ``BLPOP`` of a wait: well inside the client's command timeout (10 s); a longer
#: wait blocks again.
LONGEST_BLOCK = 5.0
#: How long a waiter's mark outlives the wait it was made for: it is renewed by the next wait
#: of the same ``lock()`` call, and it must last over the looks between two waits.
WAITING_MARK_MS = 1000
#: How a group's marker starts (the scripts' ``is_group``): no owner token starts so.
GROUP = b"= "
SHARED = GROUP + b"shared"

# Every script's KEYS: the lock key, the wake-up list, the holders' records, their lease ends,
# the waiting exclusive lockers (and, for the waiter's take, its own wake-up list).
_PRELUDE = (
    f"local wake_ms, shared = {WAKE_TTL_MS}, '{SHARED.decode()}'"
    + """
local lock, wake, holders, ends, waiting = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local function now_ms()
  local t = redis.call('time')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function is_group(v) return string.sub(v, 1, 2) == '= ' end
-- A lease ends when the clock passes its end, as a key's expiry does.
local function left(now)  -- drops the group's holders whose lease ended; how many are left
  local ended = redis.call('zrangebyscore', ends, '-inf', '(' .. now)
  for _, token in ipairs(ended) do redis.call('hdel', holders, token) end
  if #ended > 0 then redis.call('zremrangebyscore', ends, '-inf', '(' .. now) end
  return redis.call('zcard', ends)
end
local function stretch()  -- the group's keys last as long as its longest lease
  local last = redis.call('zrange', ends, -1, -1, 'withscores')[2]
  for _, key in ipairs({lock, holders, ends}) do redis.call('pexpireat', key, last) end
end
local function wake_one()  -- one wake-up element at most: one nobody took yet will do
  if redis.call('llen', wake) == 0 then
    redis.call('lpush', wake, 1) redis.call('pexpire', wake, wake_ms)
  end
end
local function free()  -- nobody holds the name any more: wake one waiter
  redis.call('del', lock, holders, ends)
  wake_one()
end
local function holder(now)  -- the lock key's value; false when free
  local v = redis.call('get', lock)
  if not v then redis.call('del', holders, ends) return false end
  if is_group(v) and left(now) == 0 then redis.call('del', lock, holders, ends) return false end
  return v
end
local function join(now, token, record, ttl)
  redis.call('hset', holders, token, record)
  redis.call('zadd', ends, now + tonumber(ttl), token)
  stretch()
  return 1
end
"""
)

# ARGV: "<token> " (empty: whoever holds it). 1 if it released a holder whose lease had not
# ended. A group's last holder leaving frees the name.
RELEASE = (
    # A plain holder's release first, before the group's functions are made: it stays as
    # cheap as a plain compare-and-delete. One wake-up element at most: one nobody took yet
    # wakes the next waiter all the same.
    f"""
local v = redis.call('get', KEYS[1])
if not v then return 0 end
if string.sub(v, 1, 2) ~= '= ' then
  if string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
  redis.call('del', KEYS[1])
  if redis.call('llen', KEYS[2]) == 0 then
    redis.call('lpush', KEYS[2], 1) redis.call('pexpire', KEYS[2], {WAKE_TTL_MS})
  end
  return 1
end
"""
    + _PRELUDE
    + """
if ARGV[1] == '' then free() return 1 end
local token = string.sub(ARGV[1], 1, -2)
local ended = redis.call('zscore', ends, token)
if not ended then return 0 end
redis.call('hdel', holders, token) redis.call('zrem', ends, token)
local now = now_ms()
if left(now) > 0 then stretch() wake_one() else free() end  -- a slot's waiter may go
return tonumber(ended) >= now and 1 or 0
"""
)
# ARGV: "<token> ", the new lease in ms. 1 if renewed; 0 if the lease ended or was taken.
REFRESH = (
    _PRELUDE
    + """
local v = redis.call('get', lock)
if not v then return 0 end
if is_group(v) then
  local token, now = string.sub(ARGV[1], 1, -2), now_ms()
  local ended = redis.call('zscore', ends, token)
  if not ended or tonumber(ended) < now then return 0 end
  redis.call('zadd', ends, now + tonumber(ARGV[2]), token)
  stretch()
  return 1
end
if string.sub(v, 1, #ARGV[1]) == ARGV[1] then return redis.call('pexpire', lock, ARGV[2]) end
return 0
"""
)
# ARGV: token, record, lease ms, marker ("= semaphore N"), N. 1 if it took a slot, 0 if all are
# taken (or shared holds hold the name), -M if a holder recorded another count M.
TAKE_SLOT = (
    _PRELUDE
    + """
local now = now_ms()
local v = holder(now)
if not v then
  redis.call('set', lock, ARGV[4])
elseif v ~= ARGV[4] then
  if not is_group(v) then return -1 end  -- a plain lock's holder counts as 1
  local recorded = string.match(v, '^= semaphore (%d+)$')
  return recorded and -tonumber(recorded) or 0
elseif redis.call('zcard', ends) >= tonumber(ARGV[5]) then
  return 0
end
join(now, ARGV[1], ARGV[2], ARGV[3])
if redis.call('zcard', ends) < tonumber(ARGV[5]) then wake_one() end  -- a slot is left
return 1
"""
)
# ARGV: token, record, lease ms. 1 if it took a shared hold; 0 while the name is held otherwise
# or an exclusive locker waits for it. A take wakes the next waiter (shared holds wake each
# other in turn; an exclusive waiter woken so tries once more and waits again).
TAKE_SHARED = (
    _PRELUDE
    + """
local now = now_ms()
redis.call('zremrangebyscore', waiting, '-inf', '(' .. now)
if redis.call('zcard', waiting) > 0 then return 0 end
local v = holder(now)
if not v then redis.call('set', lock, shared) elseif v ~= shared then return 0 end
join(now, ARGV[1], ARGV[2], ARGV[3])
wake_one()  -- the next shared waiter may go too
return 1
"""
)
# KEYS[6]: the name's fencing counter. ARGV: "<token> ", the holder's record up to its fencing
# token's digits (``LockInfo.fenced_json_prefix``). The next token if the holder still holds the
# name (its lease not ended), else 0; the holder's record is rewritten with the token, its
# lease left as it was.
FENCE = (
    _PRELUDE
    + """
local v = redis.call('get', lock)
if not v then return 0 end
local n
if is_group(v) then
  local token = string.sub(ARGV[1], 1, -2)
  local ended = redis.call('zscore', ends, token)
  if not ended or tonumber(ended) < now_ms() then return 0 end
  n = redis.call('incr', KEYS[6])
  redis.call('hset', holders, token, ARGV[2] .. n .. '}\\n')
else
  if string.sub(v, 1, #ARGV[1]) ~= ARGV[1] then return 0 end
  n = redis.call('incr', KEYS[6])
  local ms = redis.call('pttl', lock)
  if ms > 0 then redis.call('set', lock, ARGV[1] .. ARGV[2] .. n .. '}\\n', 'px', ms) end
end
return n
"""
)
# A waiter's take of a free lock, which leaves the waiter's own BLPOP (KEYS[6]) a wake-up to
# return on; else it marks the waiter waiting. ARGV: value, lease ms, token, mark ms.
TAKE = (
    _PRELUDE
    + """
if redis.call('set', lock, ARGV[1], 'nx', 'px', ARGV[2]) then
  redis.call('zrem', waiting, ARGV[3])
  redis.call('lpush', KEYS[6], 1) redis.call('pexpire', KEYS[6], wake_ms)
  return 1
end
redis.call('zadd', waiting, now_ms() + tonumber(ARGV[4]), ARGV[3])
redis.call('pexpireat', waiting, redis.call('zrange', waiting, -1, -1, 'withscores')[2])
return 0
"""
)
# The take right behind a waiter's BLPOP. ARGV: value, lease ms, token.
TAKE_WOKEN = """
if redis.call('set', KEYS[1], ARGV[1], 'nx', 'px', ARGV[2]) then
  redis.call('zrem', KEYS[5], ARGV[3])
  return 1
end
return 0
"""


class NameKeys(NamedTuple):
    """The keys of one lock name, in the order every script takes them."""

    lock: bytes
    wake: bytes
    holders: bytes
    ends: bytes
    waiting: bytes


def name_keys(base: bytes, name: str) -> NameKeys:
    """``name``'s keys after ``base`` (``<KEY_PREFIX>isolatable:``, and its hash tag in a
    cluster)."""
    encoded = name.encode("utf-8", "surrogatepass")
    return NameKeys(*(base + kind + encoded for kind in _KINDS))


_KINDS = (b"lock:", b"wake:", b"holders:", b"ends:", b"waiting:")


@dataclass(frozen=True)
class Scripts:
    """The scripts run with ``EVALSHA`` (redis-py reloads one that meets ``NOSCRIPT``)."""

    release: Script
    refresh: Script
    take_slot: Script
    take_shared: Script
    fence: Script


def register_scripts(client: redis.Redis) -> Scripts:
    scripts = (RELEASE, REFRESH, TAKE_SLOT, TAKE_SHARED, FENCE)
    return Scripts(*(client.register_script(s) for s in scripts))
