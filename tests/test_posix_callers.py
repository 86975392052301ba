"""Differential POSIX test with callers other than root, in the spirit of pjdfstest.

test_posix_diff.py runs random operations as root.  A POSIX suite also acts as other users
(ownership changes, set-id bits, sticky directories, search permission, the rules of utimes)
and checks which timestamps an operation moved.  Here a fixed script of such steps runs twice,
on a plain directory and through the mount, each step in a child process with the step's
credentials.  What must match: the result or errno, the stat of each path the step watches
(type and mode, owner, link count, size, device number) and which of its mtime and ctime moved
(and its atime, for the steps that set times).

Known differences, not compared:
- atime after a read: the kernel never moves a FUSE inode's atime itself (S_NOATIME), and a read
  answered from its page cache never reaches us, so only reads that reach native storage do.
- ctime after chown(-1, -1): Linux moves it natively; POSIX says it need not, and through FUSE
  nothing changes, so nothing is sent.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import shutil
import stat
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, outcome, renameat2

pytestmark = pytest.mark.mount

libc = ctypes.CDLL(None, use_errno=True)  # getxattr(2) with no buffer: the value's size

Who = tuple[int, list[int]] | None  # (uid, groups, the first being the gid); None: root
NOBODY: Who = (65534, [65534])
NOBODY_IN_TWO: Who = (65534, [65533, 65532])
OTHER: Who = (65533, [65531])
KINDS = ["regular", "dir", "fifo", "block", "char", "socket", "symlink"]


@dataclass
class Step:
    desc: str
    who: Who
    fn: Callable[[Path], Any]
    watch: tuple[str, ...] = ()  # paths (relative to the root) whose stat and times are compared
    atime: bool = False  # also compare whether atime moved
    times: bool = True  # compare which times moved (False: stats only)


def as_caller(who: Who, fn: Callable[[], Any]) -> Any:
    """fn() in a child with who's credentials: ("ok", value) or ("err", errno name)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.close(r)
            if who is not None:
                uid, groups = who
                os.setgroups(groups)
                os.setresgid(groups[0], groups[0], groups[0])
                os.setresuid(uid, uid, uid)
            out = outcome(fn)
        except BaseException:
            out = ("crash", traceback.format_exc())
        os.write(w, pickle.dumps(out))
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(data)


def shape(p: Path) -> dict[str, Any] | None:
    try:
        s = os.lstat(p)
    except FileNotFoundError:
        return None
    device = stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode)
    return {
        "mode": oct(s.st_mode),
        "uid": s.st_uid,
        "gid": s.st_gid,
        "nlink": s.st_nlink,
        "size": s.st_size if not stat.S_ISDIR(s.st_mode) else None,
        "rdev": s.st_rdev if device else None,
    }


def stamps(p: Path) -> tuple[int, int, int] | None:
    try:
        s = os.lstat(p)
    except FileNotFoundError:
        return None
    return s.st_atime_ns, s.st_mtime_ns, s.st_ctime_ns


def moved(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> Any:
    if before is None or after is None:
        return None
    return tuple("moved" if b != a else "same" for a, b in zip(before, after, strict=True))


# -- what the steps do ----------------------------------------------------------------------------
def make(p: Path, kind: str) -> dict[str, Any] | None:
    if kind == "regular":
        os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    elif kind == "dir":
        os.mkdir(p, 0o755)
    elif kind == "fifo":
        os.mkfifo(p, 0o644)
    elif kind == "block":
        os.mknod(p, 0o644 | stat.S_IFBLK, os.makedev(1, 2))
    elif kind == "char":
        os.mknod(p, 0o644 | stat.S_IFCHR, os.makedev(1, 2))
    elif kind == "socket":
        os.mknod(p, 0o644 | stat.S_IFSOCK)
    else:
        os.symlink("target", p)
    return shape(p)


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        os.rmdir(p)
    else:
        os.unlink(p)


def touch(p: Path, mode: int = 0o644) -> dict[str, Any] | None:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, mode))
    return shape(p)


def on_fd(p: Path, flags: int, fn: Callable[[int], Any]) -> Any:
    fd = os.open(p, flags)
    try:
        return fn(fd)
    finally:
        os.close(fd)


