"""The FUSE handlers driven directly, with a fake request context, no mount (in the way S3QL's
t3_fs_api.py tests its Operations): fast, and runnable without root or /dev/fuse.

A registry over a temporary host directory and SQLite store is built as the daemon builds it;
the tests call `Operations` handlers as the kernel would (lookup, create, write, read,
unlink, rename, mkdir...) and check errno, usage and the native directory.  They cover the
handlers' own logic; what the kernel adds (permission checks, caching, write-back) is for the
mount tests.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from vfusefs import config as config_mod
from vfusefs.fuse.inodes import ROOT_INODE, InodeTable
from vfusefs.fuse.ops import Operations
from vfusefs.state.registry import Registry
from vfusefs.store import open_store

# a caller that is not an admin: uid 1000 as root (files are chowned to it), else ourselves
UID = 1000 if os.getuid() == 0 else os.getuid()
GID = 1000 if os.getuid() == 0 else os.getgid()


@dataclass
class Ctx:
    """What pyfuse3's RequestContext tells a handler."""

    uid: int = UID
    gid: int = GID
    pid: int = os.getpid()
    umask: int = 0o022


@dataclass
class World:
    ops: Operations
    registry: Registry
    host_dir: Path

    async def vfolder(self, mode: str, **limits: Any) -> tuple[int, Path]:
        """A new vfolder where our caller has mode: its root inode, as looked up by the caller
        under the host directory, and its native directory."""
        grants = [{"principal": f"uid:{UID}", "mode": mode}]
        vf = await self.registry.create_vfolder("local", grants=grants, **limits)
        os.chmod(vf.record.native_path, 0o777)
        host = await self.ops.lookup(ROOT_INODE, b"local", Ctx())
        entry = await self.ops.lookup(host.st_ino, vf.id.encode(), Ctx())
        return entry.st_ino, Path(vf.record.native_path)

    def usage(self, native: Path) -> tuple[int, int]:
        vf = self.registry.vfolders[native.name]
        acc = self.registry.ledger.account(vf.quota_keys[0])
        return acc.used_bytes, acc.used_inodes


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    host_dir = tmp_path / "native"
    host_dir.mkdir()
    cfg_path = tmp_path / "vfusefs.toml"
    cfg_path.write_text(
        f'[daemon]\nmountpoint = "{tmp_path}/mnt"\nstate_dir = "{tmp_path}/state"\n'
        f'control_socket = "{tmp_path}/state/c.sock"\nmetrics_listen = ""\n'
        f'[hosts.local]\npath = "{host_dir}"\n'
    )
    cfg = config_mod.load(str(cfg_path))
    store = open_store(cfg.store_url)
    registry = Registry(cfg, store, InodeTable(), trio.lowlevel.current_trio_token())
    try:
        await registry.load()
        async with trio.open_nursery() as nursery:
            registry.nursery = nursery
            yield World(Operations(registry, cfg.daemon), registry, host_dir)
            nursery.cancel_scope.cancel()
    finally:
        registry.close()
        store.close()


async def errno_of(call: Any) -> int:
    try:
        await call
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return 0


def du(path: Path) -> tuple[int, int]:
    """Allocated bytes and inodes below path, as du counts them (hard links once)."""
    seen: set[int] = set()
    total = os.lstat(path).st_blocks * 512
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total, len(seen)


async def test_rw_creates_writes_reads_and_may_not_delete(world: World) -> None:
    ops = world.ops
    root, native = await world.vfolder("rw")
    fi, entry = await ops.create(root, b"f", 0o644, os.O_RDWR, Ctx())
    assert await ops.write(fi.fh, 0, b"hello" * 1000) == 5000
    assert await ops.read(fi.fh, 0, 5) == b"hello"
    await ops.release(fi.fh)
    assert (native / "f").read_bytes() == b"hello" * 1000
    assert (native / "f").stat().st_uid == UID and (native / "f").stat().st_mode & 0o777 == 0o644
    attrs = await ops.getattr(entry.st_ino, Ctx())
    assert attrs.st_size == 5000
    assert world.usage(native) == du(native)
    # rw: no unlink, no rmdir, no rename over an existing name
    d = await ops.mkdir(root, b"d", 0o755, Ctx())
    assert await errno_of(ops.unlink(root, b"f", Ctx())) == errno.EPERM
    assert await errno_of(ops.rmdir(root, b"d", Ctx())) == errno.EPERM
    g, _ = await ops.create(root, b"g", 0o644, os.O_WRONLY, Ctx())
    await ops.release(g.fh)
    assert await errno_of(ops.rename(root, b"g", root, b"f", 0, Ctx())) == errno.EPERM
    await ops.rename(root, b"g", d.st_ino, b"g2", 0, Ctx())  # replacing nothing: allowed
    assert (native / "d" / "g2").exists() and (native / "f").exists()
    assert world.usage(native) == du(native)


