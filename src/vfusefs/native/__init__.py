"""Blocking syscalls on native storage, one function per FUSE operation (the mount table is
`native.mounts`).

Every function here runs on a host's worker thread (`runtime/workers.py`), never on the event
loop, and
does all the syscalls its operation needs so that a request costs one thread hop.

Safety by construction: every path is one name relative to a directory fd (`*at` calls) and
nothing follows a symlink on the native side (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`).  An inode is
reached through the `O_PATH` fd the inode table holds; where Linux has no `f*` call for an
`O_PATH` fd (chmod, chown, utimens, xattrs, reopen), we use its `/proc/self/fd/N` magic link, which
lands on the inode itself and never walks a native path or follows the inode if it is a symlink.
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import mmap
import os
import stat as stat_mod
from collections.abc import Iterator
from typing import Any, NamedTuple

from vfusefs.runtime._hop import listxattr_at

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
# SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER: start writeback of every dirty page, wait
_SYNC_WHOLE_RANGE = 1 | 2 | 4


def proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class Entry(NamedTuple):
    """A native inode just reached: a new O_PATH fd (or None if already known), its stat, and
    the names of its xattrs (so `ls -l` asking for absent ACL/SELinux xattrs needs no hop)."""

    fd: int | None
    st: os.stat_result
    xattrs: frozenset[bytes] | None = None


class NewFd(int):
    """An fd a native call has just opened and hands back.  Should the request that asked for
    it have given up meanwhile (op_timeout on a hung host), nobody would ever close it: the
    worker pool finds these in the late result (`opened`) and closes them."""

    __slots__ = ()


def opened(result: Any) -> list[Any]:
    """The NewFds and DirStreams in a native call's result (tuples and lists are searched)."""
    if isinstance(result, (NewFd, DirStream)):
        return [result]
    if isinstance(result, (tuple, list)) and not isinstance(result, os.stat_result):
        return [x for item in result for x in opened(item)]
    return []


_NO_XATTRS: frozenset[bytes] = frozenset()


def xattr_names(dirfd: int, name: bytes) -> frozenset[bytes] | None:
    """The names of name's xattrs (name itself: a symlink is not followed); None if unknown."""
    try:
        raw = listxattr_at(dirfd, name)
        if raw is None:  # a kernel before 6.13: the same through /proc, slower
            return frozenset(
                os.fsencode(n)
                for n in os.listxattr(b"/proc/self/fd/%d/%s" % (dirfd, name), follow_symlinks=False)
            )
    except OSError:
        return None
    return frozenset(raw.split(b"\0")[:-1]) if raw else _NO_XATTRS


def _open_path(dirfd: int, name: bytes) -> Entry:
    fd = NewFd(os.open(name, O_PATH_FLAGS, dir_fd=dirfd))
    try:
        return Entry(fd, os.fstat(fd), xattr_names(dirfd, name))
    except BaseException:
        os.close(fd)
        raise


def lookup(dirfd: int, name: bytes, known: Any, vfid: str) -> Entry:
    """Stat name in dirfd; open an O_PATH fd only if the inode is not in the table yet."""
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if (vfid, st.st_dev, st.st_ino) in known:
        # the trailing name is one component from the kernel or getdents: never followed
        return Entry(None, st, xattr_names(dirfd, name))
    return _open_path(dirfd, name)


def open_path(dirfd: int, name: bytes) -> Entry:
    return _open_path(dirfd, name)


def fstat(fd: int) -> os.stat_result:
    return os.fstat(fd)


def _own(dirfd: int, name: bytes, uid: int, gid: int, mode: int) -> None:
    """Give a node the daemon just made (as root) to the caller, as if the caller had made it.

    A parent with the set-group-ID bit keeps the group the native filesystem already chose.
    chown clears set-user/group-ID bits, so those are put back afterwards.
    """
    parent = os.fstat(dirfd)
    os.chown(
        name,
        uid,
        -1 if parent.st_mode & stat_mod.S_ISGID else gid,
        dir_fd=dirfd,
        follow_symlinks=False,
    )
    if mode & (stat_mod.S_ISUID | stat_mod.S_ISGID) and not stat_mod.S_ISLNK(mode):
        os.chmod(name, stat_mod.S_IMODE(mode), dir_fd=dirfd)


