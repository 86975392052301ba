"""What the daemon serves: hosts from the config, vfolders from the store, kept in memory.

The request path (`ops.py`) reads this state without I/O; the control API changes it through the
methods here, which write through to the store (on a worker thread), update memory, and tell the
kernel to drop cached entries that no longer hold.  Management errors are `RegistryError` with an
HTTP-like status and a one-line message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import trio

from vfusefs import native
from vfusefs.backends import AlreadyThere, BackendError, load_backend
from vfusefs.config import Config, HostConfig
from vfusefs.domain import access
from vfusefs.domain.quota import QuotaLedger
from vfusefs.domain.validation import (
    RegistryError,
    canonical_uuid,
    parse_grants,
    parse_limits,
    parse_mode,
    parse_owner,
    parse_scope,
    strict_uuid,
)
from vfusefs.fuse.inodes import ROOT_INODE, InodeTable, Kind
from vfusefs.fuse.kernel import KernelCache
from vfusefs.native import mounts
from vfusefs.runtime.workers import HostWorkers
from vfusefs.state.accounting import Accounting
from vfusefs.state.base import open_dir
from vfusefs.state.clones import Clones
from vfusefs.state.feed import Feed
from vfusefs.state.health import HostHealth
from vfusefs.state.leases import LeaseKeeper
from vfusefs.state.netwatch import NetState, NetWatch
from vfusefs.state.records import Host, Task, Vfolder
from vfusefs.store import SharedStore, Store, TrashRecord, VfolderRecord, node_name

log = logging.getLogger(__name__)

ADMIN_THREADS = 2  # per host, for backend calls
TRASH_CLAIM = 3600.0  # seconds a node holds a trash entry it purges (then another may take it)


class Registry(Accounting, Clones, Feed):
    """Hosts and vfolders in memory, their lifecycle (create, delete, grants, trash, restore;
    serialized per id), start-up and reload.  Accounting, clones and the change feed are its
    parts (state/accounting.py, state/clones.py, state/feed.py), on the state they share
    (state/base.py)."""

    def __init__(
        self, config: Config, store: Store, table: InodeTable, token: trio.lowlevel.TrioToken
    ) -> None:
        self.config = config
        self.store = store
        self.node = node_name(config.store_node)  # this daemon's name in shared state
        # whether the store answered the last read of its change feed, and since when
        self.store_connected = True
        self.store_since = time.time()
        self.seen_change = 0  # the last change-feed entry applied (follow_store)
        self.store_epoch = ""  # the store's identity when loaded (a new one: write back)
        self.table = table
        self.token = token
        self.hosts: dict[str, Host] = {}
        self.vfolders: dict[str, Vfolder] = {}
        self.started = time.time()
        # the store gets its own thread so a slow store never waits behind a hung host
        self.store_workers = HostWorkers("store", 1, 30.0, token)
        self.kernel = KernelCache()  # the one way to make the kernel forget (fuse/kernel.py)
        self.trash_waiting = trio.Event()  # set when a delete queued data for purging
        self.store_wake = trio.Event()  # set when the store says it changed (pub/sub)
        self.ledger = QuotaLedger()
        self.tasks: dict[str, Task] = {}
        self.nursery: trio.Nursery | None = None  # for background tasks, set by the daemon
        self.needs_scan: list[Vfolder] = []  # usage not trusted after an unclean stop
        # vfolders whose usage stays untrusted until a rescan finishes: while any is left, a
        # stop is not "clean" and the next start recounts
        self.untrusted: set[str] = set()
        self._id_locks: dict[str, trio.Lock] = {}  # see _lifecycle
        self._flushing = trio.Lock()  # one usage flush (or refresh) at a time
        self.on_health_change: Callable[[], None] | None = None  # the daemon's STATUS line
        self.netwatch: NetWatch | None = None
        # usage batches: numbered (rising across restarts too), the last one kept until the
        # store took it (sent again as it was after an error: added once)
        self._batch = time.time_ns() // 1000
        self._unsent: tuple[int, list[tuple[str, int, int]]] | None = None
        self.usage_seen = 0  # shared store: the usage changes taken in so far (refresh_usage)
        # many nodes: limited accounts are spent through quota leases (state/leases.py)
        self.leases: LeaseKeeper | None = None
        if store.shared:
            self.leases = LeaseKeeper(self, cast(SharedStore, store))

    @property
    def mounted(self) -> bool:
        return self.kernel.mounted

    @mounted.setter
    def mounted(self, value: bool) -> None:
        self.kernel.mounted = value

    # -- start-up -------------------------------------------------------------------------------
    async def load(self) -> None:
        for hc in self.config.hosts.values():
            await self._probe_fs(self._add_host(hc))
        usage = await self.store_workers.run(self.store.usage)
        for scope, (qb, qi) in (await self.store_workers.run(self.store.scopes)).items():
            self._set_limits_of(f"scope:{scope}", qb, qi)
        self.seen_change = await self.store_workers.run(self.store.last_change)
        self.store_epoch = await self.store_workers.run(self.store.epoch)
        clean = await self.store_workers.run(self.store.clean, self.node)
        await self.store_workers.run(self.store.set_clean, self.node, False)
        records = await self.store_workers.run(self.store.vfolders)
        if not clean and records:
            log.warning("the last stop was not clean: usage will be recounted by a rescan")
        for rec in records:
            host = self.hosts.get(rec.host)
            if host is None:
                log.warning(
                    "vfolder %s belongs to host %r, which is not configured: not served",
                    rec.id,
                    rec.host,
                    extra={"host": rec.host, "vfolder": rec.id},
                )
                continue
            vf = await self._attach_stored(host, rec, usage)
            if vf is not None and (not clean or rec.id not in usage):
                self.needs_scan.append(vf)
                self.untrusted.add(vf.id)

    async def _attach_stored(
        self, host: Host, rec: VfolderRecord, usage: dict[str, tuple[int, int]]
    ) -> Vfolder | None:
        """Serve a vfolder from the store on host; None (logged) if its directory is missing."""
        try:
            vf = await self._attach(host, rec)
        except FileNotFoundError:
            moved = await host.admin.run(host.backend.find_in_trash, rec.id)
            if moved is None:
                raise
            # a delete that stopped (a crash) between moving the data and the store: finish it
            await self.store_workers.run(
                self.store.delete_vfolder,
                rec.id,
                TrashRecord(moved, host.name, rec.id, time.time()),
            )
            self.trash_waiting.set()
            log.info(
                "vfolder %s: finished its deletion (data already in %s)",
                rec.id,
                moved,
                extra={"host": host.name, "vfolder": rec.id},
            )
            return None
        except OSError as exc:
            log.error(
                "vfolder %s: native directory %s cannot be opened (%s): not served",
                rec.id,
                rec.native_path,
                exc.strerror,
                extra={"host": host.name, "vfolder": rec.id},
            )
            return None
        if rec.id in usage:
            self.set_usage(vf, *usage[rec.id])
            vf.stored = usage[rec.id]
        return vf

    def _add_host(self, hc: HostConfig) -> Host:
        backend = load_backend(hc)
        workers = HostWorkers(hc.name, self.config.daemon.io_threads, hc.op_timeout, self.token)

        def close_opened(result: Any) -> None:  # a late open or lookup: close what it opened
            for item in native.opened(result):
                if isinstance(item, native.DirStream):
                    workers.submit(item.close)
                else:
                    workers.close_soon([item])

        workers.on_abandoned = close_opened
        admin = HostWorkers(f"{hc.name}-admin", ADMIN_THREADS, hc.op_timeout, self.token)
        admin.on_abandoned = close_opened
        host = Host(hc.name, hc, backend, workers, admin)
        host.node = self.table.new_virtual(Kind.HOST, host)
        host.health_watch = HostHealth(host, self._health_changed)
        # a request that got no answer: the host is down (backend calls may take long)
        workers.on_timeout = host.health_watch.suspect
        self.hosts[hc.name] = host
        if self.nursery is not None:
            self.nursery.start_soon(self.watch_health, host)
        return host

    async def watch_health(self, host: Host) -> None:
        """Probe host's storage until the host is no longer served (state/health.py)."""
        assert host.health_watch is not None
        with trio.CancelScope() as scope:
            host.health_scope = scope
            await host.health_watch.watch()

    async def watch_network(self) -> None:
        """Start watching the way to every host's servers over netlink (state/netwatch.py)."""
        self.netwatch = NetWatch(self.token, self._network_changed)
        await self.network_targets()
        self.netwatch.start()

    async def network_targets(self) -> None:
        """Tell the network watch which servers each host has (at start, after a reload)."""
        if self.netwatch is None:
            return
        targets = {}
        for host in list(self.hosts.values()):
            try:  # the mount table and the host's path: on its admin threads (it may hang)
                targets[host.name] = await host.admin.run(host.backend.health_targets)
            except (OSError, trio.TooSlowError) as exc:
                log.warning("host %s: cannot tell its storage servers: %s", host.name, exc)
        self.netwatch.set_targets(targets)

    def _network_changed(self, changed: dict[str, NetState]) -> None:
        for name, net in changed.items():
            host = self.hosts.get(name)
            if host is not None and host.health_watch is not None:
                host.health_watch.network(net)

    def _health_changed(self, host: Host, old: str, new: str) -> None:
        host.admin.set_down(new == "down")
        if self.on_health_change is not None:
            self.on_health_change()

    async def _probe_fs(self, host: Host) -> None:
        try:
            host.fs_type = await host.admin.run(mounts.fs_type, host.config.path)
        except (OSError, trio.TooSlowError) as exc:
            log.warning(
                "host %s: cannot tell the filesystem type of %s: %s",
                host.name,
                host.config.path,
                exc,
                extra={"host": host.name},
            )
        host.flush_needed = host.fs_type not in native.LOCAL_FS_TYPES
        host.cached_reads = host.fs_type in native.NOWAIT_FS_TYPES

    async def _attach(self, host: Host, rec: VfolderRecord) -> Vfolder:
        vf = Vfolder(rec.id, host, rec)
        vf.quota_keys = (f"vf:{rec.id}",) + ((f"scope:{rec.scope}",) if rec.scope else ())
        self._set_limits_of(vf.quota_keys[0], rec.quota_bytes, rec.quota_inodes)
        fd, st = await host.admin.run(open_dir, rec.native_path)
        vf.root = self.table.add(Kind.VFROOT, fd, st, vf, parent=host.node.ino if host.node else 1)
        host.vfolders[vf.id] = vf
        self.vfolders[vf.id] = vf
        return vf

    def close(self) -> None:
        for task in self.tasks.values():  # a clone copying gives up (and removes its copy)
            task.cancel = True
        for host in self.hosts.values():
            host.workers.stop()
            host.admin.stop()
        self.store_workers.stop()
        if self.leases is not None:
            self.leases.close()
        if self.netwatch is not None:
            self.netwatch.stop()

    def _set_limits_of(self, key: str, quota_bytes: int, quota_inodes: int) -> None:
        """An account's limits, as the store has them (leased on a shared store)."""
        self.ledger.set_limits(key, quota_bytes, quota_inodes, self.store.shared)

    # -- reload (SIGHUP) ------------------------------------------------------------------------
    async def reload_hosts(self, new: dict[str, HostConfig]) -> list[str]:
        """Serve exactly the hosts in `new` without unmounting; returns one line per change.

        A removed host disappears from the root (its open files answer ENOENT from then on, as
        if deleted); an added one appears with its vfolders from the store, recounted by a
        rescan.  A changed path, backend, layout or options re-attaches the host (its vfolders
        move to where the new settings put them); a changed op_timeout or servers list is
        applied in place.
        """
        changes = []
        for name in [n for n in self.hosts if n not in new]:
            await self._remove_host(name)
            changes.append(f"host {name} removed")
        for name, hc in new.items():
            old = self.hosts.get(name)
            if old is None:
                await self._add_host_live(hc)
                changes.append(f"host {name} added ({len(self.hosts[name].vfolders)} vfolders)")
            elif old.config == hc:
                continue
            elif _attach_fields(old.config) == _attach_fields(hc):
                old.config = hc
                old.workers.op_timeout = old.admin.op_timeout = hc.op_timeout
                changes.append(
                    f"host {name}: op_timeout {hc.op_timeout}s, servers {list(hc.servers)}"
                )
            else:
                await self._remove_host(name)
                await self._add_host_live(hc)
                changes.append(
                    f"host {name} re-attached ({hc.backend} at {hc.path}, layout {hc.layout})"
                )
        if changes:
            self.kernel.forget_attrs(ROOT_INODE)  # its link count
        await self.network_targets()  # servers may have changed without anything else
        return changes

    async def _remove_host(self, name: str) -> None:
        await self.flush_usage()  # its vfolders' usage stays in the store for a later re-add
        host = self.hosts.pop(name)
        for vf in list(host.vfolders.values()):
            self._stop_serving(vf)
        host.workers.stop()  # queued calls finish; later ones fail, closes run inline
        host.admin.stop()
        if host.health_scope is not None:
            host.health_scope.cancel()
        self.kernel.forget_entry(ROOT_INODE, name.encode())

    def _stop_serving(self, vf: Vfolder) -> None:
        """Take a vfolder out of service (deleted, or its host removed): requests on its nodes
        answer ENOENT from now on, its usage leaves its scope, and its nodes go away as the
        kernel forgets them."""
        self.set_usage(vf, 0, 0)  # its scope no longer carries it
        self.ledger.accounts.pop(vf.quota_keys[0], None)
        vf.deleted = True
        vf.host.vfolders.pop(vf.id, None)
        self.vfolders.pop(vf.id, None)
        if vf.root is not None:
            vf.root.kind = Kind.NATIVE  # no longer pinned: dropped once the kernel forgets it
            self.table.native_fds += 1
        fds = self.table.detach(vf)
        if fds:
            vf.host.workers.close_soon(fds)

    async def _add_host_live(self, hc: HostConfig) -> None:
        host = self._add_host(hc)
        await self._probe_fs(host)
        usage = await self.store_workers.run(self.store.usage)
        for rec in await self.store_workers.run(self.store.vfolders):
            if rec.host != hc.name:
                continue
            path = host.backend.native_path(uuid.UUID(rec.id), rec.scope)
            if path != rec.native_path:  # the host's path or layout changed
                log.info(
                    "vfolder %s now at %s (was %s)",
                    rec.id,
                    path,
                    rec.native_path,
                    extra={"host": hc.name, "vfolder": rec.id},
                )
                rec = VfolderRecord(**{**rec.__dict__, "native_path": path})
                await self.store_workers.run(self.store.put_vfolder, rec)
            vf = await self._attach_stored(host, rec, usage)
            if vf is not None and self.nursery is not None:
                self.untrusted.add(vf.id)
                self.start_rescan(vf)  # it may have changed while not served here
        self.kernel.forget_entry(ROOT_INODE, hc.name.encode())

    # -- lookups --------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise RegistryError(404, "no_such_host", f"no host {name!r}") from None

    def vfolder(self, host: str, vfid: str) -> Vfolder:
        h = self.host(host)
        vfid = canonical_uuid(vfid)
        try:
            return h.vfolders[vfid]
        except KeyError:
            raise RegistryError(
                404, "no_such_vfolder", f"no vfolder {vfid} on host {host!r}"
            ) from None

    # -- changes --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifecycle(self, vfid: str) -> AsyncIterator[None]:
        """Serialize changes to one vfolder id (create, delete, grants, limits): each reads the
        state, awaits native storage and the store, then writes; interleaved, a delete could
        remove the store record of a create that came after it."""
        lock = self._id_locks.setdefault(vfid, trio.Lock())
        async with lock:
            try:
                yield
            finally:
                if not lock.statistics().tasks_waiting:
                    self._id_locks.pop(vfid, None)

    async def create_vfolder(
        self,
        host_name: str,
        vfid: Any = None,
        scope: Any = None,
        quota_bytes: Any = 0,
        quota_inodes: Any = 0,
        grants: Any = None,
        adopt: Any = False,
        owner: Any = None,
        mode: Any = None,
    ) -> Vfolder:
        # everything is validated before anything is changed: a refused create leaves nothing
        host = self.host(host_name)
        vfid = str(uuid.uuid4()) if vfid is None else canonical_uuid(vfid)
        scope = parse_scope(scope)
        grant_map = parse_grants([] if grants is None else grants)
        root_owner, root_mode = parse_owner(owner), parse_mode(mode)
        quota_bytes, quota_inodes = (v or 0 for v in parse_limits(quota_bytes, quota_inodes))
        if not isinstance(adopt, bool):
            raise RegistryError(400, "bad_adopt", "adopt must be true or false")
        try:
            path = host.backend.native_path(uuid.UUID(vfid), scope)
        except BackendError as exc:
            raise RegistryError(409, "backend", str(exc)) from None
        async with self._lifecycle(vfid):
            if vfid in self.vfolders or await self.store_workers.run(self.store.has_vfolder, vfid):
                raise RegistryError(409, "exists", f"vfolder {vfid} already exists")
            try:
                made = await host.admin.run(host.backend.create_vfolder, path, adopt)
            except AlreadyThere as exc:
                raise RegistryError(
                    409, "native_exists", f'{exc}; adopt it to serve what it holds ("adopt": true)'
                ) from None
            except BackendError as exc:
                raise RegistryError(409, "backend", str(exc)) from None
            try:  # the root's owner and mode: what the vfolder's users need at its top level
                if made:  # a new root: the defaults where not given (0:0, 0755)
                    root_owner = root_owner or (0, 0)
                    root_mode = 0o755 if root_mode is None else root_mode
                if root_owner is not None or root_mode is not None:  # adopted: only what is given
                    await host.admin.run(_set_root, path, root_owner, root_mode)
                if quota_bytes or quota_inodes:  # the storage's own limit too, where it has one
                    await self._push_native_quota(host, path, quota_bytes, quota_inodes)
            except BaseException as exc:
                if made:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(host.backend.remove_new_vfolder, path)
                if isinstance(exc, OSError):
                    raise RegistryError(
                        409, "backend", f"cannot set the owner and mode of {path}: {exc.strerror}"
                    ) from None
                raise
            rec = VfolderRecord(
                id=vfid,
                host=host.name,
                native_path=path,
                scope=scope,
                quota_bytes=quota_bytes,
                quota_inodes=quota_inodes,
                grants=grant_map,
            )
            try:
                await self.store_workers.run(self.store.put_vfolder, rec)
                vf = None
                try:
                    vf = await self._attach(host, rec)
                    if not adopt:  # an empty directory: its own blocks
                        found = await host.admin.run(native.scan, vf.root.fd)  # type: ignore[union-attr]
                        await self.store_workers.run(
                            self.store.set_usage, vf.id, found.bytes, found.inodes
                        )
                        self.set_usage(vf, found.bytes, found.inodes)
                        vf.stored = (found.bytes, found.inodes)
                except BaseException:
                    if vf is not None:
                        self._stop_serving(vf)
                    with trio.CancelScope(shield=True):
                        await self.store_workers.run(self.store.delete_vfolder, vfid, None)
                    raise
            except BaseException:
                if made:  # only what this create made: an adopted directory stays
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(host.backend.remove_new_vfolder, path)
                raise
            if adopt:
                self.start_rescan(vf)
        log.info(
            "vfolder %s created on host %s at %s",
            vfid,
            host.name,
            path,
            extra={"host": host.name, "vfolder": vfid},
        )
        return vf

    async def delete_vfolder(self, host_name: str, vfid: str, force: bool = False) -> str:
        async with self._lifecycle(self.vfolder(host_name, vfid).id):
            return await self._delete_vfolder(host_name, vfid, force)

    async def _delete_vfolder(self, host_name: str, vfid: str, force: bool) -> str:
        vf = self.vfolder(host_name, vfid)  # again: it may have gone while we waited
        if vf.handles and not force:
            raise RegistryError(
                409,
                "in_use",
                f"vfolder {vf.id} is in use ({vf.handles} open "
                f"handles); add ?force=1 to delete anyway",
            )
        host = vf.host
        # hide it first so no new request reaches it, then move the data aside
        self._stop_serving(vf)
        self._invalidate_entry(host, vf.id)
        try:
            moved = await host.admin.run(host.backend.delete_vfolder, vf.record.native_path, vf.id)
        except OSError as exc:
            # nothing moved: serve it again, as it was (its usage is recounted)
            again = await self._attach_stored(host, vf.record, {})
            if again is not None:
                self.untrusted.add(again.id)
                if self.nursery is not None:
                    self.start_rescan(again)
            raise RegistryError(
                409, "backend", f"cannot move {vf.record.native_path} to trash: {exc.strerror}"
            ) from None
        trash = (
            TrashRecord(moved, host.name, vf.id, time.time(), record=vf.record) if moved else None
        )
        await self.store_workers.run(self.store.delete_vfolder, vf.id, trash)
        self.trash_waiting.set()
        log.info(
            "vfolder %s deleted from host %s (data moved to %s)",
            vf.id,
            host.name,
            moved or "-",
            extra={"host": host.name, "vfolder": vf.id},
        )
        return moved

    async def set_grant(
        self, host_name: str, vfid: str, principal: str, mode: str | None
    ) -> Vfolder:
        async with self._lifecycle(self.vfolder(host_name, vfid).id):
            return await self._set_grant(host_name, vfid, principal, mode)

    async def _set_grant(
        self, host_name: str, vfid: str, principal: str, mode: str | None
    ) -> Vfolder:
        vf = self.vfolder(host_name, vfid)
        try:
            principal = access.parse_principal(principal)
            grants = dict(vf.record.grants)
            if mode is None:
                if principal not in grants:
                    raise RegistryError(
                        404, "no_such_grant", f"no grant for {principal} on {vf.id}"
                    )
                del grants[principal]
            else:
                grants[principal] = access.canonical_mode(mode)
        except access.BadGrant as exc:
            raise RegistryError(400, "bad_grant", str(exc)) from None
        rec = VfolderRecord(**{**vf.record.__dict__, "grants": grants})
        await self.store_workers.run(self.store.put_vfolder, rec)
        vf.record = rec
        vf.modes = {}
        await self._grants_changed(vf)
        return vf

    async def _grants_changed(self, vf: Vfolder) -> None:
        """Make the kernel ask again: drop cached pages and attributes of the vfolder's inodes."""
        self._invalidate_entry(vf.host, vf.id)
        await self.kernel.forget_inodes([n.ino for n in self.table.of_vfolder(vf)])

    def _invalidate_entry(self, host: Host, name: str) -> None:
        if host.node is not None:
            self.kernel.forget_entry(host.node.ino, name.encode())

    async def purge_trash(self) -> float | None:
        """Remove trashed vfolder data for good, oldest first, once it has been in the trash
        for `trash_retention` (runs in the background).  Returns when the next entry is due
        (unix time), or None if nothing waits."""
        retention = self.config.daemon.trash_retention
        due: float | None = None
        for rec in await self.store_workers.run(self.store.trash):
            host = self.hosts.get(rec.host)
            if host is None:
                continue
            if rec.deleted + retention > time.time():
                due = rec.deleted + retention if due is None else min(due, rec.deleted + retention)
                continue
            if not await self.store_workers.run(
                self.store.claim_trash, rec.path, self.node, TRASH_CLAIM
            ):
                continue  # another node is purging it, or it is being restored
            try:
                # a stop does not wait for a big purge: it is queued still, and the next start
                # goes on where this one was interrupted
                await trio.to_thread.run_sync(host.backend.purge, rec.path, abandon_on_cancel=True)
            except (OSError, BackendError) as exc:
                log.warning("purging %s failed: %s", rec.path, exc)
                continue
            await self.store_workers.run(self.store.trash_purged, rec.path)
            log.info("purged trashed data of vfolder %s (%s)", rec.vfolder, rec.path)
        return due

    async def trash_list(self, host_name: str) -> list[dict[str, Any]]:
        """What a host's trash holds, oldest first: each deleted vfolder and when it goes."""
        host = self.host(host_name)
        retention = self.config.daemon.trash_retention
        return [
            {
                "id": rec.vfolder,
                "host": rec.host,
                "trash": rec.path,
                "deleted": rec.deleted,
                "purge_after": rec.deleted + retention,
                "restorable": rec.record is not None,
                "scope": rec.record.scope or None if rec.record else None,
            }
            for rec in await self.store_workers.run(self.store.trash)
            if rec.host == host.name
        ]

    async def restore_vfolder(self, host_name: str, vfid: str) -> Vfolder:
        """Bring a deleted vfolder back from its host's trash, as it was when deleted (grants,
        limits, scope); its usage is recounted."""
        host = self.host(host_name)
        vfid = canonical_uuid(vfid)
        async with self._lifecycle(vfid):
            if vfid in self.vfolders or await self.store_workers.run(self.store.has_vfolder, vfid):
                raise RegistryError(409, "exists", f"vfolder {vfid} exists: nothing to restore")
            entries = [
                t
                for t in await self.store_workers.run(self.store.trash)
                if t.vfolder == vfid and t.host == host.name and t.record is not None
            ]
            if not entries:
                raise RegistryError(
                    404,
                    "not_in_trash",
                    f"vfolder {vfid} is not in the trash of "
                    f"host {host.name!r} (purged, or never here)",
                )
            entry = entries[-1]  # the latest deletion
            assert entry.record is not None
            if not await self.store_workers.run(
                self.store.claim_trash, entry.path, self.node, TRASH_CLAIM
            ):
                raise RegistryError(409, "being_purged", f"vfolder {vfid} is being purged")
            path = host.backend.native_path(uuid.UUID(vfid), entry.record.scope)
            rec = VfolderRecord(**{**entry.record.__dict__, "native_path": path})
            try:
                await host.admin.run(host.backend.restore_vfolder, entry.path, path)
            except (OSError, BackendError) as exc:
                await self.store_workers.run(self.store.claim_trash, entry.path, self.node, 0)
                raise RegistryError(
                    409,
                    "backend",
                    f"cannot restore {entry.path} to {path}: "
                    f"{getattr(exc, 'strerror', None) or exc}",
                ) from None
            try:
                if not await self.store_workers.run(self.store.restore_vfolder, rec, entry.path):
                    raise RegistryError(409, "being_purged", f"vfolder {vfid} was purged meanwhile")
            except BaseException:
                with trio.CancelScope(shield=True):  # back where it was, still queued
                    await host.admin.run(os.rename, path, entry.path)
                    await self.store_workers.run(self.store.claim_trash, entry.path, self.node, 0)
                raise
            vf = await self._attach_stored(host, rec, {})
            if vf is None:
                raise RegistryError(409, "backend", f"restored {path}, but it cannot be opened")
            self._invalidate_entry(host, vfid)
            self.untrusted.add(vf.id)
            if self.nursery is not None:
                self.start_rescan(vf)
        log.info(
            "vfolder %s restored on host %s from %s",
            vfid,
            host.name,
            entry.path,
            extra={"host": host.name, "vfolder": vfid},
        )
        return vf


def _attach_fields(hc: HostConfig) -> tuple[Any, ...]:
    """What decides where a host's vfolders live: changing any of it re-attaches the host."""
    return hc.backend, hc.path, hc.layout, hc.options


def _set_root(path: str, owner: tuple[int, int] | None, mode: int | None) -> None:
    """Give a vfolder's root directory its owner and permission bits, each if given (no
    symlink followed; the owner first: chown clears set-ID bits)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


# the validation the control API relies on is domain.validation's, re-exported here
__all__ = [
    "Host",
    "Task",
    "Registry",
    "RegistryError",
    "Vfolder",
    "canonical_uuid",
    "native",
    "parse_grants",
    "parse_limits",
    "parse_scope",
    "strict_uuid",
]
