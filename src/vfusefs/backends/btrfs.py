"""The `btrfs` backend: a vfolder is a btrfs subvolume, its byte limit a qgroup limit.

What it adds to plain directories:
- native quota: the vfolder's byte limit is its subvolume's qgroup limit (`max_rfer`), so a write
  that bypasses vfusefs (an admin on the host) is refused by btrfs with EDQUOT too.  btrfs has
  no inode limits: the inode limit is held by vfusefs's ledger alone, and so are scope limits
  (one qgroup per subvolume; a scope is not a subtree here);
- clone and snapshots: `btrfs subvolume snapshot` (O(1), no space until the copies diverge).
  Snapshots live outside the vfolder, in `<path>/.vfusefs-snapshots/<vfolder>/<name>`, so
  they are neither visible to the vfolder's users nor counted in its usage;
- fast usage: the qgroup's referenced bytes (extents, as btrfs counts them; vfusefs's own usage
  stays `du`'s allocated bytes, so the two may differ a little: small files stored inline).

It drives btrfs-progs (`btrfs`, Debian's btrfs-progs), on the host's admin threads only.  The
filesystem must have quotas enabled (`btrfs quota enable MOUNTPOINT`); a limit set without
them fails with a line that says so.  Trash entries are subvolumes renamed into the host's
trash; purging one deletes the subvolume and its qgroup.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

from vfusefs.backends import AlreadyThere, Backend, BackendError, Capabilities

SNAPSHOTS_DIR = ".vfusefs-snapshots"
SUBVOL_ROOT_INO = 256  # the inode number of every btrfs subvolume's root directory


def _btrfs(*args: str) -> str:
    """Run `btrfs ARGS`; its output, or BackendError with what it said."""
    try:
        r = subprocess.run(["btrfs", *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise BackendError("btrfs-progs is not installed (apt-get install btrfs-progs)") from None
    if r.returncode != 0:
        said = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise BackendError(f"btrfs {' '.join(args)}: {said[-1] if said else r.returncode}")
    return r.stdout


def is_subvolume(path: str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_ino == SUBVOL_ROOT_INO and os.path.isdir(path) and not os.path.islink(path)


class BtrfsBackend(Backend):
    name = "btrfs"
    capabilities = Capabilities(
        native_quota=True, fast_usage=True, clone="snapshot", snapshots=True
    )

    def create_vfolder(self, path: str, adopt: bool = False) -> bool:
        if os.path.lexists(path):
            if not adopt:
                raise AlreadyThere(f"native directory {path} already exists")
            if not os.path.isdir(path) or os.path.islink(path):
                raise BackendError(f"native path {path} exists and is not a directory")
            if not is_subvolume(path):
                raise BackendError(
                    f"{path} is a plain directory, not a btrfs subvolume: a btrfs vfolder is a "
                    "subvolume (create a new vfolder and copy the data in)"
                )
            return False
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        _btrfs("subvolume", "create", path)
        return True

    def remove_new_vfolder(self, path: str) -> None:
        if is_subvolume(path):
            self._delete_subvolume(path)

    def purge(self, trash_path: str) -> None:
        if is_subvolume(trash_path):
            self._delete_subvolume(trash_path)
        else:
            super().purge(trash_path)

    def _delete_subvolume(self, path: str) -> None:
        """Delete a subvolume (and the subvolumes below it) and its qgroup."""
        for below in self._subvolumes_below(path):
            self._delete_subvolume(below)
        rootid = _btrfs("inspect-internal", "rootid", path).strip()
        _btrfs("subvolume", "delete", path)
        try:  # the kernel keeps an empty qgroup for a deleted subvolume: drop it
            _btrfs("qgroup", "destroy", f"0/{rootid}", os.path.dirname(path))
        except BackendError:
            pass  # quotas off, or the kernel dropped it already

    @staticmethod
    def _subvolumes_below(path: str) -> list[str]:
        found = []
        for dirpath, dirnames, _ in os.walk(path):
            for d in list(dirnames):
                full = os.path.join(dirpath, d)
                if is_subvolume(full):
                    found.append(full)
                    dirnames.remove(d)
        return found

    # -- native quota and usage -----------------------------------------------------------------
    def set_native_quota(self, path: str, quota_bytes: int, quota_inodes: int) -> None:
        """The qgroup limit of the vfolder's subvolume (btrfs has no inode limit)."""
        try:
            _btrfs("qgroup", "limit", str(quota_bytes) if quota_bytes else "none", path)
        except BackendError as exc:
            if "quota" in str(exc).lower() and "not enabled" in str(exc).lower():
                raise BackendError(
                    f"btrfs quota is not enabled on the filesystem of {path}: run "
                    f"'btrfs quota enable {self.host.path}'"
                ) from None
            raise

    def native_limit(self, path: str) -> int:
        """The qgroup limit btrfs enforces on the vfolder (0: none)."""
        return self._qgroup(path)[1]

    def native_usage(self, path: str) -> tuple[int, int]:
        """(referenced bytes, 0): btrfs counts no inodes per qgroup."""
        return self._qgroup(path)[0], 0

    def _qgroup(self, path: str) -> tuple[int, int]:
        """(referenced bytes, max referenced or 0) of path's subvolume."""
        rootid = _btrfs("inspect-internal", "rootid", path).strip()
        out = _btrfs("qgroup", "show", "-r", "--raw", path)
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == f"0/{rootid}":
                limit = fields[3] if len(fields) > 3 else "none"
                return int(fields[1]), 0 if limit == "none" else int(limit)
        raise BackendError(f"no qgroup for subvolume {rootid} of {path} (btrfs quota enabled?)")

    # -- clone and snapshots --------------------------------------------------------------------
    def clone(
        self,
        src: str,
        dst: str,
        snapshot: str | None = None,
        progress: Callable[[int, int], None] = lambda files, nbytes: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        """dst becomes a writable snapshot of src (or of src's snapshot `snapshot`): O(1)."""
        origin = self._snapshot_path(src, snapshot) if snapshot else src
        if snapshot and not is_subvolume(origin):
            raise BackendError(f"no snapshot {snapshot!r} of {src}")
        if os.path.lexists(dst):
            raise AlreadyThere(f"native directory {dst} already exists")
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        _btrfs("subvolume", "snapshot", origin, dst)

    def snapshot(self, path: str, name: str) -> str:
        """A read-only snapshot of the vfolder, kept outside it."""
        target = self._snapshot_path(path, name)
        if os.path.lexists(target):
            raise AlreadyThere(f"snapshot {name!r} of {path} already exists")
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        _btrfs("subvolume", "snapshot", "-r", path, target)
        return target

    def snapshots(self, path: str) -> list[str]:
        d = os.path.dirname(self._snapshot_path(path, "x"))
        try:
            return sorted(os.listdir(d))
        except FileNotFoundError:
            return []

    def delete_snapshot(self, path: str, name: str) -> None:
        target = self._snapshot_path(path, name)
        if not is_subvolume(target):
            raise BackendError(f"no snapshot {name!r} of {path}")
        self._delete_subvolume(target)

    def _snapshot_path(self, path: str, name: str) -> str:
        if not name or "/" in name or name in (".", "..") or len(name) > 200:
            raise BackendError(f"bad snapshot name {name[:40]!r}")
        return os.path.join(self.host.path, SNAPSHOTS_DIR, os.path.basename(path), name)
