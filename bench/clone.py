#!/usr/bin/env python3
"""Clone speed: a vfolder of 20,000 files (4-12 KiB) cloned by vfusefs against `cp -a` of the
same tree on the same storage, and the same on btrfs (a snapshot); then the time to read a
vfolder's usage (`getfattr -n user.vfusefs.usage.bytes`) at 100,000 files on each backend.

    sudo .venv/bin/python bench/clone.py [--files 20000] [--usage-files 100000]

Runs on a plain directory under /var/tmp (vfs) and on a btrfs loop device it makes (btrfs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from many_nodes import BIN, Node  # noqa: E402


def make_tree(root: Path, files: int) -> None:
    rng = random.Random(3)
    for i in range(files):
        d = root / f"d{i % 50:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:06d}").write_bytes(rng.randbytes(rng.randrange(4096, 12289)))


class Daemon(Node):
    def __init__(self, base: Path, host_path: Path, backend: str) -> None:
        super().__init__(base, host_path, f"sqlite://{base}/state/state.db", "bench")
        text = self.cfg.read_text().replace("[hosts.local]", "[hosts.h]")
        text = text.replace(f'path = "{host_path}"', f'backend = "{backend}"\npath = "{host_path}"')
        self.cfg.write_text(text)

    def cli(self, *args: str) -> str:
        r = subprocess.run(
            [str(BIN), "--config", str(self.cfg), *args], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise SystemExit(f"vfusefs {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout


def clone_row(label: str, base: Path, host_path: Path, backend: str, files: int) -> None:
    d = Daemon(base / f"daemon-{backend}", host_path, backend)
    d.start()
    try:
        vf = json.loads(d.cli("--json", "vfolder", "create", "h", "--grant", "*=rwd"))
        make_tree(Path(vf["native_path"]), files)  # natively, then recounted
        d.cli("vfolder", "rescan", "h", vf["id"])
        os.sync()
        t0 = time.perf_counter()
        new = json.loads(d.cli("--json", "vfolder", "clone", "h", vf["id"]))
        t_clone = time.perf_counter() - t0
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", vf["native_path"], str(host_path / "cp-a")], check=True)
        os.sync()
        t_cp = time.perf_counter() - t0
        same = subprocess.run(
            ["diff", "-r", "--no-dereference", vf["native_path"], new["native_path"]],
            capture_output=True,
        ).returncode == 0  # fmt: skip
        print(
            f"{label:8} clone {t_clone:7.2f} s   cp -a {t_cp:7.2f} s   ratio {t_clone / t_cp:5.2f}"
            f"   identical: {same}"
        )
    finally:
        d.stop()


def usage_row(label: str, base: Path, host_path: Path, backend: str, files: int) -> None:
    d = Daemon(base / f"usage-{backend}", host_path, backend)
    d.start()
    try:
        vf = json.loads(d.cli("--json", "vfolder", "create", "h", "--grant", "*=rwd"))
        make_tree(Path(vf["native_path"]), files)
        d.cli("vfolder", "rescan", "h", vf["id"])
        times = []
        for _ in range(11):
            t0 = time.perf_counter()
            subprocess.run(
                ["getfattr", "-n", "user.vfusefs.usage.bytes", vf["path"]],
                capture_output=True,
                check=True,
            )
            times.append(time.perf_counter() - t0)
        print(f"{label:8} usage read at {files} files: {statistics.median(times) * 1000:.1f} ms")
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--usage-files", type=int, default=100000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it mounts)")
    base = Path(tempfile.mkdtemp(prefix="vfusefs-bench-clone-", dir="/var/tmp"))
    base.chmod(0o755)
    img, bt = base / "btrfs.img", base / "btrfs"
    try:
        plain = base / "plain"
        plain.mkdir()
        bt.mkdir()
        subprocess.run(["truncate", "-s", "4G", str(img)], check=True)
        subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(bt)], check=True)
        subprocess.run(["btrfs", "quota", "enable", str(bt)], check=True)
        print(f"== clone of {args.files} files of 4-12 KiB, against cp -a on the same storage")
        clone_row("vfs", base, plain, "vfs", args.files)
        clone_row("btrfs", base, bt, "btrfs", args.files)
        if args.usage_files:
            print("== reading a vfolder's usage (getfattr, median of 11)")
            shutil.rmtree(plain)
            plain.mkdir()
            usage_row("vfs", base, plain, "vfs", args.usage_files)
            usage_row("btrfs", base, bt, "btrfs", args.usage_files)
    finally:
        subprocess.run(["umount", "-l", str(bt)], check=False)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
