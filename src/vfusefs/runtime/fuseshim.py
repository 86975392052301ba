"""What pyfuse3 does not tell a handler: which inode a statfs request is about, and which thread
is reading, whether a write comes from the page cache (see shim/fuseshim.c).

`load()` must run before pyfuse3 is imported (`vfusefs serve` calls it first): the shim then
wraps fuse_session_new.  `statfs_ino()` returns the inode of the statfs request being handled,
`read_tid()` the thread id of the process whose read is being handled; both None if the shim is
not active (then df shows host totals everywhere, and reads keep no CPU awake).  Call them first
thing in the handler, before any await: the next request overwrites them.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

_ino: ctypes.c_ulonglong | None = None
_tid: ctypes.c_int | None = None
_cached: ctypes.c_int | None = None
_hooked: ctypes.c_int | None = None


def load() -> None:
    global _ino, _tid, _cached, _hooked
    if "pyfuse3" in sys.modules or _ino is not None:
        return  # too late to interpose, or done already
    here = os.path.dirname(__file__)
    for path in sorted(glob.glob(os.path.join(here, "_fuseshim*.so"))):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
        except OSError:
            continue
        _ino = ctypes.c_ulonglong.in_dll(lib, "vfusefs_statfs_ino")
        _tid = ctypes.c_int.in_dll(lib, "vfusefs_read_tid")
        _cached = ctypes.c_int.in_dll(lib, "vfusefs_write_cached")
        _hooked = ctypes.c_int.in_dll(lib, "vfusefs_statfs_hooked")
        return


def active() -> bool:
    return _hooked is not None and bool(_hooked.value)


def statfs_ino() -> int | None:
    """The inode of the statfs request being handled."""
    return int(_ino.value) if active() and _ino is not None else None


def read_tid() -> int:
    """The thread id of the process whose read is being handled; 0 if unknown."""
    return int(_tid.value) if _tid is not None else 0


def write_cached() -> bool:
    """Whether the write being handled is the kernel writing back its cached pages (a shared
    writable mapping): its handle is not necessarily the one whose caller dirtied them."""
    return bool(_cached.value) if _cached is not None else False
