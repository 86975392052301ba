"""Many nodes, one truth: two daemons on this machine as two nodes sharing one real
redis-server (separate mountpoints, state dirs, control sockets and node names; the same native
directory for the host, as two nodes over one NFS export would have).

What a user of a cluster relies on: a vfolder made on one node is served by the other within a
second; a grant narrowed through one node stops a writer on the other within a second, open fd
included; writers on both nodes into one limit (a vfolder's bytes, a scope's, a vfolder's
inodes) end within the documented bound and usage equals `du` on both nodes; Redis killed and
started again empty mid-workload: both nodes recover by themselves.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from vfusefs.store import open_store

from conftest import Daemon, RedisServer, free_port, run
from test_access_mount import Container, container  # noqa: F401 (fixture)

pytestmark = pytest.mark.mount

MiB = 1 << 20
FLOOR = MiB  # lease_floor (the default, said explicitly)


def wait_for(cond: Callable[[], bool], seconds: float = 3.0, what: str = "") -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < seconds, f"not within {seconds} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - start


class Cluster:
    def __init__(self, base: Path, redis: RedisServer, lease_ttl: float = 30.0) -> None:
        self.native = base / "native"
        self.redis = redis
        self.nodes = [
            Daemon(
                base / name,
                hosts={"local": {"path": str(self.native)}},
                store_url=redis.url,
                store_opts={"node": f"node-{name}", "lease_floor": "1M", "lease_ttl": lease_ttl},
                daemon_opts={"metrics_listen": f"127.0.0.1:{free_port()}"},
            )
            for name in ("a", "b")
        ]

    @staticmethod
    def metric(d: Daemon, name: str) -> float:
        text = httpx.get(f"http://{d.daemon_opts['metrics_listen']}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not exported")

    def start(self) -> Cluster:
        for d in self.nodes:
            d.start()
        return self

    def stop(self) -> None:
        for d in self.nodes:
            assert d.stop() == 0


@pytest.fixture
def cluster(world_dir: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    redis_server.flush()
    c = Cluster(world_dir, redis_server).start()
    yield c
    c.stop()


def du_bytes(path: Path) -> int:
    return int(run("du", "--block-size=1", "-s", str(path)).stdout.split()[0])


def inodes_below(path: Path) -> int:
    return len(set(run("find", str(path), "-mindepth", "1", "-printf", "%i\n").stdout.split()))


def usage(d: Daemon, vfid: str) -> tuple[int, int]:
    info = d.api("GET", f"/v1/hosts/local/vfolders/{vfid}").json()
    return info["usage_bytes"], info["usage_inodes"]


def dd_until_full(path: Path, mib: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        out.append(err)
    return out


def test_a_vfolder_and_a_revoke_reach_the_other_node_within_a_second(
    cluster: Cluster, container: Container
) -> None:
    a, b = cluster.nodes
    who = f"cgroup:{container.cgroup}"
    vfid = a.create_vfolder(grants=[{"principal": who, "mode": "rw"}])["id"]
    took = wait_for(lambda: (b.mnt / "local" / vfid).is_dir(), 1.0, "vfolder on node b")
    print(f"vfolder made on a served by b after {took:.3f} s")
    # a writer on b, its file open, writing every 20 ms
    code = (
        "import os, sys, time\n"
        "fd = os.open('w', os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "print('open', flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        os.write(fd, b'x' * 4096)\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno, time.time(), flush=True)\n"
        "        break\n"
        "    time.sleep(0.02)\n"
    )
    writer = subprocess.Popen(
        container.wrap(b.mnt / "local" / vfid, [sys.executable, "-c", code]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "open\n"
        time.sleep(0.2)
        revoked = time.time()
        r = a.api(
            "PUT",
            f"/v1/hosts/local/vfolders/{vfid}/grants/{who.replace('/', '%2F')}",
            {"mode": "ro"},
        )
        assert r.status_code == 200, r.text
        line = writer.stdout.readline().split()
        assert line[:2] == ["refused", str(errno.EROFS)], line
        delay = float(line[2]) - revoked
        print(f"grant narrowed on a stopped the writer on b after {delay:.3f} s")
        assert delay < 1.0
    finally:
        writer.kill()
        writer.wait()
    # and b lists the nodes sharing the store, both alive
    nodes = b.api("GET", "/v1/status").json()["store"]["nodes"]
    assert sorted((n["node"], n["alive"]) for n in nodes) == [
        ("node-a", True),
        ("node-b", True),
    ]
    assert "node-a" in b.cli("status").stdout


def check_usage_on_both(cluster: Cluster, vfids: list[str]) -> None:
    """Usage equals du on both nodes once they flushed and took in each other's writes."""

    def agree() -> bool:
        for vfid in vfids:
            real = (du_bytes(cluster.native / vfid), inodes_below(cluster.native / vfid))
            if any(usage(d, vfid) != real for d in cluster.nodes):
                return False
        return True

    try:
        wait_for(agree, 15.0, "usage equal to du on both nodes")
    except AssertionError:
        for vfid in vfids:
            real = (du_bytes(cluster.native / vfid), inodes_below(cluster.native / vfid))
            print(vfid, "du", real, [usage(d, vfid) for d in cluster.nodes])
        for d in cluster.nodes:
            print(d.log()[-4000:])
        raise