# Functions that change a directory also return its stat taken afterwards ("pst"), so the
# kernel's next getattr on it (it drops the dir's cached attributes) needs no second hop, and
# the change in allocated bytes they caused (stats before and after, same hop) for quota.


def _alloc(st: os.stat_result | None) -> int:
    return st.st_blocks * 512 if st is not None else 0


# -- what a change did: typed results ----------------------------------------------------------
# Every call that may change usage returns one of these.  `grown_bytes` and `grown_inodes` are
# what it added to the vfolder's usage (negative: freed), measured from the stats around it;
# the caller charges exactly that (Operations._charged).
class Made(NamedTuple):  # mknod, mkdir, symlink
    entry: Entry
    parent_st: os.stat_result
    grown_bytes: int
    grown_inodes: int = 1


class Linked(NamedTuple):
    st: os.stat_result  # the file, its link count one higher
    parent_st: os.stat_result
    grown_bytes: int  # the directory's growth only: a link adds no file bytes
    grown_inodes: int = 0


class Created(NamedTuple):
    fd: int  # the data fd
    entry: Entry
    parent_st: os.stat_result
    grown_bytes: int
    grown_inodes: int  # 1, or 0 if it existed (O_TRUNC of it frees its blocks)


class Changed(NamedTuple):  # setattr, setxattr, removexattr
    st: os.stat_result  # after
    grown_bytes: int
    grown_inodes: int = 0


class Opened(NamedTuple):  # open with O_TRUNC
    fd: int
    st: os.stat_result
    grown_bytes: int
    grown_inodes: int = 0


class Written(NamedTuple):
    written: int
    st: os.stat_result
    grown_bytes: int
    grown_inodes: int = 0


class Removed(NamedTuple):  # unlink, rmdir
    victim: os.stat_result | None  # what the name was
    parent_st: os.stat_result
    grown_bytes: int  # negative: freed (a last link's blocks, the directory's shrink)
    grown_inodes: int  # -1 for a last link, else 0


class Renamed(NamedTuple):
    victim: os.stat_result | None  # the replaced inode (exchange: the other one)
    old_st: os.stat_result  # both parents after
    new_st: os.stat_result
    moved: os.stat_result | None  # what now sits at the new name
    grown_bytes: int
    grown_inodes: int  # a replaced last link frees one; a whiteout adds one


