"""Quota (SPEC §4, §5): exactness and enforcement on a real mount (the ledger alone:
test_ledger.py).

"Exact" means: after any sequence of operations through the mount, the reported usage equals
`du --block-size=1 -s` of the native directory and its number of inodes (hard links once).
"""

from __future__ import annotations

import errno
import json
import mmap
import multiprocessing
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Daemon, run

MiB = 1 << 20


# -- on a real mount ---------------------------------------------------------------------------
def test_scan_of_a_wide_tree_needs_one_fd_per_level(tmp_path: Path) -> None:
    """300 subdirectories side by side, counted under a 64-fd limit, equal du."""
    for i in range(300):
        (tmp_path / f"d{i}" / "sub").mkdir(parents=True)
        (tmp_path / f"d{i}" / "sub" / "f").write_bytes(b"s" * (i * 100))
    os.link(tmp_path / "d1" / "sub" / "f", tmp_path / "hard")
    script = (
        "import os, resource, sys\n"
        "from vfusefs import native\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "print(*native.scan(os.open(sys.argv[1], os.O_PATH)))\n"
    )
    out = subprocess.run(
        [os.sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert (int(out[0]), int(out[1])) == du(tmp_path)


# -- on a real mount ----------------------------------------------------------------------------
def native_of(d: Daemon, vf: Path) -> Path:
    return Path(d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])


def du(path: Path) -> tuple[int, int]:
    nbytes = int(run("du", "--block-size=1", "-s", str(path)).stdout.split()[0])
    inodes = len(set(run("find", str(path), "-mindepth", "1", "-printf", "%i\n").stdout.split()))
    return nbytes, inodes


def usage(d: Daemon, vf: Path) -> tuple[int, int]:
    info = d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()
    return info["usage_bytes"], info["usage_inodes"]


def settled_usage(
    d: Daemon, vf: Path, native: Path, seconds: float = 10.0
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(usage, du) once they agree, or as they stand after `seconds` (the native fs may still
    be settling blocks it allocates at writeback)."""
    deadline = time.monotonic() + seconds
    while usage(d, vf) != du(native) and time.monotonic() < deadline:
        time.sleep(0.2)
    return usage(d, vf), du(native)


def wait_usage_equals_du(d: Daemon, vf: Path, native: Path, seconds: float = 10.0) -> None:
    got, real = settled_usage(d, vf, native, seconds)
    assert got == real


def _writer(path: str, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b" if os.path.exists(path) else "w+b") as f:
        for _ in range(200):
            f.seek(rng.randrange(4 * MiB))
            f.write(os.urandom(rng.randrange(1, 20000)))


@pytest.mark.mount
def test_usage_is_exact_after_random_workloads(any_daemon: Daemon) -> None:
    daemon = any_daemon
    vf = daemon.vfolder()
    native = native_of(daemon, vf)
    assert usage(daemon, vf) == du(native)  # an empty vfolder: its own directory block
    rng = random.Random(int(os.environ.get("QUOTA_SEED", 7)))
    names = [f"f{i}" for i in range(12)] + [f"d/f{i}" for i in range(6)]
    (vf / "d").mkdir()
    for step in range(600):
        name = rng.choice(names)
        p = vf / name
        op = rng.choice(
            [
                "write",
                "write",
                "sparse",
                "truncate",
                "link",
                "rename",
                "unlink",
                "mkdir",
                "rmdir",
                "symlink",
                "xattr",
            ]
        )
        try:
            if op == "write":
                with open(p, "ab") as f:
                    f.write(os.urandom(rng.randrange(1, 50000)))
            elif op == "sparse":
                with open(p, "r+b" if p.exists() else "wb") as f:
                    f.seek(rng.randrange(8 * MiB))
                    f.write(b"x" * rng.randrange(1, 9000))
            elif op == "truncate":
                os.truncate(p, rng.randrange(3 * MiB))
            elif op == "link":
                os.link(p, vf / rng.choice(names))
            elif op == "rename":
                os.rename(p, vf / rng.choice(names))
            elif op == "unlink":
                os.unlink(p)
            elif op == "mkdir":
                os.mkdir(vf / f"dir{rng.randrange(5)}")
            elif op == "rmdir":
                os.rmdir(vf / f"dir{rng.randrange(5)}")
            elif op == "symlink":
                os.symlink("t" * rng.choice([10, 3000]), vf / f"s{rng.randrange(5)}")
            elif op == "xattr":
                os.setxattr(p, f"user.k{rng.randrange(3)}", os.urandom(rng.randrange(1, 3000)))
        except OSError:
            pass
        if step % 100 == 99:
            assert usage(daemon, vf) == du(native), f"after step {step}"
    # concurrent writers from several processes, into their own and a shared file
    procs = [
        multiprocessing.Process(target=_writer, args=(str(vf / f"par{i % 3}"), i)) for i in range(6)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    assert usage(daemon, vf) == du(native)


@pytest.mark.mount
def test_edquot_bypass_attempts(daemon: Daemon, world_dir: Path) -> None:
    limit = 4 * MiB
    vf = Path(
        daemon.create_vfolder(
            quota_bytes=limit, quota_inodes=50, grants=[{"principal": "*", "mode": "rwd"}]
        )["path"]
    )
    native = native_of(daemon, vf)

    def over_by() -> int:
        return du(native)[0] - limit

    r = subprocess.run(
        ["dd", "if=/dev/zero", f"of={vf}/dd", "bs=1M", "count=10"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "Disk quota exceeded" in r.stderr
    assert over_by() <= 0  # checked before each write: never over at all
    os.unlink(vf / "dd")
    # fallocate(2) cannot reach the daemon (pyfuse3 has no handler): refused, nothing allocated
    r = subprocess.run(["fallocate", "-l", "100M", str(vf / "fa")], capture_output=True, text=True)
    assert (
        r.returncode != 0 and not (native / "fa").exists() or (native / "fa").stat().st_blocks == 0
    )
    # an extending truncate allocates nothing; writing into the hole is what counts
    with open(vf / "holes", "wb") as f:
        f.truncate(100 * MiB)
        with pytest.raises(OSError) as exc:
            for off in range(0, 100 * MiB, 256 * 1024):
                f.seek(off)
                f.write(b"y" * 65536)
                f.flush()
    assert exc.value.errno == errno.EDQUOT and over_by() <= 0
    os.unlink(vf / "holes")
    # writes through a shared mapping surface EDQUOT at msync/close, not later
    with open(vf / "mapped", "w+b") as f:
        f.truncate(16 * MiB)
        m = mmap.mmap(f.fileno(), 16 * MiB)
        m[:] = b"z" * (16 * MiB)
        with pytest.raises(OSError) as exc:
            m.flush()
            m.close()
            f.flush()
            os.fsync(f.fileno())
        assert exc.value.errno == errno.EDQUOT
        m.close()  # the mapping holds the file (and its blocks) until it is unmapped
    assert over_by() <= 0
    os.unlink(vf / "mapped")
    # O_APPEND from many processes at once
    procs = [
        subprocess.Popen(
            ["sh", "-c", f"while printf '%4096s' x >> {vf}/log; do :; done"], stderr=subprocess.PIPE
        )
        for _ in range(6)
    ]
    for proc in procs:
        proc.wait(60)
    assert over_by() <= 0
    os.unlink(vf / "log")
    # hard-link, then write through the link
    (vf / "orig").write_bytes(b"a" * MiB)
    os.link(vf / "orig", vf / "alias")
    with pytest.raises(OSError) as exc:
        with open(vf / "alias", "ab") as f:
            f.write(b"b" * (8 * MiB))
    assert exc.value.errno == errno.EDQUOT and over_by() <= 0
    # large xattrs are charged too
    with pytest.raises(OSError) as exc:
        for i in range(100000):
            os.setxattr(vf / "orig", f"user.big{i}", b"v" * 3000)
    assert exc.value.errno in (errno.EDQUOT, errno.ENOSPC, errno.E2BIG) and over_by() <= 0
    # many small files against the inode limit
    made = 0
    with pytest.raises(OSError) as exc:
        for i in range(100):
            (vf / f"small{i}").touch()
            made += 1
    assert exc.value.errno == errno.EDQUOT
    assert du(native)[1] == 50 and usage(daemon, vf) == du(native)


@pytest.mark.mount
def test_scope_limit_spans_vfolders(daemon: Daemon) -> None:
    scope = "project:7c4e3a52-1f7e-4a8e-9d7c-2b1d1a9e3f00"
    r = daemon.api("PUT", f"/v1/scopes/{scope}", {"quota_bytes": "3M"})
    assert r.status_code == 200 and r.json()["quota_bytes"] == 3 * MiB
    a = daemon.vfolder(scope=scope)
    b = daemon.vfolder(scope=scope)
    (a / "x").write_bytes(b"1" * (2 * MiB))
    with pytest.raises(OSError) as exc:
        (b / "y").write_bytes(b"2" * (2 * MiB))
    assert exc.value.errno == errno.EDQUOT
    info = daemon.api("GET", f"/v1/scopes/{scope}").json()
    assert sorted(info["vfolders"]) == sorted([a.name, b.name])
    assert info["usage_bytes"] == usage(daemon, a)[0] + usage(daemon, b)[0] <= 3 * MiB
    assert os.getxattr(a, "user.vfusefs.scope") == scope.encode()
    out = json.loads(daemon.cli("scope", scope, "--json").stdout)
    assert out["usage_bytes"] == info["usage_bytes"]
    daemon.cli("scope", scope, "--bytes", "0")
    (b / "y").write_bytes(b"2" * (2 * MiB))  # unlimited again


@pytest.mark.mount
def test_quota_xattrs_api_and_cli(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    native = native_of(daemon, vf)
    (vf / "f").write_bytes(b"x" * 100000)
    attrs = run("getfattr", "-d", "-m", "user.vfusefs", str(vf)).stdout
    for key in (
        'quota.bytes="0"',
        'quota.inodes="0"',
        f'usage.bytes="{du(native)[0]}"',
        'usage.inodes="1"',
        'scope=""',
        'mode="admin"',
    ):
        assert f"user.vfusefs.{key}" in attrs, attrs
    run("setfattr", "-n", "user.vfusefs.quota.bytes", "-v", "10G", str(vf))
    run("setfattr", "-n", "user.vfusefs.quota.inodes", "-v", "1000", str(vf))
    assert os.getxattr(vf, "user.vfusefs.quota.bytes") == str(10 << 30).encode()
    info = json.loads(daemon.cli("vfolder", "quota", "local", vf.name, "--json").stdout)
    assert (info["quota_bytes"], info["quota_inodes"]) == (10 << 30, 1000)
    for value in ("lots", "-5", "1.5G", ""):
        r = subprocess.run(
            ["setfattr", "-n", "user.vfusefs.quota.bytes", "-v", value, str(vf)],
            capture_output=True,
            text=True,
        )
        assert r.returncode != 0 and "Invalid argument" in r.stderr, value
    r = subprocess.run(
        ["setfattr", "-n", "user.vfusefs.usage.bytes", "-v", "1", str(vf)],
        capture_output=True,
        text=True,
    )
    assert "Operation not permitted" in r.stderr
    os.chmod(vf, 0o777)
    daemon.cli("grant", "local", vf.name, "uid:1000", "rwd")
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "setfattr",
            "-n",
            "user.vfusefs.quota.bytes",
            "-v",
            "1T",
            str(vf),
        ],
        capture_output=True,
        text=True,
    )
    assert "Operation not permitted" in r.stderr  # only admins set limits
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "getfattr",
            "--only-values",
            "-n",
            "user.vfusefs.usage.inodes",
            str(vf),
        ],
        capture_output=True,
        text=True,
    )
    assert r.stdout == "1"
    daemon.cli("vfolder", "quota", "local", vf.name, "--bytes", "512M", "--inodes", "0")
    assert (
        daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["quota_bytes"] == 512 * MiB
    )
    r = daemon.api("PATCH", f"/v1/hosts/local/vfolders/{vf.name}", {"quota_bytes": "much"})
    assert r.status_code == 400 and r.json()["error"] == "bad_quota"
    r = daemon.cli("vfolder", "quota", "local", vf.name, "--bytes", "much", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1  # a bad value: a usage error
    # host directories carry the host's totals
    assert int(os.getxattr(daemon.mnt / "local", "user.vfusefs.usage.bytes")) == du(native)[0]


@pytest.mark.mount
def test_usage_survives_restarts_and_is_recounted_after_a_crash(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    native = native_of(daemon, vf)
    (vf / "a").write_bytes(os.urandom(300000))
    before = usage(daemon, vf)
    assert daemon.stop() == 0
    daemon.start()
    assert usage(daemon, vf) == before and "not clean" not in daemon.log()
    # changes behind vfusefs, then a crash: the restart recounts
    (native / "behind").write_bytes(b"q" * 500000)
    daemon.crash()
    daemon.start()  # finds and clears the dead mount
    deadline = time.monotonic() + 20
    while usage(daemon, vf) != du(native) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert usage(daemon, vf) == du(native)
    assert "not clean" in daemon.log()


@pytest.mark.mount
def test_shell_truncation_frees_quota_and_shows_the_new_size(daemon: Daemon) -> None:
    """`: > f` opens with O_TRUNC (no setattr): the size, times and usage must follow at once,
    also for a file written before a restart (no longer watched for delayed allocation)."""
    vf = daemon.vfolder()
    native = native_of(daemon, vf)
    (vf / "f").write_bytes(os.urandom(1000000))
    os.sync()
    assert daemon.stop() == 0
    daemon.start()
    full = usage(daemon, vf)
    assert full == du(native) and full[0] > 1000000
    mtime = os.stat(vf / "f").st_mtime_ns
    run("sh", "-c", ": > f", cwd=vf)
    st = os.stat(vf / "f")
    assert st.st_size == 0 and st.st_blocks == 0 and st.st_mtime_ns > mtime
    assert usage(daemon, vf) == du(native) and usage(daemon, vf)[0] < full[0] - 1000000


@pytest.mark.mount
def test_rescan_corrects_drift(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    native = native_of(daemon, vf)
    for i in range(200):
        (native / f"n{i}").write_bytes(b"w" * 5000)
    assert usage(daemon, vf) != du(native)
    r = daemon.api("POST", f"/v1/hosts/local/vfolders/{vf.name}/rescan", {})
    assert r.status_code == 202
    task = r.json()
    deadline = time.monotonic() + 20
    while task["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        task = daemon.api("GET", f"/v1/tasks/{task['id']}").json()
    assert task["state"] == "done" and (task["done_bytes"], task["done_files"]) == du(native)
    assert usage(daemon, vf) == du(native)
    (native / "more").write_bytes(b"m" * 70000)
    out = daemon.cli("vfolder", "rescan", "local", vf.name).stdout
    assert out.startswith("done") and usage(daemon, vf) == du(native)
    assert daemon.api("GET", "/v1/tasks/nope").status_code == 404


def df(path: str, *flags: str, runner: list[str] | None = None) -> list[str]:
    out = subprocess.run(
        (runner or []) + ["df", "--output=size,used,avail", *flags, path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.splitlines()[1].split()


@pytest.mark.mount
def test_df_and_getfattr_show_the_quota_to_admins_and_containers(daemon: Daemon) -> None:
    from test_access_mount import CGROOT, Container

    if not (CGROOT / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy")
    container = Container()
    try:
        vf = Path(
            daemon.create_vfolder(
                quota_bytes="64M",
                quota_inodes=100,
                grants=[{"principal": f"cgroup:{container.cgroup}", "mode": "rw"}],
            )["path"]
        )
        (vf / "data").write_bytes(b"d" * (10 * MiB))
        used = usage(daemon, vf)
        # as the admin, with 1K blocks: size is the quota, used what vfusefs counts
        size, used_k, avail = map(int, df(str(vf), "-k"))
        assert size == 64 * 1024 and used_k == used[0] // 1024 and avail == 64 * 1024 - used_k
        itotal, iused, ifree = (
            subprocess.run(
                ["df", "--output=itotal,iused,iavail", str(vf)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.splitlines()[1]
            .split()
        )
        assert (int(itotal), int(iused), int(ifree)) == (100, used[1], 100 - used[1])
        # another vfolder without quota shows the native filesystem
        other = daemon.vfolder()
        native = os.statvfs(native_of(daemon, other))
        assert int(df(str(other), "-k")[0]) == native.f_blocks * native.f_frsize // 1024
        # inside the container, through its bind mount, df and getfattr -d show the same
        r = container.sh(vf, "df --output=size,used,avail -k . && getfattr -d -m user.vfusefs .")
        lines = r.stdout.splitlines()
        assert lines[1].split() == [str(64 * 1024), str(used_k), str(64 * 1024 - used_k)], (
            r.stdout + r.stderr
        )
        for key in (
            'quota.bytes="67108864"',
            'quota.inodes="100"',
            f'usage.bytes="{used[0]}"',
            'mode="rw"',
        ):
            assert f"user.vfusefs.{key}" in r.stdout, r.stdout
        r = container.sh(vf, "setfattr -n user.vfusefs.quota.bytes -v 1T .")
        assert "Operation not permitted" in r.stderr  # root in a container is not an admin
    finally:
        container.close()


@pytest.mark.mount
def test_writeback_cache_reports_edquot_by_fsync_and_close(world_dir: Path) -> None:
    """With the kernel write-back cache on, write() lands in the page cache; EDQUOT must come
    back by fsync/close at the latest, and native storage stays within one write request."""
    d = Daemon(world_dir, daemon_opts={"writeback_cache": True}).start()
    try:
        limit = 4 * MiB
        vf = Path(
            d.create_vfolder(quota_bytes=limit, grants=[{"principal": "*", "mode": "rwd"}])["path"]
        )
        native = native_of(d, vf)
        fd = os.open(vf / "wb", os.O_WRONLY | os.O_CREAT, 0o644)
        failed_at = None
        try:
            for _ in range(160):
                os.write(fd, b"w" * 65536)  # 10 MiB in all
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.EDQUOT
            failed_at = "write/fsync"
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.EDQUOT
            failed_at = failed_at or "close"
        assert failed_at is not None, "10 MiB went into a 4 MiB quota without an error"
        assert du(native)[0] <= limit + MiB  # at most one write request (max_write) over
        assert usage(d, vf) == du(native)
    finally:
        assert d.stop() == 0
