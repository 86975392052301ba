"""The Redis store: the state many nodes share, and the quota leases that make one limit hold
across them.

URL forms (`store.url`):

    redis://[user:pass@]host:6379/0            one server (rediss:// for TLS)
    unix:///run/redis/redis.sock?db=0          one server on a unix socket
    redis+sentinel://[user:pass@]h1:26379,h2:26379,h3:26379/SERVICE[/DB]
                                               the master Sentinel names SERVICE (failover)
    redis+cluster://[user:pass@]h1:7000,h2:7001[/]
                                               a Redis Cluster (any reachable nodes)

Every key carries the hash tag `{vfusefs}`, so every script touches one Cluster slot (a Cluster
gives vfusefs availability, not capacity: its state lives in one slot).  Every change to a
vfolder or a scope appends to the change feed in the same script (a counter `seq` and a sorted
set of `seq|kind|key`, trimmed to the last KEEP_CHANGES) and publishes `changed` on the events
channel, so followers wake at once instead of at their next poll.

Usage is one pair of counters per vfolder id and per `scope:<scope>`, moved by HINCRBY:
no node's flush overwrites another's, and a recount sets a vfolder's pair and moves its scope's
by the difference.

Quota leases (many nodes, one limit): a node may grow a limited account only by what it holds
in a lease.  `lease:<account>` (`vf:<id>` or `scope:<scope>`, the ledger's account names) maps
node -> "bytes inodes expiry": what the node was granted and
has not yet flushed as usage.  ACQUIRE grants from what nobody holds (limit - usage - the other
nodes' unexpired leases), at least what the node asks for and, while there is room, up to a
unit of about room / (2 x live nodes) (never below lease_floor while room lasts), as Lustre's
qunit shrinks near a limit; ADD_USAGE converts a flushed delta from lease to usage in the same
script, so usage + leases never jumps.  Grants never exceed the room: the limit is exceeded only
by what the native filesystem allocates on its own after a write (delayed allocation), or by a
node cut off from Redis past its lease_ttl (others may then be granted what it spent but had not
flushed yet; nodes flush leased accounts every half second).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import redis
import redis.cluster
import redis.sentinel

from vfusefs.store import Change, Grant, NodeInfo, StoreError, TrashRecord, VfolderRecord

P = "{vfusefs}:"  # the hash tag: every key in one cluster slot
VFOLDERS, SCOPES, CLEAN = P + "vfolders", P + "scopes", P + "clean"
USAGE = P + "usage"  # "<account>|b", "<account>|i"
TRASH, CLAIMS = P + "trash", P + "trash:claims"
SEQ, CHANGES, EPOCH = P + "seq", P + "changes", P + "epoch"
NODES, SEEN = P + "nodes", P + "nodes:seen"  # node -> json; node scored by last heartbeat
EVENTS = P + "events"  # pub/sub channel: "changed", "reclaim|<account>|<node>"
KEEP_CHANGES = 10000
REPLICA_WAIT_MS = 500  # Sentinel: how long a change waits for a replica to have it
TIMEOUT = 5.0  # seconds a command may take (a lease request is answered by then, or refused)

# Helpers every script gets.  KEYS[1] is always VFOLDERS (it routes the script to the slot);
# the other keys share its hash tag, so a script may name them itself.
_LIB = (
    """
