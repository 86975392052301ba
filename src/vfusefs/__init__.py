"""vfusefs: one FUSE mount per node presenting every storage host's virtual folders."""

from vfusefs import fuseshim as _fuseshim

__version__ = "0.1.0"

# before anything imports pyfuse3: lets statfs learn its inode (see shim/fuseshim.c)
_fuseshim.load()
