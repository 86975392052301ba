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

from conftest import Daemon, run
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
            except socket.timeout:
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
    d.env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "600000",
             "VFUSEFS_TEST_HOOKS": "1"}
    d.allowed_errors = []
    try:
        d.start()
        d.vfolder()
        t_ready, ready = listener.wait_for("READY")
        assert ready["READY"] == "1" and ready["MAINPID"] == str(d.proc.pid)  # type: ignore[union-attr]
        assert "serving 0 vfolder(s) of 1 host(s)" in ready["STATUS"] and "local ok" in ready["STATUS"]
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
        gaps = [(b - a, a) for a, b in zip(pings(), pings()[1:])]
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
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(vf)], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout is not None
    done = []
    for line in writer.stdout:
        done.append(line.split())
        if len(done) == 150:
            break
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)  # mid-workload
    d.proc.wait()
    done += [line.split() for line in writer.stdout]
    assert writer.wait(30) == 0
    with pytest.raises(OSError) as exc:
        os.listdir(d.mnt)
    assert exc.value.errno == 107  # ENOTCONN: the dead mount is still there
    d.proc = None
    d.logf.close()

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
    hosts = {"local": {"path": str(world_dir / "n-local")},
             "b": {"path": str(world_dir / "n-b")}}
    d = Daemon(world_dir, hosts=hosts).start()
    d.allowed_errors = ["reload refused"]
    vf_local = d.vfolder()
    vf_b = d.vfolder("b")
    (vf_b / "keep").write_bytes(b"k" * 50000)
    b_usage = d.api("GET", f"/v1/hosts/b/vfolders/{vf_b.name}").json()["usage_bytes"]
    holder = subprocess.Popen(["sleep", "60"], cwd=vf_local)  # the mount stays in use throughout
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
        assert "hosts.bad.path" in d.log().splitlines()[-1] or \
            "hosts.bad.path" in [x for x in d.log().splitlines() if "reload refused" in x][-1]
        assert sorted(os.listdir(d.mnt)) == ["c", "local"]
        del d.hosts["bad"]

        # b back: its vfolder returns from the store with its data and usage
        d.hosts["b"] = {"path": str(world_dir / "n-b")}
        d.write_config()
        reload("host b added")
        assert sorted(os.listdir(d.mnt)) == ["b", "c", "local"]
        assert (vf_b / "keep").read_bytes() == b"k" * 50000
        deadline = time.monotonic() + 15
        while d.api("GET", f"/v1/hosts/b/vfolders/{vf_b.name}").json()["usage_bytes"] != b_usage:
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
        holder.kill()
        holder.wait()
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
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "vfusefs.service" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