def busy_text(exe: Path) -> list[str]:
    """Open for writing and truncate a program while it runs: ETXTBSY both."""
    shutil.copy("/bin/sleep", exe)
    os.chmod(exe, 0o755)
    proc = subprocess.Popen([str(exe), "5"])
    try:
        time.sleep(0.3)
        out = []
        for fn in (lambda: os.close(os.open(exe, os.O_WRONLY)), lambda: os.truncate(exe, 0)):
            try:
                fn()
                out.append("ok")
            except OSError as exc:
                out.append(errno.errorcode[exc.errno or 0])
        return out
    finally:
        proc.kill()
        proc.wait()


def runs(p: Path) -> int:
    return subprocess.run([str(p)], capture_output=True).returncode


# -- the script -----------------------------------------------------------------------------------
def ownership_steps(kind: str) -> Iterator[Step]:
    """chown/chmod/utimes by root, the owner and others, on each kind of node (pjdfstest's
    chown, chmod and utimensat loops)."""
    n = "n0"
    yield Step(f"create {kind}", None, lambda r: make(r / n, kind), (n, "."))
    if kind != "symlink":

        def chown(uid: int, gid: int) -> Callable[[Path], Any]:
            return lambda r: os.chown(r / n, uid, gid)

        def chmod(mode: int) -> Callable[[Path], Any]:
            return lambda r: os.chmod(r / n, mode)

        yield Step(f"root chowns a {kind}", None, chown(123, 456), (n,))
        yield Step(f"root gives a {kind} to nobody", None, chown(65534, 65533), (n,))
        yield Step(f"root sets set-id bits of a {kind}", None, chmod(0o6555), (n,))
        yield Step(f"the owner changes a {kind}'s group", NOBODY_IN_TWO, chown(65534, 65532), (n,))
        yield Step(f"root sets set-id bits of a {kind} again", None, chmod(0o6555), (n,))
        yield Step(
            f"the owner chowns a {kind} to -1 -1", NOBODY_IN_TWO, chown(-1, -1), (n,), times=False
        )
        yield Step(f"the owner chowns a {kind} to -1 65533", NOBODY_IN_TWO, chown(-1, 65533), (n,))
        yield Step(f"another user chowns a {kind}", OTHER, chown(65533, -1), (n,))
        yield Step(f"another user chmods a {kind}", OTHER, chmod(0o777), (n,))
        yield Step(
            f"the owner sets set-gid of a {kind} outside its groups", NOBODY, chmod(0o2755), (n,)
        )
        yield Step(f"the owner sets the sticky bit of a {kind}", NOBODY, chmod(0o1755), (n,))
        yield Step(
            f"the owner sets a {kind}'s times to now",
            NOBODY,
            lambda r: os.utime(r / n),
            (n,),
            atime=True,
        )
        yield Step(
            f"the owner sets a {kind}'s times",
            NOBODY,
            lambda r: os.utime(r / n, ns=(1234567890123456789, 987654321987654321)),
            (n,),
            atime=True,
        )
        yield Step(
            f"another user sets a {kind}'s times",
            OTHER,
            lambda r: os.utime(r / n, ns=(1, 2)),
            (n,),
            atime=True,
        )
        yield Step(
            f"another user sets a {kind}'s times to now",
            OTHER,
            lambda r: os.utime(r / n),
            (n,),
            atime=True,
        )
        yield Step(f"root makes a {kind} 0666", None, chmod(0o666), (n,))
        yield Step(
            f"another user who may write sets a {kind}'s times to now",
            OTHER,
            lambda r: os.utime(r / n),
            (n,),
            atime=True,
        )
        yield Step(
            f"another user who may write sets a {kind}'s times",
            OTHER,
            lambda r: os.utime(r / n, ns=(1, 2)),
            (n,),
            atime=True,
        )
        yield Step(f"link a {kind}", None, lambda r: os.link(r / n, r / "n1"), (n, "n1", "."))
        yield Step(f"rename a {kind}", None, lambda r: os.rename(r / n, r / "n2"), (n, "n2", "."))
        yield Step(
            f"rename a {kind} back", None, lambda r: os.rename(r / "n2", r / n), (n, "n2", ".")
        )
        yield Step(
            f"unlink a {kind}'s second link", None, lambda r: os.unlink(r / "n1"), (n, "n1", ".")
        )
    yield Step(
        f"lchown a {kind}", None, lambda r: os.chown(r / n, 123, 456, follow_symlinks=False), (n,)
    )
    yield Step(f"remove a {kind}", None, lambda r: remove(r / n), (n, "."))


