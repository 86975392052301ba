"""The `xfs` backend: a vfolder is a directory tree of its own XFS project, its limits are that
project's quota (bytes and inodes).

What it adds to plain directories:
- native quota: each vfolder's directory gets a project id, inherited by everything made
  below it (the PROJINHERIT flag), and the project's hard limits (`bhard`, `ihard`) are the
  vfolder's limits.  So a write that bypasses vfusefs (an admin on the host) is held by XFS
  too.  XFS answers a project quota overrun with ENOSPC; vfusefs passes it on to callers as
  EDQUOT, as for every native refusal (`quota_errno`);
- fast usage: the project's quota report (used blocks and inodes, kept by XFS as it goes: no
  walk, whatever the tree's size).

One project per vfolder, in both layouts (`flat` and `backendai`): a scope's limit is held by
vfusefs's ledger, not by XFS.  Project ids live on the directories themselves (the project id
XFS keeps in each inode, set and read with the FS_IOC_FSSETXATTR / FS_IOC_FSGETXATTR ioctls),
not in /etc/projects or a dotfile: an adopted or restored directory keeps its own.  A new
vfolder's id is derived from its UUID (so two nodes making vfolders at once pick different ids,
short of a CRC-32 collision between two new UUIDs) and moved past ids the filesystem already
uses.  `xfs_quota` (xfsprogs) sets and reads limits, on the host's admin threads only, with
/etc/projects and /etc/projid unused.  The filesystem must be mounted with `prjquota` (or
`pquota`); a limit set without it fails with a line that says so.  Clones are copies
(`copy_file_range`, so reflinks where the filesystem was made with `reflink=1`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
import zlib

from vfusefs.backends import Backend, BackendError, BackendOption, Capabilities
from vfusefs.native import mounts

FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr)
FS_IOC_FSSETXATTR = 0x401C5820  # _IOW('X', 32, struct fsxattr)
FS_XFLAG_PROJINHERIT = 0x00000200
FSXATTR = struct.Struct("<IIIII8s")  # xflags, extsize, nextents, projid, cowextsize, pad
MAX_ID = 0x7FFFFFFF
# one line of `xfs_quota -c 'quota -p -N -n -b -i ID'`: device, blocks (KiB) used soft hard
# warnings [grace], inodes used soft hard warnings [grace], mount point
QUOTA_LINE = re.compile(
    r"^\S+\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+\s+\[[^\]]*\]\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+\s+\[[^\]]*\]"
)
REPORT_ID = re.compile(r"^#(\d+)\s")


def project_of(path: str) -> tuple[int, bool]:
    """The project id XFS keeps for path, and whether its children inherit it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        got = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(FSXATTR.size))
    finally:
        os.close(fd)
    xflags, _, _, projid, _, _ = FSXATTR.unpack(got)
    return projid, bool(xflags & FS_XFLAG_PROJINHERIT)


