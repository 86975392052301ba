"""Clones and snapshots through the control API and the CLI, on real storage: a copy on a plain
directory keeps what `cp -a` keeps and holes; a clone that does not fit or fails leaves nothing;
on btrfs a clone is a snapshot (no extra space) and may start from a snapshot.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import BtrfsFs, Daemon, run

pytestmark = pytest.mark.mount
MiB = 1 << 20


def wait_task(d: Daemon, task: dict[str, Any], seconds: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while task["state"] == "running":
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
        task = d.api("GET", f"/v1/tasks/{task['id']}").json()
    return task


def tree(root: Path) -> dict[str, Any]:
    """What `cp -a` must keep, per path below root (natively, with no vfusefs code)."""
    out: dict[str, Any] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            first = inodes.setdefault(st.st_ino, rel)
            entry: dict[str, Any] = {
                "mode": oct(st.st_mode),
                "owner": (st.st_uid, st.st_gid),
                "mtime": st.st_mtime_ns,
                "size": st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                "link_of": first if first != rel else None,
                "xattrs": {
                    k: os.getxattr(p, k, follow_symlinks=False)
                    for k in os.listxattr(p, follow_symlinks=False)
                },
            }
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                entry["data"] = p.read_bytes()
                entry["blocks"] = st.st_blocks
            out[rel] = entry
    return out


def populate(vf: Path) -> None:
    """Through the mount, as a user (root here) would make it."""
    (vf / "d" / "e").mkdir(parents=True)
    (vf / "d" / "e" / "deep.txt").write_text("deep\n")
    (vf / "plain").write_bytes(os.urandom(300_000))
    os.chmod(vf / "plain", 0o640)
    os.chown(vf / "plain", 1234, 2345)
    os.chmod(vf / "d", 0o2750)
    with open(vf / "sparse", "wb") as f:  # 64 MiB apparent, 8 KiB of data
        f.seek(32 * MiB)
        f.write(b"x" * 8192)
        f.truncate(64 * MiB)
    os.setxattr(vf / "plain", "user.tag", b"kept")
    os.symlink("d/e/deep.txt", vf / "link")
    os.symlink("/etc/shadow", vf / "outside")  # copied as a link, never followed
    os.link(vf / "plain", vf / "hard")
    os.mkfifo(vf / "fifo")
    os.utime(vf / "d" / "e" / "deep.txt", ns=(1_000_000_000, 2_000_000_000))


def test_a_copy_keeps_what_cp_a_keeps_and_holes(daemon: Daemon) -> None:
    info = daemon.create_vfolder(grants=[{"principal": "*", "mode": "rwd"}], quota_bytes="1G")
    src = Path(info["path"])
    populate(src)
    r = daemon.cli("--json", "vfolder", "clone", "local", info["id"], "--bytes", "2G")
    new = json.loads(r.stdout)
    assert new["quota_bytes"] == 2 << 30 and new["grants"] == info["grants"]
    before, after = tree(Path(info["native_path"])), tree(Path(new["native_path"]))
    assert after == before
    assert after["sparse"]["blocks"] * 512 < 1 * MiB  # the holes stayed holes
    assert tree(Path(new["path"])) == tree(src)  # and the mount serves the same
    usage = daemon.api("GET", f"/v1/hosts/local/vfolders/{new['id']}").json()
    du = int(run("du", "--block-size=1", "-s", new["native_path"]).stdout.split()[0])
    assert usage["usage_bytes"] == du
    # the task said how far it got
    task = daemon.api("POST", f"/v1/hosts/local/vfolders/{info['id']}/clone", {}).json()
    assert task["kind"] == "clone" and task["source"] == info["id"]
    assert task["total_bytes"] is not None
    done = wait_task(daemon, task)
    assert done["state"] == "done" and done["vfolder"]["id"] == task["vfolder"]
    assert done["done_files"] == done["total_files"] and done["done_bytes"] > 0


def test_a_clone_that_does_not_fit_or_fails_leaves_nothing(world_dir: Path) -> None:
    small = world_dir / "small"
    small.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small))
    try:
        d = Daemon(world_dir, hosts={"local": {"path": str(small)}}).start()
        try:
            info = d.create_vfolder(grants=[{"principal": "*", "mode": "rwd"}])
            (Path(info["path"]) / "big").write_bytes(os.urandom(7 * MiB))
            names = sorted(os.listdir(small))
            # does not fit the limits asked for: refused at once
            r = d.api("POST", f"/v1/hosts/local/vfolders/{info['id']}/clone", {"quota_bytes": "1M"})
            assert r.status_code == 409 and r.json()["error"] == "quota", r.text
            bad = d.cli("vfolder", "clone", "local", info["id"], "--bytes", "1M", check=False)
            assert bad.returncode == 1 and bad.stderr.count("\n") == 1
            # fits its limits, but the storage fills up half way: the task fails, nothing left
            task = d.api("POST", f"/v1/hosts/local/vfolders/{info['id']}/clone", {}).json()
            failed = wait_task(d, task)
            assert failed["state"] == "failed" and "No space left" in failed["error"], failed
            assert sorted(os.listdir(small)) == names
            assert [v["id"] for v in d.api("GET", "/v1/hosts/local/vfolders").json()] == [
                info["id"]
            ]
            assert d.api("GET", f"/v1/hosts/local/vfolders/{task['vfolder']}").status_code == 404
            r = d.api("POST", f"/v1/hosts/local/vfolders/{info['id']}/clone", {"snapshot": "s"})
            assert r.status_code == 409  # vfs has no snapshots
        finally:
            d.allowed_errors.append("clone")
            assert d.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_btrfs_clone_is_a_snapshot(world_dir: Path, btrfs_fs: BtrfsFs) -> None:
    host = btrfs_fs.dir(f"c{uuid.uuid4().hex[:8]}")
    d = Daemon(world_dir, hosts={"bt": {"backend": "btrfs", "path": str(host)}}).start()
    try:
        info = d.create_vfolder("bt", grants=[{"principal": "*", "mode": "rwd"}])
        src = Path(info["path"])
        for i in range(4):
            (src / f"f{i}").write_bytes(os.urandom(50 * MiB))
        os.sync()
        d.cli("vfolder", "snapshot", "bt", info["id"], "before")
        (src / "after").write_text("made after the snapshot\n")
        assert json.loads(d.cli("--json", "vfolder", "snapshot", "bt", info["id"]).stdout) == [
            {"name": "before"}
        ]
        used = used_bytes(host)
        started = time.monotonic()
        new = json.loads(d.cli("--json", "vfolder", "clone", "bt", info["id"]).stdout)
        took = time.monotonic() - started
        os.sync()
        print(f"btrfs clone of 200 MiB: {took:.2f} s (CLI round trip included)")
        assert used_bytes(host) - used < 8 * MiB  # no copy of the data
        assert (Path(new["path"]) / "after").exists()
        assert (Path(new["path"]) / "f3").read_bytes() == (src / "f3").read_bytes()
        assert run("btrfs", "subvolume", "show", new["native_path"]).returncode == 0
        # a clone from the snapshot has the snapshot's content
        old = json.loads(
            d.cli("--json", "vfolder", "clone", "bt", info["id"], "--snapshot", "before").stdout
        )
        assert sorted(os.listdir(old["path"])) == ["f0", "f1", "f2", "f3"]
        (Path(old["path"]) / "mine").write_text("a clone is writable\n")
        d.cli("vfolder", "snapshot", "bt", info["id"], "before", "--rm")
        assert json.loads(d.cli("--json", "vfolder", "snapshot", "bt", info["id"]).stdout) == []
        gone = d.cli("vfolder", "snapshot", "bt", info["id"], "before", "--rm", check=False)
        assert gone.returncode == 1 and "no snapshot" in gone.stderr
    finally:
        assert d.stop() == 0


def used_bytes(path: Path) -> int:
    """Data bytes the btrfs filesystem has allocated to files (btrfs-progs' own count)."""
    os.sync()
    run("btrfs", "filesystem", "sync", str(path))
    out = run("btrfs", "filesystem", "usage", "-b", str(path)).stdout
    for line in out.splitlines():
        if line.strip().startswith("Used:"):
            return int(line.split()[1])
    raise AssertionError(out)
