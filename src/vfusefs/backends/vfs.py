"""The built-in `vfs` backend: vfolders are plain directories under the host's native path.

Any mounted directory will do (NFS, SMB, ext4...).  It has no native quota and no fast usage, so
vfusefs's own accounting is the only enforcement and rescans walk the tree; everything it needs
is in the `Backend` base class.  Clones (reflink where the filesystem has it, else a copy) come
with issue 22.
"""

from vfusefs.backends import Backend, Capabilities


class VfsBackend(Backend):
    name = "vfs"
    capabilities = Capabilities(clone=None)
