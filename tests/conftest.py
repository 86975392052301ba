"""Shared fixtures: a real `vfusefs serve` process with its own config, mount and native dirs.

Nothing is mocked: the daemon is started as users start it (the console script, a TOML file),
mounted with allow_other at a temporary mountpoint, driven with real tools and syscalls, and
stopped with SIGTERM; its log must then hold no traceback and no unexpected ERROR line.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

VENV_BIN = Path(sys.executable).parent
VFUSEFS = str(VENV_BIN / "vfusefs")
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if IS_ROOT and os.path.exists("/dev/fuse"):
        return
    skip = pytest.mark.skip(reason="needs root and /dev/fuse for a real FUSE mount")
    for item in items:
        if "mount" in item.keywords:
            item.add_marker(skip)


class Daemon:
    """One vfusefs daemon under test."""

    def __init__(
        self,
        base: Path,
        hosts: dict[str, dict[str, Any]] | None = None,
        daemon_opts: dict[str, Any] | None = None,
        store_url: str | None = None,
        store_opts: dict[str, Any] | None = None,
    ) -> None:
        self.base = base
        self.mnt = base / "mnt"
        self.state = base / "state"
        self.config = base / "vfusefs.toml"
        self.log_path = base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.allowed_errors: list[str] = []
        self.env: dict[str, str] = {}  # extra environment for the daemon (NOTIFY_SOCKET...)
        self.nofile: int | None = None  # RLIMIT_NOFILE (soft and hard) to start the daemon with
        self.prefix: list[str] = []  # run the daemon under this (nsenter --net=... for netns)
        for d in (self.mnt, self.state):
            d.mkdir(parents=True, exist_ok=True)
        if hosts is None:
            hosts = {"local": {"path": str(base / "native")}}
        for h in hosts.values():
            Path(h["path"]).mkdir(parents=True, exist_ok=True)
        self.hosts = hosts
        self.store_url = store_url or f"sqlite://{self.state}/state.db"
        self.store_opts = store_opts or {}
        self.daemon_opts = {
            "mountpoint": str(self.mnt),
            "state_dir": str(self.state),
            "control_socket": str(self.state / "control.sock"),
            "metrics_listen": "",
            **(daemon_opts or {}),
        }
        self.write_config()

    def write_config(self) -> None:
        lines = ["[daemon]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.daemon_opts.items()]
        lines += ["", "[store]", f'url = "{self.store_url}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.store_opts.items()]
        for name, opts in self.hosts.items():
            lines += ["", f"[hosts.{name}]"]
            lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def socket(self) -> str:
        return str(self.daemon_opts["control_socket"])

    def start(self, timeout: float | None = None) -> Daemon:
        # the test VM (tests/vm.py) emulates its CPU: a daemon takes ~15 s to start there
        timeout = timeout or float(os.environ.get("VFUSEFS_TEST_START_TIMEOUT", 15))
        self.logf = open(self.log_path, "ab")
        nofile = self.nofile
        self.proc = subprocess.Popen(
            [*self.prefix, VFUSEFS, "serve", "--config", str(self.config)],
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            preexec_fn=None
            if nofile is None
            else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            if os.path.ismount(self.mnt) and os.path.exists(self.socket):
                try:
                    self.api("GET", "/v1/status")
                    return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not come up: {self.log()}")

    def stop(self, check: bool = True) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self.logf.close()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        if check:
            self.check_log()
        return code

    def crash(self) -> None:
        """kill -9, as a crash: the dead mount stays for the next start (or doctor) to find."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self.logf.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_log(self) -> None:
        text = self.log()
        assert "Traceback" not in text, text
        bad = [
            line
            for line in text.splitlines()
            if (" ERROR " in line or '"level": "error"' in line)
            and not any(a in line for a in self.allowed_errors)
        ]
        assert not bad, "\n".join(bad)

    # -- control API and CLI ----------------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None) -> httpx.Response:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket), base_url="http://x", timeout=30
        ) as c:
            return c.request(method, path, json=body)

    def cli(
        self, *args: str, check: bool = True, user: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [VFUSEFS, "--config", str(self.config), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} -> {r.returncode}: {r.stderr}")
        return r

    def create_vfolder(self, host: str = "local", **body: Any) -> dict[str, Any]:
        r = self.api("POST", f"/v1/hosts/{host}/vfolders", body)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def vfolder(self, host: str = "local", **body: Any) -> Path:
        """A new vfolder (everyone rwd unless grants given); returns its path under the mount."""
        body.setdefault("grants", [{"principal": "*", "mode": "rwd"}])
        return Path(self.create_vfolder(host, **body)["path"])


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A scratch dir other uids can traverse (pytest's tmp_path is 0700 to root)."""
    base = Path(tempfile.mkdtemp(prefix="vfusefs-test-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    for p in (base / "mnt",):
        if os.path.ismount(p):
            subprocess.run(["umount", "-l", str(p)], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def daemon(world_dir: Path) -> Iterator[Daemon]:
    d = Daemon(world_dir).start()
    yield d
    assert d.stop() == 0


@pytest.fixture(params=["vfs", "btrfs", "cephfs"])
def any_daemon(request: pytest.FixtureRequest, world_dir: Path) -> Iterator[Daemon]:
    """A daemon whose host `local` is a plain directory (vfs), a btrfs filesystem with quotas
    (the btrfs backend) or CephFS (the cephfs backend): for the tests every backend must pass.
    (XFS runs only in the test VM, whose emulated CPU is too slow for fsx: tests/guest_xfs.py
    has its own workload there.)"""
    hosts = None
    if request.param != "vfs":
        fs = request.getfixturevalue({"btrfs": "btrfs_fs", "cephfs": "ceph_fs"}[request.param])
        path = fs.dir(f"h{uuid.uuid4().hex[:8]}")
        hosts = {"local": {"backend": request.param, "path": str(path)}}
    d = Daemon(world_dir, hosts=hosts).start()
    yield d
    assert d.stop() == 0


class RedisServer:
    """A real redis-server on a unix socket (no TCP port, nothing persisted), for the tests."""

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.sock = base / "redis.sock"
        self.sock.unlink(missing_ok=True)  # a server stopped before: start afresh on its path
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                "0",
                "--unixsocket",
                str(self.sock),
                "--unixsocketperm",
                "600",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        self.url = f"unix://{self.sock}?db=0"

    def flush(self) -> None:
        subprocess.run(
            ["redis-cli", "-s", str(self.sock), "FLUSHALL"], check=True, capture_output=True
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not have("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def run(
    *cmd: str, cwd: Any = None, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=120, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} -> {r.returncode}: {r.stderr}")
    return r


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str | Path, new: str | Path, flags: int) -> None:
    """renameat2(2) (1: RENAME_NOREPLACE, 2: RENAME_EXCHANGE); OSError as os.rename raises."""
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def outcome(fn: Callable[[], Any]) -> Any:
    """("ok", fn()) or ("err", errno name): what differential tests compare."""
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, exc.errno))


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (and, for Redis Cluster, its bus port + 10000)."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return int(port)


def redis_cli(port: int, *args: str) -> str:
    return run("redis-cli", "-h", "127.0.0.1", "-p", str(port), *args).stdout


class RedisProcesses:
    """redis-server processes on loopback TCP ports (Cluster, Sentinel), stopped together."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int, *args: str, conf: str | None = None) -> int:
        d = self.base / str(port)
        d.mkdir(parents=True, exist_ok=True)
        cmd = ["redis-server"]
        if conf is not None:
            (d / "redis.conf").write_text(conf)
            cmd.append(str(d / "redis.conf"))
        cmd += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        cmd += ["--dir", str(d), *args]
        self.procs[port] = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "ping"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            != "PONG"
        ):
            assert time.monotonic() < deadline, f"redis-server on {port} did not start"
            time.sleep(0.05)
        return port

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(10)
        self.procs.clear()


class RedisCluster(RedisProcesses):
    """Three masters, no replicas: `redis-cli --cluster create`, as an operator does it."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        ports = [
            self.start(
                free_port(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"
            )
            for _ in range(3)
        ]
        run(
            "redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
            "--cluster-replicas", "0", "--cluster-yes",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while any("cluster_state:ok" not in redis_cli(p, "cluster", "info") for p in ports):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.2)
        self.ports = ports
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports[:2])

    def flush(self) -> None:
        for p in self.ports:
            redis_cli(p, "flushall")


class RedisSentinel(RedisProcesses):
    """A master, a replica and three sentinels watching it as `m` (failover in about 5 s)."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.master = self.start(free_port())
        self.replica = self.start(free_port(), "--replicaof", "127.0.0.1", str(self.master))
        deadline = time.monotonic() + 10
        while "master_link_status:up" not in redis_cli(self.replica, "info", "replication"):
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        self.sentinels = []
        for _ in range(3):
            conf = (
                f"sentinel monitor m 127.0.0.1 {self.master} 2\n"
                "sentinel down-after-milliseconds m 1000\n"
                "sentinel failover-timeout m 3000\n"
            )
            self.sentinels.append(self.start(free_port(), "--sentinel", conf=conf))
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + "/m"

    def master_port(self) -> int:
        out = redis_cli(self.sentinels[0], "sentinel", "get-master-addr-by-name", "m").split()
        return int(out[1])


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    if not have("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


class ScratchFs:
    """A filesystem the tests mounted (or were given): fresh directories on it for hosts."""

    mnt: Path

    def dir(self, name: str) -> Path:
        d = self.mnt / name
        d.mkdir()
        return d

    def stop(self) -> None:
        """Unmount and stop what serves it."""


F = TypeVar("F", bound=ScratchFs)


def scratch(kind: Callable[[Path], F], prefix: str) -> Iterator[F]:
    """A session fixture's filesystem: made in a fresh directory other uids can traverse,
    stopped and removed at the end."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    fs = kind(base)
    try:
        yield fs
    finally:
        fs.stop()
        shutil.rmtree(base, ignore_errors=True)


class BtrfsFs(ScratchFs):
    """A btrfs filesystem on a loop device, quotas enabled (LABS: milliseconds to make)."""

    def __init__(self, base: Path, size: str = "1G") -> None:
        self.image, self.mnt = base / "btrfs.img", base / "btrfs"
        self.mnt.mkdir(parents=True)
        run("truncate", "-s", size, str(self.image))
        run("mkfs.btrfs", "-q", str(self.image))
        run("mount", "-o", "loop", str(self.image), str(self.mnt))
        run("btrfs", "quota", "enable", str(self.mnt))
        self.mnt.chmod(0o755)

    def stop(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], check=False)


CEPH_CONF = """[global]
fsid = {fsid}
mon host = {addrs}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon data avail warn = 1
osd objectstore = memstore
memstore device bytes = 1073741824
osd crush chooseleaf type = 0
ms bind ipv4 = true
ms bind ipv6 = false
public addr = 127.0.0.1
run dir = {d}/run
admin socket = {d}/run/$cluster-$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
mds data = {d}/mds/$cluster-$id
keyring = {d}/keyring
[client]
admin socket = {d}/run/client.$pid.asok
log file = {d}/log/client.$pid.log
"""


class CephFs(ScratchFs):
    """A single-node Ceph cluster on loopback (one monitor, one memstore OSD, one MDS; no
    manager, no cephx) with CephFS mounted by ceph-fuse: real CephFS quotas, recursive
    statistics and snapshots, about 6 s to start.  Started once per session."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mnt = base / "mnt"
        for sub in ("mon/ceph-a", "osd/ceph-0", "mds/ceph-a", "run", "log", "mnt"):
            (base / sub).mkdir(parents=True)
        (base / "keyring").touch()
        self.conf = base / "ceph.conf"
        fsid = str(uuid.uuid4())
        addrs = f"[v2:127.0.0.1:{free_port()},v1:127.0.0.1:{free_port()}]"
        self.conf.write_text(CEPH_CONF.format(fsid=fsid, d=base, addrs=addrs))
        self.fuse: subprocess.Popen[bytes] | None = None
        c = ("-c", str(self.conf))
        run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", addrs, str(base / "monmap"))
        run("ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(base / "monmap"))
        run("ceph-mon", *c, "-i", "a")
        run("ceph", *c, "osd", "create")
        run("ceph-osd", *c, "-i", "0", "--mkfs", "--no-mon-config")
        run("ceph-osd", *c, "-i", "0")
        for pool in ("cephfs_data", "cephfs_meta"):
            run("ceph", *c, "osd", "pool", "create", pool, "8")
            run("ceph", *c, "osd", "pool", "set", pool, "size", "1", "--yes-i-really-mean-it")
        run("ceph", *c, "fs", "new", "cephfs", "cephfs_meta", "cephfs_data")
        run("ceph-mds", *c, "-i", "a")
        deadline = time.monotonic() + 60
        while "up:active" not in run("ceph", *c, "mds", "stat").stdout:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the MDS did not become active: see " + str(base / "log"))
            time.sleep(0.2)
        self.fuse = subprocess.Popen(
            ["ceph-fuse", *c, "-f", str(self.mnt)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.mnt):
            if self.fuse.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("ceph-fuse did not mount: see " + str(base / "log"))
            time.sleep(0.1)
        self.mnt.chmod(0o755)

    def stop(self) -> None:
        """Unmount first, then stop the daemons (ceph-fuse hangs if the monitor goes first)."""
        subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)
        if self.fuse is not None:
            self.fuse.terminate()
            try:
                self.fuse.wait(10)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
        for name in ("mds.a", "osd.0", "mon.a"):
            pidfile = self.base / "run" / f"{name}.pid"
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def ceph_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephFs]:
    if not (have("ceph-mon") and have("ceph-fuse") and IS_ROOT):
        pytest.skip("needs root and Ceph (ceph-mon ceph-osd ceph-mds ceph-fuse)")
    yield from scratch(CephFs, "vfusefs-ceph-")


class XfsFs(ScratchFs):
    """An XFS filesystem mounted with prjquota.  This machine's kernel has no XFS quota, so it
    exists only inside the test VM (tests/test_vm_storage.py boots it and runs the XFS tests
    there, with VFUSEFS_XFS_MNT naming the mount); on the host the tests that need it skip."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt


@pytest.fixture(scope="session")
def xfs_fs() -> XfsFs:
    mnt = os.environ.get("VFUSEFS_XFS_MNT")
    if not mnt:
        pytest.skip("XFS project quota: runs inside the test VM (tests/test_vm_storage.py)")
    return XfsFs(Path(mnt))


@pytest.fixture(scope="session")
def btrfs_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BtrfsFs]:
    if not (have("mkfs.btrfs") and IS_ROOT):
        pytest.skip("needs root and btrfs-progs for a btrfs loop mount")
    yield from scratch(BtrfsFs, "vfusefs-btrfs-")
