#!/usr/bin/env python3
"""vfusefs benchmark: the same workloads on a native directory and through the mount, one run.

    sudo .venv/bin/python bench/run.py [--quick] [--compare checks|quota|redis] [--repeat 3]
                                       [--rss-files 100000] [--only write,untar,...]
                                       [--bindfs] [--mergerfs] [--baseline CHECKOUT]

Prints the median seconds on each side and the ratio mount/native (1.0 = as fast as native),
then the CPU seconds each daemon process burnt per workload (vfusefs and the peers: --bindfs,
--mergerfs, both from Debian).
Workloads run as a container would: root inside a confined cgroup, through a bind mount of the
vfolder, with several grants in place (one matching).  --compare checks mounts a second daemon
with access checks off, --compare quota one whose vfolder has no quota (the first has vfolder
and scope limits set), --compare redis runs the first on a Redis store (a redis-server the bench
starts; both with far-away limits, so writes spend quota leases) and the second on SQLite, and
reports what each costs; --baseline mounts one running another
checkout's code (an older revision) and reports the change.  Targets take turns within each
repetition, so drift on the machine hits all of them alike.  Caches are dropped before the
"cold" rows only; every other row runs right after the previous one, as a user would see it.

4 KiB random reads run twice.  "cached" first reads the file whole, untimed, so its native pages
are in memory; on a mount, its own page cache of the file is dropped first, untimed (fadvise
DONTNEED through the mount, which leaves the native pages alone), so that every read reaches the
daemon: vfusefs keeps a file's cache across opens while the file is unchanged, bindfs does not,
and the row is meant to time the daemons.  "cold" drops every cache first, so every read waits
for the disk.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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
    r = subprocess.run(
        list(cmd), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-2000:]}")


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
        subprocess.run(
            f"find '{d / 'tree'}' -type f -exec cat {{}} + > /dev/null", shell=True, check=True
        )

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
    def __init__(
        self,
        base: Path,
        checks: bool,
        quota: bool = False,
        source: Path | None = None,
        store_url: str = "",
    ) -> None:
        self.base = base
        for sub in ("native", "state", "mnt", "bind"):
            (base / sub).mkdir(parents=True)
        self.sock = base / "state" / "control.sock"
        cfg = base / "vfusefs.toml"
        cfg.write_text(
            f'[daemon]\nmountpoint = "{base}/mnt"\nstate_dir = "{base}/state"\n'
            f'control_socket = "{self.sock}"\nmetrics_listen = ""\n'
            + (f'[store]\nurl = "{store_url}"\n' if store_url else "")
            + f'[hosts.local]\npath = "{base}/native"\n'
        )
        env = dict(os.environ)
        if not checks:
            env["VFUSEFS_BENCH_NO_ACCESS_CHECKS"] = "1"
        if source is not None:  # another checkout's code (--baseline): its src/ comes first
            env["PYTHONPATH"] = str(source / "src")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--config", str(cfg)],
            stderr=open(base / "daemon.log", "wb"),
            env=env,
        )
        for _ in range(200):
            if os.path.ismount(base / "mnt") and self.sock.exists():
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"daemon did not start: {(base / 'daemon.log').read_text()}")
        # grants in place, as on a real node: the bench's caller matches the cgroup grant
        grants = [
            {"principal": "uid:4242", "mode": "ro"},
            {"principal": "gid:4242", "mode": "rw"},
            {"principal": "cgroup:/docker", "mode": "ro"},
            {"principal": f"cgroup:{CGROUP}", "mode": "rwd"},
            {"principal": "*", "mode": "ro"},
        ]
        body: dict = {"grants": grants}
        if quota:  # limits that the workloads never reach, so every operation is checked
            body.update(
                quota_bytes="1T",
                quota_inodes=100_000_000,
                scope="project:00000000-0000-4000-8000-00000000be9c",
            )
        with self.client() as c:
            if quota:
                c.put(f"/v1/scopes/{body['scope']}", json={"quota_bytes": "2T"})
            vf = c.post("/v1/hosts/local/vfolders", json=body).json()
        self.vfid = vf["id"]
        self.native = Path(vf["native_path"])
        # containers see a vfolder through a bind mount of /mnt/vfroot/<host>/<id>, so do we
        self.vfolder = base / "bind"
        subprocess.run(["mount", "--bind", vf["path"], str(self.vfolder)], check=True)

    def client(self) -> httpx.Client:
        """A client of its control API."""
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://x")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        subprocess.run(["umount", str(self.vfolder)], check=False)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
CGROUP = "/docker/vfusefs-bench"


def in_container(args: list[str]) -> list[str]:
    """Run a workload as a container would: root, but in a confined cgroup (never an admin)."""
    procs = CGROUP_ROOT / CGROUP.lstrip("/") / "cgroup.procs"
    return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *args]


def workload_seconds(w: Workloads, key: str, target: Path, cold: bool, mount: bool) -> float:
    if cold:
        drop_caches()
    r = subprocess.run(
        in_container(
            [
                sys.executable,
                __file__,
                "--worker",
                key,
                str(target),
                "--size-mib",
                str(w.size_mib),
                "--tarball",
                str(w.tarball),
            ]
            + ["--mount"] * mount
        ),
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"bench: workload {key} on {target} failed:\n{r.stderr.strip()}")
    return float(r.stdout.strip().splitlines()[-1])


def worker(key: str, target: Path, size_mib: int, tarball: Path, mount: bool) -> None:
    w = Workloads(size_mib, 0, tarball)
    fn = {k: f for k, _, f, _ in rows(w)}[key]
    if key in ("read-warm", "random"):
        w.seq_read(target)  # other targets' cold rows dropped this one's cache: warm it, untimed
    if key == "random" and mount:  # but not the mount's own cache of the file (module doc)
        fd = os.open(target / "big", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    print(timed(lambda: fn(target)))


def rows(w: Workloads) -> list[tuple[str, str, Callable[[Path], object], bool]]:
    return [
        ("write", f"seq write {w.size_mib} MiB (1 MiB blocks)", w.seq_write, False),
        ("read-cold", f"seq read {w.size_mib} MiB cold", w.seq_read, True),
        ("read-warm", f"seq read {w.size_mib} MiB warm", w.seq_read, False),
        ("random", "4 KiB random reads x20000 (cached)", w.random_reads, False),
        ("random-cold", "4 KiB random reads x20000 (cold)", w.random_reads, True),
        ("untar", f"untar {w.files} files of 4-12 KiB", w.untar, False),
        ("ls", "ls -lR of that tree", w.ls_lr, False),
        ("ls-cold", "ls -lR, caches dropped first", w.ls_lr, True),
        ("readback", "read the tree back (find|cat)", w.read_tree, False),
        ("readback-cold", "read the tree back, cold", w.read_tree, True),
        ("rm", "rm -rf the tree", w.rm_tree, False),
    ]


# what a workload reads, and the workload that makes it (run untimed when --only leaves it out)
NEEDS = {
    "read-cold": ("write", "big"),
    "read-warm": ("write", "big"),
    "random": ("write", "big"),
    "random-cold": ("write", "big"),
    "ls": ("untar", "tree"),
    "ls-cold": ("untar", "tree"),
    "readback": ("untar", "tree"),
    "readback-cold": ("untar", "tree"),
    "rm": ("untar", "tree"),
}


class Peer:
    """Another FUSE passthrough over a plain directory, in the foreground (so its CPU can be
    read from /proc): bindfs (C, libfuse) or mergerfs (C++, its own libfuse), the references
    vfusefs is held against."""

    COMMANDS = {
        "bindfs": ["bindfs", "-f", "{src}", "{mnt}"],
        "mergerfs": [
            "mergerfs", "-f", "-o", "allow_other,cache.files=off,category.create=ff",
            "{src}", "{mnt}",
        ],
    }  # fmt: skip

    def __init__(self, base: Path, kind: str) -> None:
        self.src, self.vfolder = base / "src", base / "mnt"
        self.src.mkdir(parents=True)
        self.vfolder.mkdir()
        cmd = [a.format(src=self.src, mnt=self.vfolder) for a in self.COMMANDS[kind]]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.ismount(self.vfolder):
                return
            time.sleep(0.05)
        raise SystemExit(f"bench: {kind} did not mount")

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.vfolder)], check=False)
        self.proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_suite(
    base: Path,
    w: Workloads,
    compare: str,
    only: set[str],
    repeat: int,
    peers: tuple[str, ...] = (),
    baseline: Path | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[float]]]]:
    """Every workload on each target in turn (rotating the order), the whole sequence `repeat`
    times; returns {workload: {target: [seconds...]}} and the CPU seconds each target's daemon
    burnt for it, alike.  "on" has access checks and, with --compare quota, a quota set; "off"
    lacks the compared feature; peers (bindfs, mergerfs) are other passthroughs."""
    redis = None
    if compare == "redis":
        redis = RedisServer(base / "redis")
        daemons = {"on": Daemon(base / "on", True, quota=True, store_url=redis.url)}
        daemons["off"] = Daemon(base / "off", True, quota=True)
    else:
        daemons = {"on": Daemon(base / "on", True, quota=compare == "quota")}
    if compare == "checks":
        daemons["off"] = Daemon(base / "off", False)
    elif compare == "quota":
        daemons["off"] = Daemon(base / "off", True, quota=False)
    elif compare == "baseline":
        daemons["off"] = Daemon(base / "off", True, source=baseline)
    refs = {kind: Peer(base / kind, kind) for kind in peers}
    plain = base / "plain"
    plain.mkdir()
    targets = {
        "native": plain,
        **{k: d.vfolder for k, d in daemons.items()},
        **{k: r.vfolder for k, r in refs.items()},
    }
    pids = {
        **{k: d.proc.pid for k, d in daemons.items()},
        **{k: r.proc.pid for k, r in refs.items()},
    }
    times: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    try:
        for rep in range(repeat):
            for key, name, _, cold in rows(w):
                if only and key not in only:
                    continue
                order = list(targets)
                order = order[rep % len(order) :] + order[: rep % len(order)]
                for target in order:
                    made = NEEDS.get(key)
                    if made and not (targets[target] / made[1]).exists():
                        workload_seconds(
                            w, made[0], targets[target], False, target != "native"
                        )  # --only left it out
                    before = cpu_seconds(pids[target]) if target in pids else 0.0
                    t = workload_seconds(w, key, targets[target], cold, target != "native")
                    times.setdefault(key, {}).setdefault(target, []).append(t)
                    if target in pids:
                        used = cpu_seconds(pids[target]) - before
                        cpu.setdefault(key, {}).setdefault(target, []).append(used)
                got = times[key]
                print(
                    f"  run {rep + 1}/{repeat} {name:38} "
                    + "  ".join(f"{t} {got[t][-1]:7.3f}s" for t in targets),
                    flush=True,
                )
    finally:
        for d in daemons.values():
            d.stop()
        for r in refs.values():
            r.stop()
        if redis is not None:
            redis.stop()
    return times, cpu


class RedisServer:
    """A redis-server on a unix socket, nothing persisted (--compare redis, bench/many_nodes)."""

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True)
        self.sock = base / "redis.sock"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm",
             "600", "--save", "", "--appendonly", "no", "--dir", str(base)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            if self.sock.exists():
                break
            time.sleep(0.02)
        else:
            raise SystemExit("bench: redis-server did not start (apt-get install redis-server)")
        self.url = f"unix://{self.sock}?db=0"

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def rss_check(base: Path, files: int) -> tuple[float, float, float]:
    """RSS after ls -lR of `files` files, and the median time of getfattr of usage on them."""
    daemon = Daemon(base, True, quota=True)
    try:
        tree = daemon.native / "rss"
        for i in range(files):
            if i % 1000 == 0:
                (tree / f"d{i // 1000:03d}").mkdir(parents=True)
            (tree / f"d{i // 1000:03d}" / f"f{i:06d}").write_bytes(b"x")
        with daemon.client() as c:
            task = c.post(f"/v1/hosts/local/vfolders/{daemon.vfid}/rescan").json()
            while task["state"] == "running":
                time.sleep(0.2)
                task = c.get(f"/v1/tasks/{task['id']}").json()
        t = timed(lambda: sh("ls", "-lR", str(daemon.vfolder / "rss")))
        reads = []
        for _ in range(21):
            reads.append(
                timed(lambda: sh("getfattr", "-n", "user.vfusefs.usage.bytes", str(daemon.vfolder)))
            )
        return daemon.rss_mib(), t, statistics.median(reads)
    finally:
        daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB and 5,000 files (smoke run)")
    ap.add_argument(
        "--rss-files", type=int, default=100000, help="files for the RSS check (0: skip)"
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated workloads: write, read-cold, "
        "read-warm, random, random-cold, untar, ls, readback, rm",
    )
    ap.add_argument(
        "--compare",
        choices=["checks", "quota", "redis"],
        help="mount a second daemon without access checks (or without a quota, or on SQLite "
        "instead of Redis) and report what the feature costs",
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also mount a daemon running another checkout's code (git worktree add "
        "/tmp/before REV; cd /tmp/before && python setup.py build_ext --inplace) and report "
        "this tree's change against it, in the same run",
    )
    ap.add_argument("--repeat", type=int, default=3, help="run the whole sequence N times")
    ap.add_argument("--bindfs", action="store_true", help="also run every workload on bindfs")
    ap.add_argument("--mergerfs", action="store_true", help="also run every workload on mergerfs")
    ap.add_argument("--worker", nargs=2, metavar=("KEY", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--size-mib", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--tarball", default="", help=argparse.SUPPRESS)
    ap.add_argument("--mount", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(
            args.worker[0], Path(args.worker[1]), args.size_mib, Path(args.tarball), args.mount
        )
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it mounts, drops caches and makes a cgroup)")
    size, files = (256, 5000) if args.quick else (1024, 20000)
    only = set(filter(None, args.only.split(",")))
    w = Workloads(size, files, Path("/nonexistent"))
    unknown = only - {key for key, *_ in rows(w)}
    if unknown:
        raise SystemExit(
            f"bench: unknown workload(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(key for key, *_ in rows(w))}"
        )
    (CGROUP_ROOT / CGROUP.lstrip("/")).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="vfusefs-bench-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        w.tarball = base / "tree.tar"
        make_tarball(w.tarball, files)
        print(
            f"workloads run as root in cgroup {CGROUP} (a container: not an admin) on a plain "
            f"directory and on a vfolder bind mount; ratio = vfusefs / native (medians of "
            f"{args.repeat})"
        )
        peers = tuple(k for k in ("bindfs", "mergerfs") if getattr(args, k))
        for kind in peers:
            if shutil.which(kind) is None:
                raise SystemExit(f"bench: --{kind} needs {kind} (apt-get install {kind})")
        if args.baseline is not None:
            if args.compare:
                raise SystemExit("bench: --baseline and --compare are one comparison each")
            if not (args.baseline / "src" / "vfusefs").is_dir():
                raise SystemExit(f"bench: {args.baseline} is not a vfusefs checkout")
            args.compare = "baseline"
        times, cpu = run_suite(base, w, args.compare or "", only, args.repeat, peers, args.baseline)
        med = {k: {t: statistics.median(v) for t, v in tv.items()} for k, tv in times.items()}
        print()
        print(
            f"{'workload':40} {'native s':>9} {'vfusefs s':>10} {'ratio':>7}"
            + (
                f" {'baseline s':>12} {'ratio':>7} {'change':>11}"
                if args.compare == "baseline"
                else f" {'no-' + args.compare + ' s':>12} {'ratio':>7} {args.compare + ' cost':>11}"
                if args.compare
                else ""
            )
            + "".join(f" {p + ' s':>11} {'ratio':>7} {'vs ' + p:>12}" for p in peers)
        )
        for key, name, _, _ in rows(w):
            if key not in med:
                continue
            n, v = med[key]["native"], med[key]["on"]
            line = f"{name:40} {n:9.3f} {v:10.3f} {v / n:7.2f}"
            if "off" in med[key]:
                v2 = med[key]["off"]
                line += f" {v2:12.3f} {v2 / n:7.2f} {(v / v2 - 1) * 100:+10.1f}%"
            for p in peers:
                b = med[key][p]
                line += f" {b:11.3f} {b / n:7.2f} {v / b:11.2f}x"
            print(line)
        # the CPU each daemon burnt per workload (taken from a GPU node's data loaders)
        cols = [t for t in ("on", "off", *peers) if any(t in c for c in cpu.values())]
        print()
        print(f"{'daemon CPU seconds (median)':40}" + "".join(f" {c:>11}" for c in cols))
        for key, name, _, _ in rows(w):
            if key in cpu:
                line = f"{name:40}"
                for c in cols:
                    got = cpu[key].get(c)
                    line += f" {statistics.median(got):11.2f}" if got else f" {'-':>11}"
                print(line)
        if args.rss_files:
            rss, t, read = rss_check(base / "rss", args.rss_files)
            print(
                f"daemon RSS after ls -lR of {args.rss_files} files: {rss:.0f} MiB (ls took {t:.2f}s)"
            )
            print(
                f"getfattr -n user.vfusefs.usage.bytes on that vfolder: {read * 1000:.1f} ms "
                f"(median of 21, including starting getfattr)"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
