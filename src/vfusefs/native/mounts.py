"""The mount table, read from /proc/self/mountinfo, and umount2(2).

One reader serves everyone who asks what is mounted where: start-up (is a vfusefs mount already
at the mountpoint? which device is ours, for its read-ahead?), host loading (which filesystem
holds a host's path?) and `vfusefs doctor`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from typing import NamedTuple

MNT_DETACH = 2
VFUSEFS_TYPE = "fuse.vfusefs"  # what mountinfo calls our mount (fuse, subtype=vfusefs)

_libc = ctypes.CDLL(None, use_errno=True)


class Mount(NamedTuple):
    point: str
    dev: str  # "major:minor"
    fstype: str
    source: str = ""  # "10.0.0.5:/export", "/dev/sda1", ...


def _unescape(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


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
            dash = fields.index("-")
            yield Mount(
                _unescape(fields[4]),
                fields[2],
                fields[dash + 1],
                _unescape(fields[dash + 2]) if len(fields) > dash + 2 else "",
            )
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


def mount_of(path: str) -> Mount | None:
    """The mount holding path: that of the longest mount point that is a prefix of it."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in table():
        if (real == m.point or real.startswith(m.point.rstrip("/") + "/")) and (
            best is None or len(m.point) >= len(best.point)
        ):
            best = m
    return best


def fs_type(path: str) -> str:
    """Filesystem type holding path ("?" if the mount table cannot tell)."""
    m = mount_of(path)
    return m.fstype if m is not None else "?"


def source_server(source: str) -> str:
    """The (first) server of a network mount's source: "10.0.0.5:/export" -> "10.0.0.5",
    "[fd00::5]:/x" -> "fd00::5", "mon1:6789,mon2:6789:/" -> "mon1", "10.0.0.1@tcp:/lustre" ->
    "10.0.0.1"; "" when the source names no server."""
    head, sep, _ = source.partition(":/")
    if not sep or not head:
        return ""
    first = head.split(",")[0].partition("@")[0]  # the first of several; Lustre's "@tcp" off
    if first.startswith("["):
        return first[1:].partition("]")[0]
    if first.count(":") == 1:  # host:port (more colons: a bare IPv6 address)
        first = first.partition(":")[0]
    return first


def umount(mountpoint: str, lazy: bool) -> None:
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), mountpoint)
