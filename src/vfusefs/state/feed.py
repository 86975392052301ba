"""The registry following the store's change feed: what another writer changed (a node, an
admin's CLI on another host) reaches memory and the kernel's caches through the same path as a
local change; a store that comes back empty or new gets this node's state written back."""

from __future__ import annotations

import logging

from vfusefs.state.base import RegistryBase
from vfusefs.store import VfolderRecord

log = logging.getLogger("vfusefs.state.registry")


class Feed(RegistryBase):
    # -- the store's change feed -----------------------------------------------------------------
    async def apply_changes(self) -> int:
        """Bring memory and the kernel's caches up to what the store's change feed says changed
        since the last look: vfolders created, deleted or changed (grants, limits) by another
        writer, scope limits.  Changes made here come back through the feed too and are no-ops.
        Returns how many entries were read."""
        epoch = await self.store_workers.run(self.store.epoch)
        if epoch != self.store_epoch:
            await self._republish()
            self.store_epoch = epoch
            return 0
        changes = await self.store_workers.run(self.store.changes, self.seen_change)
        if not changes:
            return 0
        vfids: dict[str, None] = {}
        scopes: dict[str, None] = {}
        records: dict[str, VfolderRecord | None] = {}  # read at once for an "all"
        for ch in changes:
            if ch.kind == "all":  # fell behind what the feed keeps: compare everything
                vfids.update(dict.fromkeys(self.vfolders))
                records = dict.fromkeys(self.vfolders)  # absent from the store: deleted
                for r in await self.store_workers.run(self.store.vfolders):
                    vfids[r.id] = None
                    records[r.id] = r
                scopes.update(dict.fromkeys(await self.store_workers.run(self.store.scopes)))
            elif ch.kind == "vfolder":
                vfids[ch.key] = None
            elif ch.kind == "scope":
                scopes[ch.key] = None
        usage: dict[str, tuple[int, int]] | None = None  # read once, if a vfolder appeared
        for vfid in vfids:
            async with self._lifecycle(vfid):
                usage = await self._follow_vfolder(vfid, usage, records)
        if scopes:
            limits = await self.store_workers.run(self.store.scopes)
            for scope in scopes:
                self._set_limits_of(f"scope:{scope}", *limits.get(scope, (0, 0)))
        self.seen_change = changes[-1].seq
        return len(changes)

    async def _republish(self) -> None:
        """The store's identity changed: it is empty or another store (a Redis that lost its
        data).  What this node serves is not dropped for that: its vfolders, their usage and
        the scope limits it knows are written back, and the feed is followed from where the
        store is now."""
        put = 0
        self._unsent = None  # in the recount below
        self.usage_seen = 0
        for vf in list(self.vfolders.values()):
            # what this node has not flushed was written before the store came back: the
            # recount below (this node's or the one that wrote the vfolder back) has it
            acc = self.ledger.account(vf.quota_keys[0])
            vf.stored = (acc.used_bytes, acc.used_inodes)
            acc.dirty = False
        for vf in list(self.vfolders.values()):
            async with self._lifecycle(vf.id):
                if vf.deleted or await self.store_workers.run(self.store.has_vfolder, vf.id):
                    continue
                await self.store_workers.run(self.store.put_vfolder, vf.record)
                acc = self.ledger.account(vf.quota_keys[0])
                await self.store_workers.run(
                    self.store.set_usage, vf.id, acc.used_bytes, acc.used_inodes
                )
                vf.stored = (acc.used_bytes, acc.used_inodes)
                put += 1
                if self.store.shared and self.nursery is not None:
                    self.untrusted.add(vf.id)  # other nodes' writes meanwhile: count them
                    self.start_rescan(vf)
        known = await self.store_workers.run(self.store.scopes)
        for key, acc in list(self.ledger.accounts.items()):
            scope = key.removeprefix("scope:")
            if (
                key.startswith("scope:")
                and scope not in known
                and (acc.limit_bytes or acc.limit_inodes)
            ):
                await self.store_workers.run(
                    self.store.put_scope, scope, acc.limit_bytes, acc.limit_inodes
                )
        self.seen_change = await self.store_workers.run(self.store.last_change)
        if self.leases is not None:
            self.leases.forget_all()
        log.warning(
            "the store is not the one this node loaded (emptied, or another): wrote back "
            "%d vfolder(s) this node serves",
            put,
        )

    async def _follow_vfolder(
        self,
        vfid: str,
        usage: dict[str, tuple[int, int]] | None,
        records: dict[str, VfolderRecord | None],
    ) -> dict[str, tuple[int, int]] | None:
        """Bring vfid up to the store's record.  usage: the store's usage if read already for
        this batch of changes (it is read at most once per batch); returned for the next.
        records: what the store holds, when a full comparison read it all at once."""
        if vfid in records:
            rec = records[vfid]
        else:
            rec = await self.store_workers.run(self.store.vfolder, vfid)
        vf = self.vfolders.get(vfid)
        if vf is not None and rec == vf.record:
            return usage
        if vf is not None and (
            rec is None
            or (rec.host, rec.native_path, rec.scope)
            != (vf.record.host, vf.record.native_path, vf.record.scope)
        ):
            # deleted elsewhere (its data is the deleter's to move), or moved: stop serving it
            self._stop_serving(vf)
            self._invalidate_entry(vf.host, vf.id)
            log.info(
                "vfolder %s %s in the store by another writer: no longer served here",
                vfid,
                "deleted" if rec is None else "moved",
                extra={"host": vf.host.name, "vfolder": vfid},
            )
            vf = None
        if rec is None:
            return usage
        if vf is None:
            host = self.hosts.get(rec.host)
            if host is None:
                return usage  # a host this node does not serve
            if usage is None:
                usage = await self.store_workers.run(self.store.usage)
            try:
                vf = await self._attach_stored(host, rec, usage)
            except FileNotFoundError:
                log.warning(
                    "vfolder %s appeared in the store, but %s is not there on this node: "
                    "not served here",
                    vfid,
                    rec.native_path,
                    extra={"host": host.name, "vfolder": vfid},
                )
                return usage
            if vf is None:
                return usage
            self._invalidate_entry(host, vfid)  # the kernel may remember it as absent
            # no usage stored: count it, unless the store is shared (the node that made it
            # counts it; a follower that walked it now would race that node's writes)
            if rec.id not in usage and self.nursery is not None and not self.store.shared:
                self.untrusted.add(vf.id)
                self.start_rescan(vf)
            log.info(
                "vfolder %s appeared in the store: served",
                vfid,
                extra={"host": host.name, "vfolder": vfid},
            )
            return usage
        old, vf.record = vf.record, rec
        self._set_limits_of(vf.quota_keys[0], rec.quota_bytes, rec.quota_inodes)
        if rec.grants != old.grants:
            vf.modes = {}
            await self._grants_changed(vf)
        log.info(
            "vfolder %s changed in the store: grants and limits applied",
            vfid,
            extra={"host": vf.host.name, "vfolder": vfid},
        )
        return usage
