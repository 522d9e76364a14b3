"""The durable session log in Redis: `RedisStore`, for clusters whose nodes must share sessions.

Same protocol and semantics as `serving.sessions.store.SQLiteStore` (records, idempotent append-only
events and token chunks, tenant isolation, TTL purge, per-tenant bounds with eviction, worker leases,
cancellation, fenced checkpoint/finish). Every operation that SQLiteStore runs in one transaction is
one Lua script here (Redis runs a script atomically): it checks everything first and writes only
once every check passed, so a refused or failed call writes nothing, and two workers racing to claim
a session cannot both get it.

Layout (every key starts with `prefix`, `tandem:` by default; `{id}` is the session id):

- `s:{id}` (hash) — the record: tenant, model, status, created, updated, expires, request (JSON),
  result (JSON; absent while None), bytes, owner (absent while None), lease_until,
  cancel_requested (0/1), claims. Floats are stored as Python's repr (exact round trip) and every
  float is computed in Python: scripts only compare them.
- `e:{id}` (list) — the events; index == seq (appends never leave a gap), each `[type, data]` JSON.
- `t:{id}` (hash) — token chunks: field = start (decimal), value = the ids packed as int64 (as
  SQLiteStore packs them); field `n` = the number of ids stored.
- `tenant:{tenant}` (zset, score created) — the tenant's sessions, for the per-tenant bounds.
- `unowned` (zset, score created) — unfinished sessions without an owner.
- `uq:{tenant}` (zset, score created) — the same, per tenant; `uq_tenants` (set) — the tenants whose
  `uq:` may be non-empty. Orphans are offered round-robin across tenants from these.
- `served` (zset, score the lease clock of the tenant's last claim that changed hands) — within a
  round of `orphans`, the tenant served least recently comes first.
- `leases` (zset, score lease_until) — unfinished sessions with an owner.
- `held:{owner}` (set) — the unfinished sessions an owner holds (for `cancels`).
- `finished` (zset, score expires) — finished sessions (for `purge_expired`).
- `ob:{event_id}` (hash) — an outbox entry (a completion webhook still to deliver): response_id,
  tenant, status, created, attempts, claimed_by (absent while unclaimed), lease_until. Written by the
  script that gives a `webhook_tenants` session its finished status (finish, set_status, a
  request_cancel that cancels on the spot); kept when the session is deleted or purged, removed by
  `outbox_remove` once delivered or given up on.
- `outbox` (zset, score created) — unclaimed outbox entries; `outbox_leases` (zset, score
  lease_until) — claimed ones.

Orphans are `unowned` plus the `leases` that ran out, round-robin across tenants (each tenant's by
(created, id)), as in SQLiteStore. A session queued by a version without `uq:` keys is still offered:
the oldest of `unowned` are read too, and `uq:` entries that are no longer unowned are dropped when
seen. Scripts build the
keys of other sessions (eviction) and owners from the prefix, so this needs one Redis server
(standalone, or a primary with replicas/Sentinel), not Redis Cluster.

Clock: with `server_clock` (the default), a call whose `now` is None uses the Redis server's TIME,
so nodes whose clocks drift apart still agree on which leases ran out; `now` passed explicitly is
used as given. `updated` and `created` are the caller's clock, as in SQLiteStore.

Durability is the server's: use AOF (`appendonly yes`, `appendfsync everysec` or `always`) for a
session log that survives a Redis restart. The store checks `appendonly` when it opens: it warns
without AOF, or refuses to open with `require_aof` (sessions.store.require_aof); a server that refuses
CONFIG GET (managed Redis, an ACL) is warned about. Writes use no `WAIT`: a failover to a replica
can still lose the last writes the primary acknowledged.

Timeouts: every command has a socket timeout and a connect timeout (sessions.store.socket_timeout_s,
socket_connect_timeout_s; redis-py 5 has none by default) and few retries, so an unreachable server
fails calls in bounded time (callers answer 503 store_unavailable) instead of holding their threads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

try:
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("RedisStore needs the `redis` client: pip install 'tandem[redis]'") from e

from serving.config import SessionStoreSpec
from serving.sessions.store import (
    Event,
    LeaseLost,
    OutboxEntry,
    QuotaExceeded,
    SessionHead,
    SessionRecord,
    Status,
    StoreError,
    _pack,
    _unpack,
)
from serving.sessions.webhooks import completion_event_id

logger = logging.getLogger(__name__)

_RENEW_CHUNK = 1000  # ids renewed by one script call (each call is atomic; ids are independent)
_PURGE_CHUNK = 1000  # sessions purged by one script call

# Helpers prepended to every script. ARGV[1] is always the key prefix.
_LIB = r"""
local P = ARGV[1]
local function skey(id) return P .. 's:' .. id end
local function ekey(id) return P .. 'e:' .. id end
local function tkey(id) return P .. 't:' .. id end
local function heldkey(owner) return P .. 'held:' .. owner end
local function tenkey(tenant) return P .. 'tenant:' .. tenant end
local function uqkey(tenant) return P .. 'uq:' .. tenant end
local UNOWNED, LEASES, FINISHED = P .. 'unowned', P .. 'leases', P .. 'finished'
local UQ_TENANTS, SERVED = P .. 'uq_tenants', P .. 'served'
local OUTBOX, OUTBOX_LEASES = P .. 'outbox', P .. 'outbox_leases'
local function obkey(eid) return P .. 'ob:' .. eid end

local function is_finished(status) return status ~= 'queued' and status ~= 'in_progress' end

