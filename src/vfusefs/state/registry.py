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
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import trio

from vfusefs import native
from vfusefs.backends import AlreadyThere, Backend, BackendError, consistency, load_backend
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
from vfusefs.fuse.inodes import ROOT_INODE, InodeTable, Kind, Node
from vfusefs.fuse.kernel import KernelCache
from vfusefs.native import copytree, mounts
from vfusefs.runtime.workers import HostWorkers
from vfusefs.state.health import HostHealth
from vfusefs.state.leases import LeaseKeeper
from vfusefs.state.netwatch import NetState, NetWatch
from vfusefs.store import SharedStore, Store, StoreError, TrashRecord, VfolderRecord, node_name

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Vfolder:
    id: str
    host: Host
    record: VfolderRecord
    root: Node | None = None
    modes: dict[Any, access.Mode] = field(default_factory=dict)  # Caller -> mode, per grants
    quota_keys: tuple[str, ...] = ()  # ledger accounts charged: the vfolder's, its scope's
    # files changed lately whose allocation the native fs may still adjust (delayed allocation,
    # speculative preallocation): ino -> (node, monotonic time to stop watching)
    recent: dict[int, tuple[Node, float]] = field(default_factory=dict)
    handles: int = 0  # open file and directory handles: "in use"
    deleted: bool = False
    # files with more than one link: (st_dev, st_ino) -> (st_nlink, names in the vfolder), from
    # the last scan, kept up to date by links and removals through vfusefs (Operations._own_links)
    links: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    links_scan: trio.Event | None = None  # set when the scan counting links in flight ends
    # changes through vfusefs that may move usage: begun so far, and in flight now (a rescan's
    # count is taken only from a walk that none overlapped: Registry._rescan)
    changes: int = 0
    changing: int = 0
    stored: tuple[int, int] = (0, 0)  # usage as the store holds it (the last flush or recount)

    @property
    def grants(self) -> dict[str, str]:
        return self.record.grants

    def describe(self, mountpoint: str, ledger: QuotaLedger | None = None) -> dict[str, Any]:
        r = self.record
        acc = ledger.account(self.quota_keys[0]) if ledger is not None and self.quota_keys else None
        return {
            "id": self.id,
            "host": self.host.name,
            "path": os.path.join(mountpoint, self.host.name, self.id),
            "native_path": r.native_path,
            "scope": r.scope or None,
            "quota_bytes": r.quota_bytes,
            "quota_inodes": r.quota_inodes,
            "usage_bytes": acc.used_bytes if acc else None,
            "usage_inodes": acc.used_inodes if acc else None,
            "grants": [{"principal": p, "mode": m} for p, m in sorted(r.grants.items())],
            "open_handles": self.handles,
            "created": r.created,
        }


@dataclass(eq=False)
class Host:
    name: str
    config: HostConfig
    backend: Backend
    workers: HostWorkers  # the lanes serving FUSE requests
    admin: HostWorkers  # backend calls (create, delete, quotas...): never on the lanes
    node: Node | None = None
    vfolders: dict[str, Vfolder] = field(default_factory=dict)
    health: str = "ok"  # ok, degraded, down: kept by `health_watch` (state/health.py)
    health_watch: HostHealth | None = None
    health_scope: trio.CancelScope | None = None
    fs_type: str = "?"  # of the native path, from mountinfo
    # close() of a written file is passed on (close-to-open: NFS writes back and reports errors
    # then); on a local filesystem it has nothing to do, so flush needs no worker hop there
    flush_needed: bool = True
    # reads are first tried from the page cache on the trio thread (HostWorkers.read_cached):
    # only where RWF_NOWAIT is known to mean "never wait for storage"
    cached_reads: bool = False
    bytes_read: int = 0  # through the mount, since start (metrics)
    bytes_written: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.config.backend,
            "path": self.config.path,
            "layout": self.config.layout,
            "health": self.health,
            "fs_type": self.fs_type,
            "vfolders": len(self.vfolders),
            "capabilities": self.backend.describe()["capabilities"],
        }


