"""A hung storage host, as a user sees it: its operations fail with EIO within op_timeout,
then at once while it is `down`; another host stays fast; the control API answers; 50 callers
on the dead host all return; the daemon's threads stay bounded; SIGCONT brings it back.

The hang is real: the host's native directory is a bindfs mount (a FUSE daemon from Debian)
whose process is stopped with SIGSTOP, so every syscall on it blocks in the kernel, as on a
dead NFS server with a hard mount.
"""

from __future__ import annotations

import errno
import os
import signal
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon, have, run

pytestmark = pytest.mark.mount
OP_TIMEOUT = 2.0


class Bindfs:
    def __init__(self, src: Path, mnt: Path) -> None:
        src.mkdir()
        mnt.mkdir()
        self.mnt = mnt
        self.proc = subprocess.Popen(["bindfs", "-f", str(src), str(mnt)])
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline, "bindfs did not mount"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def hosts(world_dir: Path) -> Iterator[tuple[Daemon, Bindfs]]:
    if not have("bindfs"):
        pytest.skip("bindfs is not installed (apt-get install bindfs)")
    bind = Bindfs(world_dir / "slow-src", world_dir / "slow")
    d = Daemon(
        world_dir,
        hosts={
            "fast": {"path": str(world_dir / "fast")},
            "slow": {"path": str(bind.mnt), "op_timeout": OP_TIMEOUT},
        },
    )
    try:
        d.start()
        yield d, bind
    finally:
        bind.proc.send_signal(signal.SIGCONT)
        d.stop(check=False)
        bind.stop()
    assert "Traceback" not in d.log()


def timed_stat(path: Path) -> tuple[float, int]:
    start = time.monotonic()
    try:
        os.stat(path)
        code = 0
    except OSError as exc:
        code = exc.errno or 0
    return time.monotonic() - start, code


def at_once(paths: list[Path], seconds: float) -> list[tuple[float, int]]:
    """stat every path from its own thread, all at once: (seconds, errno) of each that ended."""
    results: list[tuple[float, int]] = []
    callers = [threading.Thread(target=lambda p=p: results.append(timed_stat(p))) for p in paths]
    for t in callers:
        t.start()
    for t in callers:
        t.join(seconds)
    return results


def health(d: Daemon, host: str) -> str:
    return str(d.api("GET", f"/v1/hosts/{host}").json()["health"])