def test_writers_on_two_nodes_share_one_byte_limit(cluster: Cluster) -> None:
    a, b = cluster.nodes
    limit = 64 * MiB
    vfid = a.create_vfolder(quota_bytes=limit, grants=[{"principal": "*", "mode": "rwd"}])["id"]
    wait_for(lambda: (b.mnt / "local" / vfid).is_dir(), 1.0)
    started = time.monotonic()
    procs = [
        dd_until_full(d.mnt / "local" / vfid / f"{d.base.name}{i}", 80)
        for d in cluster.nodes
        for i in range(2)
    ]
    errs = finish(procs)
    took = time.monotonic() - started
    assert all("Disk quota exceeded" in e for e in errs), errs
    total = du_bytes(cluster.native / vfid)
    print(f"4 writers on 2 nodes: {total / MiB:.2f} MiB of {limit / MiB:.0f} in {took:.1f} s")
    assert total <= limit + 2 * FLOOR  # the bound: N x lease_floor over
    assert total >= limit - 4 * MiB  # and the leases did not strand what was left
    check_usage_on_both(cluster, [vfid])
    # what one node frees, the other may write again
    freed = 0
    for f in sorted((a.mnt / "local" / vfid).iterdir(), key=lambda f: -f.stat().st_size):
        if freed < 9 * MiB:  # through node a, whoever wrote it
            freed += f.stat().st_size
            f.unlink()
    finish([dd_until_full(b.mnt / "local" / vfid / "again", 8)])
    assert (b.mnt / "local" / vfid / "again").stat().st_size == 8 * MiB
    check_usage_on_both(cluster, [vfid])


def test_writers_on_two_nodes_share_one_scope(cluster: Cluster) -> None:
    a, b = cluster.nodes
    scope = f"user:{uuid.uuid4()}"
    assert a.api("PUT", f"/v1/scopes/{scope}", {"quota_bytes": 64 * MiB}).status_code == 200
    one = a.create_vfolder(scope=scope, grants=[{"principal": "*", "mode": "rwd"}])["id"]
    two = b.create_vfolder(scope=scope, grants=[{"principal": "*", "mode": "rwd"}])["id"]
    wait_for(lambda: (b.mnt / "local" / one).is_dir() and (a.mnt / "local" / two).is_dir(), 1.0)
    procs = [dd_until_full(a.mnt / "local" / one / f"a{i}", 80) for i in range(2)]
    procs += [dd_until_full(b.mnt / "local" / two / f"b{i}", 80) for i in range(2)]
    errs = finish(procs)
    assert all("Disk quota exceeded" in e for e in errs), errs
    total = du_bytes(cluster.native / one) + du_bytes(cluster.native / two)
    print(f"one scope over two nodes: {total / MiB:.2f} MiB of 64")
    assert 60 * MiB <= total <= 64 * MiB + 2 * FLOOR
    check_usage_on_both(cluster, [one, two])
    info = b.api("GET", f"/v1/scopes/{scope}").json()
    assert info["usage_bytes"] == total


