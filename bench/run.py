#!/usr/bin/env python3
"""vfusefs benchmark: the same workloads on a native directory and through the mount, one run.

    sudo .venv/bin/python bench/run.py [--quick] [--rss-files 100000] [--only NAME,...]

Prints seconds for each side and the ratio mount/native (1.0 = as fast as native).  Caches are
dropped before the "cold" rows only; every other row runs as a user would see it, right after
the previous one.  The daemon is started by this script from a temporary config, exactly as
`vfusefs serve` runs in production.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx

BIN = Path(sys.executable).parent / "vfusefs"
MiB = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sh(*cmd: str, cwd: Path | None = None) -> None:
    subprocess.run(list(cmd), cwd=cwd, check=True, stdout=subprocess.DEVNULL)


class Workloads:
    def __init__(self, size_mib: int, files: int, tarball: Path) -> None:
        self.size_mib = size_mib
        self.files = files
        self.tarball = tarball

    def seq_write(self, d: Path) -> None:
        buf = os.urandom(MiB)
        fd = os.open(d / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(self.size_mib):
                os.write(fd, buf)
        finally:
            os.close(fd)

    def seq_read(self, d: Path) -> None:
        fd = os.open(d / "big", os.O_RDONLY)
        try:
            while os.read(fd, MiB):
                pass
        finally:
            os.close(fd)

    def random_reads(self, d: Path, count: int = 20000) -> None:
        rng = random.Random(1)
        blocks = self.size_mib * 256
        fd = os.open(d / "big", os.O_RDONLY)
        try:
            for _ in range(count):
                os.pread(fd, 4096, rng.randrange(blocks) * 4096)
        finally:
            os.close(fd)

    def untar(self, d: Path) -> None:
        sh("tar", "-xf", str(self.tarball), "-C", str(d))

    def ls_lr(self, d: Path) -> None:
        sh("ls", "-lR", str(d / "tree"))

    def read_tree(self, d: Path) -> None:
        subprocess.run(f"find '{d / 'tree'}' -type f -exec cat {{}} + > /dev/null", shell=True, check=True)

    def rm_tree(self, d: Path) -> None:
        sh("rm", "-rf", str(d / "tree"))


def make_tarball(path: Path, files: int, dirs: int = 50) -> None:
    rng = random.Random(2)
    src = Path(tempfile.mkdtemp(prefix="vfusefs-bench-src-"))
    try:
        for i in range(files):
            sub = src / "tree" / f"d{i % dirs:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f{i:06d}").write_bytes(rng.randbytes(rng.randrange(4096, 12289)))
        with tarfile.open(path, "w") as tar:
            tar.add(src / "tree", arcname="tree")
    finally:
        shutil.rmtree(src)


class Daemon:
    def __init__(self, base: Path, checks: bool) -> None:
        self.base = base
        (base / "native").mkdir()
        (base / "state").mkdir()
        (base / "mnt").mkdir()
        self.sock = base / "state" / "control.sock"
        cfg = base / "vfusefs.toml"
        cfg.write_text(f'[daemon]\nmountpoint = "{base}/mnt"\nstate_dir = "{base}/state"\n'
                       f'control_socket = "{self.sock}"\nmetrics_listen = ""\n'
                       f'[hosts.local]\npath = "{base}/native"\n')
        self.proc = subprocess.Popen([str(BIN), "serve", "--config", str(cfg)],
                                     stderr=open(base / "daemon.log", "wb"))
        for _ in range(200):
            if os.path.ismount(base / "mnt") and self.sock.exists():
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"daemon did not start: {(base / 'daemon.log').read_text()}")
        grants = [{"principal": "uid:4242", "mode": "ro"}, {"principal": "gid:4242", "mode": "rw"},
                  {"principal": "cgroup:/docker/bench", "mode": "rwd"}, {"principal": "*", "mode": "rwd"}]
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://x") as c:
            vf = c.post("/v1/hosts/local/vfolders", json={"grants": grants}).json()
        self.native = Path(vf["native_path"])
        # containers see a vfolder through a bind mount of /mnt/vfroot/<host>/<id>, so do we
        self.vfolder = base / "bind"
        self.vfolder.mkdir()
        subprocess.run(["mount", "--bind", vf["path"], str(self.vfolder)], check=True)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        subprocess.run(["umount", str(self.vfolder)], check=False)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB and 5,000 files (smoke run)")
    ap.add_argument("--rss-files", type=int, default=100000, help="files for the RSS check (0: skip)")
    ap.add_argument("--only", default="", help="comma-separated workloads: write, read-cold, "
                    "read-warm, random, untar, ls, readback, rm")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it mounts and drops caches)")
    size, files = (256, 5000) if args.quick else (1024, 20000)
    base = Path(tempfile.mkdtemp(prefix="vfusefs-bench-", dir="/var/tmp"))
    base.chmod(0o755)
    tarball = base / "tree.tar"
    make_tarball(tarball, files)
    w = Workloads(size, files, tarball)
    daemon = Daemon(base, checks=True)
    native = base / "plain"
    native.mkdir()
    rows: list[tuple[str, str, Callable[[Path], object], bool]] = [
        ("write", f"seq write {size} MiB (1 MiB blocks)", w.seq_write, False),
        ("read-cold", f"seq read {size} MiB cold", w.seq_read, True),
        ("read-warm", f"seq read {size} MiB warm", w.seq_read, False),
        ("random", "4 KiB random reads x20000 (cold)", w.random_reads, True),
        ("untar", f"untar {files} files of 4-12 KiB", w.untar, False),
        ("ls", "ls -lR of that tree", w.ls_lr, False),
        ("readback", "read the tree back (find|cat)", w.read_tree, False),
        ("rm", "rm -rf the tree", w.rm_tree, False),
    ]
    only = set(filter(None, args.only.split(",")))
    unknown = only - {key for key, *_ in rows}
    if unknown:
        raise SystemExit(f"bench: unknown workload(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(key for key, *_ in rows)}")
    results = []
    try:
        for key, name, fn, cold in rows:
            if only and key not in only:
                continue
            times = []
            for target in (native, daemon.vfolder):
                if cold:
                    drop_caches()
                times.append(timed(lambda: fn(target)))
            results.append({"workload": name, "native_s": times[0], "vfusefs_s": times[1],
                            "ratio": times[1] / times[0] if times[0] else float("inf")})
            if not args.json:
                r = results[-1]
                print(f"{name:40} native {r['native_s']:8.3f}s  vfusefs {r['vfusefs_s']:8.3f}s  "
                      f"x{r['ratio']:.2f}", flush=True)
        if args.rss_files:
            tree = daemon.native / "rss"
            for i in range(args.rss_files):
                if i % 1000 == 0:
                    (tree / f"d{i // 1000:03d}").mkdir(parents=True)
                (tree / f"d{i // 1000:03d}" / f"f{i:06d}").touch()
            t = timed(lambda: sh("ls", "-lR", str(daemon.vfolder / "rss")))
            rss = daemon.rss_mib()
            results.append({"workload": f"RSS after ls -lR of {args.rss_files} files",
                            "rss_mib": rss, "ls_s": t})
            if not args.json:
                print(f"daemon RSS after ls -lR of {args.rss_files} files: {rss:.0f} MiB "
                      f"(ls took {t:.2f}s)")
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