# the hyphenated form only (either case): uuid.UUID() also takes braces, "urn:uuid:", no
# hyphens and trailing whitespace, which would turn a typo into a different, valid id
RESCAN_TRIES = 3  # walks a rescan makes of a vfolder that changes through vfusefs meanwhile
RESCAN_RETRY = 1.0  # seconds between them
ADMIN_THREADS = 2  # per host, for backend calls
SNAPSHOT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
OTHERS_FLUSH_WAIT = 0.3  # seconds other nodes get to flush usage around a rescan's walk
TRASH_CLAIM = 3600.0  # seconds a node holds a trash entry it purges (then another may take it)


class Registry:
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
        fd, st = await host.admin.run(_open_dir, rec.native_path)
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

    # -- clones and snapshots -------------------------------------------------------------------
    async def start_clone(
        self,
        host_name: str,
        vfid: str,
        new_id: Any = None,
        scope: Any = None,
        quota_bytes: Any = None,
        quota_inodes: Any = None,
        grants: Any = None,
        snapshot: Any = None,
    ) -> Task:
        """Check a clone of vfid (everything, before anything is made) and start it in the
        background; the new vfolder exists only once it is complete (Registry._clone).  It
        gets the source's scope, limits and grants unless given."""
        src = self.vfolder(host_name, vfid)
        host = src.host
        if host.backend.capabilities.clone is None:
            raise RegistryError(409, "backend", f"backend {host.backend.name} cannot clone")
        new_id = str(uuid.uuid4()) if new_id is None else canonical_uuid(new_id)
        scope = src.record.scope if scope is None else parse_scope(scope)
        grant_map = dict(src.record.grants) if grants is None else parse_grants(grants)
        qb, qi = parse_limits(quota_bytes, quota_inodes)
        qb = src.record.quota_bytes if qb is None else qb
        qi = src.record.quota_inodes if qi is None else qi
        if snapshot is not None and not isinstance(snapshot, str):
            raise RegistryError(400, "bad_snapshot", "snapshot must be a snapshot's name")
        if snapshot is not None and not host.backend.capabilities.snapshots:
            raise RegistryError(409, "backend", f"backend {host.backend.name} has no snapshots")
        try:
            path = host.backend.native_path(uuid.UUID(new_id), scope)
        except BackendError as exc:
            raise RegistryError(409, "backend", str(exc)) from None
        if new_id in self.vfolders or await self.store_workers.run(self.store.has_vfolder, new_id):
            raise RegistryError(409, "exists", f"vfolder {new_id} already exists")
        if any(t.vfolder == new_id and t.state == "running" for t in self.tasks.values()):
            raise RegistryError(409, "exists", f"a clone into {new_id} is running")
        if await host.admin.run(os.path.lexists, path):  # never a syscall on the event loop
            raise RegistryError(409, "native_exists", f"native directory {path} already exists")
        used = self.ledger.account(src.quota_keys[0])
        self._check_fits(new_id, scope, qb, qi, used.used_bytes, used.used_inodes)
        if self.nursery is None:
            raise RegistryError(409, "not_ready", "the daemon is not ready for background tasks")
        task = Task(
            id=str(uuid.uuid4()), kind="clone", host=host.name, vfolder=new_id, source=src.id
        )
        task.total_files, task.total_bytes = used.used_inodes, used.used_bytes
        self.tasks[task.id] = task
        rec = VfolderRecord(
            id=new_id,
            host=host.name,
            native_path=path,
            scope=scope,
            quota_bytes=qb,
            quota_inodes=qi,
            grants=grant_map,
        )
        self.nursery.start_soon(self._clone, src, rec, snapshot, task)
        log.info(
            "clone of vfolder %s into %s started (%s)",
            src.id,
            new_id,
            host.backend.capabilities.clone,
            extra={"host": host.name, "vfolder": src.id},
        )
        return task

    def _check_fits(
        self, vfid: str, scope: str, qb: int, qi: int, nbytes: int, inodes: int
    ) -> None:
        """RegistryError (409 quota) unless a vfolder using this much fits its limits and its
        scope's room."""
        if (qb and nbytes > qb) or (qi and inodes > qi):
            raise RegistryError(
                409,
                "quota",
                f"the clone {vfid} would use {nbytes} bytes and {inodes} inodes: more than its "
                f"limits ({qb or 'no'} bytes, {qi or 'no'} inodes); give larger ones",
            )
        if scope:
            acc = self.ledger.account(f"scope:{scope}")
            if (acc.limit_bytes and acc.used_bytes + nbytes > acc.limit_bytes) or (
                acc.limit_inodes and acc.used_inodes + inodes > acc.limit_inodes
            ):
                raise RegistryError(
                    409, "quota", f"the clone {vfid} does not fit the room left in scope {scope}"
                )

    async def _clone(
        self, src: Vfolder, rec: VfolderRecord, snapshot: str | None, task: Task
    ) -> None:
        """Make the copy under a hidden name, check it still fits, then give it its name, its
        native limits and its record: until then nothing lists it, and on any failure what
        was made is removed."""
        host = src.host
        hidden = os.path.join(
            os.path.dirname(rec.native_path), f".{os.path.basename(rec.native_path)}.clone"
        )

        def progress(files: int, nbytes: int) -> None:
            task.done_files, task.done_bytes = files, nbytes

        placed = False
        try:
            async with self._lifecycle(rec.id):
                await trio.to_thread.run_sync(
                    host.backend.clone,
                    src.record.native_path,
                    hidden,
                    snapshot,
                    progress,
                    lambda: task.cancel,
                )
                fd, _ = await trio.to_thread.run_sync(_open_dir, hidden)
                try:
                    found = await trio.to_thread.run_sync(native.scan, fd)
                finally:
                    os.close(fd)
                task.done_files, task.done_bytes = found.inodes, found.bytes
                task.total_files, task.total_bytes = found.inodes, found.bytes
                self._check_fits(
                    rec.id, rec.scope, rec.quota_bytes, rec.quota_inodes, found.bytes, found.inodes
                )
                if await self.store_workers.run(self.store.has_vfolder, rec.id):
                    raise RegistryError(409, "exists", f"vfolder {rec.id} was made meanwhile")
                await trio.to_thread.run_sync(_place, hidden, rec.native_path)
                placed = True
                if rec.quota_bytes or rec.quota_inodes:
                    await self._push_native_quota(
                        host, rec.native_path, rec.quota_bytes, rec.quota_inodes
                    )
                await self.store_workers.run(self.store.put_vfolder, rec)
                try:
                    vf = await self._attach(host, rec)
                    await self.store_workers.run(
                        self.store.set_usage, vf.id, found.bytes, found.inodes
                    )
                    self.set_usage(vf, found.bytes, found.inodes)
                    vf.stored = (found.bytes, found.inodes)
                except BaseException:
                    stale = self.vfolders.get(rec.id)
                    if stale is not None:
                        self._stop_serving(stale)
                    with trio.CancelScope(shield=True):
                        await self.store_workers.run(self.store.delete_vfolder, rec.id, None)
                    raise
                self._invalidate_entry(host, rec.id)  # the kernel may remember it as absent
                task.result = vf.describe(self.config.daemon.mountpoint, self.ledger)
                task.state = "done"
                log.info(
                    "clone of vfolder %s into %s done: %d files, %d bytes",
                    src.id,
                    rec.id,
                    found.inodes,
                    found.bytes,
                    extra={"host": host.name, "vfolder": rec.id},
                )
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                for made in (hidden, rec.native_path) if placed else (hidden,):
                    try:
                        await trio.to_thread.run_sync(host.backend.remove_new_vfolder, made)
                    except (OSError, BackendError) as cleanup:
                        log.error("clone into %s: could not remove %s: %s", rec.id, made, cleanup)
            task.state = "failed"
            task.error = (
                exc.message
                if isinstance(exc, RegistryError)
                else "the daemon stopped"
                if isinstance(exc, (trio.Cancelled, copytree.CopyCancelled))
                else getattr(exc, "strerror", None) or str(exc)
            )
            log.warning(
                "clone of vfolder %s into %s failed (nothing left of it): %s",
                src.id,
                rec.id,
                task.error,
                extra={"host": host.name, "vfolder": src.id},
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            task.finished = time.time()

    async def snapshots(self, host_name: str, vfid: str) -> list[str]:
        vf = self.vfolder(host_name, vfid)
        backend = vf.host.backend
        if not backend.capabilities.snapshots:
            raise RegistryError(409, "backend", f"backend {backend.name} has no snapshots")
        return await vf.host.admin.run(backend.snapshots, vf.record.native_path)

    async def take_snapshot(self, host_name: str, vfid: str, name: Any) -> str:
        vf = self.vfolder(host_name, vfid)
        backend = vf.host.backend
        if not backend.capabilities.snapshots:
            raise RegistryError(409, "backend", f"backend {backend.name} has no snapshots")
        if not isinstance(name, str) or not SNAPSHOT_NAME_RE.fullmatch(name):
            raise RegistryError(
                400, "bad_snapshot", "a snapshot name is 1-100 letters, digits, '.', '_' or '-'"
            )
        try:
            await vf.host.admin.run(backend.snapshot, vf.record.native_path, name)
        except AlreadyThere as exc:
            raise RegistryError(409, "exists", str(exc)) from None
        except BackendError as exc:
            raise RegistryError(502, "backend", str(exc)) from None
        return name

    async def delete_snapshot(self, host_name: str, vfid: str, name: str) -> None:
        vf = self.vfolder(host_name, vfid)
        backend = vf.host.backend
        if not backend.capabilities.snapshots:
            raise RegistryError(409, "backend", f"backend {backend.name} has no snapshots")
        if name not in await vf.host.admin.run(backend.snapshots, vf.record.native_path):
            raise RegistryError(404, "no_such_snapshot", f"no snapshot {name!r} of {vfid}")
        try:
            await vf.host.admin.run(backend.delete_snapshot, vf.record.native_path, name)
        except BackendError as exc:
            raise RegistryError(502, "backend", str(exc)) from None

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


@dataclass
class Task:
    """A background task (rescan, clone), as GET /v1/tasks/{id} shows it."""

    id: str
    kind: str
    host: str
    vfolder: str  # the vfolder recounted, or the clone's new id
    state: str = "running"  # running, done, failed
    done_files: int = 0
    done_bytes: int = 0
    total_files: int | None = None  # once known
    total_bytes: int | None = None
    error: str = ""
    applied: bool = False  # a rescan's count became the vfolder's usage (see Registry._rescan)
    source: str = ""  # a clone's source vfolder
    result: dict[str, Any] | None = None  # a clone's new vfolder, once done
    cancel: bool = False  # the daemon is stopping: a clone gives up and removes what it made
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("result", "cancel")}
        if self.kind != "clone":
            del out["source"]
        elif self.result is not None:
            out["vfolder"] = self.result  # SPEC: a clone's task names its new vfolder's object
        return out


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


def _attach_fields(hc: HostConfig) -> tuple[Any, ...]:
    """What decides where a host's vfolders live: changing any of it re-attaches the host."""
    return hc.backend, hc.path, hc.layout, hc.options


def _place(hidden: str, path: str) -> None:
    """Give a finished clone its name (a rename: it appears whole, or not at all)."""
    if os.path.lexists(path):
        raise RegistryError(409, "native_exists", f"native directory {path} appeared meanwhile")
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    os.rename(hidden, path)


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


def _open_dir(path: str) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return fd, os.fstat(fd)


# the validation the control API relies on is domain.validation's, re-exported here
__all__ = [
    "Host",
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