local P = '"""
    + P
    + """'
local VF, SC, USAGE = P .. 'vfolders', P .. 'scopes', P .. 'usage'
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function changed(kind, key)
  local seq = redis.call('INCR', P .. 'seq')
  redis.call('ZADD', P .. 'changes', seq, seq .. '|' .. kind .. '|' .. key)
  redis.call('ZREMRANGEBYRANK', P .. 'changes', 0, -("""
    + str(KEEP_CHANGES + 1)
    + """))
  redis.call('PUBLISH', P .. 'events', 'changed')
end
local function num(x) return tonumber(x or '0') or 0 end
local function usage_of(acct)
  return num(redis.call('HGET', USAGE, acct .. '|b')), num(redis.call('HGET', USAGE, acct .. '|i'))
end
local function bump(acct, db, di)
  if db ~= 0 then redis.call('HINCRBY', USAGE, acct .. '|b', db) end
  if di ~= 0 then redis.call('HINCRBY', USAGE, acct .. '|i', di) end
end
local function usage_changed(vfid, seq)
  redis.call('ZADD', P .. 'usage:changed', seq, vfid)
end
local function scope_of(vfid)
  local raw = redis.call('HGET', VF, vfid)
  if not raw then return nil end
  local s = cjson.decode(raw).scope
  if s == nil or s == '' or s == cjson.null then return '' end
  return s
end
local function parse_lease(v)
  local b, i, exp = string.match(v, '^(%-?%d+) (%-?%d+) ([%d%.]+)$')
  return tonumber(b), tonumber(i), tonumber(exp)
end
local function put_lease(acct, node, b, i, exp)
  redis.call('HSET', P .. 'lease:' .. acct, node, string.format('%d %d %.3f', b, i, exp))
end
local function spend(acct, node, db, di)
  local v = redis.call('HGET', P .. 'lease:' .. acct, node)
  if v then
    local b, i, exp = parse_lease(v)
    put_lease(acct, node, b - db, i - di, exp)
  end
end
"""
)

PUT_VFOLDER = """
redis.call('HSET', VF, ARGV[1], ARGV[2])
changed('vfolder', ARGV[1])
"""

# ARGV: id, trash path ('' none), trash json
DELETE_VFOLDER = """
local scope = scope_of(ARGV[1])
local b, i = usage_of(ARGV[1])
if scope and scope ~= '' then bump('scope:' .. scope, -b, -i) end
redis.call('HDEL', VF, ARGV[1])
redis.call('HDEL', USAGE, ARGV[1] .. '|b', ARGV[1] .. '|i')
redis.call('ZREM', P .. 'usage:changed', ARGV[1])
redis.call('DEL', P .. 'lease:vf:' .. ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', P .. 'trash', ARGV[2], ARGV[3]) end
changed('vfolder', ARGV[1])
"""

PUT_SCOPE = """
redis.call('HSET', SC, ARGV[1], ARGV[2])
changed('scope', ARGV[1])
"""

# ARGV: node, batch (0: none), then (vfolder, bytes, inodes) triples.  A batch already added
# is not added again; a deleted vfolder's deltas are dropped.
ADD_USAGE = """
local node, batch = ARGV[1], tonumber(ARGV[2])
if batch > 0 then
  if num(redis.call('HGET', P .. 'batches', node)) >= batch then return 0 end
  redis.call('HSET', P .. 'batches', node, ARGV[2])
end
local seq = redis.call('INCR', P .. 'useq')
for k = 3, #ARGV, 3 do
  local vfid, db, di = ARGV[k], tonumber(ARGV[k + 1]), tonumber(ARGV[k + 2])
  local scope = scope_of(vfid)
  if scope then
    bump(vfid, db, di)
    usage_changed(vfid, seq)
    spend('vf:' .. vfid, node, db, di)
    if scope ~= '' then
      bump('scope:' .. scope, db, di)
      spend('scope:' .. scope, node, db, di)
    end
  end
end
"""

# ARGV: id, bytes, inodes (a recount: the scope moves by the difference)
SET_USAGE = """
local b, i = usage_of(ARGV[1])
local nb, ni = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('HSET', USAGE, ARGV[1] .. '|b', ARGV[2], ARGV[1] .. '|i', ARGV[3])
usage_changed(ARGV[1], redis.call('INCR', P .. 'useq'))
local scope = scope_of(ARGV[1])
if scope and scope ~= '' then bump('scope:' .. scope, nb - b, ni - i) end
"""

# ARGV: path, node, seconds -> 1 if node holds it now
CLAIM_TRASH = """
if redis.call('HEXISTS', P .. 'trash', ARGV[1]) == 0 then return 0 end
local t = now()
local held = redis.call('HGET', P .. 'trash:claims', ARGV[1])
if held then
  local claim = cjson.decode(held)
  if claim[1] ~= ARGV[2] and claim[2] >= t then return 0 end
end
redis.call('HSET', P .. 'trash:claims', ARGV[1], cjson.encode({ARGV[2], t + tonumber(ARGV[3])}))
return 1
"""

