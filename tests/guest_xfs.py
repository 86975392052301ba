"""XFS project quota through a real mount: runs inside the test VM only (this machine's kernel
has no XFS quota), where tests/test_vm_storage.py runs pytest on this module with an XFS
filesystem mounted with prjquota at VFUSEFS_XFS_MNT.  Not collected on the host (its name does
not start with test_).  What the storage holds is read with xfs_quota and lsattr-like ioctls,
not with vfusefs's code."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon, XfsFs, run

pytestmark = pytest.mark.mount
MiB = 1 << 20


@pytest.fixture
def xd(world_dir: Path, xfs_fs: XfsFs) -> Iterator[Daemon]:
    d = Daemon(
        world_dir,
        hosts={"x": {"backend": "xfs", "path": str(xfs_fs.dir(f"h{uuid.uuid4().hex[:8]}"))}},
        daemon_opts={"trash_retention": 0.0},
    ).start()
    yield d
    assert d.stop() == 0


def project(path: Path) -> int:
    """The project id XFS keeps for path, as xfs_io reports it."""
    out = run("xfs_io", "-r", "-c", "stat", str(path)).stdout
    m = re.search(r"fsxattr\.projid = (\d+)", out)
    assert m, out
    return int(m.group(1))


def limits(path: Path, projid: int) -> tuple[int, int, int, int]:
    """(KiB used, KiB hard limit, inodes used, inode hard limit) from xfs_quota's report."""
    out = run(
        "xfs_quota", "-x", "-D", "/dev/null", "-P", "/dev/null",
        "-c", "report -p -n -N -b -i", str(path),
    ).stdout  # fmt: skip
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == f"#{projid}":
            return int(f[1]), int(f[3]), int(f[6]), int(f[8])
    return 0, 0, 0, 0


def limit(d: Daemon, vfid: str, **limits: object) -> None:
    """Set limits through the control API (the CLI costs seconds a call in the VM)."""
    r = d.api("PATCH", f"/v1/hosts/x/vfolders/{vfid}", limits)
    assert r.status_code == 200, r.text


def dd(path: Path, mib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"],
        capture_output=True,
        text=True,
    )


def test_limits_are_project_quotas_that_hold_writes_around_vfusefs(xd: Daemon) -> None:
    info = xd.create_vfolder(
        "x", quota_bytes="16M", quota_inodes=50, grants=[{"principal": "*", "mode": "rwd"}]
    )
    native, mounted = Path(info["native_path"]), Path(info["path"])
    mnt = Path(os.environ["VFUSEFS_XFS_MNT"])
    pid = project(native)
    assert pid != 0
    assert limits(mnt, pid)[1] == 16 * 1024 and limits(mnt, pid)[3] == 50
    (mounted / "sub").mkdir()
    assert project(native / "sub") == pid  # inherited by what is made below
    # through the mount: vfusefs's ledger refuses first
    r = dd(mounted / "through", 32)
    assert r.returncode != 0 and "Disk quota exceeded" in r.stderr
    (mounted / "through").unlink()
    # around vfusefs (an admin on the host): XFS itself refuses near the limit, with ENOSPC
    r = dd(native / "around", 32)
    assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
    assert (native / "around").stat().st_size <= 16 * MiB
    # what XFS refuses reaches a caller of the mount as EDQUOT: raise vfusefs's own limit
    # above XFS's by hand (drift), then write through the mount
    limit(xd, info["id"], quota_bytes="64M")
    run(
        "xfs_quota", "-x", "-D", "/dev/null", "-P", "/dev/null",
        "-c", f"limit -p bhard=20m {pid}", str(mnt),
    )  # fmt: skip
    r = dd(mounted / "more", 16)
    assert r.returncode != 0 and "Disk quota exceeded" in r.stderr, r.stderr
    drift = xd.api("GET", "/v1/hosts/x").json()["consistency"]["limit_drift"]
    assert drift == [{"id": info["id"], "store": 64 * MiB, "native": 20 * MiB}]
    for f in ("around", "more"):
        (mounted / f).unlink()
    # the CLI's limits reach XFS again; 0 lifts them
    limit(xd, info["id"], quota_bytes="32M", quota_inodes=0)
    assert limits(mnt, pid)[1] == 32 * 1024 and limits(mnt, pid)[3] == 0
    assert dd(mounted / "fits", 24).returncode == 0
    # usage from the project report agrees with du
    used_kib = limits(mnt, pid)[0]
    du_kib = int(run("du", "-sk", str(native)).stdout.split()[0])
    assert abs(used_kib - du_kib) <= 8, (used_kib, du_kib)
    # a delete (trash_retention 0) purges the tree and drops the project's limits
    assert xd.api("DELETE", f"/v1/hosts/x/vfolders/{info['id']}?force=1").status_code == 200
    deadline = time.monotonic() + 15
    while limits(mnt, pid)[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert limits(mnt, pid)[1] == 0 and not native.exists()


def test_two_vfolders_get_their_own_projects_and_adopt_keeps_one(xd: Daemon) -> None:
    a = xd.create_vfolder("x", quota_bytes="8M")
    b = xd.create_vfolder("x", quota_bytes="8M")
    pa, pb = project(Path(a["native_path"])), project(Path(b["native_path"]))
    assert pa and pb and pa != pb
    # a tree made natively, then adopted: every inode is put in the new project
    host = Path(a["native_path"]).parent
    vfid = str(uuid.uuid4())
    tree = host / vfid
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(os.urandom(3 * MiB))
    r = xd.api("POST", "/v1/hosts/x/vfolders", {"id": vfid, "adopt": True, "quota_bytes": "8M"})
    assert r.status_code == 201, r.text
    pc = project(tree)
    assert pc not in (0, pa, pb) and project(tree / "d" / "f") == pc
    assert limits(Path(os.environ["VFUSEFS_XFS_MNT"]), pc)[0] >= 3 * 1024
