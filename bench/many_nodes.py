#!/usr/bin/env python3
"""Many nodes on one Redis: what shared quota costs, and how far it scales.

    sudo .venv/bin/python bench/many_nodes.py [--quick] [--only writers,sim,vfolders]

writers   four `dd` writers (1 MiB blocks) into one limit until EDQUOT: on a plain directory
          (no limit: the same bytes), one node on SQLite, two nodes on one redis-server (two
          writers each); throughput as a ratio to native, and the final overshoot
sim       100 and 1,000 simulated nodes (in-process lease clients, as the daemon's LeaseKeeper
          drives the store) filling one limit: lease requests per second and per GiB, Redis CPU
          seconds, the overshoot against the bound of N x lease_floor
vfolders  100,000 vfolders with grants in Redis: daemon start-up (to a served mount) and RSS,
          then a full resync (the change feed overrun while the daemon was stopped)

Everything runs on this machine: redis-server on a unix socket, daemons on temporary mounts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from run import RedisServer  # noqa: E402

from vfusefs.domain.quota import QuotaExceeded, QuotaLedger  # noqa: E402
from vfusefs.store import SharedStore, VfolderRecord, open_store  # noqa: E402

BIN = Path(sys.executable).parent / "vfusefs"
MiB, GiB = 1 << 20, 1 << 30
FLOOR = (MiB, 1)
TTL = 30.0


class Node:
    """A vfusefs daemon with its own mount, state and socket over a shared native directory."""

    def __init__(self, base: Path, native: Path, store_url: str, name: str) -> None:
        for sub in ("state", "mnt"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.base, self.mnt = base, base / "mnt"
        self.sock = base / "state" / "control.sock"
        self.cfg = base / "vfusefs.toml"
        self.cfg.write_text(
            f'[daemon]\nmountpoint = "{self.mnt}"\nstate_dir = "{base}/state"\n'
            f'control_socket = "{self.sock}"\nmetrics_listen = ""\nscan_interval = 0.0\n'
            f'[store]\nurl = "{store_url}"\nnode = "{name}"\n'
            f'[hosts.local]\npath = "{native}"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait until the mount and control API answer; returns the seconds."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--config", str(self.cfg)],
            stderr=open(self.base / "daemon.log", "ab"),
            preexec_fn=raise_nofile,  # one O_PATH fd per vfolder root, as systemd allows
        )
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon died: {(self.base / 'daemon.log').read_text()[-2000:]}")
            if os.path.ismount(self.mnt) and self.sock.exists():
                try:
                    self.api("GET", "/v1/status")
                    return time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
            time.sleep(0.02)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://x", timeout=600
        ) as c:
            r = c.request(method, path, json=body)
            r.raise_for_status()
            return r.json()

    def rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)


def raise_nofile() -> None:
    """LimitNOFILE=1048576, as the systemd unit sets it (or as high as this machine allows)."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
    except (ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def vfolders_allowed(wanted: int) -> int:
    """A daemon keeps one O_PATH fd per vfolder root: as many as RLIMIT_NOFILE allows here."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard >= (1 << 20) or hard == resource.RLIM_INFINITY:
        return wanted
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
        return wanted
    except (ValueError, OSError):
        allowed = min(wanted, hard - 5000)
        if allowed < wanted:
            print(f"(this machine allows {hard} fds per process and a daemon holds one per "
                  f"vfolder: {allowed} vfolders instead of {wanted})")  # fmt: skip
        return allowed


def dd_writers(targets: list[Path], mib: int) -> tuple[float, int]:
    """Run one dd per target (1 MiB blocks, at most mib each) at once: seconds, bytes written."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["dd", "if=/dev/zero", f"of={t}", "bs=1M", f"count={mib}", "conv=fsync"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for t in targets
    ]
    for p in procs:
        p.wait()
    took = time.perf_counter() - t0
    return took, sum(t.stat().st_size for t in targets if t.exists())


