"""The `cephfs` backend: a vfolder is a directory on a CephFS mount (the kernel client or
ceph-fuse), its limits are CephFS directory quotas.

What it adds to plain directories:
- native quota: `ceph.quota.max_bytes` and `ceph.quota.max_files` on the vfolder's directory,
  so a client writing around vfusefs (another node's mount, an admin host) is held too.  CephFS
  enforces quotas in its clients, cooperatively: a write may pass the limit by what the client
  had in flight (0.1-1 MB seen), and is then refused with EDQUOT;
- fast usage: `ceph.dir.rbytes` and `ceph.dir.rentries`, the recursive statistics the MDS keeps
  for every directory (no walk, whatever the tree's size).  rbytes counts file sizes, not
  allocated blocks, and rentries counts the directory itself and everything below it; a client
  reports new sizes to the MDS when it flushes, so these lag writes by seconds.  vfusefs's own
  usage stays `du`'s figures;
- snapshots: CephFS snapshots, `mkdir <vfolder>/.snap/<name>` (O(1)).  They live in the
  vfolder's hidden `.snap` directory, readable there by its users (read-only), and are not
  counted in its usage.  A clone copies the tree (from a snapshot, if asked): CephFS has no
  writable snapshot to clone from.

Everything is xattrs and mkdir/rmdir on the mount, so it needs no Ceph tools and no cluster
credentials beyond the mount's own; it runs on the host's admin threads only.  Snapshots need
the file system to allow them (`ceph fs set <fs> allow_new_snaps true`, the default since
Octopus).
"""

from __future__ import annotations

import errno
import os

from vfusefs.backends import AlreadyThere, Backend, BackendError, Capabilities

SNAP_DIR = ".snap"
MAX_BYTES = "ceph.quota.max_bytes"
MAX_FILES = "ceph.quota.max_files"


def _get(path: str, name: str) -> int:
    try:
        return int(os.getxattr(path, name, follow_symlinks=False) or b"0")
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return 0  # no quota set (older clients say so instead of "0")
        raise _not_ceph(path, exc) from None
    except ValueError:
        raise BackendError(f"{path}: {name} is not a number") from None


def _not_ceph(path: str, exc: OSError) -> BackendError:
    if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return BackendError(
            f"{path} is not on a CephFS mount (no ceph.* xattrs): mount CephFS there "
            '(mount -t ceph, or ceph-fuse) or use backend = "vfs"'
        )
    return BackendError(f"{path}: {exc.strerror}")


class CephFsBackend(Backend):
    name = "cephfs"
    capabilities = Capabilities(native_quota=True, fast_usage=True, clone="copy", snapshots=True)

    # -- native quota and usage -----------------------------------------------------------------
    def set_native_quota(self, path: str, quota_bytes: int, quota_inodes: int) -> None:
        """The directory quota CephFS enforces (0 removes a limit)."""
        for name, value in ((MAX_BYTES, quota_bytes), (MAX_FILES, quota_inodes)):
            try:
                os.setxattr(path, name, str(value).encode(), follow_symlinks=False)
            except OSError as exc:
                raise _not_ceph(path, exc) from None

    def native_limit(self, path: str) -> int:
        """The byte limit CephFS enforces on the vfolder (0: none)."""
        return _get(path, MAX_BYTES)

    def native_usage(self, path: str) -> tuple[int, int]:
        """(bytes, entries) from the MDS's recursive statistics: rbytes, rentries."""
        return _get(path, "ceph.dir.rbytes"), _get(path, "ceph.dir.rentries")

    def purge(self, trash_path: str) -> None:
        """CephFS does not remove a directory that still has snapshots: drop them first."""
        for name in self.snapshots(trash_path):
            self.delete_snapshot(trash_path, name)
        super().purge(trash_path)

    # -- snapshots and clone --------------------------------------------------------------------
    def _snap(self, path: str, name: str) -> str:
        if (
            not name
            or "/" in name
            or name in (".", "..")
            or name.startswith("_")
            or len(name) > 200
        ):
            raise BackendError(f"bad snapshot name {name[:40]!r} (no '/', no leading '_')")
        return os.path.join(path, SNAP_DIR, name)

    def snapshot(self, path: str, name: str) -> str:
        target = self._snap(path, name)
        try:
            os.mkdir(target)
        except FileExistsError:
            raise AlreadyThere(f"snapshot {name!r} of {path} already exists") from None
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise BackendError(
                    f"CephFS refused a snapshot of {path}: allow them with "
                    "'ceph fs set <fs> allow_new_snaps true'"
                ) from None
            raise _not_ceph(path, exc) from None
        return target

    def snapshots(self, path: str) -> list[str]:
        try:
            names = os.listdir(os.path.join(path, SNAP_DIR))
        except FileNotFoundError:
            return []
        # "_name_inode" entries are snapshots of a parent directory, seen from below
        return sorted(n for n in names if not n.startswith("_"))

    def delete_snapshot(self, path: str, name: str) -> None:
        target = self._snap(path, name)
        try:
            os.rmdir(target)
        except FileNotFoundError:
            raise BackendError(f"no snapshot {name!r} of {path}") from None

    def snapshot_origin(self, path: str, name: str) -> str:
        """A clone from a snapshot copies it (CephFS snapshots are read-only)."""
        origin = self._snap(path, name)
        if not os.path.isdir(origin):
            raise BackendError(f"no snapshot {name!r} of {path}")
        return origin
