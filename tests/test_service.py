"""Running as a service (SPEC §7): systemd notify and watchdog, crash recovery, SIGTERM, SIGHUP.

The daemon runs as systemd would run it: a test-owned NOTIFY_SOCKET datagram socket receives what
it says, WATCHDOG_USEC asks for pings.  Crashes are real `kill -9`s during a write workload.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Daemon, RedisServer, run
from test_quota import du, native_of, usage

pytestmark = pytest.mark.mount


class NotifyListener:
    """The systemd side of sd_notify: collects (monotonic time, fields) per datagram."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, timeout: float = 15.0) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if key in m:
                    return t, m
            time.sleep(0.02)
        raise AssertionError(f"no {key} from the daemon; got {self.messages}")

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def test_notify_ready_status_watchdog_stopping(world_dir: Path) -> None:
    d = Daemon(world_dir)
    listener = NotifyListener(world_dir / "notify.sock")
    d.env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "600000", "VFUSEFS_TEST_HOOKS": "1"}
    d.allowed_errors = []
    try:
        d.start()
        d.vfolder()
        t_ready, ready = listener.wait_for("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(d.proc.pid)  # type: ignore[union-attr]
        assert (
            "serving 0 vfolder(s) of 1 host(s)" in ready["STATUS"] and "local ok" in ready["STATUS"]
        )
        # READY came only once the mount answered: nothing but STATUS/WATCHDOG before it
        before = [m for t, m in listener.messages if t < t_ready]
        assert all(set(m) <= {"STATUS", "WATCHDOG"} for m in before), before
        assert os.listdir(d.mnt) == ["local"]
        # STATUS follows changes (checked every 5 s)
        deadline = time.monotonic() + 12
        while not any("serving 1 vfolder(s)" in m.get("STATUS", "") for _, m in listener.messages):
            assert time.monotonic() < deadline, listener.messages
            time.sleep(0.1)

        # pings every 0.2 s from the event loop; block the loop for 2 s: the pings stop
        def pings() -> list[float]:
            return [t for t, m in listener.messages if m.get("WATCHDOG") == "1"]

        time.sleep(1.0)
        t0 = time.monotonic()
        r = d.api("POST", "/v1/debug/stall", {"seconds": 2.0})
        assert r.status_code == 200, r.text
        time.sleep(1.0)
        gaps = [(b - a, a) for a, b in zip(pings(), pings()[1:], strict=False)]
        quiet = [g for g, a in gaps if a >= t0 - 0.5]
        assert max(quiet) > 1.8, gaps  # the stall: no ping for ~2 s
        normal = [g for g, a in gaps if a < t0 - 0.5 and a > t_ready]
        assert normal and max(normal) < 0.6, normal  # while healthy, well inside WATCHDOG_USEC
        assert pings()[-1] > t0 + 2.0  # and they resume afterwards

        assert d.stop() == 0
        t_stop, stopping = listener.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1" and "stopping" in stopping["STATUS"]
        assert t_ready < t_stop
        keys = [k for _, m in listener.messages for k in m if k in ("READY", "STOPPING")]
        assert keys == ["READY", "STOPPING"]
    finally:
        d.stop(check=False)
        listener.close()


WRITER = r"""
import hashlib, os, sys
d = sys.argv[1]
i = 0
while True:
    data = os.urandom(4096 * (1 + i % 50))
    name = os.path.join(d, f"f{i:05d}")
    try:
        fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        sys.exit(0)  # the daemon is gone
    print(name, hashlib.sha256(data).hexdigest(), flush=True)
    i += 1
"""


def test_kill9_during_writes_then_restart_recovers(world_dir: Path) -> None:
    d = Daemon(world_dir).start()
    vf = d.vfolder()
    native = native_of(d, vf)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(vf)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    done = []
    for line in writer.stdout:
        done.append(line.split())
        if len(done) == 150:
            break
    d.crash()  # mid-workload
    done += [line.split() for line in writer.stdout]
    assert writer.wait(30) == 0
    with pytest.raises(OSError) as exc:
        os.listdir(d.mnt)
    assert exc.value.errno == 107  # ENOTCONN: the dead mount is still there

    d.start()  # same config: clears the stale mount and mounts again
    log = d.log()
    assert "stale mount" in log and "not clean" in log
    for name, digest in done:  # everything fsynced before the crash is intact
        assert hashlib.sha256(Path(name).read_bytes()).hexdigest() == digest, name
    deadline = time.monotonic() + 30
    while usage(d, vf) != du(native) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert usage(d, vf) == du(native)  # the rescan after the unclean stop
    (vf / "after").write_bytes(b"x" * 10000)
    assert usage(d, vf) == du(native)
    assert d.stop() == 0
    d.start()  # the recount finished before that clean stop: this start trusts the usage
    assert d.log().count("not clean") == 1 and usage(d, vf) == du(native)
    assert d.stop() == 0


def test_sigterm_unmounts_and_detaches_lazily_when_busy(world_dir: Path) -> None:
    d = Daemon(world_dir).start()
    vf = d.vfolder()
    (vf / "kept").write_text("data")
    assert d.stop() == 0
    assert "unmounted " in d.log() and not os.path.ismount(d.mnt)
    d.start()
    assert (vf / "kept").read_text() == "data" and "not clean" not in d.log()
    # a process sitting in the mount keeps it busy: detach lazily, say so, still exit 0
    holder = subprocess.Popen(["sleep", "60"], cwd=vf)
    try:
        time.sleep(0.2)
        assert d.stop() == 0
        assert "is busy" in d.log() and "detached it lazily" in d.log()
        assert not os.path.ismount(d.mnt)
    finally:
        holder.kill()
        holder.wait()


def test_sighup_adds_removes_and_refuses_broken_config(world_dir: Path) -> None:
    hosts = {"local": {"path": str(world_dir / "n-local")}, "b": {"path": str(world_dir / "n-b")}}
    d = Daemon(world_dir, hosts=hosts).start()
    d.allowed_errors = ["reload refused"]
    vf_local = d.vfolder()
    vf_b = d.vfolder("b")
    (vf_b / "keep").write_bytes(b"k" * 50000)
    assert (
        d.api("GET", f"/v1/hosts/b/vfolders/{vf_b.name}").json()["usage_bytes"]
        == du(world_dir / "n-b" / vf_b.name)[0]
    )
    holder = subprocess.Popen(["sleep", "60"], cwd=vf_local)  # the mount stays in use throughout
    # and a process keeps b's file open while b is removed and added back
    holder_b = subprocess.Popen(["sleep", "60"], cwd=vf_b, stdin=open(vf_b / "keep", "rb"))
    mount_id = _mount_id(d.mnt)

    def reload(expect: str) -> None:
        before = d.log().count(expect)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while d.log().count(expect) == before:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)

    try:
        # remove b, add c, change local's op_timeout
        del d.hosts["b"]
        d.hosts["c"] = {"path": str(world_dir / "n-c")}
        (world_dir / "n-c").mkdir()
        d.hosts["local"]["op_timeout"] = 12.0
        d.write_config()
        reload("configuration reloaded")
        assert sorted(os.listdir(d.mnt)) == ["c", "local"]
        assert not (d.mnt / "b").exists() and not vf_b.exists()
        assert [h["name"] for h in d.api("GET", "/v1/hosts").json()] == ["local", "c"]
        assert "host b removed" in d.log() and "host c added" in d.log()
        assert "host local: op_timeout 12.0s" in d.log()
        vf_c = d.vfolder("c")
        (vf_c / "new").write_text("on c")
        assert (world_dir / "n-c" / vf_c.name / "new").read_text() == "on c"
        assert (vf_local / ".").exists() and _mount_id(d.mnt) == mount_id  # never unmounted

        # a broken file: refused, logged with the reason, everything keeps running
        d.config.write_text(d.config.read_text() + "\n[hosts.bad\n")
        reload("reload refused")
        line = [x for x in d.log().splitlines() if "reload refused" in x][-1]
        assert str(d.config) in line and "not valid TOML" in line
        assert sorted(os.listdir(d.mnt)) == ["c", "local"]
        # and one naming a missing directory
        d.hosts["bad"] = {"path": str(world_dir / "missing")}
        d.write_config()
        reload("reload refused")
        assert (
            "hosts.bad.path" in d.log().splitlines()[-1]
            or "hosts.bad.path" in [x for x in d.log().splitlines() if "reload refused" in x][-1]
        )
        assert sorted(os.listdir(d.mnt)) == ["c", "local"]
        del d.hosts["bad"]

        # b back: its vfolder returns from the store with its data and usage
        d.hosts["b"] = {"path": str(world_dir / "n-b")}
        d.write_config()
        reload("host b added")
        assert sorted(os.listdir(d.mnt)) == ["b", "c", "local"]
        assert (vf_b / "keep").read_bytes() == b"k" * 50000  # not the removed host's stale node
        (vf_b / "keep2").write_bytes(b"2")
        assert (world_dir / "n-b" / vf_b.name / "keep2").read_bytes() == b"2"
        deadline = time.monotonic() + 15
        native_b = world_dir / "n-b" / vf_b.name
        while (
            d.api("GET", f"/v1/hosts/b/vfolders/{vf_b.name}").json()["usage_bytes"]
            != du(native_b)[0]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)

        # b moves (its path changes): re-attached, vfolders followed to the new place
        os.rename(world_dir / "n-b", world_dir / "n-b2")
        d.hosts["b"] = {"path": str(world_dir / "n-b2")}
        d.write_config()
        reload("host b re-attached")
        assert (vf_b / "keep").read_bytes() == b"k" * 50000
        info = d.api("GET", f"/v1/hosts/b/vfolders/{vf_b.name}").json()
        assert info["native_path"] == str(world_dir / "n-b2" / vf_b.name)
        assert _mount_id(d.mnt) == mount_id
    finally:
        for p in (holder, holder_b):
            p.kill()
            p.wait()
    assert d.stop() == 0


