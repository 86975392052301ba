"""The mounted tree driven with ordinary tools, compared against the native directory."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, have, outcome, renameat2, run

pytestmark = pytest.mark.mount
MiB = 1 << 20


def test_tree_shape_and_readonly_levels(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    assert sorted(os.listdir(daemon.mnt)) == ["local"]
    assert os.listdir(daemon.mnt / "local") == [vf.name]
    st = os.stat(daemon.mnt / "local")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555
    for level in (daemon.mnt, daemon.mnt / "local"):
        for fn in (
            lambda p: os.mkdir(p / "x"),
            lambda p: open(p / "f", "w"),
            lambda p: os.symlink("a", p / "l"),
        ):
            with pytest.raises(OSError) as exc:
                fn(level)
            assert exc.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
    with pytest.raises(OSError) as exc:
        os.rmdir(vf)
    assert exc.value.errno in (errno.EPERM, errno.EROFS)
    with pytest.raises(FileNotFoundError):
        os.stat(daemon.mnt / "local" / "00000000-0000-4000-8000-000000000000")
    with pytest.raises(FileNotFoundError):
        os.stat(daemon.mnt / "nohost")


def test_real_tools_roundtrip(daemon: Daemon, tmp_path: Path) -> None:
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    run("cp", str(src), str(vf / "copy.bin"))
    assert (native / "copy.bin").read_bytes() == src.read_bytes()
    run("dd", "if=/dev/zero", f"of={vf / 'zeros'}", "bs=1M", "count=4", "status=none")
    assert (native / "zeros").stat().st_size == 4 << 20
    run("mv", str(vf / "copy.bin"), str(vf / "moved.bin"))
    assert not (native / "copy.bin").exists() and (native / "moved.bin").exists()
    run("mkdir", "-p", str(vf / "a/b/c"))
    run("cp", "-a", str(vf / "moved.bin"), str(vf / "a/b/c/"))
    run("ln", str(vf / "moved.bin"), str(vf / "hard"))
    run("ln", "-s", "moved.bin", str(vf / "soft"))
    assert os.readlink(vf / "soft") == "moved.bin"
    assert (vf / "soft").read_bytes() == src.read_bytes()
    assert os.stat(vf / "hard").st_nlink == 2
    assert os.stat(vf / "hard").st_ino == os.stat(vf / "moved.bin").st_ino
    run("mkfifo", str(vf / "fifo"))
    assert stat.S_ISFIFO(os.lstat(vf / "fifo").st_mode)
    run("setfattr", "-n", "user.color", "-v", "blue", str(vf / "moved.bin"))
    assert 'user.color="blue"' in run("getfattr", "-d", str(vf / "moved.bin")).stdout
    assert os.getxattr(native / "moved.bin", "user.color") == b"blue"
    run("truncate", "-s", "10", str(vf / "moved.bin"))
    assert (native / "moved.bin").stat().st_size == 10
    run("touch", "-d", "2001-02-03 04:05:06", str(vf / "hard"))
    assert (native / "hard").stat().st_mtime == os.stat(vf / "hard").st_mtime
    # ls -l through the mount shows what the native directory holds
    mine = run("ls", "-l", "--time-style=+%s", str(vf)).stdout.splitlines()[1:]
    theirs = run("ls", "-l", "--time-style=+%s", str(native)).stdout.splitlines()[1:]
    strip = [" ".join(line.split()[:5] + line.split()[6:]) for line in mine]
    assert strip == [" ".join(line.split()[:5] + line.split()[6:]) for line in theirs]
    run("rm", "-rf", str(vf / "a"), str(vf / "hard"), str(vf / "soft"), str(vf / "fifo"))
    assert sorted(os.listdir(native)) == ["moved.bin", "zeros"]
    assert sorted(os.listdir(vf)) == ["moved.bin", "zeros"]


def test_ownership_and_umask_follow_the_caller(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    os.chmod(vf, 0o777)
    cmd = [
        "setpriv",
        "--reuid=1234",
        "--regid=2345",
        "--clear-groups",
        "sh",
        "-c",
        f"umask 027 && mkdir {vf}/d && touch {vf}/f && ln -s f {vf}/l && mkfifo {vf}/p",
    ]
    subprocess.run(cmd, check=True)
    for name, mode in (("d", 0o750), ("f", 0o640), ("p", 0o640)):
        st = os.lstat(native / name)
        assert (st.st_uid, st.st_gid) == (1234, 2345), name
        assert stat.S_IMODE(st.st_mode) == mode, name
    assert os.lstat(native / "l").st_uid == 1234
    # a set-group-ID directory passes its group on, as natively
    os.mkdir(vf / "shared")
    os.chown(vf / "shared", 0, 777)
    os.chmod(vf / "shared", 0o2777)
    subprocess.run(
        ["setpriv", "--reuid=1234", "--regid=2345", "--clear-groups", "mkdir", f"{vf}/shared/sub"],
        check=True,
    )
    st = os.stat(native / "shared" / "sub")
    assert st.st_gid == 777 and st.st_mode & stat.S_ISGID
    # and permission bits are enforced for others, as natively
    os.chmod(vf / "f", 0o600)
    r = subprocess.run(
        ["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups", "cat", f"{vf}/f"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_long_names_and_deep_paths(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    name = "n" * 255
    (vf / name).write_text("x")
    assert (vf / name).read_text() == "x"
    with pytest.raises(OSError) as exc:
        (vf / ("n" * 256)).write_text("x")
    assert exc.value.errno == errno.ENAMETOOLONG
    # build a path close to PATH_MAX relative to the vfolder, walking with dir fds
    fd = os.open(vf, os.O_RDONLY)
    depth = 0
    try:
        while depth < 16:
            os.mkdir("d" * 250, dir_fd=fd)
            nfd = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            depth += 1
        os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    rel = "/".join(["d" * 250] * depth) + "/leaf"
    assert 4000 < len(rel) < 4096
    os.chdir(vf)
    try:
        assert os.path.exists(rel)
    finally:
        os.chdir("/")
    run("rm", "-rf", str(vf / ("d" * 250)))


def test_sparse_and_large_offsets(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    with open(vf / "sparse", "wb") as f:
        f.seek(1 << 33)
        f.write(b"end")
    st = os.stat(vf / "sparse")
    assert st.st_size == (1 << 33) + 3
    assert st.st_blocks * 512 < 1 << 20
    with open(vf / "sparse", "rb") as f:
        f.seek((1 << 33) - 2)
        assert f.read() == b"\0\0end"


def daemon_thread(pid: int, name: str) -> int | None:
    for task in os.listdir(f"/proc/{pid}/task"):
        if Path(f"/proc/{pid}/task/{task}/comm").read_text().strip() == name:
            return int(task)
    return None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_cold_read_keeps_the_readers_cpu_awake(daemon: Daemon) -> None:
    """While the loop spins for a small read from the disk, the daemon's keeper thread
    (shim/hop.c) runs at idle priority on the CPU of the thread reading (the read request says
    which thread; the libfuse shim records it).  The loop is pinned to another CPU here, as the
    keeper stays off the loop's CPU."""
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    data = os.urandom(MiB)
    (vf / "f").write_bytes(data)
    assert daemon.proc is not None
    pid = daemon.proc.pid
    assert daemon_thread(pid, "vfusefs-keeper") is None  # started by the first cold read
    loop_cpu, reader_cpu = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(pid, {loop_cpu})  # the main thread is the loop's
    mine = os.sched_getaffinity(0)
    nfd = os.open(native / "f", os.O_RDONLY)
    fd = os.open(vf / "f", os.O_RDONLY)
    try:
        os.fsync(nfd)
        os.posix_fadvise(nfd, 0, 0, os.POSIX_FADV_RANDOM)
        os.sched_setaffinity(0, {reader_cpu})  # this thread reads
        for off in range(0, MiB, 64 << 10):
            os.posix_fadvise(nfd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold natively...
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # ... and in the mount's cache
            assert os.pread(fd, 4096, off) == data[off : off + 4096]
    finally:
        os.sched_setaffinity(0, mine)
        os.close(fd)
        os.close(nfd)
    keeper = daemon_thread(pid, "vfusefs-keeper")
    assert keeper is not None
    assert os.sched_getscheduler(keeper) == os.SCHED_IDLE
    assert os.sched_getaffinity(keeper) == {reader_cpu}


def test_reads_are_right_whether_native_storage_has_the_data_cached_or_not(daemon: Daemon) -> None:
    """On a local filesystem, reads first look in the native page cache from the trio thread
    (workers.read_cached) and a worker reads what is missing: all of it, part or nothing.  The
    mount's own cache is dropped before each read, so every one reaches the daemon.  O_DIRECT
    opens never look (a direct read waits for the device even with RWF_NOWAIT)."""
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    data = os.urandom(4 * MiB)
    (vf / "f").write_bytes(data)
    nfd = os.open(native / "f", os.O_RDONLY)
    fd = os.open(vf / "f", os.O_RDONLY)
    try:
        os.fsync(nfd)
        os.posix_fadvise(nfd, 0, 0, os.POSIX_FADV_RANDOM)  # the native cache holds what we say
        chunks = [(0, 4096), (12345, 1000), (MiB - 100, 200), (MiB, MiB), (4 * MiB - 10, 4096)]
        for state in ("uncached", "cached", "half cached"):
            os.posix_fadvise(nfd, 0, 0, os.POSIX_FADV_DONTNEED)
            if state == "cached":
                os.pread(nfd, 4 * MiB, 0)
            elif state == "half cached":
                for off in range(0, 4 * MiB, 8192):
                    os.pread(nfd, 4096, off)
            for off, size in chunks:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, size, off) == data[off : off + size], (state, off, size)
        assert run("cmp", str(vf / "f"), str(native / "f")).returncode == 0
    finally:
        os.close(fd)
        os.close(nfd)
    # O_DIRECT, as dd and databases use it: the native fd is opened O_DIRECT too, and its I/O
    # needs aligned buffers
    run("dd", f"if={vf / 'f'}", f"of={vf / 'g'}", "bs=1M", "iflag=direct", "oflag=direct")
    assert (native / "g").read_bytes() == data
    run(
        "dd",
        "if=/dev/zero",
        f"of={vf / 'g'}",
        "bs=4k",
        "count=1",
        "seek=3",
        "conv=notrunc",
        "oflag=direct",
    )
    assert (native / "g").read_bytes() == data[:12288] + bytes(4096) + data[16384:]
    dfd = os.open(vf / "g", os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, MiB) as buf:  # aligned, as the client's side of O_DIRECT wants too
            assert os.preadv(dfd, [buf], 0) == MiB
            assert buf[:] == data[:12288] + bytes(4096) + data[16384:MiB]
            assert os.preadv(dfd, [buf], 3 * MiB) == MiB and buf[:] == data[3 * MiB :]
    finally:
        os.close(dfd)


