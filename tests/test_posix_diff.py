"""Differential POSIX test: the same random operations on the mount and on a plain directory.

The kernel is the oracle (mergerfs's posix_parity idea): every step's result or errno must be
the same on both sides, and so must the final trees (names, types, modes, owners, sizes, link
counts, contents, symlink targets, xattrs).  Inode numbers and timestamps are not compared: ours
are FUSE inode numbers, and the two sides run at slightly different times.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conftest import Daemon, outcome, renameat2

pytestmark = pytest.mark.mount

LONG = "L" * 255
NAMES = ["a", "b", "c", "d", LONG, "d/a", "d/b", "d/e", "d/e/a", "e", "e/a"]
names = st.sampled_from(NAMES)


def snapshot(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st_ = os.lstat(p)
            entry: dict[str, Any] = {
                "mode": st_.st_mode,
                "uid": st_.st_uid,
                "gid": st_.st_gid,
                "nlink": st_.st_nlink,
            }
            if stat.S_ISREG(st_.st_mode):
                entry["size"] = st_.st_size
                entry["data"] = p.read_bytes()
            if stat.S_ISLNK(st_.st_mode):
                entry["target"] = os.readlink(p)
            else:
                entry["xattrs"] = {n: os.getxattr(p, n) for n in sorted(os.listxattr(p))}
            out[rel] = entry
    return out


class Parity(RuleBasedStateMachine):
    """One instance per hypothesis example: fresh, empty twin directories."""

    mount_root: Path
    native_root: Path

    def __init__(self) -> None:
        super().__init__()
        for root in (self.mount_root, self.native_root):
            for child in root.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()

    def both(self, fn: Callable[[Path], Any]) -> Any:
        ours = outcome(lambda: fn(self.mount_root))
        theirs = outcome(lambda: fn(self.native_root))
        assert ours == theirs, f"mount {ours} != native {theirs}"
        return ours

    @rule(name=names, data=st.binary(max_size=300), off=st.integers(0, 70000))
    def write_at(self, name: str, data: bytes, off: int) -> None:
        def op(root: Path) -> int:
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)

        self.both(op)

    @rule(name=names, data=st.binary(max_size=100))
    def append(self, name: str, data: bytes) -> None:
        def op(root: Path) -> int:
            fd = os.open(root / name, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both(op)

    @rule(
        name=names,
        excl=st.booleans(),
        trunc=st.booleans(),
        mode=st.sampled_from([0o600, 0o644, 0o755, 0o4755]),
    )
    def create(self, name: str, excl: bool, trunc: bool, mode: int) -> None:
        flags = os.O_CREAT | os.O_RDWR | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)
        self.both(lambda root: os.close(os.open(root / name, flags, mode)))

    @rule(name=names, size=st.integers(0, 200000))
    def truncate(self, name: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / name, size))

    @rule(name=names, off=st.integers(0, 70000), size=st.integers(0, 5000))
    def read(self, name: str, off: int, size: int) -> None:
        def op(root: Path) -> bytes:
            fd = os.open(root / name, os.O_RDONLY)
            try:
                return os.pread(fd, size, off)
            finally:
                os.close(fd)

        self.both(op)

    @rule(name=names, mode=st.sampled_from([0o700, 0o755, 0o2755, 0o1777]))
    def mkdir(self, name: str, mode: int) -> None:
        self.both(lambda root: os.mkdir(root / name, mode))

    @rule(name=names)
    def rmdir(self, name: str) -> None:
        self.both(lambda root: os.rmdir(root / name))

    @rule(name=names)
    def unlink(self, name: str) -> None:
        self.both(lambda root: os.unlink(root / name))

    @rule(old=names, new=names, flags=st.sampled_from([0, 1, 2]))
    def rename(self, old: str, new: str, flags: int) -> None:
        self.both(lambda root: renameat2(root / old, root / new, flags))

    @rule(old=names, new=names)
    def link(self, old: str, new: str) -> None:
        self.both(lambda root: os.link(root / old, root / new, follow_symlinks=False))

    @rule(dest=st.sampled_from(["a", "d/a", "d/../a", "nowhere", LONG]), name=names)
    def symlink(self, dest: str, name: str) -> None:
        self.both(lambda root: os.symlink(dest, root / name))

    @rule(name=names)
    def readlink(self, name: str) -> None:
        self.both(lambda root: os.readlink(root / name))

    @rule(name=names, mode=st.sampled_from([0o600, 0o644, 0o711, 0o4755, 0o1777]))
    def chmod(self, name: str, mode: int) -> None:
        self.both(lambda root: os.chmod(root / name, mode))

    @rule(name=names, uid=st.sampled_from([0, 1000, 4242]), gid=st.sampled_from([-1, 0, 100]))
    def chown(self, name: str, uid: int, gid: int) -> None:
        self.both(lambda root: os.chown(root / name, uid, gid, follow_symlinks=False))

    @rule(
        name=names,
        key=st.sampled_from(["user.a", "user.b", "trusted.t"]),
        value=st.binary(max_size=64),
        flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]),
    )
    def setxattr(self, name: str, key: str, value: bytes, flags: int) -> None:
        self.both(lambda root: os.setxattr(root / name, key, value, flags, follow_symlinks=False))

    @rule(name=names, key=st.sampled_from(["user.a", "user.b", "user.none"]))
    def getxattr(self, name: str, key: str) -> None:
        self.both(lambda root: os.getxattr(root / name, key, follow_symlinks=False))

    @rule(name=names, key=st.sampled_from(["user.a", "user.b"]))
    def removexattr(self, name: str, key: str) -> None:
        self.both(lambda root: os.removexattr(root / name, key, follow_symlinks=False))

    @rule(name=names)
    def listdir(self, name: str) -> None:
        self.both(lambda root: sorted(os.listdir(root / name)))

    @rule(name=names)
    def stat_(self, name: str) -> None:
        def op(root: Path) -> tuple:
            s = os.lstat(root / name)
            size = s.st_size if not stat.S_ISDIR(s.st_mode) else None
            return (s.st_mode, s.st_nlink, s.st_uid, s.st_gid, size, s.st_blocks if size else None)

        self.both(op)

    @rule(name=names, times=st.tuples(st.integers(0, 2**31), st.integers(0, 2**31)))
    def utime(self, name: str, times: tuple[int, int]) -> None:
        def op(root: Path) -> tuple:
            os.utime(root / name, ns=(times[0] * 1000, times[1] * 1000), follow_symlinks=False)
            s = os.lstat(root / name)
            return (s.st_atime_ns, s.st_mtime_ns)

        self.both(op)

    @invariant()
    def trees_match(self) -> None:
        assert snapshot(self.mount_root) == snapshot(self.native_root)


@pytest.fixture(scope="module", params=["vfs", "btrfs"])
def twin(request: pytest.FixtureRequest) -> Iterator[tuple[Path, Path]]:
    """A vfolder through the mount and a plain directory on the same filesystem: tmp for the
    vfs backend, a btrfs loop mount for the btrfs one (so errno and attributes compare like
    with like)."""
    base = Path(tempfile.mkdtemp(prefix="vfusefs-parity-", dir="/tmp"))
    base.chmod(0o755)
    where, hosts = base, None
    if request.param == "btrfs":
        where = request.getfixturevalue("btrfs_fs").dir(f"parity-{uuid.uuid4().hex[:8]}")
        hosts = {"local": {"backend": "btrfs", "path": str(where / "host")}}
    d = Daemon(base, hosts=hosts).start()
    try:
        vf = d.vfolder()
        native = where / "twin-native"
        native.mkdir()
        yield vf, native
    finally:
        assert d.stop() == 0
        shutil.rmtree(base, ignore_errors=True)


def test_posix_parity(twin: tuple[Path, Path]) -> None:
    Parity.mount_root, Parity.native_root = twin
    old = os.umask(0o022)
    try:
        run_state_machine = Parity.TestCase
        run_state_machine.settings = settings(
            max_examples=int(os.environ.get("PARITY_EXAMPLES", 60)),
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        run_state_machine().runTest()
    finally:
        os.umask(old)
