"""Copy a vfolder's tree for a clone, on storage with no snapshot: what `cp -a` keeps, and holes.

Kept: file contents (copy_file_range, which reflinks on XFS and btrfs and copies in the kernel
elsewhere, so no byte passes through Python), holes (only the data segments SEEK_DATA finds are
copied), modes, owners, access and modification times, extended attributes, symlinks (copied
as links, never followed), hard links (one inode stays one inode), FIFOs and device nodes.

Everything is reached from directory fds with O_NOFOLLOW: a name a user swaps for a symlink
during the copy is refused (ELOOP), never followed out of the vfolder.  Blocking; runs on a
thread, never on the event loop.  `progress(files, bytes)` is called as it goes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

CHUNK = 64 << 20  # bytes per copy_file_range call (progress between calls)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CopyCancelled(Exception):
    """The clone was abandoned (the caller's `cancelled()` said so)."""


def copy_tree(
    src_fd: int,
    dst_fd: int,
    progress: Callable[[int, int], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> tuple[int, int]:
    """Copy everything below directory src_fd into the empty directory dst_fd (whose own mode,
    owner, times and xattrs are set from src_fd's last).  Returns (files, bytes) copied."""
    state = _Copy(progress, cancelled)
    try:
        state.directory(src_fd, dst_fd)
    finally:
        state.close()
    _attributes(None, dst_fd, os.fstat(src_fd), src_fd)
    return state.files, state.bytes


class _Copy:
    def __init__(self, progress: Callable[[int, int], None], cancelled: Callable[[], bool]) -> None:
        self.progress = progress
        self.cancelled = cancelled
        self.files = 0
        self.bytes = 0
        self.links: dict[tuple[int, int], tuple[int, str]] = {}  # inode -> (dst dir fd, name)
        self.link_dirs: list[int] = []  # dst dir fds kept open for later hard links

    def directory(self, src: int, dst: int) -> None:
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if self.cancelled():
                raise CopyCancelled()
            st = os.stat(entry.name, dir_fd=src, follow_symlinks=False)
            self.entry(src, dst, entry.name, st)
            self.files += 1
            self.progress(self.files, self.bytes)

    def entry(self, src: int, dst: int, name: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            sfd = os.open(name, DIR_FLAGS, dir_fd=src)
            try:
                dfd = os.open(name, DIR_FLAGS, dir_fd=dst)
                try:
                    self.directory(sfd, dfd)
                    _attributes(None, dfd, st, sfd)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
            return
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:  # a hard link to an inode copied already
            first_dir, first_name = self.links[key]
            os.link(first_name, name, src_dir_fd=first_dir, dst_dir_fd=dst, follow_symlinks=False)
            return
        if stat.S_ISREG(mode):
            self.regular(src, dst, name, st)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            _attributes(name, dst, st, None, src_dir=src)
        else:  # FIFOs, sockets, device nodes
            os.mknod(name, mode, st.st_rdev, dir_fd=dst)
            _attributes(name, dst, st, None, src_dir=src)
        if st.st_nlink > 1:
            keep = os.dup(dst)
            self.link_dirs.append(keep)
            self.links[key] = (keep, name)

    def regular(self, src: int, dst: int, name: str, st: os.stat_result) -> None:
        sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
        try:
            dfd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dst
            )
            try:
                for start, end in _data_segments(sfd, st.st_size):
                    self._copy_range(sfd, dfd, start, end)
                os.ftruncate(dfd, st.st_size)  # a trailing hole
                _attributes(None, dfd, st, sfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def _copy_range(self, sfd: int, dfd: int, start: int, end: int) -> None:
        off = start
        while off < end:
            if self.cancelled():
                raise CopyCancelled()
            want = min(CHUNK, end - off)
            try:
                n = os.copy_file_range(sfd, dfd, want, off, off)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                n = os.pwrite(dfd, os.pread(sfd, min(want, 1 << 20), off), off)
            if n == 0:  # the source shrank meanwhile
                return
            off += n
            self.bytes += n
            self.progress(self.files, self.bytes)

    def close(self) -> None:
        for fd in self.link_dirs:
            os.close(fd)


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges holding data (the rest are holes), by SEEK_DATA/SEEK_HOLE."""
    out = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            if exc.errno == errno.EINVAL:  # no SEEK_DATA here: all of it is data
                return [(0, size)] if size else []
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        off = end
    return out


def _attributes(
    name: str | None,
    dst: int,
    st: os.stat_result,
    src_fd: int | None,
    src_dir: int | None = None,
) -> None:
    """Give dst (an fd, or `name` in directory dst for symlinks and nodes) src's xattrs,
    owner, mode and times (owner before mode: chown clears set-ID bits)."""
    if name is None:  # an fd of each side
        assert src_fd is not None
        _copy_xattrs(src_fd, dst, True)
        os.fchown(dst, st.st_uid, st.st_gid)
        os.fchmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    _copy_xattrs(_proc_path(src_dir, name), _proc_path(dst, name), False)
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)


def _copy_xattrs(src: int | str, dst: int | str, follow: bool) -> None:
    try:
        keys = os.listxattr(src, follow_symlinks=follow)
    except OSError:
        return  # the filesystem has none
    for key in keys:
        try:
            value = os.getxattr(src, key, follow_symlinks=follow)
            os.setxattr(dst, key, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                raise


def _proc_path(dir_fd: int | None, name: str) -> str:
    """A path naming `name` in directory dir_fd without walking any path a user controls."""
    return f"/proc/self/fd/{dir_fd}/{name}"
