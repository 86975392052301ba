"""The built-in `vfs` backend: vfolders are plain directories under the host's native path.

Any mounted directory will do (NFS, SMB, ext4...).  It has no native quota and no fast usage, so
vfusefs's own accounting is the only enforcement and rescans walk the tree; everything it needs
is in the `Backend` base class, clones included: a copy of the tree (copy_file_range: the kernel
reflinks where the filesystem can, XFS and btrfs, and copies without Python elsewhere).
"""

from vfusefs.backends import Backend


class VfsBackend(Backend):
    name = "vfs"