def _mount_id(path: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return fields[0]
    raise AssertionError(f"{path} not mounted")


def test_json_logs_carry_fields_and_no_per_request_lines(world_dir: Path) -> None:
    d = Daemon(world_dir, daemon_opts={"log_format": "json"}).start()
    vf = d.vfolder()
    for i in range(50):
        (vf / f"f{i}").write_text("x")
        os.unlink(vf / f"f{i}")
    assert d.stop() == 0
    lines = d.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    created = [r for r in records if "created" in r["msg"]]
    assert created and created[0]["host"] == "local" and created[0]["vfolder"] == vf.name
    assert len(records) < 30, lines  # 100 requests did not add a line each
    assert all(r["level"] != "debug" for r in records)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if not Path("/usr/bin/systemd-analyze").exists():
        pytest.skip("systemd-analyze not installed")
    unit = (Path(__file__).parent.parent / "systemd" / "vfusefs.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=on-failure" in unit
    # the shipped unit runs /usr/local/bin/vfusefs (make install); verify it against this venv's
    exe = str(Path(sys.executable).parent / "vfusefs")
    (tmp_path / "vfusefs.service").write_text(unit.replace("/usr/local/bin/vfusefs", exe))
    r = run("systemd-analyze", "verify", str(tmp_path / "vfusefs.service"), check=False)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "vfusefs.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_count_what_was_done(world_dir: Path) -> None:
    port = _free_port()
    d = Daemon(world_dir, daemon_opts={"metrics_listen": f"127.0.0.1:{port}"}).start()
    vf = d.vfolder(
        grants=[{"principal": "*", "mode": "rwd"}, {"principal": "uid:1000", "mode": "ro"}]
    )
    os.chmod(vf, 0o777)  # mode bits let uid 1000 try: the ro grant is what refuses it
    for i in range(7):
        os.mkdir(vf / f"d{i}")
    for i in range(3):
        os.rmdir(vf / f"d{i}")
    run("dd", "if=/dev/urandom", f"of={vf}/big", "bs=1M", "count=3", "conv=fsync")
    assert len((vf / "big").read_bytes()) == 3 << 20
    as_1000 = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]
    for i in range(5):
        r = run(*as_1000, "touch", f"{vf}/no{i}", check=False)
        assert r.returncode == 1 and "Read-only file system" in r.stderr
    info = d.api("PATCH", f"/v1/hosts/local/vfolders/{vf.name}", {"quota_bytes": "5M"}).json()
    r = run("dd", "if=/dev/zero", f"of={vf}/over", "bs=1M", "count=4", check=False)
    assert r.returncode == 1 and "Disk quota exceeded" in r.stderr

    m = scrape(port)

    def get(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    assert get("vfusefs_ops_total", host="local", op="mkdir", result="ok") == 7
    assert get("vfusefs_ops_total", host="local", op="rmdir", result="ok") == 3
    assert get("vfusefs_ops_total", host="local", op="create", result="EROFS") == 5
    assert get("vfusefs_op_seconds_count", host="local", op="mkdir") == 7
    assert get("vfusefs_op_seconds_bucket", host="local", op="mkdir", le="+Inf") == 7
    assert get("vfusefs_denied_total", host="local", reason="read_only") == 5
    edquot = sum(
        v
        for (name, labels), v in m.items()
        if name == "vfusefs_ops_total" and ("result", "EDQUOT") in labels
    )
    assert edquot >= 1 and get("vfusefs_denied_total", host="local", reason="quota") == edquot
    assert get("vfusefs_bytes_read_total", host="local") == 3 << 20
    written = get("vfusefs_bytes_written_total", host="local")
    over = (vf / "over").stat().st_size
    assert written == (3 << 20) + over
    info = d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()
    assert get("vfusefs_vfolder_usage_bytes", host="local", vfolder=vf.name) == info["usage_bytes"]
    assert get("vfusefs_vfolder_quota_bytes", host="local", vfolder=vf.name) == 5 << 20
    assert get("vfusefs_host_up", host="local") == 1
    assert get("process_resident_memory_bytes") > 0

    # per-vfolder series can be switched off live for very large installations
    d.daemon_opts["metrics_vfolders"] = False
    d.write_config()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while any(name == "vfusefs_vfolder_usage_bytes" for name, _ in scrape(port)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert d.stop() == 0


def test_doctor_says_what_to_fix(world_dir: Path) -> None:
    d = Daemon(world_dir)
    r = d.cli("doctor", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[ok  ] /dev/fuse" in r.stdout and "[ok  ] mountpoint" in r.stdout
    assert "[ok  ] host local (vfs" in r.stdout and "daemon: not running" in r.stdout
    d.start()
    d.vfolder()
    r = d.cli("doctor", "--json", check=False)
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    assert r.returncode == 0 and checks["daemon"]["detail"].startswith("running")
    assert checks[f"mountpoint {d.mnt}"]["detail"] == "served by a running vfusefs daemon"
    assert "1 vfolder(s)" in checks[f"store {d.state}/state.db"]["detail"]
    # the same store spelled sqlite:////abs (SQLAlchemy's form, and what the demo once wrote)
    text = d.config.read_text()
    d.config.write_text(text.replace(f'url = "sqlite://{d.state}', f'url = "sqlite:///{d.state}'))
    checks = {c["name"]: c for c in json.loads(d.cli("doctor", "--json", check=False).stdout)}
    assert checks[f"store {d.state}/state.db"]["level"] == "ok", checks
    assert "1 vfolder(s)" in checks[f"store {d.state}/state.db"]["detail"]
    d.config.write_text(text)
    # a crashed daemon and a host whose storage is gone
    d.crash()
    time.sleep(1.2)  # past entry_timeout: the mountpoint's cached attributes are gone too
    d.hosts["gone"] = {"path": str(world_dir / "gone")}
    d.write_config()
    r = d.cli("doctor", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"[FAIL] mountpoint {d.mnt}: stale vfusefs mount" in r.stdout, r.stdout
    assert f"fix: umount -l {d.mnt}" in r.stdout
    assert "[FAIL] host gone (vfs" in r.stdout and "No such file or directory" in r.stdout
    # a broken file: one failing line naming the key
    d.config.write_text("[daemon]\nmountpoint = 3\n")
    r = d.cli("doctor", check=False)
    assert r.returncode == 1 and "[FAIL] config:" in r.stdout and "daemon.mountpoint" in r.stdout
    subprocess.run(["umount", "-l", str(d.mnt)], check=False)


def test_examples_run_as_written(world_dir: Path) -> None:
    from vfusefs import config

    repo = Path(__file__).parent.parent
    cfg = config.parse((repo / "examples" / "vfs.toml").read_text(), "vfs.toml", check_paths=False)
    assert set(cfg.hosts) == {"local", "nfs1"} and cfg.hosts["nfs1"].layout == "backendai"
    cfg = config.parse((repo / "examples" / "btrfs.toml").read_text(), "btrfs", check_paths=False)
    assert cfg.hosts["fast"].backend == "btrfs"
    cfg = config.parse(
        (repo / "examples" / "many-nodes.toml").read_text(), "many-nodes", check_paths=False
    )
    assert cfg.store_url.startswith("redis://") and cfg.lease_floor == 1 << 20
    cfg = config.parse((repo / "examples" / "cephfs.toml").read_text(), "cephfs", check_paths=False)
    assert cfg.hosts["ceph"].backend == "cephfs" and cfg.hosts["ceph"].layout == "backendai"
    cfg = config.parse((repo / "examples" / "xfs.toml").read_text(), "xfs", check_paths=False)
    assert cfg.hosts["scratch"].backend == "xfs"
    for example in sorted((repo / "examples").glob("*.toml")):  # every one is checked here
        assert example.name in (
            "vfs.toml",
            "btrfs.toml",
            "cephfs.toml",
            "xfs.toml",
            "many-nodes.toml",
            "demo.toml",
        )

    cgroot = Path("/sys/fs/cgroup/unified")
    if not (cgroot / "cgroup.procs").exists() and not Path("/sys/fs/cgroup/cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy")
    d = Daemon(world_dir).start()
    vf = d.vfolder(grants=[])  # nobody but admins
    (vf / "data").write_text("shared\n")
    script = str(repo / "examples" / "agent-bind-mount.sh")
    env = {
        **os.environ,
        "VFUSEFS_CONFIG": str(d.config),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }

    def agent(mode: str, cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, "local", vf.name, mode, "sh", "-c", cmd],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = agent("ro", "pwd; cat data; cat /proc/self/cgroup; touch new")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.splitlines()[:2] == [f"/home/work/{vf.name}", "shared"]
    assert "0::/docker/agent-demo-" in r.stdout and "Read-only file system" in r.stderr
    r = agent("rw", "echo hi > new && cat new && rm new")
    assert r.returncode == 1 and "hi" in r.stdout and "Operation not permitted" in r.stderr
    r = agent("rwd", "rm new && echo gone")
    assert r.returncode == 0 and r.stdout == "gone\n", r.stderr
    # the script revokes its grant when the container ends
    assert d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["grants"] == []
    assert d.stop() == 0


def test_fewer_requests_large_reads_and_no_flush_on_read_only_close(world_dir: Path) -> None:
    port = _free_port()
    d = Daemon(world_dir, daemon_opts={"metrics_listen": f"127.0.0.1:{port}"}).start()
    vf = d.vfolder()
    data = os.urandom(16 << 20)
    (vf / "f").write_bytes(data)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    before = scrape(port).get(
        ("vfusefs_ops_total", (("host", "local"), ("op", "read"), ("result", "ok"))), 0.0
    )
    assert hashlib.sha256((vf / "f").read_bytes()).digest() == hashlib.sha256(data).digest()
    reads = (
        scrape(port)[("vfusefs_ops_total", (("host", "local"), ("op", "read"), ("result", "ok")))]
        - before
    )
    assert reads <= 16 + 4, reads  # 1 MiB each (128 KiB, 128 requests, without read_ahead_kb)

    # closing a file opened read-only sends no FLUSH (FOPEN_NOFLUSH); one written to does
    def flushes() -> float:
        return scrape(port).get(
            ("vfusefs_ops_total", (("host", "local"), ("op", "flush"), ("result", "ok"))), 0.0
        )

    before = flushes()
    for _ in range(5):
        (vf / "f").read_bytes()
    assert flushes() == before
    (vf / "g").write_bytes(b"x")
    assert flushes() == before + 1
    assert d.api("GET", "/v1/hosts/local").json()["fs_type"] != "?"
    assert d.stop() == 0


def test_busy_metrics_port_is_one_line_and_nothing_mounted(world_dir: Path) -> None:
    from conftest import VFUSEFS

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = Daemon(world_dir, daemon_opts={"metrics_listen": f"127.0.0.1:{port}"})
        r = subprocess.run(
            [VFUSEFS, "serve", "--config", str(d.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert (
        len(errors) == 1 and f"metrics_listen 127.0.0.1:{port}: Address already in use" in errors[0]
    )
    assert not os.path.ismount(d.mnt)
    # and when it is free, hypercorn has nothing to complain about (ASGI lifespan answered)
    d.start()
    assert d.stop() == 0
    assert "Lifespan" not in d.log()


@pytest.mark.parametrize(
    "opts,expect",
    [
        (
            {"control_socket": "/proc/nope/control.sock"},
            "control socket /proc/nope/control.sock: cannot",
        ),
        ({"mountpoint": "/proc/nope/mnt"}, "mountpoint /proc/nope/mnt: cannot create it"),
        ({"mountpoint": "/etc/hostname"}, "mountpoint /etc/hostname: not a directory"),
    ],
)
def test_unusable_places_fail_start_in_one_line(world_dir: Path, opts: dict, expect: str) -> None:
    from conftest import VFUSEFS

    d = Daemon(world_dir, daemon_opts=opts)
    r = subprocess.run(
        [VFUSEFS, "serve", "--config", str(d.config)], capture_output=True, text=True, timeout=60
    )
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and expect in errors[0], r.stderr


def test_spinning_stops_when_requests_stop(world_dir: Path) -> None:
    """Workers spin for their next call and the loop polls /dev/fuse while requests flow
    (README, Benchmark): once they stop, the daemon must go back to sleeping, using no CPU."""
    d = Daemon(world_dir, daemon_opts={"busy_poll_us": 1000}).start()
    try:
        vf = d.vfolder(grants=[{"principal": "*", "mode": "rwd"}])
        for i in range(300):  # requests back to back: the spinning paths are taken
            (vf / f"f{i}").write_text("x")
            os.stat(vf / f"f{i}")
        time.sleep(0.5)
        assert d.proc is not None

        def cpu_seconds() -> float:
            fields = Path(f"/proc/{d.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = cpu_seconds()
        time.sleep(3)
        assert cpu_seconds() - before < 0.15  # 5% of one CPU (the periodic tasks use some)
    finally:
        d.stop()


def test_make_install_stages_a_package_with_destdir(tmp_path: Path) -> None:
    """make install DESTDIR=...: the daemon's venv (running from PREFIX once unpacked), the
    command link, the unit and the example config, staged; no packages installed, no systemctl."""
    root = tmp_path / "pkg"
    r = subprocess.run(
        ["make", "-C", str(Path(__file__).parent.parent), "install", f"DESTDIR={root}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "apt-get" not in r.stdout and "daemon-reload" not in r.stdout
    assert os.readlink(root / "usr/local/bin/vfusefs") == "/opt/vfusefs/bin/vfusefs"
    assert (root / "etc/vfusefs/vfusefs.toml").read_text() == (
        Path(__file__).parent.parent / "examples/vfs.toml"
    ).read_text()
    assert (
        "ExecStart=/usr/local/bin/vfusefs"
        in (root / "etc/systemd/system/vfusefs.service").read_text()
    )
    assert (root / "opt/vfusefs/bin/vfusefs").read_text().startswith("#!/opt/vfusefs/bin/python")
    staged = subprocess.run(
        ["grep", "-rlI", str(root), str(root / "opt/vfusefs/bin")], capture_output=True, text=True
    )
    assert staged.stdout == ""  # nothing points into the staging directory
    out = subprocess.run(
        [str(root / "opt/vfusefs/bin/python"), "-m", "vfusefs", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("vfusefs, version ")
    page = root / "usr/local/share/man/man1/vfusefs.1"
    assert page.read_text().startswith(".TH VFUSEFS 1")


def test_doctor_checks_a_redis_store(world_dir: Path, redis_server: RedisServer) -> None:
    redis_server.flush()
    d = Daemon(world_dir, store_url=redis_server.url).start()
    try:
        d.vfolder()
        checks = {c["name"]: c for c in json.loads(d.cli("doctor", "--json", check=False).stdout)}
        store = checks[f"store {redis_server.url}"]
        assert store["level"] == "ok" and store["detail"] == "reachable, 1 vfolder(s)"
    finally:
        assert d.stop() == 0
    d.store_url = f"unix://{world_dir}/nobody-here.sock"
    d.write_config()
    r = d.cli("doctor", check=False)
    assert r.returncode == 1 and f"[FAIL] store {d.store_url}: cannot reach it" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
