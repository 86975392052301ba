"""The mount table, read from /proc/self/mountinfo, and umount2(2).

One reader serves everyone who asks what is mounted where: start-up (is a vfusefs mount already
at the mountpoint? which device is ours, for its read-ahead?), host loading (which filesystem
holds a host's path?) and `vfusefs doctor`.
"""

from __future__ import annotations

import ctypes
import os
from typing import Iterator, NamedTuple

MNT_DETACH = 2
VFUSEFS_TYPE = "fuse.vfusefs"  # what mountinfo calls our mount (fuse, subtype=vfusefs)

_libc = ctypes.CDLL(None, use_errno=True)


class Mount(NamedTuple):
    point: str
    dev: str  # "major:minor"
    fstype: str


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def table() -> Iterator[Mount]:
    """Every mount this process sees, in mount order (an empty table if it cannot be read)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        try:
            yield Mount(_unescape(fields[4]), fields[2], fields[fields.index("-") + 1])
        except (IndexError, ValueError):
            continue


def mount_at(path: str) -> Mount | None:
    """The mount on top at exactly path, or None if path is not a mount point."""
    real = os.path.realpath(path)
    found = None
    for m in table():
        if m.point == real:
            found = m  # later entries are mounted over earlier ones
    return found


def fs_type(path: str) -> str:
    """Filesystem type holding path: that of the longest mount point that is a prefix of it."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    for m in table():
        if (real == m.point or real.startswith(m.point.rstrip("/") + "/")) \
                and len(m.point) >= len(best):
            best, kind = m.point, m.fstype
    return kind


def umount(mountpoint: str, lazy: bool) -> None:
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), mountpoint)