-- index an unowned session in the global and its tenant's queue
local function enqueue(id, tenant, created)
  redis.call('ZADD', UNOWNED, created, id)
  redis.call('ZADD', uqkey(tenant), created, id)
  redis.call('SADD', UQ_TENANTS, tenant)
end

-- drop a session from the queues of unowned ones (claimed, finished or deleted)
local function unqueue(id, tenant)
  redis.call('ZREM', UNOWNED, id)
  if tenant then
    redis.call('ZREM', uqkey(tenant), id)
    if redis.call('ZCARD', uqkey(tenant)) == 0 then redis.call('SREM', UQ_TENANTS, tenant) end
  end
end

-- drop a session from the indexes of unfinished ones (it finished, or it is deleted)
local function unindex_open(id, owner, tenant)
  unqueue(id, tenant)
  redis.call('ZREM', LEASES, id)
  if owner then redis.call('SREM', heldkey(owner), id) end
end

-- index a session whose status just became a finished one
local function index_finished(id, owner)
  local h = redis.call('HMGET', skey(id), 'expires', 'tenant')
  unindex_open(id, owner, h[2])
  redis.call('ZADD', FINISHED, h[1], id)
end

local function delete_session(id)
  local h = redis.call('HMGET', skey(id), 'tenant', 'owner')
  if h[1] then redis.call('ZREM', tenkey(h[1]), id) end
  unindex_open(id, h[2], h[1])
  redis.call('ZREM', FINISHED, id)
  redis.call('DEL', skey(id), ekey(id), tkey(id))
end

-- record the completion webhook `eid` of session `id` (of `tenant`) reaching `status`, when the
-- tenant is one of `tenants` (newline-joined; eid '' when none has a webhook). An entry already there
-- stays as it is.
local function outbox_add(eid, id, tenant, status, created, tenants)
  if eid == '' or not tenant then return end
  if not string.find('\n' .. tenants .. '\n', '\n' .. tenant .. '\n', 1, true) then return end
  if redis.call('EXISTS', obkey(eid)) == 1 then return end
  redis.call('HSET', obkey(eid), 'response_id', id, 'tenant', tenant, 'status', status, 'created', created,
    'attempts', '0', 'lease_until', '0')
  redis.call('ZADD', OUTBOX, created, eid)
end

local function check_owner(id, owner)
  local h = redis.call('HMGET', skey(id), 'status', 'owner')
  if not h[1] then return {'nosession'} end
  if h[2] ~= owner or is_finished(h[1]) then return {'lease', h[1], h[2]} end
  return nil
end