def directory_steps() -> Iterator[Step]:
    """New nodes' owners and modes, set-gid and sticky directories, search permission."""
    yield Step("mkdir d", None, lambda r: os.mkdir(r / "d", 0o755), ("d", "."))
    yield Step("nobody makes a dir where it may not", NOBODY, lambda r: os.mkdir(r / "d/x"), ("d",))
    yield Step("chmod d 0777", None, lambda r: os.chmod(r / "d", 0o777), ("d",))
    yield Step("nobody makes a dir", NOBODY, lambda r: os.mkdir(r / "d/x", 0o755), ("d", "d/x"))
    yield Step(
        "nobody creates a file with set-id bits", NOBODY, lambda r: touch(r / "d/f", 0o6777), ("d",)
    )
    yield Step(
        "d becomes set-gid, group 100",
        None,
        lambda r: (os.chown(r / "d", 0, 100), os.chmod(r / "d", 0o2777)),
        ("d",),
    )
    yield Step(
        "nobody creates a set-gid file in d", NOBODY, lambda r: touch(r / "d/g", 0o2777), ("d",)
    )
    yield Step(
        "nobody makes a dir in d", NOBODY, lambda r: os.mkdir(r / "d/y", 0o777), ("d", "d/y")
    )
    yield Step(
        "nobody makes a fifo in d", NOBODY, lambda r: os.mkfifo(r / "d/p", 0o666), ("d", "d/p")
    )
    yield Step(
        "nobody makes a symlink in d",
        NOBODY,
        lambda r: os.symlink("x" * 100, r / "d/s"),
        ("d", "d/s"),
    )
    yield Step("d becomes sticky", None, lambda r: os.chmod(r / "d", 0o1777), ("d",))
    yield Step("another user unlinks in sticky d", OTHER, lambda r: os.unlink(r / "d/f"), ("d",))
    yield Step(
        "another user renames in sticky d",
        OTHER,
        lambda r: os.rename(r / "d/f", r / "d/f2"),
        ("d",),
    )
    yield Step(
        "another user removes a dir in sticky d", OTHER, lambda r: os.rmdir(r / "d/x"), ("d",)
    )
    yield Step(
        "the owner unlinks in sticky d", NOBODY, lambda r: os.unlink(r / "d/f"), ("d", "d/f")
    )
    yield Step(
        "the owner renames in sticky d", NOBODY, lambda r: os.rename(r / "d/g", r / "d/g2"), ("d",)
    )
    yield Step(
        "another user renames over nobody's file in sticky d",
        OTHER,
        lambda r: (touch(r / "d/h"), os.rename(r / "d/h", r / "d/g2")),
        ("d",),
    )
    yield Step("chmod d 0755", None, lambda r: os.chmod(r / "d", 0o755), ("d",))
    yield Step("another user creates in d", OTHER, lambda r: touch(r / "d/z"), ("d",))
    yield Step("chmod d 0700", None, lambda r: os.chmod(r / "d", 0o700), ("d",))
    yield Step(
        "stat without search permission",
        OTHER,
        lambda r: shape(r / "d/g2") and os.stat(r / "d/g2").st_size,
    )
    yield Step(
        "open without search permission",
        OTHER,
        lambda r: on_fd(r / "d/g2", os.O_RDONLY, lambda fd: 0),
    )
    yield Step("chmod d 0711", None, lambda r: os.chmod(r / "d", 0o711), ("d",))
    yield Step("list without read permission", OTHER, lambda r: sorted(os.listdir(r / "d")))
    yield Step("stat with search permission", OTHER, lambda r: os.stat(r / "d/g2").st_size)
    yield Step("chmod d/g2 0600", None, lambda r: os.chmod(r / "d/g2", 0o600), ("d/g2",))
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_CREAT | os.O_WRONLY):
        yield Step(
            f"another user opens a 0600 file with {flags:#o}",
            OTHER,
            lambda r, f=flags: on_fd(r / "d/g2", f, lambda fd: 0),
        )
    yield Step("another user truncates a 0600 file", OTHER, lambda r: os.truncate(r / "d/g2", 0))


