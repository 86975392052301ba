"""The built-in `vfs` backend: vfolders are plain directories under the host's native path.

Any mounted directory will do (NFS, SMB, ext4...).  It has no native quota and no fast usage, so
vfusefs's own accounting is the only enforcement and rescans walk the tree; everything it needs
is in the `Backend` base class.  A clone is a copy of the tree (copy_file_range: the kernel
reflinks where the filesystem can, XFS and btrfs, and copies without Python elsewhere).
"""

from collections.abc import Callable

from vfusefs.backends import Backend, BackendError, Capabilities


class VfsBackend(Backend):
    name = "vfs"
    capabilities = Capabilities(clone="copy")

    def clone(
        self,
        src: str,
        dst: str,
        snapshot: str | None = None,
        progress: Callable[[int, int], None] = lambda files, nbytes: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        if snapshot is not None:
            raise BackendError(f"backend {self.name!r} has no snapshots to clone from")
        self.copy_tree(src, dst, progress, cancelled)
