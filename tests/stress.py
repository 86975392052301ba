"""A mixed filesystem load in the spirit of fsstress, for the soak test (and by hand).

    python tests/stress.py DIR --seconds 20 --seed 7 [--ops create,write,...]

Runs random operations under DIR until the time is up: creates, writes (appends, sparse and
into holes), truncates, fallocate, mkdir/rmdir, renames (plain, exchange, whiteout), hard and
symbolic links, unlinks, xattrs, writes through shared mappings, open-then-unlinked temporary
files and handles kept open across all of that.  Every OSError is expected (a quota, a grant
that just narrowed, a name another process took); what each ended with is printed as one JSON
line of counts by operation and errno ("write:EDQUOT"), so the caller can tell the expected
from the broken (EIO, ESTALE, EBADF).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import random
import time
from collections import Counter
from pathlib import Path

RENAME_EXCHANGE, RENAME_WHITEOUT = 2, 4
_libc = ctypes.CDLL(None, use_errno=True)

ABSENT_TARGET = "/nonexistent-vfusefs-stress/target"  # never made: writes through it fail


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Stress:
    def __init__(self, top: Path, rng: random.Random) -> None:
        self.top, self.rng = top, rng
        self.held: list[int] = []  # fds kept open across other operations

    def path(self, kind: str = "f", own: bool = False) -> Path:
        """A random name, sometimes one level down, sometimes in the tree all processes share
        (DIR's parent) unless `own`."""
        r = self.rng
        base = self.top if own or r.random() < 0.9 else self.top.parent
        sub = base / f"d{r.randrange(6)}" if r.random() < 0.5 else base
        return sub / f"{kind}{r.randrange(40)}"

    def data(self, most: int) -> bytes:
        n = self.rng.randrange(most)
        return bytes([self.rng.randrange(256)]) * n

    # each operation raises OSError or returns
    def create(self) -> None:
        fd = os.open(self.path(), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, self.data(256 * 1024))
        finally:
            os.close(fd)

    def write(self) -> None:
        fd = os.open(self.path(), os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            off = self.rng.choice([0, self.rng.randrange(4 << 20), os.fstat(fd).st_size])
            os.pwrite(fd, self.data(128 * 1024), off)
        finally:
            os.close(fd)

    def truncate(self) -> None:
        os.truncate(self.path(), self.rng.randrange(2 << 20))

    def fallocate(self) -> None:
        # read-write: where fallocate(2) is refused, glibc's posix_fallocate reads to emulate it
        fd = os.open(self.path(), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.posix_fallocate(fd, self.rng.randrange(1 << 20), self.rng.randrange(1, 256 * 1024))
        finally:
            os.close(fd)

    def mkdir(self) -> None:
        os.mkdir(self.path("d"))

    def rmdir(self) -> None:
        os.rmdir(self.path("d"))

    def rename(self) -> None:
        flags = self.rng.choice([0, 0, RENAME_EXCHANGE, RENAME_WHITEOUT])
        renameat2(self.path(), self.path(), flags)

    def link(self) -> None:
        os.link(self.path(), self.path())

    def symlink(self) -> None:
        # an absolute target that cannot exist: the kernel resolves a symlink in the caller's
        # own tree, so a real one (it once was /etc/passwd) would have the mix write the host's
        # files through it (the containers here share the host's root filesystem)
        os.symlink(self.rng.choice(["f1", "../f2", ABSENT_TARGET]), self.path())

    def unlink(self) -> None:
        os.unlink(self.path())

    def xattr(self) -> None:
        os.setxattr(self.path(), f"user.s{self.rng.randrange(3)}", self.data(3000) or b"x")

    def mapwrite(self) -> None:
        # in this process's own tree: a file another process truncates under a mapping would
        # kill this one with SIGBUS, as it would natively
        fd = os.open(self.path(own=True), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size:
                with mmap.mmap(fd, size) as m:
                    off = self.rng.randrange(size)
                    m[off : off + 1] = b"m"
                    if self.rng.random() < 0.5:
                        m.flush()
        finally:
            os.close(fd)

    def tempfile(self) -> None:
        p = self.path("t")
        fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
        try:
            os.unlink(p)
            os.write(fd, self.data(512 * 1024))
        finally:
            os.close(fd)

    def hold(self) -> None:
        if len(self.held) > 16 or (self.held and self.rng.random() < 0.5):
            fd = self.held.pop(self.rng.randrange(len(self.held)))
            try:
                os.pwrite(fd, self.data(64 * 1024), self.rng.randrange(1 << 20))
                if self.rng.random() < 0.3:
                    os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self.held.append(os.open(self.path(), os.O_CREAT | os.O_RDWR, 0o644))

    def read(self) -> None:
        with open(self.path(), "rb") as f:
            f.read(1 << 20)

    OPS = {
        "create": 10,
        "write": 20,
        "truncate": 6,
        "fallocate": 4,
        "mkdir": 4,
        "rmdir": 3,
        "rename": 10,
        "link": 4,
        "symlink": 2,
        "unlink": 12,
        "xattr": 4,
        "mapwrite": 4,
        "tempfile": 3,
        "hold": 6,
        "read": 8,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", default="", help="comma-separated subset of the operations")
    a = ap.parse_args()
    a.dir.mkdir(exist_ok=True)
    rng = random.Random(a.seed)
    s = Stress(a.dir, rng)
    mix = {k: w for k, w in Stress.OPS.items() if not a.ops or k in a.ops.split(",")}
    names, weights = list(mix), list(mix.values())
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + a.seconds
    while time.monotonic() < deadline:
        op = rng.choices(names, weights)[0]
        try:
            getattr(s, op)()
            outcomes["ok"] += 1
        except OSError as exc:
            outcomes[f"{op}:{errno.errorcode.get(exc.errno or 0, str(exc.errno))}"] += 1
    for fd in s.held:
        os.close(fd)
    print(json.dumps(dict(outcomes)), flush=True)


if __name__ == "__main__":
    main()
