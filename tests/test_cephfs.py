"""A CephFS host, mounted for real: a single-node Ceph cluster (monitor, memstore OSD, MDS) on
loopback with CephFS mounted by ceph-fuse (conftest.CephFs), started once per session.  Limits
are CephFS directory quotas that the client enforces on writes that bypass vfusefs, usage comes
from the MDS's recursive statistics, snapshots are `.snap` directories.  What the storage holds
is read with getfattr and ls, not with vfusefs's code.

The kernel CephFS client cannot run here (this kernel has none): ceph-fuse is the client, which
enforces quotas the same way (in the client, cooperatively)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CephFs, Daemon, run
from test_quota import du

pytestmark = pytest.mark.mount
MiB = 1 << 20


@pytest.fixture
def ceph(world_dir: Path, ceph_fs: CephFs) -> Iterator[Daemon]:
    d = Daemon(
        world_dir,
        hosts={"cf": {"backend": "cephfs", "path": str(ceph_fs.dir(f"h{uuid.uuid4().hex[:8]}"))}},
        daemon_opts={"trash_retention": 0.0},
    ).start()
    yield d
    assert d.stop() == 0


def xattr(path: Path, name: str) -> str:
    r = run("getfattr", "--only-values", "-n", name, str(path), check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def settled(d: Daemon, vfid: str, native: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(usage, du) of a vfolder on host cf once they agree, or after 10 s."""

    def usage() -> tuple[int, int]:
        info = d.api("GET", f"/v1/hosts/cf/vfolders/{vfid}").json()
        return info["usage_bytes"], info["usage_inodes"]

    deadline = time.monotonic() + 10
    while usage() != du(native) and time.monotonic() < deadline:
        time.sleep(0.2)
    return usage(), du(native)


def dd(path: Path, mib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"],
        capture_output=True,
        text=True,
    )


