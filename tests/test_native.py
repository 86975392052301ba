"""native.py on its own: listing a directory at the fd limit.

A listing opens an O_PATH fd per entry the inode table does not know yet, so near
RLIMIT_NOFILE one of them fails with EMFILE.  The fds already opened for the chunk must reach
the caller (they were lost for good before, and the daemon stayed at its limit) and every
entry must be listed exactly once, the failed one included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

LISTER = r"""
import errno, os, resource, sys
from vfusefs import native
def open_fds():
    return len(os.listdir("/proc/self/fd")) - 1  # not listdir's own

names = sorted(os.listdir(sys.argv[1]))
before = open_fds()
dirfd = os.open(sys.argv[1], os.O_PATH)
stream = native.DirStream(dirfd)
room = open_fds() + 8
resource.setrlimit(resource.RLIMIT_NOFILE, (room, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
seen, partial, refused = [], 0, 0
while True:
    chunk = stream.chunk(256, {}, "v")  # nothing known: every entry opens an fd
    if not chunk:
        break
    seen += [name.decode() for name, _ in chunk]
    partial += len(chunk) < 256
    try:
        stream.chunk(256, {}, "v")  # no fd left: the first entry fails
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
        refused += 1
    for _, entry in chunk:
        os.close(entry.fd)
stream.close()
os.close(dirfd)
assert partial >= 4 and refused >= partial - 1, (partial, refused)  # the last may end the dir
assert sorted(seen) == names, "entries lost or repeated"
assert open_fds() == before, "fds leaked"
print("ok", len(seen), partial)
"""


def test_a_listing_at_the_fd_limit_loses_no_fd_and_no_entry(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"f{i:02d}").touch()
    r = subprocess.run(
        [sys.executable, "-c", LISTER, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("ok 40"), r.stdout + r.stderr


def test_opened_finds_the_fds_a_late_result_holds(tmp_path: Path) -> None:
    """What the worker pool closes when a call ends after its request gave up."""
    import os

    from vfusefs import native

    dirfd = os.open(tmp_path, os.O_PATH)
    try:
        (tmp_path / "f").touch()
        entry = native.open_path(dirfd, b"f")
        stream = native.DirStream(dirfd)
        data, _ = native.open_data(entry.fd, os.O_RDONLY)  # the fd and its stat
        try:
            assert isinstance(entry.fd, native.NewFd)
            late = [(b"f", entry), (data, os.fstat(dirfd), 7), (stream, os.fstat(dirfd))]
            assert native.opened(late) == [entry.fd, data, stream]
            assert native.opened((3, os.fstat(dirfd), b"x")) == []  # plain ints are no fds
        finally:
            os.close(entry.fd)
            os.close(data)
            stream.close()
    finally:
        os.close(dirfd)


def test_xattr_names_are_the_entrys_own_with_listxattrat_and_without(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """xattr_names asks listxattrat(2) (Linux 6.13), or walks /proc on older kernels: both
    give the names of the entry itself (a symlink's own), also past the C side's first buffer."""
    import os

    from vfusefs import native

    (tmp_path / "f").write_bytes(b"")
    names = {b"user.a_rather_long_attribute_name_%03d" % i for i in range(40)}  # > 1 KiB
    for n in names:
        os.setxattr(tmp_path / "f", n, b"v")
    os.symlink("f", tmp_path / "l")
    dirfd = os.open(tmp_path, os.O_PATH)
    try:
        for ask in (native.listxattr_at, lambda fd, name: None):  # None: "no listxattrat"
            monkeypatch.setattr(native, "listxattr_at", ask)
            assert native.xattr_names(dirfd, b"f") == names
            assert native.xattr_names(dirfd, b"l") == frozenset()
            assert native.xattr_names(dirfd, b"missing") is None
    finally:
        os.close(dirfd)