# ARGV: task name, node, milliseconds -> 1 if node holds it now
CLAIM_TASK = """
local key = P .. 'task:' .. ARGV[1]
local held = redis.call('GET', key)
if held and held ~= ARGV[2] then return 0 end
redis.call('SET', key, ARGV[2], 'PX', ARGV[3])
return 1
"""

TRASH_PURGED = """
redis.call('HDEL', P .. 'trash', ARGV[1])
redis.call('HDEL', P .. 'trash:claims', ARGV[1])
"""

# ARGV: id, json, trash path -> 1 if restored
RESTORE_VFOLDER = """
if redis.call('HDEL', P .. 'trash', ARGV[3]) == 0 then return 0 end
redis.call('HDEL', P .. 'trash:claims', ARGV[3])
redis.call('HSET', VF, ARGV[1], ARGV[2])
changed('vfolder', ARGV[1])
return 1
"""

# ARGV: account, node, want bytes, want inodes, ttl, floor bytes, floor inodes, fresh
# ('1': the node holds no lease on it: start one, counting what the node grew the account by
# and has not flushed yet, pending bytes and inodes), have bytes, have inodes (what the node
# has left of its lease to spend) -> {granted b, granted i, usage b,
# usage i, limit b, limit i, held b, held i, others b, others i}; {} if the account is gone (vfolder deleted)
ACQUIRE = """
local acct, node = ARGV[1], ARGV[2]
local want_b, want_i = tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, floor_b, floor_i = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local t = now()
local lb, li, counted
if string.sub(acct, 1, 6) == 'scope:' then
  local raw = redis.call('HGET', SC, string.sub(acct, 7))
  if raw then local l = cjson.decode(raw); lb, li = l[1], l[2] else lb, li = 0, 0 end
  counted = acct
elseif string.sub(acct, 1, 3) == 'vf:' then
  counted = string.sub(acct, 4)
  local raw = redis.call('HGET', VF, counted)
  if not raw then return {} end
  local r = cjson.decode(raw)
  lb, li = r.quota_bytes, r.quota_inodes
else
  return {}
end
local ub, ui = usage_of(counted)
local key = P .. 'lease:' .. acct
local others_b, others_i, mine_b, mine_i = 0, 0, 0, 0
local all = redis.call('HGETALL', key)
for k = 1, #all, 2 do
  local b, i, exp = parse_lease(all[k + 1])
  if all[k] == node then mine_b, mine_i = b, i
  elseif exp > t then others_b, others_i = others_b + math.max(0, b), others_i + math.max(0, i)
  end
end
if ARGV[8] == '1' then mine_b, mine_i = tonumber(ARGV[9]), tonumber(ARGV[10]) end
redis.call('ZADD', P .. 'nodes:seen', t, node)
local live = math.max(1, redis.call('ZCOUNT', P .. 'nodes:seen', t - ttl, '+inf'))
-- mine counts what the node spent and has not flushed; have is what it has left to spend:
-- the room excludes the first, the top-up to a unit counts only the second
local function grant(limit, used, others, mine, have, want, floor)
  if limit <= 0 then return 0 end
  local room = limit - used - others - math.max(0, mine)
  if room <= 0 then return 0 end
  local unit = math.max(floor, math.floor((room + math.max(0, mine)) / (2 * live)))
  local g = math.max(want, unit - math.max(0, have))
  return math.max(0, math.min(room, g))
end
local gb = grant(lb, ub, others_b, mine_b, tonumber(ARGV[11]), want_b, floor_b)
local gi = grant(li, ui, others_i, mine_i, tonumber(ARGV[12]), want_i, floor_i)
put_lease(acct, node, mine_b + gb, mine_i + gi, t + ttl)
redis.call('SADD', P .. 'held:' .. node, acct)
return {gb, gi, ub, ui, lb, li, mine_b + gb, mine_i + gi, others_b, others_i}
"""

