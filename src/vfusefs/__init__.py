"""vfusefs: one FUSE mount per node presenting every storage host's virtual folders."""

from vfusefs import statfs_ino as _statfs_ino

__version__ = "0.1.0"

# before anything imports pyfuse3: lets statfs learn its inode (see shim/statfs_ino.c)
_statfs_ino.load()