def mknod(dirfd: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Made:
    before = os.fstat(dirfd)
    if stat_mod.S_ISREG(mode):
        os.close(
            os.open(
                name,
                os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                stat_mod.S_IMODE(mode),
                dir_fd=dirfd,
            )
        )
    else:
        os.mknod(name, mode, rdev, dir_fd=dirfd)
    _own(dirfd, name, uid, gid, mode)
    return _made(dirfd, name, before)


def _made(dirfd: int, name: bytes, before: os.stat_result) -> Made:
    entry = _open_path(dirfd, name)
    after = os.fstat(dirfd)
    return Made(entry, after, _alloc(entry.st) + _alloc(after) - _alloc(before))


def mkdir(dirfd: int, name: bytes, mode: int, uid: int, gid: int) -> Made:
    before = os.fstat(dirfd)
    os.mkdir(name, mode, dir_fd=dirfd)
    _own(dirfd, name, uid, gid, mode | stat_mod.S_IFDIR)
    return _made(dirfd, name, before)


def symlink(dirfd: int, name: bytes, target: bytes, uid: int, gid: int) -> Made:
    before = os.fstat(dirfd)
    os.symlink(target, name, dir_fd=dirfd)
    os.chown(
        name,
        uid,
        -1 if before.st_mode & stat_mod.S_ISGID else gid,
        dir_fd=dirfd,
        follow_symlinks=False,
    )
    return _made(dirfd, name, before)


def link(fd: int, dirfd: int, name: bytes) -> Linked:
    before = os.fstat(dirfd)
    os.link(proc(fd), name, dst_dir_fd=dirfd, follow_symlinks=True)
    after = os.fstat(dirfd)
    return Linked(os.fstat(fd), after, _alloc(after) - _alloc(before))


def create(dirfd: int, name: bytes, flags: int, mode: int, uid: int, gid: int) -> Created:
    """Open-or-create name, never following a symlink (O_TRUNC on an existing file frees)."""
    before = os.fstat(dirfd)
    existing = stat_at(dirfd, name)
    flags = (flags | os.O_NOFOLLOW | os.O_CLOEXEC) & ~os.O_NOCTTY
    try:
        datafd = NewFd(os.open(name, flags | os.O_CREAT | os.O_EXCL, mode, dir_fd=dirfd))
        created = True
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        datafd = NewFd(os.open(name, flags & ~os.O_CREAT, dir_fd=dirfd))
        created = False
    try:
        if created:
            _own(dirfd, name, uid, gid, mode | stat_mod.S_IFREG)
        entry = _reopen_path(datafd)
        after = os.fstat(dirfd)
        grown = (
            _alloc(after) - _alloc(before) + _alloc(entry.st) - (0 if created else _alloc(existing))
        )
        return Created(datafd, entry, after, grown, 1 if created else 0)
    except BaseException:
        os.close(datafd)
        raise


def _reopen_path(datafd: int) -> Entry:
    fd = NewFd(os.open(proc(datafd), os.O_PATH | os.O_CLOEXEC))
    try:
        return Entry(fd, os.fstat(fd), _NO_XATTRS)  # just created: no xattrs yet
    except BaseException:
        os.close(fd)
        raise


def _reopen(fd: int, flags: int) -> int:
    # O_NOFOLLOW was for the kernel's walk; here it would refuse the /proc magic link itself
    return NewFd(
        os.open(
            proc(fd),
            (flags | os.O_CLOEXEC) & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW),
        )
    )


def open_data(fd: int, flags: int) -> tuple[int, os.stat_result]:
    """A data fd for the inode fd holds, and the stat of what was opened (its link count as
    of the open)."""
    datafd = _reopen(fd, flags)
    try:
        return datafd, os.fstat(datafd)
    except BaseException:
        os.close(datafd)
        raise


def open_truncating(fd: int, flags: int) -> Opened:
    """open_data with O_TRUNC: also the change in allocated bytes (the kernel forgets the
    file's size and times, and the freed blocks leave the quota)."""
    before = os.fstat(fd)
    datafd = _reopen(fd, flags)
    try:
        after = os.fstat(datafd)
    except BaseException:
        os.close(datafd)
        raise
    return Opened(datafd, after, _alloc(after) - _alloc(before))


def setattr(
    fd: int,
    datafd: int | None,
    mode: int | None,
    uid: int,
    gid: int,
    size: int | None,
    atime_ns: int | None,
    mtime_ns: int | None,
    now_a: bool,
    now_m: bool,
) -> Changed:
    """Returns the new stat and the change in allocated bytes (a truncate may free blocks)."""
    path = proc(fd)
    before = os.fstat(fd) if size is not None else None
    if size is not None:
        if datafd is not None:
            os.ftruncate(datafd, size)
        else:
            os.truncate(path, size)
    if mode is not None:
        os.chmod(path, stat_mod.S_IMODE(mode))
    if uid != -1 or gid != -1:
        os.chown(path, uid, gid)
    if atime_ns is not None or mtime_ns is not None or now_a or now_m:
        _utimens(path, atime_ns, mtime_ns, now_a, now_m)
    after = os.fstat(fd)
    return Changed(after, _alloc(after) - _alloc(before) if before is not None else 0)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_AT_FDCWD = -100


