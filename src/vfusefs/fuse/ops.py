"""The data path: every FUSE request, from inode to native syscall.  `Operations` is the
handlers; two parts it is made of live beside it: `charging.py` (reserve, run, charge or
refund: the quota around every native call) and `virtual.py` (the root and host directories,
statfs, the `user.vfusefs.*` xattrs), on the state they share (`opsbase.py`).

Each handler reads the same way: resolve the inode, decide access for the caller (`access.py`),
run the native syscalls for the operation in one hop on the host's worker thread (`native.py`),
update the inode table, reply.  Exceptions are mapped to errno in one place (`errors.py`).

The tree:   /              virtual, lists hosts, read-only to everyone
            /<host>        virtual, lists the vfolders the caller may use, read-only
            /<host>/<id>   a vfolder: its native directory, delegated

What must never happen here: a blocking syscall on the event loop (pyfuse3 runs every handler on
one trio thread), a native path rebuilt from strings (we go through O_PATH fds and *at calls), or
an exception other than FUSEError escaping a handler (it would end the mount).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import pyfuse3

from vfusefs import native
from vfusefs.config import DaemonConfig
from vfusefs.domain import access
from vfusefs.domain.access import Caller, Mode, Need, TokenCaller
from vfusefs.fuse.callers import CallerCache, FilesContext
from vfusefs.fuse.charging import (
    BLOCK,
    Charging,
    _locked,
    _tracked,
    changing,
)
from vfusefs.fuse.errors import fail, handler
from vfusefs.fuse.fdbudget import FdBudget
from vfusefs.fuse.inodes import ROOT_INODE, InodeTable, Kind, Node
from vfusefs.fuse.virtual import XATTR_PREFIX, VirtualTree
from vfusefs.runtime import fuseshim
from vfusefs.service.metrics import DENIAL_REASONS, FOREIGN_LINK, PRIVILEGED, READ_ONLY_TREE, OpStat
from vfusefs.state.records import Host, Vfolder
from vfusefs.state.registry import Registry

log = logging.getLogger(__name__)

# operations whose first argument is a file handle, not an inode (for the host label)
FH_OPS = frozenset(
    {"read", "write", "flush", "fsync", "release", "readdir", "releasedir", "fsyncdir"}
)
READDIR_CHUNK = 256  # native entries read (and stat'ed) per worker hop
CAPABILITY_XATTR = b"security.capability"  # file capabilities: privilege, like a setuid bit
SET_ID = stat_mod.S_ISUID | stat_mod.S_ISGID


def plants_privilege(mode: int) -> bool:
    """A device node, or a set-user/group-ID bit on anything but a directory (set-group-ID on a
    directory only passes its group on: no privilege)."""
    kind = stat_mod.S_IFMT(mode)
    if kind in (stat_mod.S_IFCHR, stat_mod.S_IFBLK):
        return True
    return bool(mode & stat_mod.S_ISUID or mode & stat_mod.S_ISGID and kind != stat_mod.S_IFDIR)


UNCHECKED = Caller(0, 0, 0, "/")  # the caller of every request when checks are off (bench only)


class FileHandle:
    __slots__ = ("fd", "node", "caller", "admin", "dirty", "writable", "direct", "cached")

    def __init__(
        self, fd: int, node: Node, caller: Caller, admin: bool, writable: bool, flags: int
    ) -> None:
        self.fd = fd
        self.node = node
        self.caller = caller
        self.admin = admin
        self.dirty = False
        self.writable = writable
        self.direct = bool(flags & os.O_DIRECT)  # native I/O needs aligned buffers
        # reads try the page cache on the trio thread first (HostWorkers.read_cached); not
        # with O_DIRECT, where even a RWF_NOWAIT read waits for the device
        self.cached = node.host.cached_reads and not self.direct  # type: ignore[union-attr]


class DirHandle:
    __slots__ = (
        "node",
        "caller",
        "admin",
        "stream",
        "buffer",
        "next_off",
        "virtual",
        "dot_attrs",
        "fd_wait",
    )

    def __init__(self, node: Node, caller: Caller, admin: bool) -> None:
        self.node = node
        self.caller = caller
        self.admin = admin
        self.stream: native.DirStream | None = None
        self.buffer: deque[tuple[bytes, native.Entry]] = deque()
        self.next_off = 0  # offset of the next entry to send: 0 ".", 1 "..", 2... native
        self.virtual: list[tuple[bytes, Node]] | None = None
        self.dot_attrs: os.stat_result | None = None
        self.fd_wait = True  # at the fd limit, wait for the kernel to forget entries (readdir)


class Operations(VirtualTree, Charging):
    supports_dot_lookup = False  # the kernel never asks us for "." or ".." by name
    enable_acl = False

    def __init__(self, registry: Registry, daemon: DaemonConfig) -> None:
        super().__init__()
        self.registry = registry
        self.table: InodeTable = registry.table
        self.ledger = registry.ledger
        self.daemon = daemon
        self.enable_writeback_cache = daemon.writeback_cache
        self.timeout = daemon.entry_timeout
        self.callers = CallerCache(daemon.admin_uids, daemon.confined_cgroups)
        self.handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = 1
        self.started_ns = time.time_ns()
        # access checks; VFUSEFS_BENCH_NO_ACCESS_CHECKS=1 turns them off so bench/ can measure
        # their cost (everyone is then an admin: never on a real node)
        self.checks = os.environ.get("VFUSEFS_BENCH_NO_ACCESS_CHECKS") != "1"
        if not self.checks:
            log.warning("ACCESS CHECKS ARE OFF (VFUSEFS_BENCH_NO_ACCESS_CHECKS=1): benchmark only")
        self.stats: dict[tuple[str, str, int], OpStat] = {}  # (host, op, errno) -> stats
        self.denied: dict[tuple[str, str], int] = {}  # (host, reason) -> refused requests
        self.fds = FdBudget(registry, daemon.inode_fds)  # O_PATH fds: fuse/fdbudget.py

    # -- bookkeeping ----------------------------------------------------------------------------
    def host_label(self, op: str, args: tuple[Any, ...]) -> str:
        """The host a request is about, for metrics: "-" for the root and host-less requests."""
        key = args[0] if args else None
        if type(key) is not int:
            return "-"
        if op in FH_OPS:
            h = self.handles.get(key)
            node = h.node if h is not None else None
        else:
            node = self.table.get(key)
        host = node.host if node is not None else None
        return host.name if host is not None else "-"

    def observe(self, host: str, op: str, code: int, seconds: float) -> None:
        entry = self.stats.get((host, op, code))
        if entry is None:
            entry = self.stats[(host, op, code)] = OpStat()
        entry.add(seconds)

    def _deny(self, node: Node, code: int, reason: str | None = None) -> pyfuse3.FUSEError:
        """Count a refusal by access mode or quota (vfusefs_denied_total) and return its error."""
        key = (
            node.host.name if node.host is not None else "-",
            reason or DENIAL_REASONS.get(code, "other"),
        )
        self.denied[key] = self.denied.get(key, 0) + 1
        return fail(code)

    def _new_fh(self, h: FileHandle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        if h.node.vf is not None:
            h.node.vf.handles += 1
        if isinstance(h, FileHandle):
            h.node.opens += 1
        return fh

    def _drop_fh(self, fh: int) -> FileHandle | DirHandle:
        h = self.handles.pop(fh, None)
        if h is None:
            raise fail(errno.EBADF)
        if h.node.vf is not None:
            h.node.vf.handles -= 1
        return h

    def _node(self, ino: int) -> Node:
        node = self.table.get(ino)
        if node is None or node.fd == -1 and node.kind in (Kind.NATIVE, Kind.VFROOT):
            raise fail(errno.ESTALE)
        if node.vf is not None and node.vf.deleted:
            raise fail(errno.ENOENT)
        return node

    # -- access ---------------------------------------------------------------------------------
    def _caller(self, ctx: pyfuse3.RequestContext) -> tuple[Caller, bool]:
        if type(ctx) is FilesContext:  # type: ignore[comparison-overlap]  # the file API's
            return ctx.caller, ctx.admin  # (fuse/files.py) says who asks
        if not self.checks:
            return UNCHECKED, True
        return self.callers.caller(ctx.uid, ctx.gid, ctx.pid)

    def _mode(self, caller: Caller, admin: bool, vf: Vfolder) -> Mode:
        if admin or not self.checks:
            return Mode.ADMIN
        mode = vf.modes.get(caller)  # emptied whenever the vfolder's grants change
        if mode is None:
            if type(caller) is TokenCaller:  # never cached: a token's mode is its own
                return caller.mode_on(vf.id)
            grants = vf.grants
            full = self.callers.with_groups(caller) if access.needs_groups(grants) else caller
            mode = access.effective_mode(full, grants)
            if len(vf.modes) >= 4096:
                vf.modes.clear()
            vf.modes[caller] = mode
        return mode

    def _allow(self, ctx: pyfuse3.RequestContext, node: Node, need: Need) -> tuple[Caller, bool]:
        """Raise the SPEC §3 errno unless the caller may do `need` at node."""
        caller, admin = self._caller(ctx)
        if node.vf is None:  # root and host directories
            if need is not Need.READ:
                raise self._deny(node, errno.EPERM, READ_ONLY_TREE)
            return caller, admin
        code = access.check(self._mode(caller, admin, node.vf), need)
        if code:
            raise self._deny(node, code)
        return caller, admin

    def _recheck(self, h: FileHandle | DirHandle, need: Need) -> None:
        """Grants change live: every request on an open handle is decided again."""
        vf = h.node.vf
        if vf is None:
            return
        if vf.deleted:
            raise fail(errno.ENOENT)
        code = access.check(self._mode(h.caller, h.admin, vf), need)
        if code:
            raise self._deny(h.node, code)

    def _visible(self, caller: Caller, admin: bool, vf: Vfolder) -> bool:
        return self._mode(caller, admin, vf) is not Mode.NONE

    def _no_plants(self, ctx: pyfuse3.RequestContext, node: Node) -> None:
        """SPEC §3: what a container makes must not carry privilege on native storage, which
        other hosts and nodes may mount without nosuid/nodev.  EPERM for a confined caller
        unless the host allows it (allow_privileged); admins and host users are unaffected
        (the kernel already holds those to their own capabilities)."""
        host = node.host
        if host is not None and host.config.allow_privileged or not self.checks:
            return
        caller, admin = self._caller(ctx)
        if not admin and self.callers.in_container(caller):
            raise self._deny(node, errno.EPERM, PRIVILEGED)

    # -- hard links -----------------------------------------------------------------------------
    async def _own_links(self, node: Node) -> None:
        """SPEC §3: no native hard link lets a caller out.  A file whose link count says it has
        names the vfolder does not hold (`ln /elsewhere/secret <native dir>/x` on the native side)
        is not opened, read, written or changed through the vfolder: EACCES.  Costs nothing
        for files with one link; the names of multiply linked files are counted by a walk of
        the vfolder when a link count is new (Registry.count_links), and links and removals
        made through vfusefs keep that count."""
        if node.kind is not Kind.NATIVE or node.vf is None:
            return
        vf = node.vf
        if self._links_whole(vf, await self._stat(node)):
            return
        st = await self._run(node, native.fstat, node.fd)  # the remembered stat may be old
        self._fresh(node, st)
        if self._links_whole(vf, st):
            return
        known = vf.links.get((st.st_dev, st.st_ino))
        if known is None or known[0] != st.st_nlink:  # not counted at this link count yet
            await self.registry.count_links(vf)
            st = await self._run(node, native.fstat, node.fd)
            self._fresh(node, st)
            if self._links_whole(vf, st):
                return
        raise self._deny(node, errno.EACCES, FOREIGN_LINK)

    @staticmethod
    def _links_whole(vf: Vfolder, st: os.stat_result) -> bool:
        """Whether every link of st is a name in vf, as far as vf.links knows."""
        if st.st_nlink <= 1 or stat_mod.S_ISDIR(st.st_mode):
            return True
        known = vf.links.get((st.st_dev, st.st_ino))
        return known is not None and known[0] == st.st_nlink and known[1] >= st.st_nlink

    @staticmethod
    def _link_removed(vf: Vfolder | None, victim: os.stat_result | None) -> None:
        """One of victim's names went through vfusefs: keep the count of its names."""
        if vf is None or victim is None or victim.st_nlink <= 1 or stat_mod.S_ISDIR(victim.st_mode):
            return
        key = (victim.st_dev, victim.st_ino)
        known = vf.links.pop(key, None)
        if known is not None and known[0] == victim.st_nlink and victim.st_nlink > 2:
            vf.links[key] = (known[0] - 1, known[1] - 1)

    # -- attributes -----------------------------------------------------------------------------
    def _fresh(self, node: Node, st: os.stat_result) -> None:
        """Remember a stat taken after our last change to node; getattr may answer from it."""
        node.st = st
        node.st_until = time.monotonic() + self.timeout

    async def _stat(self, node: Node) -> os.stat_result:
        """node's stat: the remembered one while fresh (its expiry is not pushed back by being
        used), else one from native storage, remembered."""
        if node.st is not None and time.monotonic() < node.st_until:
            return node.st  # type: ignore[no-any-return]
        if node.kind is Kind.VFROOT and node.st is not None and self._down(node):
            return node.st  # type: ignore[no-any-return]  # its virtual xattrs stay readable
        st = await self._run(node, native.fstat, node.fd)
        self._fresh(node, st)
        return st  # type: ignore[no-any-return]

    @staticmethod
    def _down(node: Node) -> bool:
        return node.host is not None and node.host.health == "down"

    def _stale(self, st: os.stat_result | None, vf: Vfolder | None) -> None:
        """An inode changed in a way we have no new stat for (a link of it went away)."""
        if st is not None and vf is not None:
            node = self.table.find(vf, st)
            if node is not None:
                node.st_until = 0.0

    def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        # vfolder roots are looked up per caller in a host dir: never let the kernel reuse that
        a.entry_timeout = 0 if node.kind is Kind.VFROOT else self.timeout
        a.attr_timeout = self.timeout
        return a

    async def _run(self, node: Node, fn: Any, *args: Any) -> Any:
        host = node.host
        assert host is not None
        return await host.workers.run(fn, *args)

    def _adopt(self, parent: Node, name: bytes, entry: native.Entry) -> Node | None:
        """The node for a native inode just reached (None if a lost race needs a fresh fd)."""
        vf = parent.vf
        assert vf is not None
        node = self.table.find(vf, entry.st)
        if node is not None:
            self.table.lingering.pop(node.ino, None)  # the kernel knows it again
            if entry.fd is not None:
                node.host.workers.close_soon([entry.fd])  # type: ignore[union-attr]
            if node.kind is Kind.NATIVE:
                node.parent, node.name = parent.ino, name
            return node
        if entry.fd is None:
            return None
        node = self.table.add(Kind.NATIVE, entry.fd, entry.st, vf, parent.ino, name)
        if self.table.native_fds > self.fds.high:
            self.fds.prune()
        return node

    async def _reach(self, parent: Node, name: bytes, entry: native.Entry) -> Node:
        node = self._adopt(parent, name, entry)
        if node is None:  # forgotten between the worker's check and now: open it after all
            entry = await self._run(parent, native.open_path, parent.fd, name)
            node = self._adopt(parent, name, entry)
            assert node is not None
        if entry.xattrs is not None:
            node.xattrs = entry.xattrs
            node.xattrs_until = time.monotonic() + self.timeout
        return node

    def _absent_xattr(self, node: Node, name: bytes) -> bool:
        """True if the cached name list (fresh as cached attributes are) says name is absent."""
        return (
            node.xattrs is not None
            and name not in node.xattrs
            and time.monotonic() < node.xattrs_until
        )

    @staticmethod
    def _xattr_changed(node: Node, name: bytes, present: bool) -> None:
        if node.xattrs is not None:
            node.xattrs = node.xattrs | {name} if present else node.xattrs - {name}

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        node.nlookup += 1
        self._fresh(node, st)
        return self._attrs(node, st)

    # -- names ----------------------------------------------------------------------------------
    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.kind is Kind.ROOT:
            host = self.registry.hosts.get(name.decode(errors="replace"))
            if host is None or host.node is None:
                raise fail(errno.ENOENT)
            host.node.nlookup += 1
            return self._virtual_attrs(host.node)
        if parent.kind is Kind.HOST:
            assert parent.host is not None
            vf = parent.host.vfolders.get(name.decode(errors="replace"))
            caller, admin = self._caller(ctx)
            if vf is None or vf.root is None or not self._visible(caller, admin, vf):
                raise fail(errno.ENOENT)
            # entry_timeout 0 makes every path walk look the vfolder up again (visibility is
            # per caller); its attributes may be as old as any cached attribute, so no hop here
            st = await self._stat(vf.root)
            vf.root.nlookup += 1
            return self._attrs(vf.root, st)
        self._allow(ctx, parent, Need.READ)
        if self.fds.held() >= self.fds.hard:  # an O_PATH fd for an inode new to the kernel
            await self.fds.room(parent)
        vfid = parent.vf.id  # type: ignore[union-attr]
        entry = await self._run(parent, native.lookup, parent.fd, name, self.table.by_key, vfid)
        node = await self._reach(parent, name, entry)
        return self._entry(node, entry.st)

    @handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        closing: dict[Host, list[int]] = {}
        self.fds.forgotten += len(inode_list)
        for ino, count in inode_list:
            node = self.table.get(ino)
            if node is None:
                continue
            host = node.host
            vf = node.vf
            if (
                vf is not None
                and node.ino in vf.recent
                and node.nlookup <= count
                and node.kind is Kind.NATIVE
            ):
                # changed lately: the native fs may still settle its blocks (delayed allocation),
                # so its fd stays until its watch ends (Registry.reconcile drops it then)
                node.nlookup = 0
                self.table.lingering[node.ino] = node
                continue
            fd = self.table.forget(ino, count)
            if fd >= 0 and host is not None:
                closing.setdefault(host, []).append(fd)
        for host, fds in closing.items():
            host.workers.close_soon(fds)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.vf is None:
            return self._virtual_attrs(node)
        self._allow(ctx, node, Need.READ)
        return self._attrs(node, await self._stat(node))

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        self._allow(ctx, node, Need.WRITE)
        await self._own_links(node)
        if self._setattr_is_noop(node, attr, fields):
            # after an unlink the kernel "sets" ctime and the mtime it already has: nothing to do
            # natively (no syscall sets ctime); answer uncached so the next stat asks us
            node.st_until = 0.0
            a = self._attrs(node, node.st)
            a.attr_timeout = 0
            return a
        if fields.update_mode and attr.st_mode & SET_ID:
            old_mode = (await self._stat(node)).st_mode
            # only bits it adds: a chmod u+w of a set-ID file an admin made still works
            if plants_privilege(stat_mod.S_IFMT(old_mode) | attr.st_mode & ~old_mode):
                self._no_plants(ctx, node)
        h = self.handles.get(fh) if fh is not None else None
        datafd = h.fd if isinstance(h, FileHandle) else None
        # a truncate allocates nothing (the new range is a hole): reserve 0, charge what changed
        self._watch(node)
        st = (
            await self._charged(
                node,
                0,
                0,
                _tracked(node, native.setattr),
                node.fd,
                datafd,
                attr.st_mode if fields.update_mode else None,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
                attr.st_size if fields.update_size else None,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
                False,
                False,
            )
        ).st
        self._fresh(node, st)
        return self._attrs(node, st)

    @staticmethod
    def _setattr_is_noop(
        node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> bool:
        """Only an mtime the fresh remembered stat already has.  Never atime: reading a file or
        listing a directory through us moves the native atime without a new stat."""
        st = node.st
        if (
            st is None
            or time.monotonic() >= node.st_until
            or fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_size
            or fields.update_atime
        ):
            return False
        return not (fields.update_mtime and attr.st_mtime_ns != st.st_mtime_ns)

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        self._allow(ctx, node, Need.READ)
        await self._own_links(node)
        return await self._run(node, native.readlink, node.fd)  # type: ignore[no-any-return]

    # -- making and removing names ----------------------------------------------------------------
    def _mkparent(self, parent_inode: int, ctx: pyfuse3.RequestContext) -> Node:
        parent = self._node(parent_inode)
        self._allow(ctx, parent, Need.WRITE)
        return parent

    async def _made(self, parent: Node, name: bytes, made: native.Made) -> pyfuse3.EntryAttributes:
        self._fresh(parent, made.parent_st)
        node = await self._reach(parent, name, made.entry)
        return self._entry(node, made.entry.st)

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._mkparent(parent_inode, ctx)
        if plants_privilege(mode):
            self._no_plants(ctx, parent)
        made = await self._charged(
            parent,
            BLOCK,
            1,
            native.mknod,
            parent.fd,
            name,
            mode & ~ctx.umask,
            rdev,
            ctx.uid,
            ctx.gid,
        )
        return await self._made(parent, name, made)

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._mkparent(parent_inode, ctx)
        made = await self._charged(
            parent,
            2 * BLOCK,
            1,
            native.mkdir,
            parent.fd,
            name,
            mode & ~ctx.umask & 0o7777,
            ctx.uid,
            ctx.gid,
        )
        return await self._made(parent, name, made)

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._mkparent(parent_inode, ctx)
        made = await self._charged(
            parent,
            BLOCK + -(-len(target) // BLOCK) * BLOCK,
            1,
            native.symlink,
            parent.fd,
            name,
            target,
            ctx.uid,
            ctx.gid,
        )
        return await self._made(parent, name, made)

    @staticmethod
    def _same_vfolder(a: Node, b: Node) -> Vfolder:
        """Links and renames stay inside one vfolder: EXDEV across vfolders and hosts, EPERM
        for the read-only root and host levels."""
        if a.vf is None or b.vf is None:
            raise fail(errno.EPERM)
        if a.vf is not b.vf:
            raise fail(errno.EXDEV)
        return a.vf

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        vf = self._same_vfolder(node, parent)
        self._allow(ctx, parent, Need.WRITE)
        await self._own_links(node)
        linked = await self._charged(parent, BLOCK, 0, native.link, node.fd, parent.fd, new_name)
        st = linked.st
        vf.links[(st.st_dev, st.st_ino)] = (st.st_nlink, st.st_nlink)  # every name is ours
        self._fresh(parent, linked.parent_st)
        return self._entry(node, st)

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        self._allow(ctx, parent, Need.DELETE)
        with changing(parent.vf):
            gone = await self._run(
                parent, _locked, self._locks((parent,)), native.unlink, parent.fd, name
            )
            victim = gone.victim
            self._link_removed(parent.vf, victim)
            more_bytes, more_inodes = self._victim_correction(parent.vf, victim, gone.grown_inodes)
            self._release(parent, gone.grown_bytes + more_bytes, gone.grown_inodes + more_inodes)
        self._fresh(parent, gone.parent_st)
        self._stale(victim, parent.vf)  # its link count dropped; other links may remain

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        self._allow(ctx, parent, Need.DELETE)
        with changing(parent.vf):
            gone = await self._run(
                parent, _locked, self._locks((parent,)), native.rmdir, parent.fd, name
            )
            self._release(parent, gone.grown_bytes, gone.grown_inodes)
        self._fresh(parent, gone.parent_st)

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._node(parent_inode_old)
        new = self._node(parent_inode_new)
        vf = self._same_vfolder(old, new)
        caller, admin = self._caller(ctx)
        mode = self._mode(caller, admin, vf)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        code = access.check(mode, Need.DELETE if exchange else Need.WRITE)
        if code:
            raise self._deny(old, code)
        # rw may rename but not replace: ask the kernel for NOREPLACE so no race can slip one in
        forbid_replace = mode == Mode.RW and not flags & pyfuse3.RENAME_NOREPLACE
        # RENAME_WHITEOUT leaves a new inode (a 0:0 char device, for overlayfs) at the old name:
        # charged like a create, and refused like one at the inode limit
        whiteout = 1 if flags & native.RENAME_WHITEOUT else 0
        try:
            # the target directory may grow by a block; a replaced last link frees its bytes
            renamed = await self._charged(
                old,
                BLOCK,
                whiteout,
                native.rename,
                old.fd,
                name_old,
                new.fd,
                name_new,
                flags | (native.RENAME_NOREPLACE if forbid_replace else 0),
                lock=(old, new),
            )
        except FileExistsError:
            if forbid_replace:
                raise self._deny(old, errno.EPERM) from None
            raise fail(errno.EEXIST) from None
        self._fresh(old, renamed.old_st)
        self._fresh(new, renamed.new_st)
        victim, moved = renamed.victim, renamed.moved
        self._stale(victim, new.vf)
        # rename charged what a replaced last link's stat said; the ledger may hold other for it
        if not exchange:
            self._link_removed(vf, victim)
        self._release(new, *self._victim_correction(vf, victim, renamed.grown_inodes - whiteout))
        self._stale(moved, new.vf)  # its ctime changed
        if moved is not None and stat_mod.S_ISDIR(moved.st_mode):
            node = self.table.find(vf, moved)
            if node is not None:
                node.parent = new.ino

    # -- files ----------------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        if self.enable_writeback_cache:
            # the kernel may read to fill pages of a write-only file, and it handles O_APPEND
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags

    @staticmethod
    def _writes(flags: int) -> bool:
        return flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        writes = self._writes(flags)
        caller, admin = self._allow(ctx, node, Need.WRITE if writes else Need.READ)
        if flags & os.O_TRUNC:  # a change like a truncate: new size and times, blocks freed
            await self._own_links(node)  # before it changes anything; again below
            self._watch(node)
            fd, st, *_ = await self._charged(
                node, 0, 0, _tracked(node, native.open_truncating), node.fd, self._open_flags(flags)
            )
        else:
            fd, st = await self._run(node, native.open_data, node.fd, self._open_flags(flags))
        self._fresh(node, st)
        if st.st_nlink > 1:  # as of the open: a link made natively a moment ago counts
            try:
                await self._own_links(node)
            except BaseException:
                node.host.workers.close_soon([fd])  # type: ignore[union-attr]
                raise
        fh = self._new_fh(FileHandle(fd, node, caller, admin, writes, flags))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._mkparent(parent_inode, ctx)
        caller, admin = self._caller(ctx)
        if plants_privilege(stat_mod.S_IFREG | mode):
            self._no_plants(ctx, parent)
        created = await self._charged(
            parent,
            BLOCK,
            1,
            native.create,
            parent.fd,
            name,
            self._open_flags(flags),
            mode & ~ctx.umask & 0o7777,
            ctx.uid,
            ctx.gid,
        )
        fd, entry = created.fd, created.entry
        self._fresh(parent, created.parent_st)
        try:
            node = await self._reach(parent, name, entry)
            if not created.grown_inodes:  # it was there (made natively since the kernel looked)
                self._fresh(node, entry.st)
                await self._own_links(node)
        except BaseException:
            parent.host.workers.close_soon([fd])  # type: ignore[union-attr]
            raise
        fh = self._new_fh(FileHandle(fd, node, caller, admin, True, flags))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(node, entry.st)

    def _file(self, fh: int) -> FileHandle:
        return self._handle(fh, FileHandle)  # type: ignore[return-value]

    def _handle(self, fh: int, kind: type) -> FileHandle | DirHandle:
        h = self.handles.get(fh)
        if h is None or not isinstance(h, kind):
            raise fail(errno.EBADF)
        return h

    @handler
    async def read(self, fh: int, off: int, size: int, tid: int | None = None) -> bytes:
        """tid: given by the file API (0); a kernel request reads it from the shim"""
        if tid is None:
            tid = fuseshim.read_tid()  # first, before any await (see fuseshim.py)
        h = self._file(fh)
        self._recheck(h, Need.READ)
        host = h.node.host
        assert host is not None
        data, whole = b"", False
        if h.cached:
            try:
                data, whole = host.workers.read_cached(h.fd, size, off, tid)
            except OSError:  # e.g. EOPNOTSUPP: a worker reads it, and the next ones, as before
                h.cached = False
        if not whole:  # the rest is on its way from the device (or the file is not cached)
            rest = await self._run(
                h.node,
                native.read_direct if h.direct else native.read,
                h.fd,
                size - len(data),
                off + len(data),
            )
            data = data + rest if data else rest
        host.bytes_read += len(data)
        return data

    @handler
    async def write(self, fh: int, off: int, buf: bytes, cached: bool | None = None) -> int:
        """cached: given by the file API (False); a kernel request reads it from the shim"""
        if cached is None:
            cached = fuseshim.write_cached()  # first, before any await (see fuseshim.py)
        h = self._file(fh)
        self._recheck(h, Need.WRITE)
        if cached and h.node.opens > 1:
            self._no_narrowed_writer(h)
        h.dirty = True
        bound = native.write_bound(h.node.st, off, len(buf))
        self._watch(h.node)
        write = _tracked(h.node, native.write_direct if h.direct else native.write)
        while True:
            try:
                done = await self._charged(h.node, bound, 0, write, h.fd, buf, off, bound)
                break
            except native.NeedsRoom as more:  # it fills holes the stat did not show
                bound = more.nbytes
        self._fresh(h.node, done.st)
        h.node.host.bytes_written += done.written  # type: ignore[union-attr]
        return done.written

    def _no_narrowed_writer(self, h: FileHandle) -> None:
        """The kernel writes back a shared writable mapping's pages through any writable handle
        of the file, so a caller whose grant was narrowed could still have its writes land
        through another caller's handle.  While such a caller holds the file open (or mapped)
        for writing, pages written back from the cache are refused for everyone (EROFS; msync
        and fsync report it), since the kernel does not say who dirtied them."""
        vf = h.node.vf
        if vf is None:
            return
        for other in self.handles.values():
            if (
                other is not h
                and other.node is h.node
                and isinstance(other, FileHandle)
                and other.writable
            ):
                code = access.check(self._mode(other.caller, other.admin, vf), Need.WRITE)
                if code:
                    raise self._deny(h.node, code)

    @handler
    async def flush(self, fh: int) -> None:
        h = self._file(fh)
        self._recheck(h, Need.READ)
        if h.dirty:  # nothing of ours to push to native storage otherwise
            h.dirty = False
            if h.node.host.flush_needed:  # type: ignore[union-attr]
                await self._run(h.node, native.flush, h.fd)

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._file(fh)
        self._recheck(h, Need.READ)
        await self._run(h.node, native.fsync, h.fd, datasync)

    @handler
    async def release(self, fh: int) -> None:
        h = self._drop_fh(fh)
        assert isinstance(h, FileHandle)
        node = h.node
        node.host.workers.close_soon([h.fd])  # type: ignore[union-attr]
        node.opens -= 1
        if node.orphan and not node.opens and node.vf is not None and not node.vf.deleted:
            node.orphan = False  # its last name went before: now it is freed
            node.vf.changes += 1
            self._release(node, -(node.alloc or 0), -1)
            node.alloc = None
            node.vf.recent.pop(node.ino, None)

    # -- directories ----------------------------------------------------------------------------
    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        caller, admin = self._allow(ctx, node, Need.READ)
        h = DirHandle(node, caller, admin)
        if node.kind is Kind.ROOT:
            h.virtual = [
                (name.encode(), host.node)
                for name, host in self.registry.hosts.items()
                if host.node is not None
            ]
        elif node.kind is Kind.HOST:
            assert node.host is not None
            h.virtual = [
                (vf.id.encode(), vf.root)
                for vf in node.host.vfolders.values()
                if vf.root is not None and self._visible(caller, admin, vf)
            ]
        else:
            h.stream, h.dot_attrs = await self._run(node, _open_stream, node.fd)
        return self._new_fh(h)

    def _dir(self, fh: int) -> DirHandle:
        return self._handle(fh, DirHandle)  # type: ignore[return-value]

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self._dir(fh)
        self._recheck(h, Need.READ)
        if h.virtual is not None:
            return self._readdir_virtual(h, start_id, token)
        if start_id != h.next_off:
            await self._seekdir(h, start_id)
        node = h.node
        assert h.dot_attrs is not None  # set by opendir for every native directory
        if h.next_off == 0:
            if not pyfuse3.readdir_reply(token, b".", self._attrs(node, h.dot_attrs), 1):
                return
            h.next_off = 1
        if h.next_off == 1:
            dotdot = self.table.get(node.parent) or node
            attrs = (
                self._virtual_attrs(dotdot)
                if dotdot.vf is None
                else self._attrs(dotdot, h.dot_attrs)
            )
            if not pyfuse3.readdir_reply(token, b"..", attrs, 2):
                return
            h.next_off = 2
        with self.fds.busy(node):
            await self._readdir_native(h, token)

    async def _readdir_native(self, h: DirHandle, token: pyfuse3.ReaddirToken) -> None:
        node = h.node
        assert h.stream is not None and node.vf is not None
        sent = 0  # entries in this reply
        while True:
            if not h.buffer:
                if h.stream.ended:  # no hop to learn it again (the kernel asks until it hears)
                    return
                # each entry the kernel has not seen yet costs an O_PATH fd.  Near fd_hard:
                # read fewer, ask the kernel to forget old entries (none in a directory being
                # listed: see _prune), and end this reply early; at the start of a reply, wait
                # for the forgets.  Only entries the kernel keeps in use, or one directory
                # holding more entries than the budget, can then run the daemon out of fds.
                room = self.fds.hard - self.fds.held()
                if room < READDIR_CHUNK:
                    self.fds.prune()
                    if sent:
                        return
                    if room <= 0 and h.fd_wait:
                        room = await self.fds.room(node)
                        # in vain: listing a directory bigger than the budget (the fds run out
                        # as they did before this wait): do not wait for every entry
                        h.fd_wait = room > 0
                chunk = await self._run(
                    node,
                    h.stream.chunk,
                    max(1, min(READDIR_CHUNK, room)),
                    self.table.by_key,
                    node.vf.id,
                )
                if not chunk:
                    return
                h.buffer.extend(chunk)
            name, entry = h.buffer[0]
            child = await self._reach(node, name, entry)
            h.buffer[0] = (name, native.Entry(None, entry.st))  # the fd now belongs to the table
            if not pyfuse3.readdir_reply(token, name, self._attrs(child, entry.st), h.next_off + 1):
                return
            child.nlookup += 1
            if stat_mod.S_ISDIR(entry.st.st_mode):
                child.parent = node.ino
            h.buffer.popleft()
            h.next_off += 1
            sent += 1

    async def _seekdir(self, h: DirHandle, offset: int) -> None:
        """rewinddir or seekdir: restart the native listing (entries already sent stay counted)."""
        assert h.stream is not None
        self._discard_buffer(h)
        if offset <= 2:
            await self._run(h.node, h.stream.rewind)
        else:
            await self._run(h.node, h.stream.skip, offset - 2)
        h.next_off = offset

    def _discard_buffer(self, h: DirHandle) -> None:
        """Drop entries read ahead but never sent: their fds, and nodes the kernel never saw."""
        fds = []
        vf = h.node.vf
        for _, entry in h.buffer:
            if entry.fd is not None:
                fds.append(entry.fd)
            elif vf is not None:
                node = self.table.find(vf, entry.st)
                # nlookup 0: the kernel never saw it, so it has no open file either
                if node is not None and node.nlookup == 0 and node.kind is Kind.NATIVE:
                    fds.append(self.table.remove(node))
        h.buffer.clear()
        if fds and h.node.host is not None:
            h.node.host.workers.close_soon(fds)

    @handler
    async def releasedir(self, fh: int) -> None:
        h = self._drop_fh(fh)
        assert isinstance(h, DirHandle)
        self._discard_buffer(h)
        if h.stream is not None and h.node.host is not None:
            h.node.host.workers.submit(h.stream.close)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        h = self._dir(fh)
        self._recheck(h, Need.READ)
        if h.stream is not None:
            await self._run(h.node, native.fsync, h.stream.fd, datasync)

    @handler
    async def listing(
        self, inode: int, after: bytes, limit: int, ctx: pyfuse3.RequestContext
    ) -> native.Listed:
        """A page of a directory's entries for the file API (fuse/files.py), sorted by name and
        after `after`; the kernel lists through opendir/readdir instead.  The same check as
        opendir; no inode of the page is looked up."""
        node = self._node(inode)
        self._allow(ctx, node, Need.READ)
        if node.kind is not Kind.NATIVE and node.kind is not Kind.VFROOT:
            raise fail(errno.ENOTDIR)
        return await self._run(node, native.listing, node.fd, after, limit)  # type: ignore[no-any-return]

    async def _xattr_node(self, inode: int, ctx: pyfuse3.RequestContext, need: Need) -> Node:
        node = self._node(inode)
        if node.vf is None:
            if need is not Need.READ:
                raise fail(errno.EPERM)
            raise fail(pyfuse3.ENOATTR)
        self._allow(ctx, node, need)
        await self._own_links(node)
        return node

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.vf is None or node.kind is Kind.VFROOT and name.startswith(XATTR_PREFIX):
            if name.startswith(b"user.vfusefs.usage.") and not self._down(node):
                for vf in (  # O(files changed lately), not O(tree)
                    [node.vf] if node.vf else list(node.host.vfolders.values()) if node.host else []
                ):
                    await self.registry.reconcile(vf)
            return self._virtual_xattr(node, name, ctx)
        self._allow(ctx, node, Need.READ)
        if self._absent_xattr(node, name):
            raise fail(pyfuse3.ENOATTR)
        await self._own_links(node)
        return await self._run(node, native.getxattr, node.fd, name)  # type: ignore[no-any-return]

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        if node.vf is None:
            return list(self._virtual_xattrs(node, ctx))
        self._allow(ctx, node, Need.READ)
        if node.kind is Kind.VFROOT and self._down(node):  # the virtual ones stay readable
            return list(self._virtual_xattrs(node, ctx))
        await self._own_links(node)
        names = [os.fsencode(n) for n in await self._run(node, native.listxattr, node.fd)]
        if node.kind is Kind.VFROOT:
            names = [n for n in names if not n.startswith(XATTR_PREFIX)]
            names.extend(self._virtual_xattrs(node, ctx))
        return names

    @handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if name.startswith(XATTR_PREFIX):
            return await self._set_limit(self._node(inode), name, value, ctx)
        node = await self._xattr_node(inode, ctx, Need.WRITE)
        if name == CAPABILITY_XATTR:
            self._no_plants(ctx, node)
        self._watch(node)
        await self._charged(
            node,
            -(-(len(name) + len(value)) // BLOCK) * BLOCK,
            0,
            _tracked(node, native.setxattr),
            node.fd,
            name,
            value,
            0,
        )
        self._xattr_changed(node, name, True)
        node.st_until = 0.0  # ctime changed

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name.startswith(XATTR_PREFIX):
            self._node(inode)
            raise fail(errno.EPERM)
        node = await self._xattr_node(inode, ctx, Need.WRITE)
        self._watch(node)
        await self._charged(node, 0, 0, _tracked(node, native.removexattr), node.fd, name)
        self._xattr_changed(node, name, False)
        node.st_until = 0.0  # ctime changed


def _open_stream(fd: int) -> tuple[native.DirStream, os.stat_result]:
    stream = native.DirStream(fd)
    return stream, os.fstat(stream.fd)


__all__ = ["Operations", "ROOT_INODE"]