def data_steps() -> Iterator[Step]:
    """Sizes and times after writes, truncates and O_TRUNC; errno of opens and names."""
    g = "d/g2"
    yield Step("chmod d/g2 0644", None, lambda r: os.chmod(r / g, 0o644), (g,))
    yield Step("write 100 bytes", None, lambda r: (r / g).write_bytes(b"x" * 100), (g,))
    yield Step("truncate to 10", None, lambda r: os.truncate(r / g, 10), (g,))
    yield Step("truncate to the same size", None, lambda r: os.truncate(r / g, 10), (g,))
    yield Step("truncate too far", None, lambda r: os.truncate(r / g, 2**63 - 1), (g,))
    yield Step("truncate to -1", None, lambda r: os.truncate(r / g, -1), (g,))
    yield Step(
        "open with O_TRUNC",
        None,
        lambda r: on_fd(r / g, os.O_WRONLY | os.O_TRUNC, os.fstat).st_size,
        (g,),
    )
    yield Step(
        "open an empty file with O_TRUNC",
        None,
        lambda r: on_fd(r / g, os.O_WRONLY | os.O_TRUNC, os.fstat).st_size,
        (g,),
    )
    yield Step(
        "write, append, pwrite, ftruncate",
        None,
        lambda r: (
            (r / g).write_bytes(b"a" * 5000),
            open(r / g, "ab").write(b"zz"),
            on_fd(r / g, os.O_WRONLY, lambda fd: os.pwrite(fd, b"q", 3)),
            on_fd(r / g, os.O_WRONLY, lambda fd: os.ftruncate(fd, 7)),
            (r / g).read_bytes(),
        ),
        (g,),
    )
    yield Step(
        "posix_fallocate",
        None,
        lambda r: on_fd(
            r / g, os.O_RDWR, lambda fd: (os.posix_fallocate(fd, 0, 20000), os.fstat(fd).st_size)
        ),
        (g,),
    )
    yield Step(
        "set times to the nanosecond",
        None,
        lambda r: (os.utime(r / g, ns=(1, 999999999)), os.stat(r / g).st_mtime_ns),
        (g,),
        atime=True,
    )
    yield Step(
        "set times before 1970",
        None,
        lambda r: (os.utime(r / g, ns=(-(10**9), -5 * 10**9)), os.stat(r / g).st_atime_ns),
        (g,),
        atime=True,
    )
    yield Step("open a dir for writing", None, lambda r: os.open(r / "d", os.O_WRONLY))
    yield Step("open a dir read-write", None, lambda r: os.open(r / "d", os.O_RDWR))
    yield Step(
        "open a symlink with O_NOFOLLOW",
        None,
        lambda r: (os.symlink("g2", r / "d/sl"), os.open(r / "d/sl", os.O_NOFOLLOW)),
    )
    yield Step(
        "open a fifo for writing without a reader",
        None,
        lambda r: os.open(r / "d/p", os.O_WRONLY | os.O_NONBLOCK),
    )
    yield Step("open below a file", None, lambda r: os.open(r / g / "x", os.O_RDONLY))
    yield Step(
        "open a file as a directory", None, lambda r: os.open(r / g, os.O_RDONLY | os.O_DIRECTORY)
    )
    yield Step("create a 256-byte name", None, lambda r: touch(r / "d" / ("x" * 256)))
    yield Step("mkdir a 256-byte name", None, lambda r: os.mkdir(r / "d" / ("x" * 256)))
    yield Step("create a 255-byte name", None, lambda r: touch(r / "d" / ("x" * 255)), ("d",))
    yield Step("symlink to 4096 bytes", None, lambda r: os.symlink("x" * 4096, r / "d/sl2"))
    yield Step(
        "symlink to 4095 bytes",
        None,
        lambda r: (os.symlink("x" * 4095, r / "d/sl3"), len(os.readlink(r / "d/sl3"))),
    )
    yield Step(
        "symlink loop",
        None,
        lambda r: (os.symlink("l2", r / "d/l1"), os.symlink("l1", r / "d/l2"), os.stat(r / "d/l1")),
    )
    yield Step(
        "O_CREAT|O_EXCL on a dangling symlink",
        None,
        lambda r: (os.symlink("nowhere", r / "d/dl"), os.open(r / "d/dl", os.O_CREAT | os.O_EXCL)),
    )
    yield Step(
        "O_CREAT through a dangling symlink",
        None,
        lambda r: (touch(r / "d/dl", 0o640), shape(r / "d/nowhere")),
        ("d",),
    )
    yield Step("write to, truncate a running program", None, lambda r: busy_text(r / "d/exe"))
    yield Step(
        "mknod a char device",
        None,
        lambda r: os.mknod(r / "d/c", 0o600 | stat.S_IFCHR, os.makedev(13, 37)),
        ("d", "d/c"),
    )
    yield Step(
        "mknod a block device",
        None,
        lambda r: os.mknod(r / "d/b", 0o600 | stat.S_IFBLK, os.makedev(254, 300)),
        ("d", "d/b"),
    )
    yield Step(
        "nobody mknods a char device",
        NOBODY,
        lambda r: os.mknod(r / "d/c2", 0o600 | stat.S_IFCHR, os.makedev(1, 3)),
    )


