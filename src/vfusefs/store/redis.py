"""The Redis store: the state many nodes share (`store.url = "redis://host:6379/0"`,
`rediss://…` for TLS, `unix:///run/redis.sock?db=0`).

Every key carries the hash tag `{vfusefs}`, so one Lua script or transaction always touches one
Redis Cluster slot.  Every change to a vfolder or a scope appends to the change feed in the same
script: a counter (`seq`) and a sorted set of `seq|kind|key` scored by seq, trimmed to the last
KEEP_CHANGES entries (a reader further behind gets one `all` change and compares everything).
Usage is a base per vfolder (the last recount) plus one delta per node and vfolder, added with
HINCRBY, so no node's flush overwrites another's.

This is the store protocol only; quota leases across nodes, pub/sub wake-ups, Sentinel and
Cluster URLs come with the rest of issue 21.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from vfusefs.store import Change, StoreError, TrashRecord, VfolderRecord

P = "{vfusefs}:"  # the hash tag: every key in one cluster slot
VFOLDERS, SCOPES, CLEAN = P + "vfolders", P + "scopes", P + "clean"
BASE, DELTAS = P + "usage:base", P + "usage:deltas"
TRASH, CLAIMS = P + "trash", P + "trash:claims"
SEQ, CHANGES, EPOCH = P + "seq", P + "changes", P + "epoch"
KEEP_CHANGES = 10000

# appends (kind, key) to the feed; every script that changes a record calls it
_CHANGED = """
local function changed(kind, key)
  local seq = redis.call('INCR', KEYS_SEQ)
  redis.call('ZADD', KEYS_CHANGES, seq, seq .. '|' .. kind .. '|' .. key)
  redis.call('ZREMRANGEBYRANK', KEYS_CHANGES, 0, -(tonumber(KEEP) + 1))
end
"""


# drops every node's usage delta of one vfolder (fields "<vfolder>|<node>|b" and "...|i")
_DROP_DELTAS = """
local function drop_deltas(deltas, vfid)
  for _, field in ipairs(redis.call('HKEYS', deltas)) do
    if string.sub(field, 1, #vfid + 1) == vfid .. '|' then redis.call('HDEL', deltas, field) end
  end
end
"""


def _script(body: str) -> str:
    """A script whose first two keys are SEQ and CHANGES and whose first argument is KEEP."""
    return (
        "local KEYS_SEQ, KEYS_CHANGES, KEEP = KEYS[1], KEYS[2], ARGV[1]\n"
        + _CHANGED
        + _DROP_DELTAS
        + body
    )


PUT_VFOLDER = _script("""
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
changed('vfolder', ARGV[2])
""")

# KEYS: seq, changes, vfolders, base, deltas, trash; ARGV: keep, id, trash path ('' none), json
DELETE_VFOLDER = _script("""
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
drop_deltas(KEYS[5], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[6], ARGV[3], ARGV[4]) end
changed('vfolder', ARGV[2])
""")

PUT_SCOPE = _script("""
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
changed('scope', ARGV[2])
""")

# KEYS: base, deltas; ARGV: id, json [bytes, inodes]
SET_USAGE = (
    _DROP_DELTAS
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
drop_deltas(KEYS[2], ARGV[1])
"""
)

# KEYS: trash, claims; ARGV: path, node, seconds, now -> 1 if node holds it now
CLAIM_TRASH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local claim = cjson.decode(held)
  if claim[1] ~= ARGV[2] and claim[2] >= tonumber(ARGV[4]) then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({ARGV[2], tonumber(ARGV[4]) + tonumber(ARGV[3])}))
