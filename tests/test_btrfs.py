"""A btrfs host, mounted for real: vfolders are subvolumes, byte limits are qgroup limits that
btrfs enforces on writes that bypass vfusefs, deletes remove the subvolume.  Runs on a real
btrfs filesystem on a loop device with quotas enabled (conftest.BtrfsFs); what the storage
holds is read with btrfs-progs, not with vfusefs's code.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import BtrfsFs, Daemon, run

pytestmark = pytest.mark.mount
MiB = 1 << 20


@pytest.fixture
def bt(world_dir: Path, btrfs_fs: BtrfsFs) -> Iterator[Daemon]:
    d = Daemon(
        world_dir,
        hosts={"bt": {"backend": "btrfs", "path": str(btrfs_fs.dir(f"h{uuid.uuid4().hex[:8]}"))}},
        daemon_opts={"trash_retention": 0.0},
    ).start()
    yield d
    assert d.stop() == 0


def qgroup_limit(path: Path) -> str:
    """max_rfer of path's subvolume, as btrfs-progs shows it ('none' or bytes)."""
    rootid = run("btrfs", "inspect-internal", "rootid", str(path)).stdout.strip()
    for line in run("btrfs", "qgroup", "show", "-re", "--raw", str(path)).stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == f"0/{rootid}":
            return fields[3]
    raise AssertionError(f"no qgroup 0/{rootid}")


def dd(path: Path, mib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"],
        capture_output=True,
        text=True,
    )


def test_a_btrfs_vfolder_is_a_subvolume_with_a_qgroup_limit(bt: Daemon) -> None:
    info = bt.create_vfolder("bt", quota_bytes="16M", grants=[{"principal": "*", "mode": "rwd"}])
    native, mounted = Path(info["native_path"]), Path(info["path"])
    assert run("btrfs", "subvolume", "show", str(native)).returncode == 0
    assert qgroup_limit(native) == str(16 * MiB)
    host = bt.api("GET", "/v1/hosts/bt").json()
    assert host["capabilities"]["native_quota"] and host["capabilities"]["clone"] == "snapshot"
    # through the mount: vfusefs's ledger refuses first
    r = dd(mounted / "through", 32)
    assert r.returncode != 0 and "Disk quota exceeded" in r.stderr
    (mounted / "through").unlink()
    run("btrfs", "filesystem", "sync", str(native))  # btrfs settles a qgroup at commit
    # bypassing vfusefs (an admin on the host): btrfs itself refuses near the limit
    r = dd(native / "bypass", 32)
    assert r.returncode != 0 and "Disk quota exceeded" in r.stderr, r.stderr
    assert 8 * MiB <= (native / "bypass").stat().st_size <= 17 * MiB
    (native / "bypass").unlink()
    run("btrfs", "filesystem", "sync", str(native))
    # a limit changed through the CLI reaches the qgroup; 0 lifts it
    bt.cli("vfolder", "quota", "bt", info["id"], "--bytes", "64M")
    assert qgroup_limit(native) == str(64 * MiB)
    assert dd(mounted / "fits", 32).returncode == 0
    bt.cli("vfolder", "quota", "bt", info["id"], "--bytes", "0")
    assert qgroup_limit(native) == "none"
    # a delete (trash_retention 0) removes the subvolume for good
    bt.cli("vfolder", "rm", "bt", info["id"], "--force", "--yes")
    deadline = time.monotonic() + 10
    listed = run("btrfs", "subvolume", "list", str(native.parent)).stdout
    while info["id"] in listed and time.monotonic() < deadline:
        time.sleep(0.2)
        listed = run("btrfs", "subvolume", "list", str(native.parent)).stdout
    assert info["id"] not in listed
    assert not native.exists()


def test_a_limit_btrfs_cannot_hold_changes_nothing(world_dir: Path) -> None:
    """Quotas not enabled on the filesystem: a create with a limit fails in one line that says
    what to run, and leaves no subvolume and no vfolder."""
    if run("which", "mkfs.btrfs", check=False).returncode != 0:
        pytest.skip("btrfs-progs is not installed")
    base = Path(tempfile.mkdtemp(prefix="vfusefs-btrfs-noquota-", dir="/tmp"))
    img, mnt = base / "img", base / "mnt"
    mnt.mkdir()
    run("truncate", "-s", "256M", str(img))
    run("mkfs.btrfs", "-q", str(img))
    run("mount", "-o", "loop", str(img), str(mnt))
    try:
        d = Daemon(world_dir, hosts={"bt": {"backend": "btrfs", "path": str(mnt)}}).start()
        try:
            r = d.api("POST", "/v1/hosts/bt/vfolders", {"quota_bytes": "1G"})
            assert r.status_code == 502, r.text
            assert "btrfs quota is not enabled" in r.json()["message"]
            assert f"btrfs quota enable {mnt}" in r.json()["message"]
            assert d.api("GET", "/v1/hosts/bt/vfolders").json() == []
            left = [p.name for p in mnt.iterdir() if p.name != ".vfusefs-probe"]  # health's
            assert left == []  # no subvolume left behind
            ok = d.api("POST", "/v1/hosts/bt/vfolders", {})  # no limit: nothing to push
            assert ok.status_code == 201
        finally:
            assert d.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_limit_changed_behind_vfusefs_is_reported(bt: Daemon) -> None:
    info = bt.create_vfolder("bt", quota_bytes="16M")
    run("btrfs", "qgroup", "limit", "32M", info["native_path"])  # an admin, by hand
    c = bt.api("GET", "/v1/hosts/bt").json()["consistency"]
    assert c["limit_drift"] == [{"id": info["id"], "store": 16 * MiB, "native": 32 * MiB}]
    bt.cli("vfolder", "quota", "bt", info["id"], "--bytes", "16M")  # re-applied
    assert bt.api("GET", "/v1/hosts/bt").json()["consistency"]["limit_drift"] == []