def test_rename_flags(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    (vf / "a").write_text("A")
    (vf / "b").write_text("B")

    def rename2(old: str, new: str, flags: int) -> Any:
        return outcome(lambda: renameat2(vf / old, vf / new, flags))

    assert rename2("a", "b", 1) == ("err", "EEXIST")  # RENAME_NOREPLACE
    assert rename2("a", "b", 2) == ("ok", None)  # RENAME_EXCHANGE
    assert (vf / "a").read_text() == "B" and (vf / "b").read_text() == "A"
    assert rename2("a", "c", 1) == ("ok", None)
    assert sorted(os.listdir(vf)) == ["b", "c"]


def test_nothing_escapes_via_native_symlinks(daemon: Daemon, tmp_path: Path) -> None:
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    secret = tmp_path / "outside"
    secret.write_text("secret")
    os.symlink(str(secret), native / "planted")
    os.symlink("../..", native / "up")
    # the kernel resolves symlinks in the caller's namespace; vfusefs itself never follows them
    assert os.readlink(vf / "planted") == str(secret)
    with pytest.raises(OSError):
        open(vf / "up" / "x", "w")  # resolves to /mnt's parent level, read-only here
    # O_CREAT on a planted dangling symlink must not create its target outside
    os.symlink(str(tmp_path / "created-outside"), native / "dangling")
    fd = os.open(vf, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            os.close(
                os.open("dangling", os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644, dir_fd=fd)
            )
    finally:
        os.close(fd)
    assert not (tmp_path / "created-outside").exists()


def test_unlinked_open_file_keeps_working(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    with open(vf / "tmp", "w+b") as f:
        f.write(b"data")
        os.unlink(vf / "tmp")
        f.seek(0)
        assert f.read() == b"data"
        f.write(b"more")
        assert os.fstat(f.fileno()).st_nlink == 0
    assert os.listdir(vf) == []


def test_df_right_after_rm_counts_the_space_as_free(daemon: Daemon, tmp_path: Path) -> None:
    """The daemon closes native fds after release and forget in batches (workers.close_soon),
    when it is idle or before a statfs: `cp; cat; rm; df` must still show the space free."""
    vf = daemon.vfolder()
    src = tmp_path / "src"
    src.write_bytes(b"\xa5" * (96 * MiB))

    def used() -> int:
        return int(run("df", "--output=used", "-B1", str(vf)).stdout.splitlines()[1])

    for _ in range(3):
        before = used()
        run("cp", str(src), str(vf / "big"))
        run("sh", "-c", f"cat {vf}/big > /dev/null")
        assert used() - before > 48 * MiB  # sanity: the file takes space
        run("rm", str(vf / "big"))
        assert used() - before < 8 * MiB


def test_partial_listings_do_not_leak_inodes(daemon: Daemon) -> None:
    """A listing abandoned half-way (ls | head) must not leave read-ahead nodes behind."""
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    for i in range(3000):
        (native / f"f{i:05d}").touch()
    base = daemon.api("GET", "/v1/status").json()["inodes"]
    for _ in range(5):
        with os.scandir(vf) as it:
            for _, _entry in zip(range(10), it, strict=False):
                pass
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel forgets what it was sent
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = daemon.api("GET", "/v1/status").json()["inodes"]
        if now <= base + 5:
            break
        time.sleep(0.2)
    assert now <= base + 5, f"{now - base} inodes left behind by abandoned listings"


class _Dirent(ctypes.Structure):  # glibc's struct dirent on 64-bit Linux
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


def _dir_walk(path: Path, seek_after: int) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """With libc's opendir: every name in order, every name again after rewinddir, and the
    names read after seekdir back to the telldir taken once seek_after names were read."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.rewinddir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    d = libc.opendir(os.fsencode(path))
    assert d, os.strerror(ctypes.get_errno())

    def names(limit: int | None = None) -> list[bytes]:
        out: list[bytes] = []
        while limit is None or len(out) < limit:
            ent = libc.readdir(d)
            if not ent:
                break
            out.append(ent.contents.d_name)
        return out

    try:
        first = names(seek_after)
        pos = libc.telldir(d)
        first += names()
        libc.rewinddir(d)
        again = names()
        libc.seekdir(d, pos)
        resumed = names()
        return first, again, resumed
    finally:
        libc.closedir(d)


def test_rewinddir_and_seekdir_across_native_chunks(daemon: Daemon) -> None:
    """A directory longer than what one reply holds: rewinddir lists every entry again, and
    seekdir to a telldir position resumes right there, as on the native directory."""
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    for i in range(1500):
        (native / f"entry-{i:05d}").touch()
    expected = sorted([b".", b".."] + [os.fsencode(n) for n in os.listdir(native)])
    for path in (native, vf):
        first, again, resumed = _dir_walk(path, 700)
        assert sorted(first) == expected, path
        assert sorted(again) == expected, path
        assert resumed == first[700:], path


def test_fd_budget_is_kept_by_asking_the_kernel_to_forget(world_dir: Path) -> None:
    """Every cached inode holds an O_PATH fd; past inode_fds the oldest entries are dropped."""
    d = Daemon(world_dir, daemon_opts={"inode_fds": 600}).start()
    try:
        vf = d.vfolder()
        for i in range(20):
            (vf / f"d{i}").mkdir()
            for j in range(150):
                (vf / f"d{i}" / f"f{j}").write_bytes(b"%d/%d" % (i, j))
        run("ls", "-lR", str(vf))
        deadline = time.monotonic() + 5  # FORGETs arrive asynchronously
        while True:
            held = len(os.listdir(f"/proc/{d.proc.pid}/fd"))  # type: ignore[union-attr]
            if held < 800 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert held < 800, f"{held} fds held with inode_fds = 600"
        for i in range(20):  # everything forgotten is simply looked up again
            for j in range(0, 150, 7):
                assert (vf / f"d{i}" / f"f{j}").read_bytes() == b"%d/%d" % (i, j)
        assert "asking the kernel to forget" in d.log()
    finally:
        assert d.stop() == 0


def test_xattrs_set_natively_show_the_first_time_a_file_is_seen(daemon: Daemon) -> None:
    """The daemon caches each file's xattr names when it first meets the inode (lookup or
    listing), to answer absent names without a hop; that list must be the file's own (it was
    the /proc link's, empty, for files met by lookup or listing before 2026-11-21), and a
    symlink's own, never its target's."""
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    (native / "a").write_bytes(b"a")
    os.setxattr(native / "a", "user.k", b"1")
    (native / "d").mkdir()
    (native / "d" / "b").write_bytes(b"b")
    os.setxattr(native / "d" / "b", "user.k", b"2")
    os.setxattr(native / "d", "user.k", b"3")
    os.symlink("a", native / "l")
    getfattr = ("getfattr", "--only-values", "-n", "user.k")
    assert run(*getfattr, str(vf / "a")).stdout == "1"  # met by lookup
    assert sorted(os.listdir(vf / "d")) == ["b"]  # met by the listing (readdirplus)
    assert run(*getfattr, str(vf / "d" / "b")).stdout == "2"
    assert run(*getfattr, str(vf / "d")).stdout == "3"
    assert run(*getfattr, "-h", str(vf / "l"), check=False).returncode != 0  # the link's own
    assert run(*getfattr, str(vf / "l")).stdout == "1"  # followed by getfattr
    assert "user.k" not in run("getfattr", "-h", "-d", str(vf / "l")).stdout


def test_listings_never_run_out_of_fds_under_a_low_limit(world_dir: Path) -> None:
    """With RLIMIT_NOFILE at 1,024 (about 900 O_PATH fds for inodes), tools walking 6,000
    files in 60 directories again and again get every entry and never EMFILE: listings wait
    for the kernel to forget old entries instead.  (Before, find failed on the first walk.)"""
    d = Daemon(world_dir)
    d.nofile = 1024
    d.start()
    try:
        vf = d.vfolder()
        native = Path(d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
        for i in range(60):
            (native / f"d{i:02d}").mkdir()
            for j in range(100):
                (native / f"d{i:02d}" / f"f{j}").write_bytes(b"%d/%d" % (i, j))
        for _ in range(3):
            found = run("find", str(vf), "-type", "f")
            assert found.stderr == "" and len(found.stdout.split()) == 6000
        listed = run("ls", "-lR", str(vf))
        assert listed.stderr == "" and listed.stdout.count(" f") == 6000
        data = run("sh", "-c", f"find '{vf}' -type f -exec cat {{}} +")
        assert data.stderr == "" and len(data.stdout) == sum(
            len(b"%d/%d" % (i, j)) for i in range(60) for j in range(100)
        )
        run("rm", "-rf", *(str(vf / f"d{i:02d}") for i in range(30)))
        assert sorted(os.listdir(native)) == [f"d{i:02d}" for i in range(30, 60)]
        assert len(os.listdir(f"/proc/{d.proc.pid}/fd")) < 1024  # type: ignore[union-attr]
    finally:
        assert d.stop() == 0


def test_native_changes_to_a_vfolder_root_show_under_constant_use(daemon: Daemon) -> None:
    """The host-dir lookup answers from a remembered stat; using it must not keep it fresh."""
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    os.stat(vf)
    os.chmod(native, 0o700)  # behind vfusefs
    deadline = time.monotonic() + 5
    while stat.S_IMODE(os.stat(vf).st_mode) != 0o700 and time.monotonic() < deadline:
        time.sleep(0.2)  # a path walk through the host dir every 0.2 s
    assert stat.S_IMODE(os.stat(vf).st_mode) == 0o700
    assert time.monotonic() < deadline - 2  # seen within about the attribute timeout


@contextlib.contextmanager
def stoppable_storage(world_dir: Path) -> Iterator[tuple[Path, int]]:
    """A directory served by bindfs, and its pid: SIGSTOP makes it a hung NAS."""
    src, slow = world_dir / "nas-src", world_dir / "nas"
    src.mkdir()
    slow.mkdir()
    run("bindfs", str(src), str(slow))
    bindfs = int(run("pgrep", "-f", f"bindfs {src} {slow}").stdout.split()[0])
    try:
        yield slow, bindfs
    finally:
        os.kill(bindfs, signal.SIGCONT)
        run("fusermount3", "-u", str(slow), check=False)


@contextlib.contextmanager
def started(d: Daemon, bindfs: int) -> Iterator[Daemon]:
    """d serving; stopped at the end, with its storage answering again first."""
    try:
        yield d.start()
    finally:
        os.kill(bindfs, signal.SIGCONT)
        if d.proc is not None:
            d.stop()


@pytest.mark.skipif(not have("bindfs"), reason="bindfs not installed")
def test_a_hung_host_fails_with_eio_and_stalls_nothing_else(world_dir: Path) -> None:
    """A host whose storage stops answering (a hung NFS server, here: a bindfs mount whose
    process is SIGSTOPped) fails its requests with EIO after op_timeout, also once all its
    threads are stuck, while another host's vfolder keeps working meanwhile; once the storage
    answers again, so does the host."""
    with stoppable_storage(world_dir) as (slow, bindfs):
        d = Daemon(
            world_dir,
            hosts={
                "local": {"path": str(world_dir / "native")},
                "nas": {"path": str(slow), "op_timeout": 2.0},
            },
            daemon_opts={"io_threads": 2},
        )
        d.allowed_errors = ["took longer than 2.0s"]
        with started(d, bindfs):
            local, nas = (
                d.vfolder("local", grants=[{"principal": "*", "mode": "rwd"}]),
                d.vfolder("nas", grants=[{"principal": "*", "mode": "rwd"}]),
            )
            (nas / "before").write_text("x")
            os.kill(bindfs, signal.SIGSTOP)
            # three creates on the hung host: two take its two threads, the third waits
            hung = [
                subprocess.Popen(["touch", str(nas / f"new{i}")], stderr=subprocess.PIPE, text=True)
                for i in range(3)
            ]
            for i in range(200):  # meanwhile the other host answers as usual
                (local / f"f{i}").write_text(str(i))
            assert sorted(os.listdir(local)) == sorted(f"f{i}" for i in range(200))
            assert all(p.poll() is None for p in hung)  # ... before the hung host gave up
            for p in hung:
                # each touch may wait behind the others: the kernel serializes lookups in one
                # directory, and a touch makes up to two (the vfolder root, then the name),
                # each failing after op_timeout (3 x 2 x 2 s); 30 s only bounds a hang
                assert p.wait(timeout=30) == 1
                assert "Input/output error" in p.stderr.read()  # type: ignore[union-attr]
            os.kill(bindfs, signal.SIGCONT)
            for _ in range(50):  # the stuck threads come back once bindfs answers
                if run("touch", str(nas / "after"), check=False).returncode == 0:
                    break
                time.sleep(0.1)
            assert (nas / "after").exists() and (nas / "before").read_text() == "x"


def data_fds(pid: int, name: str) -> list[str]:
    """The daemon's fds on a file named name that are not O_PATH (an open data fd)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(
                Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8
            )
        except (OSError, IndexError):
            continue
        if target.endswith("/" + name) and not flags & os.O_PATH:
            out.append(target)
    return out


@pytest.mark.skipif(not have("bindfs"), reason="bindfs not installed")
def test_an_open_that_ends_after_its_request_gave_up_leaves_no_fd(world_dir: Path) -> None:
    """An open on a hung host fails with EIO after op_timeout; when the storage answers again
    the native open finishes on its worker, and the fd it opened must be closed, not leaked."""
    with stoppable_storage(world_dir) as (slow, bindfs):
        d = Daemon(
            world_dir,
            hosts={"nas": {"path": str(slow), "op_timeout": 1.0}},
            daemon_opts={"entry_timeout": 30},
        )
        d.allowed_errors = ["took longer than 1.0s"]
        with started(d, bindfs):
            nas = d.vfolder("nas", grants=[{"principal": "*", "mode": "rwd"}])
            (nas / "data").write_text("x")
            dirfd = os.open(nas, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.stat("data", dir_fd=dirfd)  # cached: the open below reaches us as OPEN
                os.kill(bindfs, signal.SIGSTOP)
                with pytest.raises(OSError) as failed:
                    os.open("data", os.O_RDONLY, dir_fd=dirfd)
                assert failed.value.errno == errno.EIO
                os.kill(bindfs, signal.SIGCONT)
            finally:
                os.close(dirfd)
            assert d.proc is not None
            deadline = time.monotonic() + 5
            while "after its request gave up" not in d.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "open_data ended well after its request gave up" in d.log()
            while data_fds(d.proc.pid, "data") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert data_fds(d.proc.pid, "data") == []


def test_utime_after_a_listing_reaches_native_storage(daemon: Daemon) -> None:
    """Listing a directory moves its native atime behind the daemon's remembered stat; setting
    the times it remembers must still set them (found by the differential test)."""
    vf = daemon.vfolder(grants=[{"principal": "*", "mode": "rwd"}])
    a = vf / "a"
    a.mkdir()
    for _ in range(2):
        os.listdir(a)
        os.utime(a, ns=(0, 0))
        assert (os.lstat(a).st_atime_ns, os.lstat(a).st_mtime_ns) == (0, 0)
    (a / "f").write_text("x")
    for _ in range(2):
        (a / "f").read_text()
        os.utime(a / "f", ns=(5_000_000_000, 7_000_000_000))
        st = os.lstat(a / "f")
        assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_000, 7_000_000_000)


def test_many_clients_at_once_all_finish_with_the_right_data(
    daemon: Daemon, tmp_path: Path
) -> None:
    # the FUSE loop reads the next request while others wait for their native calls
    # (fuseloop.py: a barging read lock, spinning between requests); six processes untar, read
    # back, write a big file, read it and delete at once: every one finishes, with the bytes
    # that were written
    src = tmp_path / "src"
    for d in range(10):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(30):
            (src / f"d{d}" / f"f{f}").write_bytes(os.urandom(1000 + 97 * f))
    tarball = tmp_path / "t.tar"
    run("tar", "-cf", str(tarball), "-C", str(src), ".")
    want = subprocess.run(
        f"cd {src} && find . -type f | sort | xargs md5sum",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    vf = daemon.vfolder()
    procs = []
    for i in range(6):
        dst = vf / f"w{i}"
        dst.mkdir()
        script = (
            f"set -e; tar -xf {tarball} -C {dst}; cd {dst}; "
            f"find . -type f | sort | xargs md5sum > {tmp_path}/sums{i}; "
            f"dd if=/dev/urandom of={tmp_path}/big{i} bs=1M count=8 status=none; "
            f"cp {tmp_path}/big{i} {dst}/big; cmp {tmp_path}/big{i} {dst}/big; "
            f"rm -rf {dst}/d*"
        )
        procs.append(subprocess.Popen(["sh", "-c", script], stderr=subprocess.PIPE, text=True))
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert (tmp_path / f"sums{i}").read_text() == want
        assert sorted(os.listdir(vf / f"w{i}")) == ["big"]
