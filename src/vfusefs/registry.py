"""What the daemon serves: hosts from the config, vfolders from the store, kept in memory.

The request path (`ops.py`) reads this state without I/O; the control API changes it through the
methods here, which write through to the store (on a worker thread), update memory, and tell the
kernel to drop cached entries that no longer hold.  Management errors are `RegistryError` with an
HTTP-like status and a one-line message.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from vfusefs import access, native
from vfusefs.backends import Backend, BackendError, load_backend
from vfusefs.config import Config, HostConfig
from vfusefs.inodes import InodeTable, Kind, Node
from vfusefs.store import SqliteStore, TrashRecord, VfolderRecord
from vfusefs.workers import HostWorkers

log = logging.getLogger(__name__)


class RegistryError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(eq=False)
class Vfolder:
    id: str
    host: "Host"
    record: VfolderRecord
    root: Node | None = None
    modes: dict[Any, access.Mode] = field(default_factory=dict)  # Caller -> mode, per grants
    handles: int = 0  # open file and directory handles: "in use"
    deleted: bool = False

    @property
    def grants(self) -> dict[str, str]:
        return self.record.grants

    def describe(self, mountpoint: str) -> dict[str, Any]:
        r = self.record
        return {"id": self.id, "host": self.host.name,
                "path": os.path.join(mountpoint, self.host.name, self.id),
                "native_path": r.native_path, "scope": r.scope or None,
                "quota_bytes": r.quota_bytes, "quota_inodes": r.quota_inodes,
                "usage_bytes": None, "usage_inodes": None,
                "grants": [{"principal": p, "mode": m} for p, m in sorted(r.grants.items())],
                "open_handles": self.handles, "created": r.created}


@dataclass(eq=False)
class Host:
    name: str
    config: HostConfig
    backend: Backend
    workers: HostWorkers
    node: Node | None = None
    vfolders: dict[str, Vfolder] = field(default_factory=dict)
    health: str = "ok"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.config.backend, "path": self.config.path,
                "layout": self.config.layout, "health": self.health,
                "vfolders": len(self.vfolders)}


def canonical_uuid(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except (ValueError, TypeError, AttributeError):
        raise RegistryError(400, "bad_id", f"bad vfolder id {text!r}: expected a UUID") from None


def parse_scope(text: str | None) -> str:
    if not text:
        return ""
    kind, sep, value = text.partition(":")
    if sep and kind in ("user", "project"):
        try:
            return f"{kind}:{uuid.UUID(value)}"
        except ValueError:
            pass
    raise RegistryError(400, "bad_scope", f"bad scope {text!r}: use user:<uuid> or project:<uuid>")


class Registry:
    def __init__(self, config: Config, store: SqliteStore, table: InodeTable,
                 token: trio.lowlevel.TrioToken) -> None:
        self.config = config
        self.store = store
        self.table = table
        self.token = token
        self.hosts: dict[str, Host] = {}
        self.vfolders: dict[str, Vfolder] = {}
        self.started = time.time()
        # the store gets its own thread so a slow store never waits behind a hung host
        self.store_workers = HostWorkers("store", 1, 30.0, token)
        self.mounted = False  # kernel notifications only make sense once mounted
        self.trash_waiting = trio.Event()  # set when a delete queued data for purging

    # -- start-up -------------------------------------------------------------------------------
    async def load(self) -> None:
        for hc in self.config.hosts.values():
            self._add_host(hc)
        for rec in await self.store_workers.run(self.store.vfolders):
            host = self.hosts.get(rec.host)
            if host is None:
                log.warning("vfolder %s belongs to host %r, which is not configured: not served",
                            rec.id, rec.host)
                continue
            try:
                await self._attach(host, rec)
            except OSError as exc:
                log.error("vfolder %s: native directory %s cannot be opened (%s): not served",
                          rec.id, rec.native_path, exc.strerror)

    def _add_host(self, hc: HostConfig) -> Host:
        backend = load_backend(hc)
        workers = HostWorkers(hc.name, self.config.daemon.io_threads, hc.op_timeout, self.token)
        host = Host(hc.name, hc, backend, workers)
        host.node = self.table.new_virtual(Kind.HOST, host)
        self.hosts[hc.name] = host
        return host

    async def _attach(self, host: Host, rec: VfolderRecord) -> Vfolder:
        vf = Vfolder(rec.id, host, rec)
        fd, st = await host.workers.run(_open_dir, rec.native_path)
        vf.root = self.table.add(Kind.VFROOT, fd, st, vf, parent=host.node.ino if host.node else 1)
        host.vfolders[vf.id] = vf
        self.vfolders[vf.id] = vf
        return vf

    def close(self) -> None:
        for host in self.hosts.values():
            host.workers.stop()
        self.store_workers.stop()

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
            raise RegistryError(404, "no_such_vfolder", f"no vfolder {vfid} on host {host!r}") from None

    # -- changes --------------------------------------------------------------------------------
    async def create_vfolder(self, host_name: str, vfid: str | None = None, scope: str | None = None,
                             quota_bytes: int = 0, quota_inodes: int = 0,
                             grants: list[dict[str, str]] | None = None, adopt: bool = False) -> Vfolder:
        host = self.host(host_name)
        vfid = canonical_uuid(vfid) if vfid else str(uuid.uuid4())
        scope = parse_scope(scope)
        grant_map = parse_grants(grants or [])
        for name, value in (("quota_bytes", quota_bytes), ("quota_inodes", quota_inodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RegistryError(400, "bad_quota", f"{name} must be a non-negative integer")
        if vfid in self.vfolders:
            raise RegistryError(409, "exists", f"vfolder {vfid} already exists")
        try:
            path = host.backend.native_path(uuid.UUID(vfid), scope)
            await host.workers.run(host.backend.create_vfolder, path, adopt)
        except BackendError as exc:
            raise RegistryError(409, "backend", str(exc)) from None
        rec = VfolderRecord(id=vfid, host=host.name, native_path=path, scope=scope,
                            quota_bytes=quota_bytes, quota_inodes=quota_inodes, grants=grant_map)
        await self.store_workers.run(self.store.put_vfolder, rec)
        vf = await self._attach(host, rec)
        log.info("vfolder %s created on host %s at %s", vfid, host.name, path)
        return vf

    async def delete_vfolder(self, host_name: str, vfid: str, force: bool = False) -> str:
        vf = self.vfolder(host_name, vfid)
        if vf.handles and not force:
            raise RegistryError(409, "in_use", f"vfolder {vf.id} is in use ({vf.handles} open "
                                               f"handles); add force=1 to delete anyway")
        host = vf.host
        # hide it first so no new request reaches it, then move the data aside
        vf.deleted = True
        host.vfolders.pop(vf.id, None)
        self.vfolders.pop(vf.id, None)
        if vf.root is not None:
            vf.root.kind = Kind.NATIVE  # no longer pinned: dropped once the kernel forgets it
            self.table.native_fds += 1
        self._invalidate_entry(host, vf.id)
        try:
            moved = await host.workers.run(host.backend.delete_vfolder, vf.record.native_path, vf.id)
        except OSError as exc:
            raise RegistryError(409, "backend", f"cannot move {vf.record.native_path} to trash: "
                                                f"{exc.strerror}") from None
        trash = TrashRecord(moved, host.name, vf.id, time.time()) if moved else None
        await self.store_workers.run(self.store.delete_vfolder, vf.id, trash)
        self.trash_waiting.set()
        log.info("vfolder %s deleted from host %s (data moved to %s)", vf.id, host.name, moved or "-")
        return moved

    async def set_grant(self, host_name: str, vfid: str, principal: str, mode: str | None) -> Vfolder:
        vf = self.vfolder(host_name, vfid)
        try:
            principal = access.parse_principal(principal)
            grants = dict(vf.record.grants)
            if mode is None:
                if principal not in grants:
                    raise RegistryError(404, "no_such_grant", f"no grant for {principal} on {vf.id}")
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
        if not self.mounted:
            return
        inos = [n.ino for n in self.table.of_vfolder(vf)]

        def invalidate() -> None:
            for ino in inos:
                try:
                    pyfuse3.invalidate_inode(ino, attr_only=False)
                except OSError:
                    pass  # the kernel no longer knows it

        await trio.to_thread.run_sync(invalidate)

    def _invalidate_entry(self, host: Host, name: str) -> None:
        if self.mounted and host.node is not None:
            pyfuse3.invalidate_entry_async(host.node.ino, name.encode(), ignore_enoent=True)

    async def purge_trash(self) -> None:
        """Remove trashed vfolder data for good, oldest first (runs in the background)."""
        for rec in list(await self.store_workers.run(lambda: list(self.store.trash()))):
            host = self.hosts.get(rec.host)
            if host is None:
                continue
            try:
                await trio.to_thread.run_sync(host.backend.purge, rec.path)
            except (OSError, BackendError) as exc:
                log.warning("purging %s failed: %s", rec.path, exc)
                continue
            await self.store_workers.run(self.store.trash_purged, rec.path)
            log.info("purged trashed data of vfolder %s (%s)", rec.vfolder, rec.path)


def parse_grants(grants: Any) -> dict[str, str]:
    if not isinstance(grants, list):
        raise RegistryError(400, "bad_grant", "grants must be a list of {principal, mode}")
    out: dict[str, str] = {}
    for g in grants:
        if not isinstance(g, dict) or set(g) != {"principal", "mode"}:
            raise RegistryError(400, "bad_grant", f"bad grant {g!r}: needs exactly principal and mode")
        try:
            out[access.parse_principal(g["principal"])] = access.canonical_mode(g["mode"])
        except access.BadGrant as exc:
            raise RegistryError(400, "bad_grant", str(exc)) from None
    return out


def _open_dir(path: str) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return fd, os.fstat(fd)


__all__ = ["Registry", "RegistryError", "Host", "Vfolder", "native"]