-- Check n events given as ARGV triples (seq, element, size) from ARGV[i]. Returns the elements to
-- append and their size, or nil and an error reply. Writes nothing.
local function check_events(id, i, n)
  local stored_last = redis.call('LLEN', ekey(id)) - 1
  local last, new, added = stored_last, {}, 0
  for k = 0, n - 1 do
    local seq, el = tonumber(ARGV[i + 3 * k]), ARGV[i + 3 * k + 1]
    if seq <= last then
      local have = false
      if seq >= 0 and seq <= stored_last then
        have = redis.call('LINDEX', ekey(id), seq)
      elseif seq > stored_last then
        have = new[seq - stored_last]
      end
      if have ~= el then return nil, {'differs', seq} end
    elseif seq ~= last + 1 then
      return nil, {'gap', seq, last}
    else
      new[#new + 1] = el
      last = seq
      added = added + tonumber(ARGV[i + 3 * k + 2])
    end
  end
  return new, added
end

local function write_events(id, new, added)
  for k = 1, #new, 1000 do
    redis.call('RPUSH', ekey(id), unpack(new, k, math.min(k + 999, #new)))
  end
  if added > 0 and redis.call('EXISTS', skey(id)) == 1 then
    redis.call('HINCRBY', skey(id), 'bytes', added)
  end
end

-- Check a token chunk (start as a decimal string). Returns true to write it, false when the same
-- chunk is stored already, or nil and an error reply.
local function check_tokens(id, start, blob)
  local have = tonumber(redis.call('HGET', tkey(id), 'n') or '0')
  local s = tonumber(start)
  if s < have then
    if redis.call('HGET', tkey(id), start) ~= blob then return nil, {'tdiffers'} end
    return false
  end
  if s ~= have then return nil, {'tgap', have} end
  return true
end

local function write_tokens(id, start, blob, new_n)
  redis.call('HSET', tkey(id), start, blob, 'n', new_n)
  if redis.call('EXISTS', skey(id)) == 1 then
    redis.call('HINCRBY', skey(id), 'bytes', string.len(blob))
  end
end
"""

# ARGV: prefix, id, tenant, model, status, created, updated, expires, request, request_len,
# max_sessions, max_bytes
_CREATE = r"""
local id, tenant = ARGV[2], ARGV[3]
local new_bytes, max_sessions, max_bytes = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local ids = redis.call('ZRANGE', tenkey(tenant), 0, -1)
local rows, count, size = {}, #ids, 0
for k, sid in ipairs(ids) do
  rows[k] = redis.call('HMGET', skey(sid), 'status', 'bytes')
  size = size + (tonumber(rows[k][2]) or 0)
end
local evict = {}
for k, sid in ipairs(ids) do
  if count < max_sessions and size + new_bytes <= max_bytes then break end
  if is_finished(rows[k][1]) then
    evict[#evict + 1] = sid
    count, size = count - 1, size - (tonumber(rows[k][2]) or 0)
  end
end
if count >= max_sessions or size + new_bytes > max_bytes then return {'quota', count, size} end
-- a duplicate id is refused after the bounds are checked and unless it is evicted, as in SQLiteStore
local evicted_self = false
for _, sid in ipairs(evict) do evicted_self = evicted_self or sid == id end
if not evicted_self and redis.call('EXISTS', skey(id)) == 1 then return {'exists'} end
for _, sid in ipairs(evict) do delete_session(sid) end
redis.call('HSET', skey(id), 'tenant', tenant, 'model', ARGV[4], 'status', ARGV[5], 'created', ARGV[6],
  'updated', ARGV[7], 'expires', ARGV[8], 'request', ARGV[9], 'bytes', ARGV[10], 'lease_until', '0',
  'cancel_requested', '0', 'claims', '0')
redis.call('ZADD', tenkey(tenant), ARGV[6], id)
if is_finished(ARGV[5]) then
  redis.call('ZADD', FINISHED, ARGV[8], id)
else
  enqueue(id, tenant, ARGV[6])
end
return {'ok'}
"""

# ARGV: prefix, id, status, result, has_result, updated, result_len, event_id, created, tenants
_SET_STATUS = r"""
local id, status = ARGV[2], ARGV[3]
local h = redis.call('HMGET', skey(id), 'status', 'owner', 'tenant')
if not h[1] then return {'nosession'} end
if is_finished(h[1]) and h[1] ~= status then return {'already', h[1]} end
redis.call('HSET', skey(id), 'status', status, 'updated', ARGV[6])
if ARGV[5] == '1' then redis.call('HSET', skey(id), 'result', ARGV[4]) end
redis.call('HINCRBY', skey(id), 'bytes', ARGV[7])
if is_finished(status) and not is_finished(h[1]) then
  index_finished(id, h[2])
  outbox_add(ARGV[8], id, h[3], status, ARGV[9], ARGV[10])
end
return {'ok'}
"""

# ARGV: prefix, id, tenant
_DELETE = r"""
if redis.call('HGET', skey(ARGV[2]), 'tenant') ~= ARGV[3] then return 0 end
delete_session(ARGV[2])
return 1
"""

# ARGV: prefix, now, limit
_PURGE = r"""
local ids = redis.call('ZRANGEBYSCORE', FINISHED, '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, id in ipairs(ids) do
  local status = redis.call('HGET', skey(id), 'status')
  if status and is_finished(status) then
    delete_session(id)
    n = n + 1
  else
    redis.call('ZREM', FINISHED, id)  -- a stale entry (this store never leaves one): unindex only
  end
end
return {#ids, n}
"""

# ARGV: prefix, id, (seq, element, size)...
_APPEND_EVENTS = r"""
local id = ARGV[2]
if redis.call('EXISTS', skey(id)) == 0 then return {'ok'} end  -- deleted: leave no e: key behind
local new, added = check_events(id, 3, (#ARGV - 2) / 3)
if not new then return added end
write_events(id, new, added)
return {'ok'}
"""

# ARGV: prefix, id, start, blob, new_n
_APPEND_TOKENS = r"""
local id = ARGV[2]
if redis.call('EXISTS', skey(id)) == 0 then return {'ok'} end  -- deleted: leave no t: key behind
local ok, err = check_tokens(id, ARGV[3], ARGV[4])
if ok == nil then return err end
if ok then write_tokens(id, ARGV[3], ARGV[4], ARGV[5]) end
return {'ok'}
"""

# ARGV: prefix, id, owner, now, lease_until, updated
_CLAIM = r"""
local id, owner = ARGV[2], ARGV[3]
local h = redis.call('HMGET', skey(id), 'status', 'owner', 'lease_until', 'tenant')
if not h[1] or is_finished(h[1]) then return false end
local holder = h[2]
local live = holder and tonumber(h[3]) >= tonumber(ARGV[4])
if live and holder ~= owner then return false end
if not live then
  redis.call('HINCRBY', skey(id), 'claims', 1)
  local served = redis.call('ZSCORE', SERVED, h[4])
  if not served or tonumber(ARGV[4]) > tonumber(served) then redis.call('ZADD', SERVED, ARGV[4], h[4]) end
end
redis.call('HSET', skey(id), 'owner', owner, 'lease_until', ARGV[5], 'status', 'in_progress',
  'updated', ARGV[6])
unqueue(id, h[4])
if holder and holder ~= owner then redis.call('SREM', heldkey(holder), id) end
redis.call('SADD', heldkey(owner), id)
redis.call('ZADD', LEASES, ARGV[5], id)
return redis.call('HGETALL', skey(id))
"""

# ARGV: prefix, owner, lease_until, id...
_RENEW = r"""
local owner, lease_until = ARGV[2], ARGV[3]
local held = {}
for k = 4, #ARGV do
  local id = ARGV[k]
  local h = redis.call('HMGET', skey(id), 'status', 'owner')
  if h[1] and h[2] == owner and not is_finished(h[1]) then
    redis.call('HSET', skey(id), 'lease_until', lease_until)
    redis.call('ZADD', LEASES, lease_until, id)
    held[#held + 1] = id
  end
end
return held
"""

# ARGV: prefix, now, last rank to read of each queue (-1: all). Returns {(id, created, tenant) triples,
# (tenant, served) pairs}: the first of every tenant's queue and of the global one (sessions queued
# before the tenant queues existed), and the leases that ran out; when each of their tenants was last
# served (false: never). The caller deduplicates and orders them round-robin.
_ORPHANS = r"""
local last = tonumber(ARGV[3])
local out = {}
local function offer(id, tenant_queue)
  local h = redis.call('HMGET', skey(id), 'created', 'tenant', 'status', 'owner')
  if h[1] and not is_finished(h[3]) and not h[4] then
    out[#out + 1] = id
    out[#out + 1] = h[1]
    out[#out + 1] = h[2]
  elseif tenant_queue then
    redis.call('ZREM', uqkey(tenant_queue), id)  -- no longer unowned (claimed by an older version)
  end
end
for _, tenant in ipairs(redis.call('SMEMBERS', UQ_TENANTS)) do
  for _, id in ipairs(redis.call('ZRANGE', uqkey(tenant), 0, last)) do offer(id, tenant) end
  if redis.call('ZCARD', uqkey(tenant)) == 0 then redis.call('SREM', UQ_TENANTS, tenant) end
end
for _, id in ipairs(redis.call('ZRANGE', UNOWNED, 0, last)) do offer(id, nil) end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', '(' .. ARGV[2])) do
  local h = redis.call('HMGET', skey(id), 'created', 'tenant')
  if h[1] then
    out[#out + 1] = id
    out[#out + 1] = h[1]
    out[#out + 1] = h[2]
  end
end
local served, seen = {}, {}
for k = 3, #out, 3 do
  local tenant = out[k]
  if not seen[tenant] then
    seen[tenant] = true
    served[#served + 1] = tenant
    served[#served + 1] = redis.call('ZSCORE', SERVED, tenant)
  end
end
return {out, served}
"""

# ARGV: prefix, id, tenant, now, updated, event_id, created, tenants
_REQUEST_CANCEL = r"""
local id = ARGV[2]
local h = redis.call('HMGET', skey(id), 'tenant', 'status', 'owner', 'lease_until')
if h[1] ~= ARGV[3] then return false end
if is_finished(h[2]) then return redis.call('HGETALL', skey(id)) end
local owner = h[3]
local unheld = (not owner and h[2] == 'queued') or (owner and tonumber(h[4]) < tonumber(ARGV[4]))
if unheld then
  redis.call('HSET', skey(id), 'cancel_requested', '1', 'status', 'cancelled', 'lease_until', '0',
    'updated', ARGV[5])
  redis.call('HDEL', skey(id), 'owner')
  index_finished(id, owner)
  outbox_add(ARGV[6], id, h[1], 'cancelled', ARGV[7], ARGV[8])
else
  redis.call('HSET', skey(id), 'cancel_requested', '1', 'updated', ARGV[5])
end
return redis.call('HGETALL', skey(id))
"""

# ARGV: prefix, owner
_CANCELS = r"""
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', heldkey(ARGV[2]))) do
  local h = redis.call('HMGET', skey(id), 'owner', 'cancel_requested', 'status')
  if h[1] == ARGV[2] and h[2] == '1' and h[3] and not is_finished(h[3]) then out[#out + 1] = id end
end
return out
"""

# ARGV: prefix, id, owner, has_tokens, start, blob, new_n, (seq, element, size)...
_CHECKPOINT = r"""
local id = ARGV[2]
local err = check_owner(id, ARGV[3])
if err then return err end
local write_t = false
if ARGV[4] == '1' then
  local ok, terr = check_tokens(id, ARGV[5], ARGV[6])
  if ok == nil then return terr end
  write_t = ok
end
local new, added = check_events(id, 8, (#ARGV - 7) / 3)
if not new then return added end
if write_t then write_tokens(id, ARGV[5], ARGV[6], ARGV[7]) end
write_events(id, new, added)
return {'ok'}
"""

# ARGV: prefix, id, owner, status, result, has_result, updated, result_len, event_id, created,
# tenants, (seq, element, size)...
_FINISH = r"""
local id, owner = ARGV[2], ARGV[3]
local err = check_owner(id, owner)
if err then return err end
local new, added = check_events(id, 12, (#ARGV - 11) / 3)
if not new then return added end
write_events(id, new, added)
redis.call('HSET', skey(id), 'status', ARGV[4], 'lease_until', '0', 'updated', ARGV[7])
if ARGV[6] == '1' then redis.call('HSET', skey(id), 'result', ARGV[5]) end
redis.call('HINCRBY', skey(id), 'bytes', ARGV[8])
redis.call('HDEL', skey(id), 'owner')
index_finished(id, owner)
outbox_add(ARGV[9], id, redis.call('HGET', skey(id), 'tenant'), ARGV[4], ARGV[10], ARGV[11])
return {'ok'}
"""

# ARGV: prefix, owner, now, lease_until, cutoff (unclaimed entries created at or before it), limit,
# event ids... (given: only those, whatever their age). Returns the claimed entries (HGETALL each).
_OUTBOX_CLAIM = r"""
local owner, now, lease_until, limit = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[6])
local ids = {}
if #ARGV > 6 then
  for k = 7, #ARGV do ids[#ids + 1] = ARGV[k] end
else
  ids = redis.call('ZRANGEBYSCORE', OUTBOX, '-inf', ARGV[5], 'LIMIT', 0, limit)
  if #ids < limit then
    local lapsed = redis.call('ZRANGEBYSCORE', OUTBOX_LEASES, '-inf', '(' .. ARGV[3], 'LIMIT', 0,
      limit - #ids)
    for _, eid in ipairs(lapsed) do ids[#ids + 1] = eid end
  end
end
local out = {}
for _, eid in ipairs(ids) do
  local h = redis.call('HMGET', obkey(eid), 'response_id', 'claimed_by', 'lease_until')
  if h[1] and (not h[2] or tonumber(h[3]) < now) then
    redis.call('HSET', obkey(eid), 'claimed_by', owner, 'lease_until', lease_until)
    redis.call('HINCRBY', obkey(eid), 'attempts', 1)
    redis.call('ZREM', OUTBOX, eid)
    redis.call('ZADD', OUTBOX_LEASES, lease_until, eid)
    out[#out + 1] = {eid, redis.call('HGETALL', obkey(eid))}
  elseif not h[1] then
    redis.call('ZREM', OUTBOX, eid)  -- a stale index entry: unindex only
    redis.call('ZREM', OUTBOX_LEASES, eid)
  end
end
return out
"""

# ARGV: prefix, owner, lease_until, event ids...
_OUTBOX_RENEW = r"""
local held = {}
for k = 4, #ARGV do
  local eid = ARGV[k]
  if redis.call('HGET', obkey(eid), 'claimed_by') == ARGV[2] then
    redis.call('HSET', obkey(eid), 'lease_until', ARGV[3])
    redis.call('ZADD', OUTBOX_LEASES, ARGV[3], eid)
    held[#held + 1] = eid
  end
end
return held
"""

# ARGV: prefix, event id, owner
_OUTBOX_REMOVE = r"""
if redis.call('HGET', obkey(ARGV[2]), 'claimed_by') ~= ARGV[3] then return 0 end
redis.call('DEL', obkey(ARGV[2]))
redis.call('ZREM', OUTBOX, ARGV[2])
redis.call('ZREM', OUTBOX_LEASES, ARGV[2])
return 1
"""

_SCRIPTS = {
    "create": _CREATE,
    "set_status": _SET_STATUS,
    "delete": _DELETE,
    "purge": _PURGE,
    "append_events": _APPEND_EVENTS,
    "append_tokens": _APPEND_TOKENS,
    "claim": _CLAIM,
    "renew": _RENEW,
    "orphans": _ORPHANS,
    "request_cancel": _REQUEST_CANCEL,
    "cancels": _CANCELS,
    "checkpoint": _CHECKPOINT,
    "finish": _FINISH,
    "outbox_claim": _OUTBOX_CLAIM,
    "outbox_renew": _OUTBOX_RENEW,
    "outbox_remove": _OUTBOX_REMOVE,
}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _redact(url: str) -> str:
    """The URL without its credentials (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host).geturl()


def _wall() -> float:
    """The local clock (a function so that tests can skew it)."""
    return time.time()


def _f(x: float) -> str:
    """A float as a string that parses back to the same float (in Python, Lua and Redis)."""
    return repr(float(x))


def _s(b: bytes | str) -> str:
    return b.decode() if isinstance(b, bytes) else b


def _record(session_id: str, flat: list[bytes]) -> SessionRecord:
    """A record from HGETALL's flat field/value list."""
    h = {_s(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    return SessionRecord(
        id=session_id,
        tenant=_s(h["tenant"]),
        model=_s(h["model"]),
        request=json.loads(h["request"]),
        status=Status(_s(h["status"])),
        created=float(h["created"]),
        updated=float(h["updated"]),
        expires=float(h["expires"]),
        result=json.loads(h["result"]) if h.get("result") else None,
        owner=_s(h["owner"]) if "owner" in h else None,
        lease_until=float(h.get("lease_until", 0)),
        cancel_requested=h.get("cancel_requested", b"0") == b"1",
        claims=int(h.get("claims", 0)),
    )


def _outbox_entry(event_id: bytes | str, flat: list[bytes]) -> OutboxEntry:
    """An outbox entry from HGETALL's flat field/value list."""
    h = {_s(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    return OutboxEntry(
        event_id=_s(event_id),
        response_id=_s(h["response_id"]),
        tenant=_s(h["tenant"]),
        status=Status(_s(h["status"])),
        created=float(h["created"]),
        attempts=int(h.get("attempts", 0)),
        claimed_by=_s(h["claimed_by"]) if "claimed_by" in h else None,
        lease_until=float(h.get("lease_until", 0)),
    )


def _event_args(events: list[Event]) -> list[Any]:
    """Events as script arguments: (seq, [type, data] JSON, len of the data JSON) each. The element
    is equal iff the type and the data JSON are (as SQLiteStore compares them); the size is what
    SQLiteStore counts."""
    out: list[Any] = []
    for ev in events:
        data = json.dumps(ev.data)
        out += [int(ev.seq), json.dumps([ev.type, ev.data]), len(data)]
    return out


class RedisStore:
    """Sessions in Redis, shared by every node of a cluster.

    Args:
        url: the server (`redis://[[user]:password@]host:6379/0`, `rediss://…` for TLS,
            `unix:///path/redis.sock?db=0`).
        ttl_s: how long a session is kept after it was created.
        max_sessions_per_tenant: sessions a tenant may hold; the oldest finished ones are evicted
            to make room, and a tenant whose sessions are all unfinished gets QuotaExceeded.
        max_bytes_per_tenant: the same bound on the bytes of a tenant's logs.
        prefix: prepended to every key (stores with different prefixes share a server).
        server_clock: whether a call whose `now` is None uses the server's clock (else this node's).
        socket_timeout / socket_connect_timeout / retries: a command's reply and connect timeouts and
            its retries after a connection error (None: sessions.store's socket_timeout_s,
            socket_connect_timeout_s, retries). Always set: redis-py 5 has no timeout of its own.
        require_aof: refuse to open (ValueError) when the server answers `appendonly no`; else
            that only logs a warning.
        webhook_tenants: tenants with a completion webhook: their sessions' ends are recorded in
            the outbox (sessions.webhooks).
        **client_options: more keyword arguments of `redis.Redis.from_url`.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_sessions_per_tenant: int,
        max_bytes_per_tenant: int,
        prefix: str = "tandem:",
        server_clock: bool = True,
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = None,
        retries: int | None = None,
        require_aof: bool = False,
        webhook_tenants: Iterable[str] = (),
        **client_options: Any,
    ) -> None:
        spec = SessionStoreSpec.model_fields  # one home for the defaults
        client_options["decode_responses"] = False  # token chunks are binary
        client_options["socket_timeout"] = _or(socket_timeout, spec["socket_timeout_s"].default)
        client_options["socket_connect_timeout"] = _or(
            socket_connect_timeout, spec["socket_connect_timeout_s"].default
        )
        client_options.setdefault(
            "retry",
            Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.01), _or(retries, spec["retries"].default)),
        )
        self._r = redis.Redis.from_url(url, **client_options)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions_per_tenant
        self.max_bytes = max_bytes_per_tenant
        self.server_clock = server_clock
        self.webhook_tenants = frozenset(webhook_tenants)
        self._webhook_tenants_arg = "\n".join(sorted(self.webhook_tenants))
        self._scripts = {name: self._r.register_script(_LIB + body) for name, body in _SCRIPTS.items()}
        self._check_durability(_redact(url), require_aof)

    def _check_durability(self, where: str, require: bool) -> None:
        """Warn (or with `require`, refuse) when the server keeps no append-only file."""
        try:
            reply = self._r.config_get("appendonly")
        except redis.ResponseError as e:  # CONFIG disabled or renamed (managed Redis), or an ACL
            logger.warning(
                "Redis at %s: could not check its persistence (CONFIG GET appendonly: %s). Make sure "
                "AOF is on (appendonly yes): without it a Redis restart loses acknowledged sessions",
                where, e,
            )  # fmt: skip
            return
        except redis.RedisError as e:  # not reachable now: calls answer 503 until it is
            logger.warning("Redis at %s: could not check its persistence (%s)", where, e)
            return
        value = _s(reply.get(b"appendonly", reply.get("appendonly", b"")))
        if value == "yes":
            return
        message = (
            f"Redis at {where} runs without an append-only file (appendonly {value or 'unknown'}): a "
            "Redis restart loses acknowledged sessions (their ids answer 404, finished ones run "
            "again). Set `appendonly yes` on the server (appendfsync everysec or always)"
        )
        if require:
            raise ValueError(f"sessions.store.require_aof: {message}, or set require_aof: false to only warn")
        logger.warning("%s, or sessions.store.require_aof: true to refuse such a server", message)

    def close(self) -> None:
        """Close the connections (a later call opens new ones)."""
        self._r.close()
        self._r.connection_pool.disconnect()

    def _run(self, name: str, *args: Any) -> Any:
        return self._scripts[name](args=[self.prefix, *args])

    def _now(self, now: float | None) -> float:
        if now is not None:
            return now
        if self.server_clock:
            sec, usec = self._r.time()
            return sec + usec / 1e6
        return _wall()

    def _outbox_args(self, session_id: str, status: Status) -> list[str]:
        """(event id, created, tenants) of the outbox entry a script records if the session's tenant
        has a webhook; an empty event id (nothing recorded) when no tenant has one."""
        if not self.webhook_tenants:
            return ["", "0", ""]
        created = _f(self._now(None))
        return [completion_event_id(session_id, status.value), created, self._webhook_tenants_arg]

    def _key(self, kind: str, session_id: str) -> str:
        return f"{self.prefix}{kind}:{session_id}"

    def _raise(self, session_id: str, reply: list[Any], owner: str | None = None, start: int = 0) -> None:
        """Raise the error a script returned (a reply `[code, …]`); nothing for `ok`."""
        code = _s(reply[0])
        if code == "ok":
            return
        if code == "exists":
            raise StoreError(f"session {session_id} exists already")
        if code == "nosession":
            if owner is not None:
                raise LeaseLost(f"no session {session_id}")
            raise StoreError(f"no session {session_id}")
        if code == "already":
            raise StoreError(f"session {session_id} is already {_s(reply[1])}")
        if code == "lease":
            holder = None if reply[2] is None else _s(reply[2])
            raise LeaseLost(f"{owner} does not hold session {session_id} ({_s(reply[1])}, held by {holder})")
        if code == "differs":
            raise StoreError(f"event {reply[1]} of {session_id} differs from the stored one")
        if code == "gap":
            raise StoreError(f"event {reply[1]} of {session_id} leaves a gap after {reply[2]}")
        if code == "tdiffers":
            raise StoreError(f"tokens at {start} of {session_id} differ from the stored ones")
        if code == "tgap":
            raise StoreError(f"tokens at {start} of {session_id} leave a gap after {reply[1]}")
        raise StoreError(f"unexpected reply from the store: {reply!r}")

    # -- sessions ---------------------------------------------------------------------------------

    def create(self, rec: SessionRecord) -> None:
        """Store a new session, evicting the tenant's oldest finished ones if it is over a bound.
        StoreError if a session with that id exists."""
        now = _wall()
        rec.updated = now
        rec.expires = rec.created + self.ttl_s
        request = json.dumps(rec.request)
        reply = self._run(
            "create", rec.id, rec.tenant, rec.model, Status(rec.status).value, _f(rec.created), _f(now),
            _f(rec.expires), request, len(request), self.max_sessions, self.max_bytes,
        )  # fmt: skip
        if _s(reply[0]) == "quota":
            count, size = reply[1], reply[2]
            raise QuotaExceeded(
                f"tenant {rec.tenant!r} holds {count} unfinished sessions ({size} bytes); "
                f"the bounds are {self.max_sessions} sessions and {self.max_bytes} bytes"
            )
        self._raise(rec.id, reply)

    def get(self, session_id: str, tenant: str) -> SessionRecord | None:
        """The session, or None if it does not exist or belongs to another tenant."""
        rec = self.get_any(session_id)
        return rec if rec is not None and rec.tenant == tenant else None

    def get_any(self, session_id: str) -> SessionRecord | None:
        """The session whatever its tenant (for workers, never for clients), or None."""
        h = self._r.hgetall(self._key("s", session_id))
        if not h:
            return None
        return _record(session_id, [x for kv in h.items() for x in kv])

    def head(self, session_id: str) -> SessionHead | None:
        """The session's tenant and status (for a reader's polls; None if it does not exist)."""
        tenant, status = self._r.hmget(self._key("s", session_id), "tenant", "status")
        return None if tenant is None or status is None else SessionHead(_s(tenant), Status(_s(status)))

    def set_status(self, session_id: str, status: Status, result: dict[str, Any] | None = None) -> None:
        """Move a session to `status` (a finished session does not change again)."""
        status = Status(status)
        blob = json.dumps(result) if result is not None else ""
        reply = self._run(
            "set_status", session_id, status.value, blob, int(result is not None), _f(_wall()), len(blob),
            *(self._outbox_args(session_id, status) if status.finished else ["", "0", ""]),
        )  # fmt: skip
        self._raise(session_id, reply)

    def delete(self, session_id: str, tenant: str) -> bool:
        """Delete the tenant's session and its logs; False if it has none by that id."""
        return bool(self._run("delete", session_id, tenant))

    def purge_expired(self, now: float | None = None) -> int:
        """Delete finished sessions past their TTL; returns how many."""
        now = self._now(now)
        total = 0
        while True:
            seen, deleted = self._run("purge", _f(now), _PURGE_CHUNK)
            total += deleted
            if seen < _PURGE_CHUNK:
                return total

    # -- logs -------------------------------------------------------------------------------------

    def append_events(self, session_id: str, events: list[Event]) -> None:
        """Append events numbered from the next free number; ones already stored (same number and
        payload) are skipped, so a retried append is harmless. Nothing is written for a session that
        does not exist (deleted while a cancel was writing its end: no key is left behind)."""
        if not events:
            return
        self._raise(session_id, self._run("append_events", session_id, *_event_args(events)))

    def events(self, session_id: str, after: int = -1) -> list[Event]:
        """Events numbered after `after`, in order."""
        first = max(after + 1, 0)
        rows = self._r.lrange(self._key("e", session_id), first, -1)
        out = []
        for seq, row in enumerate(rows, first):
            type_, data = json.loads(row)
            out.append(Event(seq, type_, data))
        return out

    def last_seq(self, session_id: str) -> int:
        """The number of the session's last stored event; -1 when it has none."""
        return self._r.llen(self._key("e", session_id)) - 1

    def append_tokens(self, session_id: str, start: int, ids: list[int]) -> None:
        """A checkpoint: generated ids[start:start+len(ids)]. It must continue the stored ids exactly;
        a chunk already stored with the same ids is skipped. Nothing is written for a session that does
        not exist."""
        if not ids:
            return
        start = int(start)
        reply = self._run("append_tokens", session_id, str(start), _pack(ids), start + len(ids))
        self._raise(session_id, reply, start=start)

    def tokens(self, session_id: str) -> list[int]:
        """Every generated id checkpointed so far, in order."""
        chunks = self._r.hgetall(self._key("t", session_id))
        chunks.pop(b"n", None)
        return _unpack(b"".join(chunks[k] for k in sorted(chunks, key=int)))

    # -- ownership ----------------------------------------------------------------------------------

    def claim(
        self, session_id: str, owner: str, lease_s: float, now: float | None = None
    ) -> SessionRecord | None:
        """Take an unfinished session for `lease_s` seconds: one nobody holds, one whose lease ran out
        (before `now`), or one `owner` already holds (which just extends its lease). A queued session
        moves to in_progress; `claims` counts the times it changed hands. Returns the updated record,
        or None if the session is missing, finished, or held by another owner."""
        now = self._now(now)
        flat = self._run("claim", session_id, owner, _f(now), _f(now + lease_s), _f(_wall()))
        return None if flat is None else _record(session_id, flat)

    def renew(
        self, owner: str, session_ids: Iterable[str], lease_s: float, now: float | None = None
    ) -> set[str]:
        """Extend to `now + lease_s` the leases of those of `session_ids` that `owner` still holds
        (unfinished, not claimed by another); returns their ids — the others were lost."""
        ids = list(dict.fromkeys(session_ids))
        if not ids:
            return set()
        lease_until = _f(self._now(now) + lease_s)
        held: set[str] = set()
        for i in range(0, len(ids), _RENEW_CHUNK):
            held.update(_s(x) for x in self._run("renew", owner, lease_until, *ids[i : i + _RENEW_CHUNK]))
        return held

    def orphans(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Ids of unfinished sessions nobody holds (no owner, or a lease that ran out before `now`), the
        ones a worker should claim, round-robin across tenants: every tenant's oldest (by created, id),
        those in the order they were created, then every tenant's second oldest, and so on. A tenant
        that queued a thousand sessions does not hold back another tenant's one. `limit` < 0: all."""
        if limit == 0:
            return []
        flat, served_flat = self._run("orphans", _f(self._now(now)), limit - 1 if limit > 0 else -1)
        by_tenant: dict[str, dict[str, float]] = {}
        for i in range(0, len(flat), 3):
            by_tenant.setdefault(_s(flat[i + 2]), {})[_s(flat[i])] = float(flat[i + 1])
        served = {
            _s(served_flat[i]): None if served_flat[i + 1] is None else float(served_flat[i + 1])
            for i in range(0, len(served_flat), 2)
        }
        ranked = []
        for tenant, sessions in by_tenant.items():
            last = served.get(tenant)
            order = (last is not None, last or 0.0)  # never served first, then least recently
            oldest_first = sorted((created, sid) for sid, created in sessions.items())
            ranked += [(turn, *order, created, sid) for turn, (created, sid) in enumerate(oldest_first)]
        ids = [r[-1] for r in sorted(ranked)]
        return ids[:limit] if limit > 0 else ids

    def request_cancel(self, session_id: str, tenant: str, now: float | None = None) -> SessionRecord | None:
        """Ask for the tenant's session to be cancelled; None if it has none by that id.

        An unfinished session gets `cancel_requested`, which its holder sees through `cancels`. One no
        worker will pick up to see it — unowned and still queued, or held under a lease that ran out
        before `now` — is cancelled here (status cancelled, no owner). A finished session is left as it
        is. Returns the updated record."""
        flat = self._run(
            "request_cancel", session_id, tenant, _f(self._now(now)), _f(_wall()),
            *self._outbox_args(session_id, Status.CANCELLED),
        )  # fmt: skip
        return None if flat is None else _record(session_id, flat)

    def cancels(self, owner: str) -> set[str]:
        """Ids of the unfinished sessions `owner` holds whose cancellation was requested."""
        return {_s(x) for x in self._run("cancels", owner)}

    def checkpoint(
        self, session_id: str, owner: str, token_start: int, token_ids: list[int], events: list[Event]
    ) -> None:
        """Append a token chunk (as `append_tokens`; no ids, no token write) and events (as
        `append_events`) in one script, if `owner` still holds the session; else raise LeaseLost
        and write nothing. A StoreError from either append also writes nothing."""
        start = int(token_start)
        blob = _pack(token_ids) if token_ids else b""
        reply = self._run(
            "checkpoint", session_id, owner, int(bool(token_ids)), str(start), blob,
            start + len(token_ids), *_event_args(events),
        )  # fmt: skip
        self._raise(session_id, reply, owner=owner, start=start)

    def finish(
        self,
        session_id: str,
        owner: str,
        status: Status,
        result: dict[str, Any] | None,
        events: list[Event],
    ) -> None:
        """End a session `owner` holds, in one script: append `events`, set the finished `status`
        (ValueError for an unfinished one) and `result` (None keeps the stored one), and release
        it. LeaseLost, and nothing written, if `owner` no longer holds it."""
        status = Status(status)
        if not status.finished:
            raise ValueError(f"finish needs a finished status, not {status.value}")
        blob = json.dumps(result) if result is not None else ""
        reply = self._run(
            "finish", session_id, owner, status.value, blob, int(result is not None), _f(_wall()),
            len(blob), *self._outbox_args(session_id, status), *_event_args(events),
        )  # fmt: skip
        self._raise(session_id, reply, owner=owner)

    # -- outbox -------------------------------------------------------------------------------------

    def outbox_claim(
        self,
        owner: str,
        lease_s: float,
        grace_s: float = 0.0,
        limit: int = 100,
        event_ids: Iterable[str] | None = None,
        now: float | None = None,
    ) -> list[OutboxEntry]:
        """Claim outbox entries for `lease_s` seconds and return them (attempts counted, this claim
        included): with `event_ids`, those of them nobody holds (unclaimed, or a lease that ran out
        before `now`); else up to `limit`, oldest first, of the unclaimed ones older than `grace_s`
        and the ones whose lease ran out. An entry another deliverer holds is never returned."""
        ids = [] if event_ids is None else list(dict.fromkeys(event_ids))
        if (event_ids is not None and not ids) or limit == 0:
            return []
        now = self._now(now)
        reply = self._run(
            "outbox_claim", owner, _f(now), _f(now + lease_s), _f(now - grace_s), int(limit), *ids
        )
        return [_outbox_entry(eid, flat) for eid, flat in reply]

    def outbox_renew(
        self, owner: str, event_ids: Iterable[str], lease_s: float, now: float | None = None
    ) -> set[str]:
        """Extend to `now + lease_s` the leases of those of `event_ids` that `owner` still holds;
        returns their ids (the others were delivered, or another deliverer took them over)."""
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return set()
        lease_until = _f(self._now(now) + lease_s)
        held: set[str] = set()
        for i in range(0, len(ids), _RENEW_CHUNK):
            kept = self._run("outbox_renew", owner, lease_until, *ids[i : i + _RENEW_CHUNK])
            held.update(_s(x) for x in kept)
        return held

    def outbox_remove(self, event_id: str, owner: str) -> bool:
        """Remove an entry `owner` holds (delivered, or given up on); False if it does not hold it."""
        return bool(self._run("outbox_remove", event_id, owner))

    def outbox(self, limit: int = -1) -> list[OutboxEntry]:
        """The entries still to deliver, oldest first (for tests and operators; `limit` < 0: all)."""
        ids = [_s(x) for x in self._r.zrange(f"{self.prefix}outbox", 0, -1)]
        ids += [_s(x) for x in self._r.zrange(f"{self.prefix}outbox_leases", 0, -1)]
        out = []
        for eid in dict.fromkeys(ids):
            flat = [x for kv in self._r.hgetall(self._key("ob", eid)).items() for x in kv]
            if flat:
                out.append(_outbox_entry(eid, flat))
        out.sort(key=lambda e: (e.created, e.event_id))
        return out[:limit] if limit >= 0 else out