def test_limits_are_cephfs_quotas_that_hold_writes_around_vfusefs(ceph: Daemon) -> None:
    info = ceph.create_vfolder(
        "cf", quota_bytes="16M", quota_inodes=100, grants=[{"principal": "*", "mode": "rwd"}]
    )
    native, mounted = Path(info["native_path"]), Path(info["path"])
    assert xattr(native, "ceph.quota.max_bytes") == str(16 * MiB)
    assert xattr(native, "ceph.quota.max_files") == "100"
    caps = ceph.api("GET", "/v1/hosts/cf").json()["capabilities"]
    assert caps["native_quota"] and caps["fast_usage"] and caps["snapshots"]
    # through the mount: vfusefs's ledger refuses first, at the limit
    r = dd(mounted / "through", 32)
    assert r.returncode != 0 and "Disk quota exceeded" in r.stderr
    assert (mounted / "through").stat().st_size <= 16 * MiB
    (mounted / "through").unlink()
    # around vfusefs (another client of the same CephFS): CephFS itself refuses near the limit
    deadline = time.monotonic() + 10
    while int(xattr(native, "ceph.dir.rbytes") or 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the MDS's recursive statistics settle after the unlink
    r = dd(native / "around", 32)
    assert r.returncode != 0 and "Disk quota exceeded" in r.stderr, r.stderr
    # CephFS clients enforce quotas cooperatively: the write runs past the limit by what the
    # client had in flight before the MDS told it (2.4 MiB seen here under load)
    assert 8 * MiB <= (native / "around").stat().st_size <= 24 * MiB
    (native / "around").unlink()
    # a limit changed through the CLI reaches CephFS; 0 lifts it
    ceph.cli("vfolder", "quota", "cf", info["id"], "--bytes", "64M", "--inodes", "0")
    assert xattr(native, "ceph.quota.max_bytes") == str(64 * MiB)
    assert xattr(native, "ceph.quota.max_files") in ("", "0")
    assert dd(mounted / "fits", 32).returncode == 0
    ceph.cli("vfolder", "quota", "cf", info["id"], "--bytes", "0")
    assert xattr(native, "ceph.quota.max_bytes") in ("", "0")
    got, real = settled(ceph, info["id"], native)
    assert got == real
    # an admin changing the quota by hand is reported as drift
    run("setfattr", "-n", "ceph.quota.max_bytes", "-v", str(8 * MiB), str(native))
    drift = ceph.api("GET", "/v1/hosts/cf").json()["consistency"]["limit_drift"]
    assert drift == [{"id": info["id"], "store": 0, "native": 8 * MiB}]


def test_usage_comes_from_the_mds(ceph: Daemon, ceph_fs: CephFs) -> None:
    from vfusefs.backends import load_backend
    from vfusefs.config import HostConfig

    info = ceph.create_vfolder("cf", grants=[{"principal": "*", "mode": "rwd"}])
    mounted, native = Path(info["path"]), Path(info["native_path"])
    (mounted / "d").mkdir()
    for i in range(10):
        (mounted / "d" / f"f{i}").write_bytes(b"x" * (1000 * (i + 1)))
    host = HostConfig("cf", "cephfs", str(native.parent), "flat", (), 30.0)
    backend = load_backend(host)
    os.sync()  # ceph-fuse tells the MDS new sizes when it flushes (or gives up its caps)
    deadline = time.monotonic() + 30
    while backend.native_usage(str(native)) != (55000, 12) and time.monotonic() < deadline:
        time.sleep(0.2)
    # file bytes; entries: the vfolder's directory, d and the 10 files
    assert backend.native_usage(str(native)) == (55000, 12)
    assert xattr(native, "ceph.dir.rbytes") == "55000"


def test_snapshots_and_a_clone_from_one(ceph: Daemon) -> None:
    info = ceph.create_vfolder("cf", grants=[{"principal": "*", "mode": "rwd"}])
    src, native = Path(info["path"]), Path(info["native_path"])
    (src / "a").write_bytes(os.urandom(MiB))
    ceph.cli("vfolder", "snapshot", "cf", info["id"], "before")
    assert (native / ".snap" / "before" / "a").read_bytes() == (src / "a").read_bytes()
    (src / "after").write_text("made after the snapshot\n")
    listed = json.loads(ceph.cli("--json", "vfolder", "snapshot", "cf", info["id"]).stdout)
    assert listed == [{"name": "before"}]
    old = json.loads(
        ceph.cli("--json", "vfolder", "clone", "cf", info["id"], "--snapshot", "before").stdout
    )
    assert sorted(os.listdir(old["path"])) == ["a"]
    (Path(old["path"]) / "mine").write_text("a clone is writable\n")
    new = json.loads(ceph.cli("--json", "vfolder", "clone", "cf", info["id"]).stdout)
    assert sorted(os.listdir(new["path"])) == ["a", "after"]
    bad = ceph.cli("vfolder", "snapshot", "cf", info["id"], "_x", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    # a vfolder with snapshots is still deleted and purged (its snapshots first)
    ceph.cli("vfolder", "rm", "cf", info["id"], "--force", "--yes")
    deadline = time.monotonic() + 15
    while native.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    trash = native.parent / ".vfusefs-trash"
    while trash.exists() and any(trash.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not native.exists() and not (trash.exists() and any(trash.iterdir()))
    ceph.cli("vfolder", "snapshot", "cf", new["id"], "later")
    ceph.cli("vfolder", "snapshot", "cf", new["id"], "later", "--rm")
    assert json.loads(ceph.cli("--json", "vfolder", "snapshot", "cf", new["id"]).stdout) == []


def test_not_on_cephfs_is_one_clear_line(world_dir: Path) -> None:
    d = Daemon(world_dir, hosts={"cf": {"backend": "cephfs", "path": str(world_dir / "plain")}})
    d.start()
    try:
        r = d.api("POST", "/v1/hosts/cf/vfolders", {"quota_bytes": "1G"})
        assert r.status_code == 502, r.text
        assert "not on a CephFS mount" in r.json()["message"]
        assert d.api("GET", "/v1/hosts/cf/vfolders").json() == []
        left = [p for p in (world_dir / "plain").iterdir() if p.name != ".vfusefs-probe"]
        assert left == []  # no directory left behind
    finally:
        assert d.stop() == 0
