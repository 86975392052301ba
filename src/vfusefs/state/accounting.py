"""The registry's accounting: usage (reconcile, flushes to the store, refreshes from it),
limits (the ledger's, the storage's native ones, scopes), recounts from the native tree
(rescans), and native storage against the store (consistency)."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

import trio

from vfusefs import native
from vfusefs.backends import BackendError, consistency
from vfusefs.domain.validation import (
    RegistryError,
    parse_limits,
    parse_scope,
)
from vfusefs.fuse.inodes import Node
from vfusefs.state.base import RegistryBase
from vfusefs.state.records import Host, Task, Vfolder
from vfusefs.store import StoreError, VfolderRecord

log = logging.getLogger("vfusefs.state.registry")

RESCAN_TRIES = 3  # walks a rescan makes of a vfolder that changes through vfusefs meanwhile
RESCAN_RETRY = 1.0  # seconds between them
OTHERS_FLUSH_WAIT = 0.3  # seconds other nodes get to flush usage around a rescan's walk


class Accounting(RegistryBase):
    # -- quota ----------------------------------------------------------------------------------
    async def reconcile(self, vf: Vfolder) -> None:
        """Charge what the native fs changed on its own in recently written files (ext4/XFS
        settle st_blocks at writeback).  Runs before usage is reported and every few seconds."""
        if not vf.recent:
            return
        nodes = [node for node, _ in vf.recent.values()]
        drift, gone = await vf.host.workers.run(_reconcile, nodes)
        self.ledger.apply(vf.quota_keys, drift, 0)
        now = time.monotonic()
        for node in gone:
            self._unwatch(vf, node)
        for node, until in list(vf.recent.values()):
            if until < now:
                self._unwatch(vf, node)

    def _unwatch(self, vf: Vfolder, node: Node) -> None:
        vf.recent.pop(node.ino, None)
        fd = self.table.unlinger(node)
        if fd >= 0:
            vf.host.workers.close_soon([fd])

    async def settle_lingering(self) -> None:
        """Past the fd budget: give up watching forgotten files, after one last look.  They are
        written back first, so that the look sees what the native fs would otherwise allocate
        after it (no watch would see that, and usage would drift from du)."""
        for vf in {node.vf for node in self.table.lingering.values()}:
            if vf is None or vf.deleted:
                continue
            nodes = [n for n in self.table.lingering.values() if n.vf is vf]
            await vf.host.admin.run(_write_back, nodes)
            await self.reconcile(vf)
            for node in nodes:  # not those forgotten meanwhile: they were not written back
                if self.table.lingering.get(node.ino) is node:
                    self._unwatch(vf, node)

    async def count_links(self, vf: Vfolder) -> None:
        """Count the names of every multiply linked file in the vfolder (a walk of its tree),
        for a file whose link count the last count does not explain.  Concurrent callers share
        one walk; bounded by the host's op_timeout (EIO)."""
        if vf.links_scan is not None:
            await vf.links_scan.wait()
            return
        vf.links_scan = done = trio.Event()
        try:
            assert vf.root is not None
            with trio.fail_after(vf.host.config.op_timeout):
                found = await trio.to_thread.run_sync(
                    native.scan, vf.root.fd, abandon_on_cancel=True
                )
            vf.links = found.links
        finally:
            vf.links_scan = None
            done.set()

    def set_usage(self, vf: Vfolder, nbytes: int, inodes: int) -> None:
        """Set a vfolder's usage (load, rescan), moving its scope's total by the difference."""
        acc = self.ledger.account(vf.quota_keys[0])
        dbytes, dinodes = nbytes - acc.used_bytes, inodes - acc.used_inodes
        self.ledger.set_usage(vf.quota_keys[0], nbytes, inodes)
        self.ledger.shift(vf.quota_keys[1:], dbytes, dinodes)

    async def set_limits(
        self, host_name: str, vfid: str, quota_bytes: Any = None, quota_inodes: Any = None
    ) -> Vfolder:
        qb, qi = parse_limits(quota_bytes, quota_inodes)
        async with self._lifecycle(self.vfolder(host_name, vfid).id):
            return await self._set_limits(self.vfolder(host_name, vfid), qb, qi)

    async def _push_native_quota(self, host: Host, path: str, qb: int, qi: int) -> None:
        """Set a vfolder's limits on the storage, where the backend has native quotas (a
        refusal: RegistryError, one line naming the backend)."""
        if not host.backend.capabilities.native_quota:
            return
        try:
            await host.admin.run(host.backend.set_native_quota, path, qb, qi)
        except BackendError as exc:
            raise RegistryError(
                502, "backend", f"backend {host.backend.name} of host {host.name}: {exc}"
            ) from None

    async def _set_limits(self, vf: Vfolder, qb: int | None, qi: int | None) -> Vfolder:
        rec = VfolderRecord(
            **{
                **vf.record.__dict__,
                "quota_bytes": vf.record.quota_bytes if qb is None else qb,
                "quota_inodes": vf.record.quota_inodes if qi is None else qi,
            }
        )
        old = vf.record
        await self._push_native_quota(vf.host, rec.native_path, rec.quota_bytes, rec.quota_inodes)
        try:
            await self.store_workers.run(self.store.put_vfolder, rec)
        except BaseException:  # the store kept the old limits: so does the storage
            with trio.CancelScope(shield=True), contextlib.suppress(RegistryError):
                await self._push_native_quota(
                    vf.host, old.native_path, old.quota_bytes, old.quota_inodes
                )
            raise
        vf.record = rec
        self._set_limits_of(vf.quota_keys[0], rec.quota_bytes, rec.quota_inodes)
        log.info(
            "vfolder %s limits: %d bytes, %d inodes (0: unlimited)",
            vf.id,
            rec.quota_bytes,
            rec.quota_inodes,
            extra={"host": vf.host.name, "vfolder": vf.id},
        )
        return vf

    def scope_info(self, scope: str) -> dict[str, Any]:
        scope = parse_scope(scope)
        acc = self.ledger.account(f"scope:{scope}")
        return {
            "scope": scope,
            "quota_bytes": acc.limit_bytes,
            "quota_inodes": acc.limit_inodes,
            "usage_bytes": acc.used_bytes,
            "usage_inodes": acc.used_inodes,
            "vfolders": [vf.id for vf in self.vfolders.values() if vf.record.scope == scope],
        }

    async def set_scope(
        self, scope: str, quota_bytes: Any = None, quota_inodes: Any = None
    ) -> dict[str, Any]:
        scope = parse_scope(scope)
        if not scope:
            raise RegistryError(400, "bad_scope", "a scope is user:<uuid> or project:<uuid>")
        acc = self.ledger.account(f"scope:{scope}")
        qb, qi = parse_limits(quota_bytes, quota_inodes)
        qb = acc.limit_bytes if qb is None else qb
        qi = acc.limit_inodes if qi is None else qi
        await self.store_workers.run(self.store.put_scope, scope, qb, qi)
        self._set_limits_of(f"scope:{scope}", qb, qi)
        return self.scope_info(scope)

    async def flush_usage(self) -> None:
        """Persist what usage changed by since the last flush, as this node's deltas (another
        node's flush adds its own and never overwrites these)."""
        async with self._flushing:
            await self._flush_usage()

    async def _flush_usage(self) -> None:
        """Send the batch an error left unsent (it may have landed: the store adds a batch
        once), then what changed since.  Not while the store is away: after it answers again
        the feed follower first checks it is the same store (apply_changes), and a store that
        lost its data gets this node's usage by a recount instead (_republish)."""
        if not self.store_connected:
            return
        for _ in range(2):
            if self._unsent is None:
                rows = []
                for key in self.ledger.take_dirty():  # only what changed: O(changes)
                    vf = self.vfolders.get(key[3:]) if key.startswith("vf:") else None
                    if vf is None:
                        continue
                    acc = self.ledger.account(key)
                    if acc.dirty:
                        acc.dirty = False
                        dbytes = acc.used_bytes - vf.stored[0]
                        dinodes = acc.used_inodes - vf.stored[1]
                        if dbytes or dinodes:
                            rows.append((vf.id, dbytes, dinodes))
                            vf.stored = (acc.used_bytes, acc.used_inodes)
                if not rows:
                    return
                self._batch += 1
                self._unsent = (self._batch, rows)
            batch, rows = self._unsent
            await self.store_workers.run(self.store.add_usage, self.node, rows, batch)
            self._unsent = None

    async def refresh_usage(self) -> None:
        """Flush usage and, on a shared store, take in what the other nodes changed it by (the
        store's figures plus what this node has not flushed yet), so usage, df and the metrics
        show every node's writes.  Limits do not depend on it: leases hold them."""
        if self.leases is None:
            return await self.flush_usage()
        async with self._flushing:
            await self._flush_usage()
            # only what changed since the last look: O(changes), not O(vfolders)
            seq, usage = await self.store_workers.run(
                self.leases.store.usage_since, self.usage_seen
            )
            self.usage_seen = seq
            for vfid, stored in usage.items():
                vf = self.vfolders.get(vfid)
                if vf is None or vf.id in self.untrusted:
                    continue
                acc = self.ledger.account(vf.quota_keys[0])
                pending = (acc.used_bytes - vf.stored[0], acc.used_inodes - vf.stored[1])
                if stored != vf.stored:
                    dirty = acc.dirty
                    self.set_usage(vf, stored[0] + pending[0], stored[1] + pending[1])
                    acc.dirty = dirty  # (ledger.dirty may list it: a no-op for the flush)
                    vf.stored = stored

    async def mark_clean(self) -> None:
        """Persist usage and, if every vfolder's usage is trusted, say the next start may use it."""
        await self.flush_usage()
        if self.untrusted & set(self.vfolders):
            log.warning(
                "stopping before the recount of %d vfolder(s) finished: the next start "
                "recounts again",
                len(self.untrusted & set(self.vfolders)),
            )
            return
        await self.store_workers.run(self.store.set_clean, self.node, True)

    async def host_consistency(self, host_name: str) -> dict[str, Any]:
        """The host's native storage against the store (backends.consistency): GET
        /v1/hosts/{host} shows it; nothing is changed."""
        host = self.host(host_name)
        recorded = {
            r.native_path: (r.id, r.quota_bytes)
            for r in await self.store_workers.run(self.store.vfolders)
            if r.host == host.name
        }
        running = {
            t.vfolder for t in self.tasks.values() if t.kind == "clone" and t.state == "running"
        }
        found = await host.admin.run(consistency, host.backend, recorded)
        found["unfinished_clones"] = [  # a clone still copying is not a leftover
            p for p in found["unfinished_clones"] if not any(v in p for v in running)
        ]
        return found

    def start_rescan(self, vf: Vfolder) -> Task:
        """Recount a vfolder's usage from its native tree in the background (one at a time)."""
        for task in self.tasks.values():
            if task.vfolder == vf.id and task.state == "running":
                return task
        if self.nursery is None:
            raise RegistryError(409, "not_ready", "the daemon is not ready for background tasks")
        task = Task(id=str(uuid.uuid4()), kind="rescan", host=vf.host.name, vfolder=vf.id)
        self.tasks[task.id] = task
        self.nursery.start_soon(self._rescan, vf, task)
        return task

    async def _rescan(self, vf: Vfolder, task: Task) -> None:
        """Recount vf from its native tree.  The count replaces usage only if no change through
        vfusefs overlapped the walk (what such a change did may be in it or not); a busy vfolder
        is walked again, RESCAN_TRIES times in all, and keeps its usage if it never held still,
        unless its usage cannot be trusted at all (after an unclean stop): then the last count
        is taken as the best there is, and the next rescan corrects it."""

        def progress(entries: int, nbytes: int) -> None:
            task.done_files, task.done_bytes = entries, nbytes

        try:
            assert vf.root is not None
            for attempt in range(RESCAN_TRIES):
                others = await self._others_flushed(vf)
                before = vf.changes if not vf.changing else None
                watched = {node.ino: node for node, _ in vf.recent.values() if node.key is not None}
                found = await trio.to_thread.run_sync(
                    native.scan,
                    vf.root.fd,
                    progress,
                    frozenset(n.key[1:] for n in watched.values() if n.key),
                    abandon_on_cancel=True,
                )
                quiet = before is not None and vf.changes == before
                quiet = quiet and await self._others_flushed(vf) == others
                if quiet or vf.deleted:
                    break
                if attempt + 1 < RESCAN_TRIES:
                    await trio.sleep(RESCAN_RETRY)
        except Exception as exc:
            task.state, task.error = "failed", str(exc)
            log.warning(
                "rescan of vfolder %s failed: %s",
                vf.id,
                exc,
                extra={"host": vf.host.name, "vfolder": vf.id},
            )
        else:
            trusted = vf.id not in self.untrusted
            if not vf.deleted and (quiet or not trusted):
                before_stored = vf.stored
                self._take_count(vf, found, watched)  # at once: nothing may change in between
                task.applied = True
                try:
                    await self.store_workers.run(
                        self.store.set_usage, vf.id, found.bytes, found.inodes
                    )
                except Exception as exc:  # the store keeps the old figure: flush the difference
                    vf.stored = before_stored
                    self.ledger.mark_dirty(vf.quota_keys[0])
                    log.warning(
                        "rescan of vfolder %s: count not stored: %s",
                        vf.id,
                        exc,
                        extra={"host": vf.host.name, "vfolder": vf.id},
                    )
            elif not vf.deleted:
                log.info(
                    "rescan of vfolder %s: changed through vfusefs during each of %d walks; "
                    "usage kept",
                    vf.id,
                    RESCAN_TRIES,
                    extra={"host": vf.host.name, "vfolder": vf.id},
                )
            task.done_files, task.done_bytes, task.state = found.inodes, found.bytes, "done"
            task.total_files, task.total_bytes = found.inodes, found.bytes
        task.finished = time.time()
        if len(self.tasks) > 1000:  # keep the most recent ones
            for key in list(self.tasks)[:-500]:
                if self.tasks[key].state != "running":
                    del self.tasks[key]

    async def _others_flushed(self, vf: Vfolder) -> tuple[int, int] | None:
        """Many nodes: ask every node to flush its usage, wait a moment, and return vf's usage
        as the store has it then.  A walk between two equal answers overlapped no change
        another node has flushed.  None on a single-node store (nothing to ask)."""
        if self.leases is None:
            return None
        try:
            await self.leases.workers.run(self.leases.store.publish, f"flush|{vf.id}")
            await trio.sleep(OTHERS_FLUSH_WAIT)
            return await self.store_workers.run(self.store.vfolder_usage, vf.id)
        except (StoreError, trio.TooSlowError):
            return (-1, time.monotonic_ns())  # unknown: never equal to another answer

    def _take_count(self, vf: Vfolder, found: native.Scan, watched: dict[int, Node]) -> None:
        """A rescan's count becomes vf's usage.  Files still watched go on being watched from
        what the walk saw of them, so what the native fs settles after it is charged too."""
        for node in watched.values():
            node.alloc = found.seen.get(node.key[1:]) if node.key else None
            if node.alloc is None:  # the walk did not meet it: no longer in the tree
                self._unwatch(vf, node)
        for node in self.table.of_vfolder(vf):
            node.orphan = False  # nameless: not counted by the scan, nothing to refund
        old = self.ledger.account(vf.quota_keys[0])
        if (old.used_bytes, old.used_inodes) != (found.bytes, found.inodes):
            log.info(
                "rescan of vfolder %s: usage %d -> %d bytes, %d -> %d inodes",
                vf.id,
                old.used_bytes,
                found.bytes,
                old.used_inodes,
                found.inodes,
                extra={"host": vf.host.name, "vfolder": vf.id},
            )
        self.set_usage(vf, found.bytes, found.inodes)
        vf.stored = (found.bytes, found.inodes)
        vf.links = found.links
        self.untrusted.discard(vf.id)


def _reconcile(nodes: list[Node]) -> tuple[int, list[Node]]:
    """Worker side of Registry.reconcile: under each node's lock, compare its allocation with
    what the ledger holds for it (node.alloc); returns the total drift and nodes to stop watching."""
    drift, gone = 0, []
    for node in nodes:
        with node.lock:
            if node.fd < 0 or node.key is None or node.alloc is None:
                gone.append(node)
                continue
            got = native.allocation(node.fd, node.key[1], node.key[2])
            if got is None or got[1] == 0:  # closed meanwhile, or unlinked (already refunded)
                gone.append(node)
                continue
            drift += got[0] - node.alloc
            node.alloc = got[0]
    return drift, gone


def _write_back(nodes: list[Node]) -> None:
    """Worker side of settle_lingering: each file's dirty pages written back, under its lock."""
    for node in nodes:
        with node.lock:
            if node.fd >= 0 and node.key is not None:
                native.write_back(node.fd, node.key[1], node.key[2])
