"""Quota leases: how one limit holds across the nodes sharing a store, with no store round trip
per write while the limit is far away.

The ledger (domain/quota.py) checks a leased account against what this node holds in a lease.
When a reservation does not fit, the request path calls `grow`, which asks the store for more
(SharedStore.acquire) on a thread of its own and lets the request try again; near the limit,
a short grant makes this node ask the others (pub/sub `reclaim`) to flush what they freed and
give back what they hold and do not spend, and try again before EDQUOT (once a second at most
while asking brings nothing back).  The keeper's tick, every TICK seconds:

- flushes usage, which turns what was spent into usage in the store (so little is ever held
  unflushed by a node that may die);
- renews leases before they run out or expire, closes those it could not renew in time (the
  store unreachable for lease_ttl: growth then fails with EDQUOT), and gives back leases
  nothing spent from for IDLE_TICKS;
- says this node is alive (its heartbeat: the nodes in `vfusefs status`, and the count the
  store divides room by).

Never on the request path: a store call.  `grow` is awaited by a request that is refused
otherwise, and waits at most the store's timeout.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Any

import trio

from vfusefs.runtime.workers import HostWorkers
from vfusefs.store import Grant, SharedStore, StoreError

if TYPE_CHECKING:
    from vfusefs.state.registry import Registry

log = logging.getLogger(__name__)

TICK = 0.5  # seconds between the keeper's rounds
# rounds with nothing spent before a lease is given back: long enough that a node keeps what
# it writes with across pauses (and through a short store outage); other nodes short of room
# get it back sooner by asking (reclaim)
IDLE_TICKS = 20
RECLAIM_WAIT = 0.15  # seconds a short grant waits for other nodes to give back, per try
RECLAIM_TRIES = 3
RECLAIM_QUIET = 1.0  # seconds after a reclaim that brought nothing: refuse without asking again
HEARTBEAT = 2.0  # seconds between heartbeats
LEASE_TIMEOUT = 5.0  # seconds one lease call may take before the write is refused


class NameTaken(Exception):
    """Another live daemon uses this node name in the store."""


class LeaseKeeper:
    def __init__(self, registry: Registry, store: SharedStore) -> None:
        self.registry = registry
        self.store = store
        self.node = registry.node
        self.instance = uuid.uuid4().hex  # tells this run from an earlier one of the same node
        self.workers = HostWorkers("leases", 2, LEASE_TIMEOUT, registry.token)
        self.until: dict[str, float] = {}  # account -> monotonic time its lease stops
        self.idle: dict[str, int] = {}  # account -> rounds without spending
        self.locks: dict[str, trio.Lock] = {}
        self.reclaimed: dict[str, float] = {}  # account -> when this node last asked the others
        self.expired: set[str] = set()  # accounts whose lease ran out (said once each)
        self.last_heartbeat = 0.0
        self.requests = 0  # lease calls made (acquire), for metrics and the bench
        self.refused = 0  # grows that found no room

    @property
    def ttl(self) -> float:
        return self.registry.config.lease_ttl

    @property
    def floor(self) -> tuple[int, int]:
        return (self.registry.config.lease_floor, 1)

    def info(self) -> dict[str, Any]:
        cfg = self.registry.config
        return {
            "mountpoint": cfg.daemon.mountpoint,
            "pid": os.getpid(),
            "started": self.registry.started,
            "hosts": sorted(self.registry.hosts),
        }

    # -- start and stop -------------------------------------------------------------------------
    async def join(self) -> None:
        """Take this node's name in the store (NameTaken if another live daemon has it) and
        forget leases an earlier run of it left."""
        taken = await self.registry.store_workers.run(
            self.store.heartbeat, self.node, self.instance, self.info(), self.ttl
        )
        if taken:
            raise NameTaken(
                f"node name {self.node!r} is in use by another live daemon sharing the store "
                f"({taken}); give each daemon its own [store] node"
            )
        await self.registry.store_workers.run(self.store.release, self.node, "*", 0, 0, True)
        self.last_heartbeat = time.monotonic()

    async def leave(self) -> None:
        """A clean stop (usage flushed): give back every lease and leave the node list."""
        await self.registry.store_workers.run(self.store.leave, self.node)

    def close(self) -> None:
        self.workers.stop()

    def forget_all(self) -> None:
        """The store lost what it knew (emptied): no lease held there any more."""
        for acc in self.registry.ledger.accounts.values():
            acc.lease_held = acc.lease_open = False
            acc.lease_bytes = acc.lease_inodes = 0
        self.until.clear()
        self.idle.clear()

    # -- the request path's way in --------------------------------------------------------------
    async def grow(self, key: str, short_bytes: int, short_inodes: int) -> bool:
        """Ask the store for at least this much more on key's lease.  True if the lease grew
        (or was renewed): the caller tries its reservation again; False: refuse it (EDQUOT)."""
        if not self.registry.store_connected:
            return False
        lock = self.locks.setdefault(key, trio.Lock())
        async with lock:  # concurrent writers short on one account: one asks, others retry
            acc = self.registry.ledger.account(key)
            before = (acc.lease_bytes, acc.lease_inodes, acc.lease_open)
            for attempt in range(RECLAIM_TRIES):
                grant = await self._acquire(key, (short_bytes, short_inodes))
                if grant is None:
                    return False
                if grant.bytes >= short_bytes and grant.inodes >= short_inodes:
                    break
                short_bytes -= grant.bytes
                short_inodes -= grant.inodes
                # short: other nodes may hold what is left, or have freed space they have not
                # flushed yet.  Ask them (they flush and give back what they do not spend)
                # and try again; but not again and again at a limit that is really reached
                now = time.monotonic()
                recently = now - self.reclaimed.get(key, -RECLAIM_QUIET) < RECLAIM_QUIET
                if attempt == RECLAIM_TRIES - 1 or (
                    recently and not grant.bytes and not grant.inodes
                ):
                    self.refused += 1
                    break
                self.reclaimed[key] = now
                try:
                    await self.workers.run(self.store.publish, f"reclaim|{key}|{self.node}")
                except (StoreError, trio.TooSlowError):
                    break
                await trio.sleep(RECLAIM_WAIT)
            return (acc.lease_bytes, acc.lease_inodes, acc.lease_open) != before
        return False  # pragma: no cover (mypy: the lock's body returns)

    async def _acquire(self, key: str, want: tuple[int, int]) -> Grant | None:
        """One acquire; updates the account's lease.  None when the store did not answer or
        the account is gone."""
        if not self.registry.store_connected:  # not until it is known to be the same store
            return None
        acc = self.registry.ledger.account(key)
        fresh = None if acc.lease_held else self.pending(key)
        have = (0, 0)
        if acc.lease_held:
            have = (acc.lease_bytes - acc.reserved_bytes, acc.lease_inodes - acc.reserved_inodes)
        sent = time.monotonic()
        self.requests += 1
        try:
            grant = await self.workers.run(
                self.store.acquire, self.node, key, want, self.ttl, self.floor, fresh, have
            )
        except (StoreError, trio.TooSlowError) as exc:
            log.debug("lease on %s: %s", key, exc)
            return None
        if grant is None:
            return None
        if fresh is not None or not acc.lease_held:
            acc.lease_bytes, acc.lease_inodes = 0, 0
        acc.lease_held = acc.lease_open = True
        acc.lease_bytes += grant.bytes
        acc.lease_inodes += grant.inodes
        self.until[key] = sent + self.ttl
        self.idle[key] = 0
        if key in self.expired:
            self.expired.discard(key)
            log.info("lease on %s renewed: writes spend it again", key)
        return grant

    def pending(self, key: str) -> tuple[int, int]:
        """What this node grew key's account by and has not flushed to the store yet."""
        b = i = 0
        if key.startswith("vf:"):  # one vfolder's; a scope's is the sum over its vfolders
            one = self.registry.vfolders.get(key[3:])
            vfolders = [one] if one is not None else []
        else:
            vfolders = list(self.registry.vfolders.values())
        for vf in vfolders:
            if key in vf.quota_keys:
                acc = self.registry.ledger.account(vf.quota_keys[0])
                b += acc.used_bytes - vf.stored[0]
                i += acc.used_inodes - vf.stored[1]
        return b, i

    # -- other nodes ----------------------------------------------------------------------------
    async def reclaim(self, key: str, node: str) -> None:
        """Another node is short on key: flush what this node freed (and grew), and give back
        what it holds and does not spend."""
        if node == self.node:
            return
        acc = self.registry.ledger.accounts.get(key)
        if acc is None:
            return
        try:
            await self.registry.flush_usage()
        except (StoreError, trio.TooSlowError) as exc:
            log.debug("flushing for a reclaim of %s: %s", key, exc)
        if not acc.lease_held:
            return
        spare_b = max(0, acc.lease_bytes - acc.reserved_bytes)
        spare_i = max(0, acc.lease_inodes - acc.reserved_inodes)
        if not spare_b and not spare_i:
            return
        acc.lease_bytes -= spare_b  # at once: reservations from now on see the smaller lease
        acc.lease_inodes -= spare_i
        try:
            await self.workers.run(self.store.release, self.node, key, spare_b, spare_i, False)
        except (StoreError, trio.TooSlowError) as exc:
            log.debug("giving back lease on %s: %s", key, exc)  # it expires in the store

    # -- the keeper -----------------------------------------------------------------------------
    async def keep(self) -> None:
        while True:
            await trio.sleep(TICK)
            try:
                await self.tick()
            except (StoreError, trio.TooSlowError):
                pass  # said by the feed follower, once per outage; leases run out by time

    async def tick(self) -> None:
        registry = self.registry
        now = time.monotonic()
        for key, until in list(self.until.items()):
            acc = registry.ledger.accounts.get(key)
            if acc is not None and acc.lease_open and now >= until:
                acc.lease_open = False
                if key not in self.expired:
                    self.expired.add(key)
                    log.warning(
                        "lease on %s ran out (the store did not renew it within lease_ttl = "
                        "%.0f s): writes into it fail with EDQUOT until it does",
                        key,
                        self.ttl,
                    )
        if not registry.store_connected:  # expiry above is all that runs without the store
            return
        await registry.flush_usage()  # what was spent becomes usage in the store
        for key in list(self.until):
            acc = registry.ledger.accounts.get(key)
            if acc is None or not acc.lease_held:
                self._forget(key)
                continue
            if not acc.leased:  # the limit went, or the vfolder did: give it all back
                await self._drop(key)
                continue
            if acc.lease_used:
                acc.lease_used = False
                self.idle[key] = 0
            else:
                self.idle[key] = self.idle.get(key, 0) + 1
                if self.idle[key] >= IDLE_TICKS and not (acc.reserved_bytes or acc.reserved_inodes):
                    await self._drop(key)
                    continue
            low = (acc.limit_bytes and acc.lease_bytes - acc.reserved_bytes < self.floor[0]) or (
                acc.limit_inodes and acc.lease_inodes - acc.reserved_inodes < 1
            )
            if (low and not self.idle[key]) or self.until[key] - now < self.ttl / 2:
                await self._acquire(key, (0, 0))  # renew, topped up to the lease unit
        if now - self.last_heartbeat >= HEARTBEAT:
            self.last_heartbeat = now
            await registry.store_workers.run(
                self.store.heartbeat, self.node, self.instance, self.info(), self.ttl
            )

    async def _drop(self, key: str) -> None:
        acc = self.registry.ledger.account(key)
        acc.lease_held = acc.lease_open = False
        acc.lease_bytes = acc.lease_inodes = 0
        self._forget(key)
        await self.workers.run(self.store.release, self.node, key, 0, 0, True)

    def _forget(self, key: str) -> None:
        self.until.pop(key, None)
        self.idle.pop(key, None)
        if key in self.locks and not self.locks[key].locked():
            del self.locks[key]

    def describe(self) -> dict[str, Any]:
        """This node's leases, for GET /v1/status."""
        now = time.monotonic()
        out = {}
        for key, until in self.until.items():
            acc = self.registry.ledger.accounts.get(key)
            if acc is not None and acc.lease_held:
                out[key] = {
                    "bytes": acc.lease_bytes,
                    "inodes": acc.lease_inodes,
                    "open": acc.lease_open,
                    "expires_in": round(until - now, 1),
                }
        return out