def test_writers_on_two_nodes_share_one_inode_limit(cluster: Cluster) -> None:
    a, b = cluster.nodes
    vfid = a.create_vfolder(quota_inodes=300, grants=[{"principal": "*", "mode": "rwd"}])["id"]
    wait_for(lambda: (b.mnt / "local" / vfid).is_dir(), 1.0)
    script = 'i=0; while touch "{d}/f$i" 2>/dev/null; do i=$((i+1)); done; echo $i'
    procs = [
        subprocess.Popen(
            [
                "sh",
                "-c",
                script.format(d=d.mnt / "local" / vfid).replace("/f$i", f"/{d.base.name}{k}-$i"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for d in cluster.nodes
        for k in range(2)
    ]
    made = [int(p.communicate(timeout=120)[0]) for p in procs]
    count = inodes_below(cluster.native / vfid)
    print(f"files made per writer: {made}; inodes: {count} of 300")
    assert 300 - 4 <= count <= 300 + 2  # N x one inode over at most
    assert all(m > 0 for m in made)
    check_usage_on_both(cluster, [vfid])


def test_redis_killed_and_started_empty_mid_workload(world_dir: Path) -> None:
    """kill -9 of redis-server while both nodes write, then an empty one on the same socket:
    unlimited writes go on; limited ones spend their lease for at most lease_ttl, then get
    EDQUOT, never hang; both nodes write back what they serve and recover by themselves;
    usage ends equal to du on both."""
    redis = RedisServer(world_dir / "redis-own")
    cluster = Cluster(world_dir, redis, lease_ttl=3.0).start()
    a, b = cluster.nodes
    try:
        free = a.create_vfolder(grants=[{"principal": "*", "mode": "rwd"}])["id"]
        limited = a.create_vfolder(
            quota_bytes=512 * MiB, grants=[{"principal": "*", "mode": "rwd"}]
        )["id"]
        wait_for(lambda: (b.mnt / "local" / limited).is_dir(), 1.0)
        for d in cluster.nodes:  # leases taken
            (d.mnt / "local" / limited / f"{d.base.name}-before").write_bytes(b"x" * MiB)
        redis.proc.kill()
        redis.proc.wait()
        killed = time.monotonic()
        # limited writes spend the lease for at most lease_ttl (3 s), then EDQUOT, never hang
        outcomes: dict[str, tuple[int, int | None, float]] = {}

        def write_on(d: Daemon) -> None:
            target = d.mnt / "local" / limited / f"{d.base.name}-during"
            written, refused = 0, None
            try:
                with open(target, "wb") as f:
                    while time.monotonic() - killed < 10:
                        t0 = time.monotonic()
                        try:
                            f.write(b"z" * 65536)
                            f.flush()
                            written += 1
                        except OSError as exc:
                            refused = exc.errno
                            break
                        assert time.monotonic() - t0 < 6.0, "a write hung"
                        time.sleep(0.02)
            except OSError as exc:  # the open, or the close's flush
                refused = refused or exc.errno
            outcomes[d.base.name] = (written, refused, time.monotonic() - killed)

        threads = [threading.Thread(target=write_on, args=(d,)) for d in cluster.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        print(f"writes into the limited vfolder after the kill: {outcomes}")
        for written, refused, after in outcomes.values():
            assert written > 0 and refused == errno.EDQUOT and after < 3.0 + 1.5
        # reads, metadata and unlimited writes go on; the outage is said
        for d in cluster.nodes:
            assert d.api("GET", "/v1/status").json()["store"]["connected"] is False
            assert cluster.metric(d, "vfusefs_store_up{") == 0
            assert len(os.listdir(d.mnt / "local" / limited)) == 4
            (d.mnt / "local" / free / f"{d.base.name}-during").write_bytes(b"y" * MiB)
        redis = cluster.redis = RedisServer(world_dir / "redis-own")  # empty, same socket
        for d in cluster.nodes:
            wait_for(
                lambda d=d: d.api("GET", "/v1/status").json()["store"]["connected"] is True, 10
            )
        for d in cluster.nodes:  # limited writes work again
            wait_for(
                lambda d=d: _writes(d.mnt / "local" / limited / f"{d.base.name}-after"),
                10,
                "writes again",
            )
        check_usage_on_both(cluster, [free, limited])
        for d in cluster.nodes:
            assert d.log().count("store unreachable") == 1
            assert cluster.metric(d, "vfusefs_store_up{") == 1
            assert cluster.metric(d, "vfusefs_lease_requests_total") > 0
    finally:
        for d in cluster.nodes:
            d.stop(check=False)
        redis.stop()
    for d in cluster.nodes:
        assert "Traceback" not in d.log()


def _writes(path: Path) -> bool:
    try:
        path.write_bytes(b"w" * MiB)
        return True
    except OSError:
        return False


def test_two_daemons_may_not_share_a_node_name(world_dir: Path, redis_server: RedisServer) -> None:
    redis_server.flush()
    opts = {"node": "same"}
    a = Daemon(
        world_dir / "a",
        hosts={"local": {"path": str(world_dir / "native")}},
        store_url=redis_server.url,
        store_opts=opts,
    ).start()
    try:
        b = Daemon(
            world_dir / "b",
            hosts={"local": {"path": str(world_dir / "native")}},
            store_url=redis_server.url,
            store_opts=opts,
        )
        with pytest.raises(RuntimeError) as exc:
            b.start()
        assert "node name 'same' is in use by another live daemon" in str(exc.value)
        assert "Traceback" not in b.log()
    finally:
        assert a.stop() == 0


def test_nodes_follow_a_sentinel_failover_mid_write(world_dir: Path) -> None:
    """A master, a replica and three sentinels; both nodes write into one limited vfolder while
    the master is killed: they follow the promoted replica by themselves, and nothing is lost
    or counted twice (usage equals du on both, and in the store)."""
    from conftest import RedisSentinel

    sentinel = RedisSentinel(world_dir / "sentinel")
    cluster = Cluster(world_dir, sentinel, lease_ttl=30.0)  # type: ignore[arg-type]
    try:
        cluster.start()
        a, b = cluster.nodes
        vfid = a.create_vfolder(quota_bytes=256 * MiB, grants=[{"principal": "*", "mode": "rwd"}])[
            "id"
        ]
        wait_for(lambda: (b.mnt / "local" / vfid).is_dir(), 1.0)
        stop = threading.Event()
        written: dict[str, int] = {}

        errors: list[str] = []

        def writer(d: Daemon) -> None:  # 256 KiB every 50 ms: far from the limit throughout
            n = 0
            while not stop.is_set() and n < 400:
                try:
                    (d.mnt / "local" / vfid / f"{d.base.name}-{n}").write_bytes(b"s" * (256 << 10))
                except OSError as exc:
                    errors.append(f"{d.base.name}-{n}: {exc}")
                n += 1
                time.sleep(0.05)
            written[d.base.name] = n

        threads = [threading.Thread(target=writer, args=(d,)) for d in cluster.nodes]
        for t in threads:
            t.start()
        time.sleep(1.0)
        old = sentinel.master
        sentinel.kill(old)
        wait_for(lambda: sentinel.master_port() != old, 20, "the sentinels promote the replica")

        # the nodes write to the new master by themselves: a change through a reaches b
        def create_works() -> bool:
            r = a.api(
                "POST", "/v1/hosts/local/vfolders", {"grants": [{"principal": "*", "mode": "ro"}]}
            )
            return r.status_code == 201

        wait_for(create_works, 20, "a change through node a after the failover")
        stop.set()
        for t in threads:
            t.join(60)
        print(f"files written across the failover: {written}; refused: {errors}")
        assert all(n > 0 for n in written.values()) and not errors
        check_usage_on_both(cluster, [vfid])
        store = open_store(sentinel.url)
        try:
            real = du_bytes(cluster.native / vfid)
            wait_for(lambda: store.vfolder_usage(vfid)[0] == real, 10, "the store's usage")
        finally:
            store.close()
    finally:
        for d in cluster.nodes:
            d.stop(check=False)
        sentinel.stop()
    for d in cluster.nodes:
        assert "Traceback" not in d.log()