def du(path: Path) -> int:
    out = subprocess.run(["du", "--block-size=1", "-s", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def bench_writers(base: Path, limit_mib: int) -> None:
    print(f"\n== four writers into one {limit_mib} MiB limit (dd, 1 MiB blocks, fsync)")
    native = base / "plain"
    native.mkdir()
    took, written = dd_writers([native / f"w{i}" for i in range(4)], limit_mib // 4)
    rows = [("native (no limit)", took, written, None)]
    shutil.rmtree(native)

    def limited(nodes: list[Node], per_node: int) -> tuple[float, int, int]:
        vf = nodes[0].api(
            "POST",
            "/v1/hosts/local/vfolders",
            {"quota_bytes": limit_mib * MiB, "grants": [{"principal": "*", "mode": "rwd"}]},
        )
        paths = [
            n.mnt / "local" / vf["id"] / f"w{n.base.name}{i}"
            for n in nodes
            for i in range(per_node)
        ]
        while not all(p.parent.is_dir() for p in paths):
            time.sleep(0.02)
        took, written = dd_writers(paths, limit_mib)
        return took, written, du(Path(vf["native_path"])) - limit_mib * MiB

    sqlite = Node(
        base / "sqlite", base / "native-sqlite", f"sqlite://{base}/sqlite/state/db", "one"
    )
    (base / "native-sqlite").mkdir()
    sqlite.start()
    try:
        took, written, over = limited([sqlite], 4)
        rows.append(("one node, SQLite", took, written, over))
    finally:
        sqlite.stop()
    redis = RedisServer(base / "redis-writers")
    (base / "native-redis").mkdir()
    nodes = [Node(base / n, base / "native-redis", redis.url, n) for n in ("a", "b")]
    try:
        for n in nodes:
            n.start()
        cpu0 = redis.cpu_seconds()
        took, written, over = limited(nodes, 2)
        rows.append(
            (f"two nodes, Redis (CPU {redis.cpu_seconds() - cpu0:.2f} s)", took, written, over)
        )
    finally:
        for n in nodes:
            n.stop()
        redis.stop()
    t_native = rows[0][1] / rows[0][2]
    print(f"{'':38} {'seconds':>8} {'MiB/s':>8} {'vs native':>10} {'over the limit':>15}")
    for name, took, written, over in rows:
        rate = written / MiB / took
        ratio = (took / written) / t_native
        print(
            f"{name:38} {took:8.2f} {rate:8.0f} {ratio:9.2f}x "
            + ("-" if over is None else f"{over / MiB:+14.2f}M")
        )


class SimNode:
    """One simulated node: a ledger whose leased account is fed by the store as the daemon's
    LeaseKeeper feeds it (grow on a short reservation, flush turns spent lease into usage)."""

    def __init__(self, store: SharedStore, name: str, vfid: str) -> None:
        self.store, self.name, self.vfid = store, name, vfid
        self.key = f"vf:{vfid}"
        self.ledger = QuotaLedger()
        self.acc = self.ledger.set_limits(self.key, 1, 0, shared=True)
        self.flushed = 0
        self.requests = 0

    def write(self, nbytes: int) -> bool:
        """Charge one write, growing the lease when it is short; False: EDQUOT."""
        for _ in range(3):
            try:
                res = self.ledger.reserve([self.key], nbytes, 0)
            except QuotaExceeded as exc:
                fresh = None if self.acc.lease_held else (self.acc.used_bytes - self.flushed, 0)
                have = (self.acc.lease_bytes - self.acc.reserved_bytes, 0)
                self.requests += 1
                g = self.store.acquire(
                    self.name, self.key, (exc.short_bytes, 0), TTL, FLOOR, fresh, have
                )
                if g is None:
                    raise SystemExit("the vfolder went away") from None
                if fresh is not None:
                    self.acc.lease_bytes = 0
                self.acc.lease_held = self.acc.lease_open = True
                self.acc.lease_bytes += g.bytes
                if not g.bytes:
                    return False
                continue
            self.ledger.commit(res, nbytes, 0)
            return True
        return False

    def flush(self) -> None:
        delta = self.acc.used_bytes - self.flushed
        if delta:
            self.store.add_usage(self.name, [(self.vfid, delta, 0)])
            self.flushed += delta


def simulate(store: SharedStore, nodes: int, limit: int, seed: int = 5) -> dict[str, float]:
    """`nodes` simulated nodes write random 64 KiB-4 MiB chunks in turn (each flushing every
    8 writes, as a node flushes every half second) until every one is refused."""
    vfid = str(uuid.uuid4())
    store.put_vfolder(VfolderRecord(id=vfid, host="local", native_path="/x", quota_bytes=limit))
    store.set_usage(vfid, 0, 0)
    sims = [SimNode(store, f"sim{i}", vfid) for i in range(nodes)]
    for s in sims:
        store.heartbeat(s.name, s.name, {}, TTL)
    rng = random.Random(seed)
    live = list(sims)
    writes = 0
    t0 = time.perf_counter()
    while live:
        for s in list(live):
            ok = s.write(rng.randrange(64 << 10, 4 * MiB))
            writes += 1
            if writes % 8 == 0 or not ok:
                s.flush()
            if not ok:
                live.remove(s)
    took = time.perf_counter() - t0
    for s in sims:
        s.flush()
    total = store.vfolder_usage(vfid)[0]
    for s in sims:
        store.leave(s.name)
    return {
        "seconds": took,
        "writes": writes,
        "requests": sum(s.requests for s in sims),
        "total": total,
    }


def bench_sim(base: Path, counts: list[int], limit: int) -> None:
    print(f"\n== simulated nodes filling one {limit / GiB:.0f} GiB limit (lease_floor 1 MiB)")
    print(
        f"{'nodes':>6} {'writes':>8} {'requests':>9} {'req/s':>8} {'req/GiB':>8} "
        f"{'redis CPU s':>12} {'filled':>8} {'over':>9} {'bound':>8}"
    )
    redis = RedisServer(base / "redis-sim")
    try:
        store = cast(SharedStore, open_store(redis.url))
        for n in counts:
            cpu0 = redis.cpu_seconds()
            r = simulate(store, n, limit)
            cpu = redis.cpu_seconds() - cpu0
            over = r["total"] - limit
            print(
                f"{n:6d} {r['writes']:8.0f} {r['requests']:9.0f} "
                f"{r['requests'] / r['seconds']:8.0f} {r['requests'] / (r['total'] / GiB):8.1f} "
                f"{cpu:12.2f} {r['total'] / limit * 100:7.2f}% {over / MiB:+8.2f}M "
                f"{n * FLOOR[0] / MiB:7.0f}M"
            )
        store.close()
    finally:
        redis.stop()


def bench_vfolders(base: Path, count: int) -> None:
    print(f"\n== {count} vfolders with grants in Redis")
    count = vfolders_allowed(count)
    redis = RedisServer(base / "redis-vf")
    native = base / "native-vf"
    native.mkdir()
    store = open_store(redis.url)
    node = Node(base / "vf-node", native, redis.url, "n1")
    try:
        t0 = time.perf_counter()
        r = store._r  # type: ignore[attr-defined]  # a pipeline of plain HSETs: set-up speed only
        pipe = r.pipeline(transaction=False)
        ids = []
        for i in range(count):
            vfid = str(uuid.uuid4())
            ids.append(vfid)
            (native / vfid).mkdir()
            rec = VfolderRecord(
                id=vfid,
                host="local",
                native_path=str(native / vfid),
                quota_bytes=10 * GiB,
                grants={f"uid:{1000 + i % 50}": "rwd", "*": "ro", f"cgroup:/docker/c{i}": "rw"},
            )
            pipe.hset("{vfusefs}:vfolders", vfid, json.dumps(rec.__dict__, sort_keys=True))
            pipe.hset("{vfusefs}:usage", f"{vfid}|b", 4096)
            pipe.hset("{vfusefs}:usage", f"{vfid}|i", 0)
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        store.set_clean("n1", True)  # a node restarting after a clean stop (no recount)
        print(f"written to the store in {time.perf_counter() - t0:.1f} s")
        took = node.start()
        listed = len(os.listdir(node.mnt / "local"))
        print(f"daemon start-up to a served mount: {took:.1f} s; RSS {node.rss_mib():.0f} MiB; "
              f"{listed} vfolders listed")  # fmt: skip
        # a full resync: the daemon stopped (SIGSTOP) while more changes than the feed keeps
        # were made; the last one is a grant it must apply
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        for i in range(10_001):
            store.put_scope(f"user:{uuid.UUID(int=i)}", i, 0)
        rec = store.vfolder(ids[-1])
        assert rec is not None
        rec.grants["uid:7"] = "rw"
        store.put_vfolder(rec)
        t0 = time.perf_counter()
        node.proc.send_signal(signal.SIGCONT)
        while "uid:7" not in json.dumps(node.api("GET", f"/v1/hosts/local/vfolders/{ids[-1]}")):
            time.sleep(0.05)
        print(f"full resync after the feed was overrun: {time.perf_counter() - t0:.1f} s; "
              f"RSS {node.rss_mib():.0f} MiB")  # fmt: skip
    finally:
        node.stop()
        store.close()
        redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller figures (a smoke run)")
    ap.add_argument("--only", default="writers,sim,vfolders", help="comma-separated sections")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it mounts)")
    only = set(args.only.split(","))
    base = Path(tempfile.mkdtemp(prefix="vfusefs-bench-nodes-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        if "writers" in only:
            bench_writers(base, 256 if args.quick else 1024)
        if "sim" in only:
            bench_sim(
                base,
                [10, 100] if args.quick else [100, 1000],
                16 * GiB if args.quick else 100 * GiB,
            )
        if "vfolders" in only:
            bench_vfolders(base, 10_000 if args.quick else 100_000)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