# ARGV: account ('*': every lease the node holds, as at a start), node, bytes, inodes, drop
# ('drop': forget the node's lease on it, whatever is left)
RELEASE = """
local acct, node = ARGV[1], ARGV[2]
if acct == '*' then
  for _, a in ipairs(redis.call('SMEMBERS', P .. 'held:' .. node)) do
    redis.call('HDEL', P .. 'lease:' .. a, node)
  end
  redis.call('DEL', P .. 'held:' .. node)
  return 1
end
if ARGV[5] == 'drop' then
  redis.call('HDEL', P .. 'lease:' .. acct, node)
  redis.call('SREM', P .. 'held:' .. node, acct)
  return 1
end
local v = redis.call('HGET', P .. 'lease:' .. acct, node)
if not v then return 0 end
local b, i, exp = parse_lease(v)
put_lease(acct, node, b - tonumber(ARGV[3]), i - tonumber(ARGV[4]), exp)
return 1
"""

# ARGV: node, instance, info json, ttl, check ('1': refuse if another live instance has it)
# -> '' or the json of the live instance that holds the name
HEARTBEAT = """
local t = now()
if ARGV[5] == '1' then
  local old = redis.call('HGET', P .. 'nodes', ARGV[1])
  local seen = tonumber(redis.call('ZSCORE', P .. 'nodes:seen', ARGV[1]) or '0')
  if old and seen > t - tonumber(ARGV[4]) and cjson.decode(old).instance ~= ARGV[2] then
    return old
  end
end
redis.call('HSET', P .. 'nodes', ARGV[1], ARGV[3])
redis.call('ZADD', P .. 'nodes:seen', t, ARGV[1])
return ''
"""

# ARGV: node -> the node leaves (a clean stop): its leases and its entry go
LEAVE = """
for _, a in ipairs(redis.call('SMEMBERS', P .. 'held:' .. ARGV[1])) do
  redis.call('HDEL', P .. 'lease:' .. a, ARGV[1])
end
redis.call('DEL', P .. 'held:' .. ARGV[1])
redis.call('HDEL', P .. 'nodes', ARGV[1])
redis.call('ZREM', P .. 'nodes:seen', ARGV[1])
"""

# -> {now, node, json, seen, {account, lease}...} for every node
NODES_SCRIPT = """
local out = {tostring(now())}
for _, node in ipairs(redis.call('HKEYS', P .. 'nodes')) do
  local held = {}
  for _, a in ipairs(redis.call('SMEMBERS', P .. 'held:' .. node)) do
    local v = redis.call('HGET', P .. 'lease:' .. a, node)
    if v then held[#held + 1] = a; held[#held + 1] = v end
  end
  out[#out + 1] = cjson.encode({node, redis.call('HGET', P .. 'nodes', node),
    redis.call('ZSCORE', P .. 'nodes:seen', node) or '0', held})
end
return out
"""

# ARGV: seq -> {seq now, vfolder, bytes, inodes, ...} for every vfolder whose usage changed
# after seq (a recount, another node's flush)
USAGE_SINCE = """
local out = {num(redis.call('GET', P .. 'useq'))}
for _, vfid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'usage:changed', '(' .. ARGV[1], '+inf')) do
  local b, i = usage_of(vfid)
  out[#out + 1] = vfid
  out[#out + 1] = b
  out[#out + 1] = i
end
return out
"""

SCRIPTS = {
    "put_vfolder": PUT_VFOLDER,
    "delete_vfolder": DELETE_VFOLDER,
    "put_scope": PUT_SCOPE,
    "add_usage": ADD_USAGE,
    "set_usage": SET_USAGE,
    "claim": CLAIM_TRASH,
    "claim_task": CLAIM_TASK,
    "purged": TRASH_PURGED,
    "restore": RESTORE_VFOLDER,
    "acquire": ACQUIRE,
    "release": RELEASE,
    "heartbeat": HEARTBEAT,
    "leave": LEAVE,
    "nodes": NODES_SCRIPT,
    "usage_since": USAGE_SINCE,
}