async def test_ro_refuses_every_change_and_no_grant_sees_nothing(world: World) -> None:
    ops = world.ops
    root, native = await world.vfolder("ro")
    (native / "f").write_text("x")
    entry = await ops.lookup(root, b"f", Ctx())
    assert await errno_of(ops.create(root, b"n", 0o644, os.O_WRONLY, Ctx())) == errno.EROFS
    assert await errno_of(ops.mkdir(root, b"n", 0o755, Ctx())) == errno.EROFS
    assert await errno_of(ops.unlink(root, b"f", Ctx())) == errno.EROFS
    assert await errno_of(ops.open(entry.st_ino, os.O_WRONLY, Ctx())) == errno.EROFS
    fi = await ops.open(entry.st_ino, os.O_RDONLY, Ctx())
    assert await ops.read(fi.fh, 0, 10) == b"x"
    await ops.release(fi.fh)
    assert sorted(os.listdir(native)) == ["f"]
    # a vfolder the caller has no grant on is not there for it under the host directory
    hidden = await world.registry.create_vfolder("local", grants=[])
    host = await ops.lookup(ROOT_INODE, b"local", Ctx())
    assert await errno_of(ops.lookup(host.st_ino, hidden.id.encode(), Ctx())) == errno.ENOENT


async def test_a_write_over_the_quota_is_refused_before_it_changes_anything(world: World) -> None:
    ops = world.ops
    root, native = await world.vfolder("rwd", quota_bytes=64 * 1024)
    fi, _ = await ops.create(root, b"f", 0o644, os.O_RDWR, Ctx())
    assert await ops.write(fi.fh, 0, b"a" * 32768) == 32768
    before = (native / "f").read_bytes()
    assert await errno_of(ops.write(fi.fh, 32768, b"b" * 65536)) == errno.EDQUOT
    assert (native / "f").read_bytes() == before  # nothing written
    await ops.release(fi.fh)
    assert world.usage(native) == du(native) and du(native)[0] <= 64 * 1024
    # an unlink gives the room back, at once
    await ops.unlink(root, b"f", Ctx())
    assert world.usage(native) == du(native)


async def test_rwd_removes_and_renames_over(world: World) -> None:
    ops = world.ops
    root, native = await world.vfolder("rwd")
    for name in (b"a", b"b"):
        fi, _ = await ops.create(root, name, 0o600, os.O_WRONLY, Ctx())
        await ops.write(fi.fh, 0, name * 10000)
        await ops.release(fi.fh)
    await ops.rename(root, b"a", root, b"b", 0, Ctx())  # replaces b: rwd may
    assert (native / "b").read_bytes() == b"a" * 10000 and not (native / "a").exists()
    d = await ops.mkdir(root, b"d", 0o700, Ctx())
    await ops.rmdir(root, b"d", Ctx())
    await ops.unlink(root, b"b", Ctx())
    assert os.listdir(native) == [] and world.usage(native) == du(native)
    assert await errno_of(ops.getattr(d.st_ino, Ctx())) in (errno.ENOENT, 0)


async def test_the_root_and_host_directories_are_read_only(world: World) -> None:
    ops = world.ops
    host = await ops.lookup(ROOT_INODE, b"local", Ctx())
    for call in (
        ops.mkdir(ROOT_INODE, b"x", 0o755, Ctx()),
        ops.mkdir(host.st_ino, b"x", 0o755, Ctx()),
        ops.create(host.st_ino, b"x", 0o644, os.O_WRONLY, Ctx()),
    ):
        assert await errno_of(call) in (errno.EPERM, errno.EROFS, errno.EACCES)
    assert await errno_of(ops.lookup(ROOT_INODE, b"nohost", Ctx())) == errno.ENOENT
    assert os.listdir(world.host_dir) == []
