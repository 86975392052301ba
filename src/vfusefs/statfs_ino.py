"""Which inode a statfs request is about (pyfuse3 does not say; see shim/statfs_ino.c).

`load()` must run before pyfuse3 is imported (the package's __init__ calls it): the shim then
wraps fuse_session_new.  `current()` returns the inode of the statfs request being handled, or
None if the shim is not active (then df shows host totals everywhere).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

_ino: ctypes.c_ulonglong | None = None
_hooked: ctypes.c_int | None = None


def load() -> None:
    global _ino, _hooked
    if "pyfuse3" in sys.modules or _ino is not None:
        return  # too late to interpose, or done already
    here = os.path.dirname(__file__)
    for path in sorted(glob.glob(os.path.join(here, "_statfs_ino*.so"))):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
        except OSError:
            continue
        _ino = ctypes.c_ulonglong.in_dll(lib, "vfusefs_statfs_ino")
        _hooked = ctypes.c_int.in_dll(lib, "vfusefs_statfs_hooked")
        return


def active() -> bool:
    return _hooked is not None and bool(_hooked.value)


def current() -> int | None:
    """Call first thing in the statfs handler, before any await."""
    return int(_ino.value) if active() and _ino is not None else None