return 1
"""

# KEYS: seq, changes, vfolders, trash, claims; ARGV: keep, id, json, trash path -> 1 if restored
RESTORE_VFOLDER = _script("""
if redis.call('HDEL', KEYS[4], ARGV[4]) == 0 then return 0 end
redis.call('HDEL', KEYS[5], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
changed('vfolder', ARGV[2])
return 1
""")


def _record_json(rec: VfolderRecord) -> str:
    return json.dumps(rec.__dict__, sort_keys=True)


class RedisStore:
    kind = "redis"

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self._r = redis.Redis.from_url(
                url,
                socket_timeout=10,
                socket_connect_timeout=5,
                decode_responses=True,
                health_check_interval=30,
            )
            self._r.ping()
        except (redis.RedisError, ValueError) as exc:
            raise StoreError(f"cannot open store {url}: {exc}") from None
        self._scripts = {
            name: self._r.register_script(body)
            for name, body in (
                ("put_vfolder", PUT_VFOLDER),
                ("delete_vfolder", DELETE_VFOLDER),
                ("put_scope", PUT_SCOPE),
                ("set_usage", SET_USAGE),
                ("claim", CLAIM_TRASH),
                ("restore", RESTORE_VFOLDER),
            )
        }

    def close(self) -> None:
        self._r.close()

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except redis.RedisError as exc:
            raise StoreError(f"store {self.url}: {exc}") from None

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self._call(self._scripts[script], keys=keys, args=args)

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
        self._run(
            "put_vfolder", [SEQ, CHANGES, VFOLDERS], [KEEP_CHANGES, rec.id, _record_json(rec)]
        )

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
        self._run(
            "delete_vfolder",
            [SEQ, CHANGES, VFOLDERS, BASE, DELTAS, TRASH],
            [KEEP_CHANGES, vfid, path, body],
        )

    # -- usage ----------------------------------------------------------------------------------
    def usage(self) -> dict[str, tuple[int, int]]:
        pipe = self._r.pipeline(transaction=True)
        pipe.hgetall(BASE)
        pipe.hgetall(DELTAS)
        base, deltas = self._call(pipe.execute)
        out: dict[str, tuple[int, int]] = {}
        for vfid, raw in base.items():
            nbytes, inodes = json.loads(raw)
            out[vfid] = (int(nbytes), int(inodes))
        for field, value in deltas.items():  # "<vfolder>|<node>|b" or "...|i"
            vfid, which = field.partition("|")[0], field.rpartition("|")[2]
            b, i = out.get(vfid, (0, 0))
            out[vfid] = (b + int(value), i) if which == "b" else (b, i + int(value))
        return out

    def add_usage(self, node: str, deltas: list[tuple[str, int, int]]) -> None:
        if not deltas:
            return
        pipe = self._r.pipeline(transaction=True)
        for vfid, nbytes, inodes in deltas:
            pipe.hincrby(DELTAS, f"{vfid}|{node}|b", nbytes)
            pipe.hincrby(DELTAS, f"{vfid}|{node}|i", inodes)
        self._call(pipe.execute)

    def set_usage(self, vfid: str, nbytes: int, inodes: int) -> None:
        self._run("set_usage", [BASE, DELTAS], [vfid, json.dumps([nbytes, inodes])])

    # -- scopes ---------------------------------------------------------------------------------
    def scopes(self) -> dict[str, tuple[int, int]]:
        out = {}
        for scope, raw in self._call(self._r.hgetall, SCOPES).items():
            qb, qi = json.loads(raw)
            out[scope] = (int(qb), int(qi))
        return out

    def put_scope(self, scope: str, quota_bytes: int, quota_inodes: int) -> None:
        self._run(
            "put_scope",
            [SEQ, CHANGES, SCOPES],
            [KEEP_CHANGES, scope, json.dumps([quota_bytes, quota_inodes])],
        )

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
        return bool(self._run("claim", [TRASH, CLAIMS], [path, node, seconds, time.time()]))

    def trash_purged(self, path: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.hdel(TRASH, path)
        pipe.hdel(CLAIMS, path)
        self._call(pipe.execute)

    def restore_vfolder(self, rec: VfolderRecord, trash_path: str) -> bool:
        return bool(
            self._run(
                "restore",
                [SEQ, CHANGES, VFOLDERS, TRASH, CLAIMS],
                [KEEP_CHANGES, rec.id, _record_json(rec), trash_path],
            )
        )

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