def tree_steps() -> Iterator[Step]:
    """rmdir, rename and link errno; link counts and times of parents."""
    d = Path("d")
    yield Step("rmdir a non-empty dir", None, lambda r: os.rmdir(r / d))
    yield Step("rmdir .", None, lambda r: os.rmdir(r / d / "y/."))
    yield Step("rmdir ..", None, lambda r: os.rmdir(r / d / "y/.."))
    yield Step("rmdir a file", None, lambda r: os.rmdir(r / d / "g2"))
    yield Step(
        "rmdir a symlink to a dir",
        None,
        lambda r: (os.symlink(".", r / d / "sd"), os.rmdir(r / d / "sd")),
    )
    yield Step("mkdir over a file", None, lambda r: os.mkdir(r / d / "g2"))
    yield Step("mkdir over a symlink", None, lambda r: os.mkdir(r / d / "sl"))
    yield Step("rename a dir into itself", None, lambda r: os.rename(r / d / "y", r / d / "y/z"))
    yield Step("rename a file over a dir", None, lambda r: os.rename(r / d / "g2", r / d / "y"))
    yield Step("rename a dir over a file", None, lambda r: os.rename(r / d / "y", r / d / "g2"))
    yield Step("mkdir d/y/z", None, lambda r: os.mkdir(r / d / "y/z"), ("d/y",))
    yield Step(
        "rename a dir over a non-empty dir",
        None,
        lambda r: (os.mkdir(r / d / "w"), os.rename(r / d / "w", r / d / "y")),
    )
    yield Step(
        "rename a dir over an empty dir",
        None,
        lambda r: os.rename(r / d / "y", r / d / "w"),
        ("d", "d/w", "d/w/z"),
    )
    yield Step(
        "rename a dir to itself", None, lambda r: os.rename(r / d / "w", r / d / "w"), ("d", "d/w")
    )
    yield Step(
        "rename a link over its twin",
        None,
        lambda r: (os.link(r / d / "g2", r / d / "twin"), os.rename(r / d / "twin", r / d / "g2")),
        ("d", "d/twin", "d/g2"),
    )
    yield Step(
        "make d/u and d/v/i",
        None,
        lambda r: (os.mkdir(r / d / "u"), os.mkdir(r / d / "v"), os.mkdir(r / d / "v/i")),
        ("d",),
    )
    yield Step("exchange two dirs", None, lambda r: renameat2(r / d / "u", r / d / "v", 2), ("d",))
    yield Step(
        "exchange a file and a dir across dirs",
        None,
        lambda r: renameat2(r / d / "g2", r / d / "u/i", 2),
        ("d", "d/u"),
    )
    yield Step(
        "rename without replacing onto a dir",
        None,
        lambda r: renameat2(r / d / "u", r / d / "v", 1),
    )
    yield Step(
        "move a dir to another parent",
        None,
        lambda r: os.rename(r / d / "v", r / d / "u/v"),
        ("d", "d/u", "d/u/v"),
    )
    yield Step("link a dir", None, lambda r: os.link(r / d / "w", r / d / "w2"))
    yield Step("unlink a dir", None, lambda r: os.unlink(r / d / "w"))
    yield Step("link onto an existing name", None, lambda r: os.link(r / d / "u/i", r / d / "sl"))