def test_a_hung_host_fails_fast_and_nothing_else_slows_down(hosts: tuple[Daemon, Bindfs]) -> None:
    d, bind = hosts
    fast = d.vfolder("fast")
    slow = d.vfolder("slow")
    for vf in (fast, slow):
        (vf / "f").write_text("x\n")
    assert health(d, "slow") == "ok"
    before = [timed_stat(fast / "f")[0] for _ in range(300)]
    threads = len(os.listdir(f"/proc/{d.proc.pid}/task"))  # type: ignore[union-attr]

    bind.proc.send_signal(signal.SIGSTOP)
    # 20 callers as it hangs, each looking up a name in one directory: the kernel sends such
    # lookups one at a time, so without care the n-th would wait n x op_timeout
    first = at_once([slow / f"new-{i}" for i in range(20)], 10 * OP_TIMEOUT)
    print(f"20 callers as the host hung: the slowest took {max(first)[0]:.2f} s")
    assert len(first) == 20 and all(code == errno.EIO for _, code in first)
    assert max(took for took, _ in first) < OP_TIMEOUT + 1.0, sorted(first)
    deadline = time.monotonic() + 3 * OP_TIMEOUT
    while health(d, "slow") != "down":
        assert time.monotonic() < deadline, "the host was not marked down"
        time.sleep(0.1)
    # now at once, and the virtual attributes still answer
    took, code = timed_stat(slow / "other-name")
    assert code == errno.EIO and took < 0.5, took
    r = subprocess.run(
        ["getfattr", "--only-values", "-n", "user.vfusefs.health", str(slow)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.stdout == "down", r.stderr
    # 50 callers at once on the dead host: every one returns, quickly
    results = at_once([slow / f"n{i}" for i in range(50)], 3 * OP_TIMEOUT)
    assert len(results) == 50 and all(code == errno.EIO for _, code in results)
    assert max(took for took, _ in results) < OP_TIMEOUT, sorted(results)[-3:]
    # the other host stays fast, the control API and the CLI answer
    during = [timed_stat(fast / "f")[0] for _ in range(300)]
    print(
        f"other host stat: median {statistics.median(before) * 1e3:.3f} ms before, "
        f"{statistics.median(during) * 1e3:.3f} ms during (max {max(during) * 1e3:.1f} ms)"
    )
    assert statistics.median(during) < max(3 * statistics.median(before), 0.002)
    start = time.monotonic()
    assert "slow" in d.cli("status").stdout and time.monotonic() - start < 5
    assert len(os.listdir(f"/proc/{d.proc.pid}/task")) <= threads + 4  # type: ignore[union-attr]

    bind.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 15
    while health(d, "slow") != "ok":
        assert time.monotonic() < deadline, "the host did not come back"
        time.sleep(0.2)
    assert (slow / "f").read_text() == "x\n"
    log = d.log()
    assert log.count("host slow is down (was ok)") == 1, log  # said once, not per request
    assert log.count("host slow is ok (was down)") == 1, log
    assert log.count("WARNING") <= 4, log


class Network:
    """The daemon's own network namespace with two veth pairs to a 'storage' namespace holding
    two servers (10.213.1.2, 10.213.2.2): nothing else routes there, so the tests decide every
    link, route and neighbour the daemon sees.  No traffic is sent: the daemon reads tables."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.d, self.p = f"vfd-{tag}", f"vfp-{tag}"
        for ns in (self.d, self.p):
            run("ip", "netns", "add", ns)
        for i in (1, 2):
            run("ip", "link", "add", f"vd{i}-{tag}", "type", "veth", "peer", "name", f"vp{i}-{tag}")
            run("ip", "link", "set", f"vd{i}-{tag}", "netns", self.d)
            run("ip", "link", "set", f"vp{i}-{tag}", "netns", self.p)
            run("ip", "-n", self.d, "addr", "add", f"10.213.{i}.1/24", "dev", f"vd{i}-{tag}")
            run("ip", "-n", self.p, "addr", "add", f"10.213.{i}.2/24", "dev", f"vp{i}-{tag}")
            run("ip", "-n", self.d, "link", "set", f"vd{i}-{tag}", "up")
            run("ip", "-n", self.p, "link", "set", f"vp{i}-{tag}", "up")
        run("ip", "-n", self.d, "link", "set", "lo", "up")
        self.tag = tag

    def ip(self, *args: str) -> None:
        run("ip", "-n", self.d, *args)

    def link(self, i: int) -> str:
        return f"vd{i}-{self.tag}"

    def close(self) -> None:
        for ns in (self.d, self.p):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_the_network_path_to_the_servers_decides_health(world_dir: Path) -> None:
    if not have("nsenter") or not have("ip"):
        pytest.skip("needs iproute2 and util-linux nsenter")
    net = Network()
    d = Daemon(
        world_dir,
        hosts={"nas": {"path": str(world_dir / "nas"), "servers": ["10.213.1.2", "10.213.2.2"]}},
    )
    d.prefix = ["nsenter", f"--net=/var/run/netns/{net.d}"]
    try:
        d.start()
        vf = d.vfolder("nas")
        (vf / "f").write_text("x\n")

        def becomes(state: str, seconds: float = 10) -> float:
            start = time.monotonic()
            while health(d, "nas") != state:
                assert time.monotonic() - start < seconds, f"not {state}: {health(d, 'nas')}"
                time.sleep(0.05)
            return time.monotonic() - start

        becomes("ok")
        net.ip("link", "set", net.link(2), "down")  # one of two servers unreachable
        print(f"one link down: degraded after {becomes('degraded'):.2f} s")
        net.ip("link", "set", net.link(1), "down")  # none left
        print(f"both links down: down after {becomes('down'):.2f} s")
        took, code = timed_stat(vf / "other")
        assert code == errno.EIO and took < 0.5
        net.ip("link", "set", net.link(1), "up")
        net.ip("link", "set", net.link(2), "up")
        print(f"links up: ok after {becomes('ok'):.2f} s")
        assert (vf / "f").read_text() == "x\n"
        net.ip("route", "del", "10.213.1.0/24")  # no route (and no default route here)
        becomes("degraded")
        net.ip("route", "add", "10.213.1.0/24", "dev", net.link(1))
        becomes("ok")
        net.ip(
            "neigh", "replace", "10.213.2.2", "dev", net.link(2),
            "lladdr", "00:11:22:33:44:55", "nud", "failed",
        )  # fmt: skip
        becomes("degraded")
        status = d.cli("status").stdout
        assert "degraded" in status
        log = d.log()
        assert "host nas is down (was degraded): no storage server is reachable" in log, log
        assert "1 of 2 servers unreachable (10.213.2.2: no route" in log, log  # its link went
        assert "10.213.2.2: neighbour 10.213.2.2 on vd2" in log, log
    finally:
        d.stop(check=False)
        net.close()
    assert "Traceback" not in d.log()
