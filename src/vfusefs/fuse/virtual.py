"""The virtual tree (Operations' part): the root (lists hosts) and host directories (list
the vfolders the caller may see), read-only; statfs per vfolder, host or the whole tree; and
the `user.vfusefs.*` xattrs of a vfolder's root (usage, limits; set by admins)."""

from __future__ import annotations

import errno
import logging
import stat as stat_mod
from typing import TYPE_CHECKING

import pyfuse3

from vfusefs import native
from vfusefs.domain.access import Need
from vfusefs.domain.quota import parse_count, parse_size
from vfusefs.fuse.errors import fail, handler
from vfusefs.fuse.inodes import Kind, Node
from vfusefs.fuse.opsbase import OpsBase
from vfusefs.native import BLOCK
from vfusefs.runtime import fuseshim
from vfusefs.state.records import Host

log = logging.getLogger("vfusefs.fuse.ops")

if TYPE_CHECKING:
    from vfusefs.fuse.ops import DirHandle

XATTR_PREFIX = b"user.vfusefs."


class VirtualTree(OpsBase):
    def _virtual_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = stat_mod.S_IFDIR | 0o555
        if node.kind is Kind.ROOT:
            a.st_nlink = 2 + len(self.registry.hosts)
        else:
            a.st_nlink = 2
        a.st_uid = a.st_gid = 0
        a.st_size = 0
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started_ns
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        return a

    def _readdir_virtual(self, h: DirHandle, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        assert h.virtual is not None
        for i in range(start_id, len(h.virtual)):
            name, child = h.virtual[i]
            if child.vf is None:
                attrs = self._virtual_attrs(child)
            else:
                # a vfolder root: listing a host dir must not wait on every vfolder's storage, so
                # send what we last saw, uncached: the kernel's next stat asks us for fresh ones
                attrs = (
                    self._attrs(child, child.st)
                    if child.st is not None
                    else self._virtual_attrs(child)
                )
                attrs.attr_timeout = 0
                attrs.entry_timeout = 0
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                return
            child.nlookup += 1

    # -- file systems and xattrs -----------------------------------------------------------------
    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        ino = fuseshim.statfs_ino()  # first, before any await (see fuseshim.py)
        node = self.table.get(ino) if ino is not None else None
        if node is None or node.kind is Kind.ROOT:
            return await self._statfs_hosts(list(self.registry.hosts.values()))
        if node.vf is None:
            assert node.host is not None
            return await self._statfs_hosts([node.host])
        self._allow(ctx, node, Need.READ)
        vf = node.vf
        await self.registry.reconcile(vf)
        out = await self._statfs_hosts([vf.host])
        vacc = self.ledger.account(vf.quota_keys[0])
        scope = self.ledger.account(vf.quota_keys[1]) if len(vf.quota_keys) > 1 else None
        if vacc.limit_bytes or scope is not None and scope.limit_bytes:
            # the quota is the size, what is left (of the vfolder and its scope) is free
            rooms = [
                r
                for r in (vacc.room_bytes(), scope.room_bytes() if scope else None)
                if r is not None
            ]
            size = vacc.limit_bytes or vacc.used_bytes + min(rooms)
            free = min(rooms + [max(0, size - vacc.used_bytes)])
            out.f_blocks = -(-size // out.f_frsize)
            out.f_bfree = out.f_bavail = free // out.f_frsize
        if vacc.limit_inodes or scope is not None and scope.limit_inodes:
            rooms = [
                r
                for r in (vacc.room_inodes(), scope.room_inodes() if scope else None)
                if r is not None
            ]
            files = vacc.limit_inodes or vacc.used_inodes + min(rooms)
            out.f_files = files
            out.f_ffree = out.f_favail = min(rooms + [max(0, files - vacc.used_inodes)])
        return out

    async def _statfs_hosts(self, hosts: list[Host]) -> pyfuse3.StatvfsData:
        """Native figures of the hosts' filesystems, summed in 4 KiB blocks."""
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = BLOCK
        out.f_namemax = 255
        blocks = bfree = bavail = files = ffree = 0
        for host in hosts:
            try:
                await host.workers.settle()  # blocks of removed files we held open are free
                sv = await host.workers.run(native.statvfs_path, host.config.path)
            except Exception:  # a host that fails or hangs is left out of the sum
                continue
            scale = sv.f_frsize / BLOCK
            blocks += int(sv.f_blocks * scale)
            bfree += int(sv.f_bfree * scale)
            bavail += int(sv.f_bavail * scale)
            files += sv.f_files
            ffree += sv.f_ffree
            if sv.f_namemax:
                out.f_namemax = min(out.f_namemax, sv.f_namemax)
        out.f_blocks, out.f_bfree, out.f_bavail = blocks, bfree, bavail
        out.f_files, out.f_ffree, out.f_favail = files, ffree, ffree
        return out

    async def _set_limit(
        self, node: Node, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        """Admins set a vfolder's limits with setfattr; everything else under user.vfusefs. is
        read-only (EPERM), and a value that is not a size is EINVAL."""
        _, admin = self._caller(ctx)
        field = {
            b"user.vfusefs.quota.bytes": "quota_bytes",
            b"user.vfusefs.quota.inodes": "quota_inodes",
        }.get(name)
        if not admin or field is None or node.kind is not Kind.VFROOT or node.vf is None:
            raise fail(errno.EPERM)
        try:
            text = value.decode("ascii").strip("\0 \n")
            limit = parse_size(text) if field == "quota_bytes" else parse_count(text)
        except (UnicodeDecodeError, ValueError):
            raise fail(errno.EINVAL) from None
        await self.registry.set_limits(node.vf.host.name, node.vf.id, **{field: limit})

    def _virtual_xattrs(self, node: Node, ctx: pyfuse3.RequestContext) -> dict[bytes, bytes]:
        caller, admin = self._caller(ctx)
        if node.kind is Kind.ROOT:
            return {}
        host = node.host
        assert host is not None
        out = {
            b"user.vfusefs.backend": host.config.backend.encode(),
            b"user.vfusefs.health": host.health.encode(),
        }
        if node.kind is Kind.HOST:
            accounts = [self.ledger.account(vf.quota_keys[0]) for vf in host.vfolders.values()]
            out[b"user.vfusefs.host"] = host.name.encode()
            out[b"user.vfusefs.vfolders"] = b"%d" % len(accounts)
            out[b"user.vfusefs.usage.bytes"] = b"%d" % sum(a.used_bytes for a in accounts)
            out[b"user.vfusefs.usage.inodes"] = b"%d" % sum(a.used_inodes for a in accounts)
            return out
        vf = node.vf
        assert vf is not None
        acc = self.ledger.account(vf.quota_keys[0])
        out.update(
            {
                b"user.vfusefs.id": vf.id.encode(),
                b"user.vfusefs.host": host.name.encode(),
                b"user.vfusefs.mode": self._mode(caller, admin, vf).label.encode(),
                b"user.vfusefs.scope": vf.record.scope.encode(),
                b"user.vfusefs.quota.bytes": b"%d" % vf.record.quota_bytes,
                b"user.vfusefs.quota.inodes": b"%d" % vf.record.quota_inodes,
                b"user.vfusefs.usage.bytes": b"%d" % acc.used_bytes,
                b"user.vfusefs.usage.inodes": b"%d" % acc.used_inodes,
            }
        )
        return out

    def _virtual_xattr(self, node: Node, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if node.vf is not None:
            self._allow(ctx, node, Need.READ)
        value = self._virtual_xattrs(node, ctx).get(name)
        if value is None:
            raise fail(pyfuse3.ENOATTR)
        return value