def xattr_and_access_steps() -> Iterator[Step]:
    f = Path("e/f")
    yield Step(
        "mkdir e, create e/f",
        None,
        lambda r: (os.mkdir(r / "e", 0o777), (r / f).write_bytes(b"a" * 5000)),
        (".", "e", "e/f"),
    )
    yield Step("chmod e/f 0604", None, lambda r: os.chmod(r / f, 0o604), ("e/f",))
    yield Step(
        "another user sets a user xattr without write permission",
        OTHER,
        lambda r: os.setxattr(r / f, "user.x", b"1"),
        ("e/f",),
    )
    yield Step(
        "another user sets a trusted xattr",
        OTHER,
        lambda r: os.setxattr(r / f, "trusted.x", b"1"),
        ("e/f",),
    )
    yield Step(
        "root sets a user xattr", None, lambda r: os.setxattr(r / f, "user.x", b"1"), ("e/f",)
    )
    yield Step("another user reads it", OTHER, lambda r: os.getxattr(r / f, "user.x"))
    yield Step("chmod e/f 0600", None, lambda r: os.chmod(r / f, 0o600), ("e/f",))
    yield Step(
        "another user reads it without read permission",
        OTHER,
        lambda r: os.getxattr(r / f, "user.x"),
    )
    yield Step(
        "another user lists them without read permission", OTHER, lambda r: os.listxattr(r / f)
    )
    yield Step(
        "user xattr on a symlink",
        None,
        lambda r: (
            os.symlink("f", r / "e/s"),
            os.setxattr(r / "e/s", "user.y", b"1", follow_symlinks=False),
        ),
    )
    yield Step(
        "user xattr on a fifo",
        None,
        lambda r: (os.mkfifo(r / "e/p"), os.setxattr(r / "e/p", "user.y", b"1")),
    )
    yield Step("remove an absent xattr", None, lambda r: os.removexattr(r / f, "user.nope"))
    yield Step(
        "XATTR_CREATE an existing xattr",
        None,
        lambda r: os.setxattr(r / f, "user.x", b"2", os.XATTR_CREATE),
    )
    yield Step(
        "XATTR_REPLACE an absent xattr",
        None,
        lambda r: os.setxattr(r / f, "user.z", b"2", os.XATTR_REPLACE),
    )
    yield Step("an xattr's size", None, lambda r: libc.getxattr(bytes(r / f), b"user.x", None, 0))
    for mode in (os.R_OK, os.W_OK, os.X_OK, os.F_OK):
        yield Step(f"another user's access({mode})", OTHER, lambda r, m=mode: os.access(r / f, m))
    yield Step("root's access(X_OK) of a 0600 file", None, lambda r: os.access(r / f, os.X_OK))
    yield Step(
        "another user links a file it may not read", OTHER, lambda r: os.link(r / f, r / "e/l")
    )
    yield Step(
        "root writes a 0444 file",
        None,
        lambda r: (
            (r / "e/ro").write_bytes(b"1"),
            os.chmod(r / "e/ro", 0o444),
            (r / "e/ro").write_bytes(b"22"),
        ),
        ("e/ro",),
    )
    yield Step("give e/ro to nobody", None, lambda r: os.chown(r / "e/ro", 65534, 65534), ("e/ro",))
    yield Step(
        "the owner opens its 0444 file read-write", NOBODY, lambda r: os.open(r / "e/ro", os.O_RDWR)
    )
    yield Step(
        "root runs a 0644 script",
        None,
        lambda r: (
            (r / "e/sh").write_text("#!/bin/sh\necho hi\n"),
            os.chmod(r / "e/sh", 0o644),
            runs(r / "e/sh"),
        )[-1],
    )
    yield Step(
        "root runs a 0744 script",
        None,
        lambda r: (os.chmod(r / "e/sh", 0o744), runs(r / "e/sh"))[-1],
    )
    yield Step("another user runs a 0744 script", OTHER, lambda r: runs(r / "e/sh"))


def script() -> Iterator[Step]:
    for kind in KINDS:
        yield from ownership_steps(kind)
    yield from directory_steps()
    yield from data_steps()
    yield from tree_steps()
    yield from xattr_and_access_steps()


def observe(root: Path, step: Step) -> Any:
    before = {w: stamps(root / w) for w in step.watch}
    result = as_caller(step.who, lambda: step.fn(root))
    assert result[0] != "crash", result[1]
    after = {}
    for w in step.watch:
        change = moved(before[w], stamps(root / w)) if step.times else None
        if change is not None and not step.atime:
            change = change[1:]
        after[w] = (shape(root / w), change)
    return result, after


@pytest.fixture
def twin(world_dir: Path) -> Iterator[tuple[Path, Path]]:
    d = Daemon(world_dir).start()
    try:
        vf = d.vfolder()
        native = world_dir / "twin-native"
        native.mkdir()
        for root in (vf, native):
            os.chmod(root, 0o777)
        yield native, vf
    finally:
        assert d.stop() == 0


def test_callers_see_what_they_would_see_natively(twin: tuple[Path, Path]) -> None:
    native, mount = twin
    old = os.umask(0o022)
    try:
        differ = []
        steps = list(script())
        for step in steps:
            want, got = observe(native, step), observe(mount, step)
            if want != got:
                differ.append(f"{step.desc}:\n  native {want}\n  mount  {got}")
        assert not differ, f"{len(differ)} of {len(steps)} steps differ:\n" + "\n".join(differ)
    finally:
        os.umask(old)