def _utimens(
    path: str, atime_ns: int | None, mtime_ns: int | None, now_a: bool, now_m: bool
) -> None:
    def ts(value: int | None, now: bool) -> _Timespec:
        if now:
            return _Timespec(0, _UTIME_NOW)
        if value is None:
            return _Timespec(0, _UTIME_OMIT)
        return _Timespec(*divmod(value, 1_000_000_000))

    times = (_Timespec * 2)(ts(atime_ns, now_a), ts(mtime_ns, now_m))
    if _utimensat(_AT_FDCWD, os.fsencode(path), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def readlink(fd: int) -> bytes:
    return os.readlink(b"", dir_fd=fd)  # readlinkat(fd, "") reads the O_PATH symlink itself


def removed(victim: os.stat_result | None) -> tuple[int, int]:
    """Bytes and inodes freed when the name victim had goes away: only with its last link."""
    if victim is None or not stat_mod.S_ISDIR(victim.st_mode) and victim.st_nlink > 1:
        return 0, 0
    return -_alloc(victim), -1


def unlink(dirfd: int, name: bytes) -> Removed:
    return _remove(os.unlink, dirfd, name)


def rmdir(dirfd: int, name: bytes) -> Removed:
    return _remove(os.rmdir, dirfd, name)


def _remove(remove: Any, dirfd: int, name: bytes) -> Removed:
    """unlink or rmdir name: what it was, and what its going freed (with the directory's own
    change in blocks)."""
    victim = stat_at(dirfd, name)
    before = os.fstat(dirfd)
    remove(name, dir_fd=dirfd)
    after = os.fstat(dirfd)
    freed_bytes, freed_inodes = removed(victim)
    return Removed(victim, after, freed_bytes + _alloc(after) - _alloc(before), freed_inodes)


def stat_at(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def rename(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> Renamed:
    victim = None if flags & RENAME_EXCHANGE else stat_at(newdirfd, new)
    before = _alloc(os.fstat(olddirfd)) + (
        _alloc(os.fstat(newdirfd)) if newdirfd != olddirfd else 0
    )
    if _renameat2(olddirfd, old, newdirfd, new, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    old_st, new_st = os.fstat(olddirfd), os.fstat(newdirfd)
    after = _alloc(old_st) + (_alloc(new_st) if newdirfd != olddirfd else 0)
    moved = stat_at(newdirfd, new)
    if flags & RENAME_EXCHANGE:
        victim = stat_at(olddirfd, old)  # the other one moved too: its ctime changed
        freed_bytes, freed_inodes = 0, 0
    else:
        freed_bytes, freed_inodes = removed(victim)
    made = 1 if flags & RENAME_WHITEOUT else 0  # the whiteout left at old is a new inode
    return Renamed(victim, old_st, new_st, moved, freed_bytes + after - before, freed_inodes + made)


def read(datafd: int, size: int, off: int) -> bytes:
    return os.pread(datafd, size, off)


BLOCK = 4096  # allocation unit assumed for quota reservations (commits use real st_blocks)


class NeedsRoom(Exception):
    """A write found more of its range unallocated than the room reserved for it (holes where
    the stat on the event loop said the file was whole): reserve `nbytes`, and ask again."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(nbytes)
        self.nbytes = nbytes


def write_bound(st: os.stat_result | None, off: int, size: int) -> int:
    """A guess, from a stat, of the most bytes a write of size at off can allocate: the blocks
    it touches, less those below the end of a file whose blocks cover its size (then probably
    no holes: an overwrite in place allocates nothing).  `write` checks the guess."""
    start, end = off // BLOCK * BLOCK, -(-(off + size) // BLOCK) * BLOCK
    if st is not None:
        size_end = -(-st.st_size // BLOCK) * BLOCK
        if st.st_blocks * 512 >= size_end:
            start = max(start, size_end)
    return max(0, end - start)


def _holes(fd: int, lo: int, hi: int, size: int) -> int:
    """Bytes of [lo, hi) (block-aligned, below end of file) that are holes (SEEK_HOLE/DATA)."""
    holes, pos = 0, lo
    while pos < hi:
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:  # no SEEK_HOLE here, or truncated meanwhile: assume all of it new
            return hi - pos + holes
        if hole >= min(hi, size):  # at most the virtual hole at the end of file
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after it
            data = hi
        hole_end = min(-(-data // BLOCK) * BLOCK, hi)
        holes += hole_end - hole // BLOCK * BLOCK
        pos = hole_end
    return holes


def _growth(fd: int, st: os.stat_result, off: int, size: int) -> int:
    """The most bytes a write of size at off can allocate, exactly: the blocks it touches past
    the end of file, and the holes it fills below it."""
    start, end = off // BLOCK * BLOCK, -(-(off + size) // BLOCK) * BLOCK
    size_end = -(-st.st_size // BLOCK) * BLOCK
    past_end = max(0, end - max(start, size_end))
    below = min(end, size_end)
    return past_end + (_holes(fd, start, below, st.st_size) if start < below else 0)


def write(datafd: int, buf: bytes | mmap.mmap, off: int, reserved: int = -1) -> Written:
    """pwrite, with the change in allocated bytes.  With reserved
    (the quota room held for it) less than the blocks the write touches, the range is checked
    for holes first (NeedsRoom if they need more): a file's blocks may cover its size and still
    have holes (an xattr block, blocks preallocated past its end)."""
    before = os.fstat(datafd)
    if 0 <= reserved < -(-(off + len(buf)) // BLOCK) * BLOCK - off // BLOCK * BLOCK:
        need = _growth(datafd, before, off, len(buf))
        if need > reserved:
            raise NeedsRoom(need)
    n = os.pwrite(datafd, buf, off)
    after = os.fstat(datafd)
    return Written(n, after, _alloc(after) - _alloc(before))


# O_DIRECT: the kernel wants the buffer aligned (EINVAL otherwise), which a bytes object is
# not; an anonymous mapping is page-aligned.  The client's offsets and sizes are its own to
# align, as they would be natively.
def read_direct(datafd: int, size: int, off: int) -> bytes:
    if not size:
        return b""
    with mmap.mmap(-1, size) as buf:
        return buf[: os.preadv(datafd, [buf], off)]


def write_direct(datafd: int, buf: bytes, off: int, reserved: int = -1) -> Written:
    if not buf:
        return write(datafd, buf, off, reserved)
    with mmap.mmap(-1, len(buf)) as aligned:
        aligned[:] = buf
        return write(datafd, aligned, off, reserved)


def fallocate(datafd: int, mode: int, off: int, length: int) -> None:
    if _fallocate(datafd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# filesystems on local block devices (or memory): close() has nothing to report or push there
LOCAL_FS_TYPES = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "bcachefs", "jfs", "reiserfs"}
)

# filesystems whose buffered reads honour RWF_NOWAIT: answered from the page cache or refused
# at once (the kernel starts reading the pages in), never waiting for the device or a server.
# FUSE refuses RWF_NOWAIT outright (EOPNOTSUPP, seen on 6.18); network filesystems are left out
# too, so that no kernel's different answer can make the trio thread wait for a server, and so
# is tmpfs, where a swapped-out page is read back in before the read returns.
NOWAIT_FS_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})


def flush(datafd: int) -> None:
    # close(dup(fd)) makes network filesystems write back and report errors now (close-to-open)
    os.close(os.dup(datafd))


def fsync(datafd: int, datasync: bool) -> None:
    (os.fdatasync if datasync else os.fsync)(datafd)


def statvfs(fd: int) -> os.statvfs_result:
    return os.statvfs(fd)


def statvfs_path(path: str) -> os.statvfs_result:
    return os.statvfs(path)


def getxattr(fd: int, name: bytes) -> bytes:
    return os.getxattr(proc(fd), name)


def setxattr(fd: int, name: bytes, value: bytes, flags: int) -> Changed:
    """An xattr may take a block of its own: that is what it grows by."""
    before = os.fstat(fd)
    os.setxattr(proc(fd), name, value, flags)
    after = os.fstat(fd)
    return Changed(after, _alloc(after) - _alloc(before))


def listxattr(fd: int) -> list[str]:
    return os.listxattr(proc(fd))


def removexattr(fd: int, name: bytes) -> Changed:
    before = os.fstat(fd)
    os.removexattr(proc(fd), name)
    after = os.fstat(fd)
    return Changed(after, _alloc(after) - _alloc(before))


def allocation(fd: int, dev: int, ino: int) -> tuple[int, int] | None:
    """(allocated bytes, link count) of the inode fd refers to; None if fd no longer refers to
    (dev, ino) (closed and reused meanwhile)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (_alloc(st), st.st_nlink) if (st.st_dev, st.st_ino) == (dev, ino) else None


def write_back(fd: int, dev: int, ino: int) -> None:
    """Make the native fs allocate what it still defers for a regular file (delayed allocation
    settles st_blocks, extent blocks included, at writeback): write its dirty pages back now and
    wait.  fd is the file's O_PATH fd; data only, no journal commit (not fsync).  Quietly does
    nothing when the fd no longer refers to (dev, ino) or the file cannot be opened."""
    try:
        data = os.open(proc(fd), os.O_RDONLY | os.O_NOATIME | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(data)
        if (st.st_dev, st.st_ino) == (dev, ino) and stat_mod.S_ISREG(st.st_mode):
            _sync_file_range(data, 0, 0, _SYNC_WHOLE_RANGE)
    finally:
        os.close(data)


class Scan(NamedTuple):
    """What a walk of a vfolder's tree found."""

    bytes: int  # allocated, as du -s counts them (the root directory's own blocks included)
    inodes: int  # below the root, hard links once
    # inodes other than directories with more than one link: (st_dev, st_ino) -> (st_nlink,
    # names in the tree), so a file with names outside the vfolder can be told apart
    links: dict[tuple[int, int], tuple[int, int]]
    # allocated bytes of the inodes asked for (`watched`) that the walk met
    seen: dict[tuple[int, int], int]


def scan(
    root_fd: int, progress: Any = None, watched: frozenset[tuple[int, int]] = frozenset()
) -> Scan:
    """Walk a vfolder's native tree: allocated bytes (du -s) and inodes below the root.

    Hard links count once, as du counts them, and their names per inode (`Scan.links`).  Never
    follows symlinks and never leaves the tree: every directory is opened relative to its
    parent with O_NOFOLLOW.  Depth first, with
    one fd per level (never one per sibling), so a wide tree cannot run out of fds; a directory
    that cannot be opened fails the scan rather than being left out of the count.
    """
    links: dict[tuple[int, int], tuple[int, int]] = {}
    seen: dict[tuple[int, int], int] = {}
    total, inodes = _alloc(os.fstat(root_fd)), 0

    def entries(dfd: int) -> list[str]:
        """Count one directory's entries; return its subdirectories' names."""
        nonlocal total, inodes
        subdirs = []
        with os.scandir(dfd) as it:
            for dent in it:
                try:
                    st = dent.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_nlink > 1 and not stat_mod.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    names = links.get(key, (0, 0))[1] + 1
                    links[key] = (st.st_nlink, names)
                    if names > 1:
                        continue
                total += _alloc(st)
                inodes += 1
                if watched and (st.st_dev, st.st_ino) in watched:
                    seen[(st.st_dev, st.st_ino)] = _alloc(st)
                if progress is not None:
                    progress(inodes, total)
                if stat_mod.S_ISDIR(st.st_mode):
                    subdirs.append(dent.name)
        return subdirs

    root = os.open(proc(root_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack = [(root, iter(entries(root)))]
    try:
        while stack:
            dfd, pending = stack[-1]
            name = next(pending, None)
            if name is None:
                os.close(dfd)
                stack.pop()
                continue
            try:
                child = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
                )
            except FileNotFoundError:
                continue  # removed since we listed it
            stack.append((child, iter(())))  # held first, so `finally` closes it if listing fails
            stack[-1] = (child, iter(entries(child)))
    finally:
        for dfd, _ in stack:
            os.close(dfd)
    return Scan(total, inodes, links, seen)


# -- directories ----------------------------------------------------------------------------------
class DirStream:
    """A native directory being listed, read in chunks; offsets are positions in the stream."""

    def __init__(self, fd: int) -> None:
        self.fd = os.open(proc(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._it: Iterator[os.DirEntry[str]] | None = os.scandir(self.fd)
        self._retry: os.DirEntry[str] | None = None  # an entry to read again first (chunk)
        self.position = 0  # offset of the next entry chunk returns

    @property
    def ended(self) -> bool:
        """The listing reached its end (until rewind): chunk would return []."""
        return self._it is None

    def rewind(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
        os.lseek(self.fd, 0, os.SEEK_SET)
        self._it = os.scandir(self.fd)
        self._retry = None
        self.position = 0

    def chunk(self, count: int, known: Any, vfid: str) -> list[tuple[bytes, Entry]]:
        """Up to count entries (name, new O_PATH fd or None, stat); [] at the end.

        An error on an entry after others were read (EMFILE at the fd limit) ends the chunk
        there, and that entry is read again first next time: the fds opened for the others
        reach the caller (raising would lose them for good) and no entry is skipped.  An
        error on the first entry is raised (and that entry too is read again next time)."""
        out: list[tuple[bytes, Entry]] = []
        while self._it is not None and len(out) < count:
            dent = self._retry if self._retry is not None else next(self._it, None)
            self._retry = None
            if dent is None:
                self._it.close()  # type: ignore[attr-defined]
                self._it = None
                break
            name = os.fsencode(dent.name)
            try:
                entry = lookup(self.fd, name, known, vfid)
            except FileNotFoundError:
                self.position += 1
                continue  # removed since getdents
            except OSError:
                self._retry = dent
                if not out:
                    raise
                break
            self.position += 1
            out.append((name, entry))
        return out

    def skip(self, count: int) -> None:
        """Advance to an arbitrary offset (telldir/seekdir); the slow path."""
        self.rewind()
        assert self._it is not None
        for _ in range(count):
            if next(self._it, None) is None:
                break
            self.position += 1

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None
        os.close(self.fd)


class Listed(NamedTuple):
    """A page of a directory's entries, sorted by name, each with its lstat."""

    entries: list[tuple[bytes, os.stat_result]]
    more: bool  # entries after the last one remain


def listing(fd: int, after: bytes, limit: int) -> Listed:
    """The first `limit` entries of the directory fd holds whose names sort after `after`
    (the file API's paged listing; an entry gone between the read and its stat is left out).
    Reading every name costs O(entries) per page, the stats only the page's."""
    dfd = os.open(proc(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = (os.fsencode(n) for n in os.listdir(dfd))
        page = heapq.nsmallest(limit + 1, (n for n in names if n > after))
        entries = []
        for name in page[:limit]:
            try:
                entries.append((name, os.stat(name, dir_fd=dfd, follow_symlinks=False)))
            except FileNotFoundError:
                continue
        return Listed(entries, len(page) > limit)
    finally:
        os.close(dfd)


def is_dir(st: os.stat_result) -> bool:
    return stat_mod.S_ISDIR(st.st_mode)


ENOATTR = errno.ENODATA