def _record_json(rec: VfolderRecord) -> str:
    return json.dumps(rec.__dict__, sort_keys=True)


class _Endpoints(NamedTuple):
    hosts: list[tuple[str, int]]
    username: str | None
    password: str | None
    path: list[str]  # what follows the host list, split at '/'


def _endpoints(url: str, default_port: int) -> _Endpoints:
    """Parse `scheme://[user:pass@]h1:p1,h2:p2/a/b` (urllib does not take host lists)."""
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    user = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        u, _, p = cred.partition(":")
        user, password = unquote(u) or None, unquote(p) or None
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"no host in {part!r}")
        hosts.append((host.strip("[]"), int(port) if port else default_port))
    return _Endpoints(hosts, user, password, [p for p in path.split("/") if p])


def connect(url: str, timeout: float = TIMEOUT) -> Any:
    """A redis-py client for any of the URL forms in this module's docstring."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 5.0),
        "decode_responses": True,
    }
    if url.startswith("redis+sentinel://"):
        ep = _endpoints(url, 26379)
        if not ep.path:
            raise ValueError("name the master: redis+sentinel://h1:26379,h2:26379/SERVICE[/DB]")
        db = int(ep.path[1]) if len(ep.path) > 1 else 0
        sentinel = redis.sentinel.Sentinel(
            ep.hosts,
            sentinel_kwargs={"socket_timeout": min(timeout, 2.0)},
            username=ep.username,
            password=ep.password,
            db=db,
            **common,
        )
        return sentinel.master_for(ep.path[0], **common)
    if url.startswith("redis+cluster://"):
        ep = _endpoints(url, 6379)
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in ep.hosts]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster(
            startup_nodes=nodes, username=ep.username, password=ep.password, **common
        )
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("not a redis URL")
    return redis.Redis.from_url(url, health_check_interval=30, **common)


class RedisStore:
    kind = "redis"
    shared = True  # many nodes: limited accounts are spent through leases

    def __init__(self, url: str) -> None:
        self.url = url
        # behind Sentinel a failover promotes a replica, which has what was replicated to it:
        # every change waits a moment for a replica to have it (WAIT); usage is sent again
        # until one does (best effort for the rest: a store with no replica keeps working)
        self._replicated = url.startswith("redis+sentinel://")
        try:
            self._r = connect(url)
            self._r.ping()
        except (redis.RedisError, ValueError, IndexError) as exc:
            raise StoreError(f"cannot open store {url}: {exc}") from None
        self._scripts = {
            name: self._r.register_script(_LIB + body) for name, body in SCRIPTS.items()
        }

    def close(self) -> None:
        self._r.close()

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except redis.RedisError as exc:
            raise StoreError(f"store {self.url}: {exc}") from None

    def _run(self, script: str, *args: Any) -> Any:
        result = self._call(self._scripts[script], keys=[VFOLDERS], args=list(args))
        if self._replicated and script not in ("nodes", "usage_since"):
            acked = self._call(self._r.execute_command, "WAIT", 1, REPLICA_WAIT_MS)
            if not acked and script == "add_usage" and self._replicas():
                # a failover now would lose it: the caller sends the batch again, and the
                # store adds it once (a master with no replica left confirms nothing: taken)
                raise StoreError(f"store {self.url}: no replica confirmed the usage in time")
        return result

    def _replicas(self) -> int:
        """How many replicas the master has connected now."""
        role = self._call(self._r.execute_command, "ROLE")
        return len(role[2]) if role and role[0] == "master" else 0

    def ping(self) -> None:
        self._call(self._r.ping)

    # -- vfolders -------------------------------------------------------------------------------
    def vfolders(self) -> list[VfolderRecord]:
        recs = [VfolderRecord(**json.loads(v)) for v in self._call(self._r.hvals, VFOLDERS)]
        return sorted(recs, key=lambda r: (r.created, r.id))

    def vfolder(self, vfid: str) -> VfolderRecord | None:
        raw = self._call(self._r.hget, VFOLDERS, vfid)
        return VfolderRecord(**json.loads(raw)) if raw else None

    def has_vfolder(self, vfid: str) -> bool:
        return bool(self._call(self._r.hexists, VFOLDERS, vfid))

    def put_vfolder(self, rec: VfolderRecord) -> None:
        self._run("put_vfolder", rec.id, _record_json(rec))

    def delete_vfolder(self, vfid: str, trash: TrashRecord | None) -> None:
        path, body = "", ""
        if trash is not None:
            path = trash.path
            body = json.dumps(
                {
                    "path": trash.path,
                    "host": trash.host,
                    "vfolder": trash.vfolder,
                    "deleted": trash.deleted,
                    "record": trash.record.__dict__ if trash.record else None,
                }
            )
        self._run("delete_vfolder", vfid, path, body)

    # -- usage ----------------------------------------------------------------------------------
    def usage(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for field, value in self._call(self._r.hgetall, USAGE).items():
            acct, _, which = field.rpartition("|")
            if acct.startswith("scope:"):
                continue
            b, i = out.get(acct, (0, 0))
            out[acct] = (b + int(value), i) if which == "b" else (b, i + int(value))
        return out

    def vfolder_usage(self, vfid: str) -> tuple[int, int]:
        b, i = self._call(self._r.hmget, USAGE, [f"{vfid}|b", f"{vfid}|i"])
        return int(b or 0), int(i or 0)

    def usage_since(self, seq: int) -> tuple[int, dict[str, tuple[int, int]]]:
        """The usage of every vfolder whose usage changed after `seq` (0: all of them), and
        the seq to ask from next time."""
        got = self._run("usage_since", seq)
        rows = {got[k]: (int(got[k + 1]), int(got[k + 2])) for k in range(1, len(got), 3)}
        return int(got[0]), rows

    def add_usage(self, node: str, deltas: list[tuple[str, int, int]], batch: int = 0) -> None:
        if deltas:
            self._run("add_usage", node, batch, *[x for row in deltas for x in row])

    def set_usage(self, vfid: str, nbytes: int, inodes: int) -> None:
        self._run("set_usage", vfid, nbytes, inodes)

    # -- scopes ---------------------------------------------------------------------------------
    def scopes(self) -> dict[str, tuple[int, int]]:
        out = {}
        for scope, raw in self._call(self._r.hgetall, SCOPES).items():
            qb, qi = json.loads(raw)
            out[scope] = (int(qb), int(qi))
        return out

    def put_scope(self, scope: str, quota_bytes: int, quota_inodes: int) -> None:
        self._run("put_scope", scope, json.dumps([quota_bytes, quota_inodes]))

    # -- clean flags ----------------------------------------------------------------------------
    def clean(self, node: str) -> bool:
        return bool(self._call(self._r.hget, CLEAN, node) == "1")

    def set_clean(self, node: str, clean: bool) -> None:
        self._call(self._r.hset, CLEAN, node, "1" if clean else "0")

    # -- trash ----------------------------------------------------------------------------------
    def trash(self) -> list[TrashRecord]:
        out = []
        for raw in self._call(self._r.hvals, TRASH):
            d = json.loads(raw)
            rec = VfolderRecord(**d["record"]) if d.get("record") else None
            out.append(TrashRecord(d["path"], d["host"], d["vfolder"], d["deleted"], rec))
        return sorted(out, key=lambda t: t.deleted)

    def claim_trash(self, path: str, node: str, seconds: float) -> bool:
        return bool(self._run("claim", path, node, seconds))

    def claim_task(self, name: str, node: str, seconds: float) -> bool:
        return bool(self._run("claim_task", name, node, max(1, int(seconds * 1000))))

    def trash_purged(self, path: str) -> None:
        self._run("purged", path)

    def restore_vfolder(self, rec: VfolderRecord, trash_path: str) -> bool:
        return bool(self._run("restore", rec.id, _record_json(rec), trash_path))

    # -- the change feed ------------------------------------------------------------------------
    def epoch(self) -> str:
        # read on every poll of the feed: a write only the first time (or after a wipe)
        found = self._call(self._r.get, EPOCH)
        if found is None:
            self._call(self._r.set, EPOCH, uuid.uuid4().hex, nx=True)
            found = self._call(self._r.get, EPOCH)
        return str(found)

    def last_change(self) -> int:
        return int(self._call(self._r.get, SEQ) or 0)

    def changes(self, since: int) -> list[Change]:
        rows = self._call(self._r.zrangebyscore, CHANGES, f"({since}", "+inf", start=0, num=5000)
        out = []
        for row in rows:
            seq, kind, key = row.split("|", 2)
            out.append(Change(int(seq), kind, key))
        if out and out[0].seq > since + 1:
            oldest = self._call(self._r.zrange, CHANGES, 0, 0)
            if oldest and int(oldest[0].split("|", 1)[0]) > since + 1:
                out.insert(0, Change(out[0].seq, "all", ""))
        return out

    # -- many nodes: leases, heartbeats, events ---------------------------------------------------
    def acquire(
        self,
        node: str,
        account: str,
        want: tuple[int, int],
        ttl: float,
        floor: tuple[int, int],
        fresh: tuple[int, int] | None = None,
        have: tuple[int, int] = (0, 0),
    ) -> Grant | None:
        """Grow node's lease on account by at least `want` (bytes, inodes) if there is room,
        and so that what it has left to spend (`have`) reaches the lease unit; extends it to
        ttl from now.  fresh: the node holds no lease on it yet, and has grown it by this
        much since its last flush.  None: the account is gone."""
        pending = fresh or (0, 0)
        got = self._run(
            "acquire",
            account,
            node,
            want[0],
            want[1],
            ttl,
            floor[0],
            floor[1],
            "1" if fresh is not None else "0",
            pending[0],
            pending[1],
            have[0],
            have[1],
        )
        if not got:
            return None
        return Grant(*(int(x) for x in got))

    def release(self, node: str, account: str, nbytes: int, inodes: int, drop: bool) -> None:
        """Give back part of node's lease (account '*': all of node's leases, as at a start);
        drop: give back all of it."""
        self._run("release", account, node, nbytes, inodes, "drop" if drop else "")

    def heartbeat(self, node: str, instance: str, info: dict[str, Any], ttl: float) -> str:
        """Say node is alive; at a start (instance new) refuse a name another live daemon
        holds: returns that daemon's info as json, or '' when done."""
        body = json.dumps({**info, "instance": instance})
        return str(self._run("heartbeat", node, instance, body, ttl, "1"))

    def leave(self, node: str) -> None:
        self._run("leave", node)

    def nodes(self) -> list[NodeInfo]:
        rows = self._run("nodes")
        now = float(rows[0])
        out = []
        for raw in rows[1:]:
            node, info, seen, held = json.loads(raw)
            held = held or []  # cjson writes an empty table as {}
            leases = {}
            for acct, v in zip(held[::2], held[1::2], strict=True):
                b, i, exp = v.split()
                leases[acct] = (int(b), int(i), float(exp) - now)
            out.append(NodeInfo(node, json.loads(info or "{}"), now - float(seen), leases))
        return sorted(out, key=lambda n: n.name)

    def publish(self, message: str) -> None:
        self._call(self._r.publish, EVENTS, message)

    def listen(self, stop: threading.Event, deliver: Callable[[str], None]) -> None:
        """Deliver every events-channel message until stop is set (on the calling thread, which
        it blocks).  Reconnects by itself; deliver('resync') after each (re)subscription, since
        messages sent meanwhile are lost."""
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self._r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(EVENTS)
                deliver("resync")
                while not stop.is_set():
                    # a burst (thousands of changes) is handed over once: what is waiting
                    # is drained first, and each distinct message delivered once
                    batch: dict[str, None] = {}
                    msg = pubsub.get_message(timeout=0.5)
                    while msg is not None and len(batch) < 1000:
                        if msg.get("type") == "message":
                            batch[str(msg["data"])] = None
                        msg = pubsub.get_message(timeout=0.0)
                    for message in batch:
                        deliver(message)
            except (redis.RedisError, OSError):
                stop.wait(0.5)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (redis.RedisError, OSError):
                        pass
        return None