def set_project(path: str, projid: int, inherit: bool) -> None:
    """Put path (not followed if a symlink) in project projid; inherit: and what is made in it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        xflags, extsize, nextents, _, cow, pad = FSXATTR.unpack(
            fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(FSXATTR.size))
        )
        if inherit:
            xflags |= FS_XFLAG_PROJINHERIT
        fcntl.ioctl(
            fd, FS_IOC_FSSETXATTR, FSXATTR.pack(xflags, extsize, nextents, projid, cow, pad)
        )
    finally:
        os.close(fd)


class XfsBackend(Backend):
    name = "xfs"
    options = (
        BackendOption(
            "lock_file_path",
            str,
            "",
            "accepted for Backend.AI volume configs, unused: project ids live on the "
            "directories themselves",
        ),
    )
    capabilities = Capabilities(native_quota=True, fast_usage=True, clone="copy", snapshots=False)
    quota_errno = errno.ENOSPC

    # -- projects -------------------------------------------------------------------------------
    def create_vfolder(self, path: str, adopt: bool = False) -> bool:
        made = super().create_vfolder(path, adopt)
        try:
            projid, inherit = project_of(path)
            if projid == 0 or not inherit:  # new, or adopted from outside any project
                self._assign(path, projid or self._free_id(path))
        except BaseException as exc:
            if made:
                self.remove_new_vfolder(path)
            if isinstance(exc, OSError):
                raise self._refusal(path, exc) from None
            raise
        return made

    def _assign(self, path: str, projid: int) -> None:
        """Put path's whole tree in project projid, new entries inheriting it (an adopted tree
        needs every inode set: XFS counts each inode in the project it carries)."""
        for dirpath, dirnames, filenames in os.walk(path):
            for name in [*dirnames, *filenames]:
                full = os.path.join(dirpath, name)
                if not os.path.islink(full):  # the ioctl needs an open file; a symlink's
                    set_project(full, projid, os.path.isdir(full))  # blocks are few
        set_project(path, projid, True)

    def _free_id(self, path: str) -> int:
        """An id no project on the filesystem uses, derived from the vfolder's UUID."""
        used = self._ids_in_use(path)
        projid = zlib.crc32(os.path.basename(path).encode()) & MAX_ID or 1
        while projid in used or projid == 0:
            projid = projid % MAX_ID + 1
        return projid

    def _ids_in_use(self, path: str) -> set[int]:
        out = self._xfs_quota(path, "report -p -n -N -b -i")
        return {int(m.group(1)) for line in out.splitlines() if (m := REPORT_ID.match(line))}

    def _project(self, path: str) -> int:
        try:
            projid, _ = project_of(path)
        except OSError as exc:
            raise self._refusal(path, exc) from None
        if projid == 0:
            raise BackendError(f"{path} is in no XFS project (made outside vfusefs?)")
        return projid

    # -- native quota and usage -----------------------------------------------------------------
    def set_native_quota(self, path: str, quota_bytes: int, quota_inodes: int) -> None:
        """The project's hard limits (0 removes one); XFS counts blocks of 1 KiB."""
        kib = -(-quota_bytes // 1024)
        projid = self._project(path)
        self._xfs_quota(path, f"limit -p bhard={kib}k ihard={quota_inodes} {projid}")

    def native_limit(self, path: str) -> int:
        return self._quota(path)[1]

    def native_usage(self, path: str) -> tuple[int, int]:
        used, _, inodes, _ = self._quota(path)
        return used, inodes

    def _quota(self, path: str) -> tuple[int, int, int, int]:
        """(bytes used, byte limit, inodes used, inode limit) of path's project."""
        projid = self._project(path)
        out = self._xfs_quota(path, f"quota -p -N -n -b -i {projid}")
        for line in out.splitlines():
            m = QUOTA_LINE.match(line)
            if m:
                used, _, hard, iused, _, ihard = (int(g) for g in m.groups())
                return used * 1024, hard * 1024, iused, ihard
        return 0, 0, 0, 0  # no usage and no limit yet: XFS reports nothing for the project

    def purge(self, trash_path: str) -> None:
        """Remove the tree, then the project's limits (so a later project with this id starts
        from none)."""
        projid = None
        try:
            projid, _ = project_of(trash_path)
        except OSError:
            pass
        super().purge(trash_path)
        if projid:
            try:
                self._xfs_quota(self.host.path, f"limit -p bhard=0 ihard=0 {projid}")
            except BackendError:
                pass  # quotas off: there were no limits to drop

    # -- xfs_quota ------------------------------------------------------------------------------
    def _xfs_quota(self, path: str, command: str) -> str:
        mount = mounts.mount_of(path)
        if mount is None:
            raise BackendError(f"{path}: not on a mounted filesystem")
        if mount.fstype != "xfs":
            raise BackendError(
                f"{path} is on {mount.fstype}, not XFS: the xfs backend needs an XFS mount "
                'with prjquota (or use backend = "vfs")'
            )
        cmd = ["xfs_quota", "-x", "-D", "/dev/null", "-P", "/dev/null", "-c", command]
        try:
            r = subprocess.run([*cmd, mount.point], capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise BackendError("xfsprogs is not installed (apt-get install xfsprogs)") from None
        said = (r.stderr.strip() or "").splitlines()
        if r.returncode != 0 or said:
            if any(
                "quota" in s.lower() and ("not" in s.lower() or "off" in s.lower()) for s in said
            ):
                raise BackendError(
                    f"XFS project quota is off on {mount.point}: mount it with "
                    f"-o prjquota (fstab: defaults,prjquota)"
                )
            raise BackendError(f"xfs_quota -c '{command}': {said[-1] if said else r.returncode}")
        return str(r.stdout)

    @staticmethod
    def _refusal(path: str, exc: OSError) -> BackendError:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return BackendError(f'{path} is not on XFS (no project ids): use backend = "vfs"')
        return BackendError(f"{path}: {exc.strerror}")
