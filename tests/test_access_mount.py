"""SPEC §3 on a real mount, with real identities.

Containers are imitated the way an agent makes them: a real cgroup-v2 group (under
/sys/fs/cgroup/unified/docker/, a confined prefix) holding a process with a private mount
namespace in which the vfolder is bind-mounted at /home/work/<name>.  Other uids and groups come
from setpriv.  Every check runs ordinary tools (touch, dd, mv, rm, rmdir, ln, setfattr,
truncate...) and reads the errno from what they print.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon

pytestmark = pytest.mark.mount

CGROOT = Path("/sys/fs/cgroup/unified")
MESSAGES = {
    "Permission denied": "EACCES",
    "Read-only file system": "EROFS",
    "Operation not permitted": "EPERM",
    "No such file or directory": "ENOENT",
    "Invalid cross-device link": "EXDEV",
}

# (label, shell command run inside the vfolder, fixtures it consumes)
OPS = [
    ("ls", "ls -l ."),
    ("cat", "cat f"),
    ("getfattr", "getfattr -n user.vfusefs.mode ."),
    ("touch", "touch new"),
    ("dd", "dd if=/dev/zero of=f bs=1k count=1 conv=notrunc status=none"),
    ("truncate", "truncate -s 10 f"),
    ("mkdir", "mkdir nd"),
    ("ln-s", "ln -s f sl"),
    ("ln", "ln f hl"),
    ("setfattr", "setfattr -n user.k -v v f"),
    ("mv", "mv f2 f3"),
    ("mv-over", "mv -f f4 victim"),
    ("rm", "rm -f victim2"),
    ("rmdir", "rmdir dd"),
]
READS = {"ls", "cat", "getfattr"}
DELETES = {"mv-over", "rm", "rmdir"}


def expected(mode: str | None, label: str) -> str:
    if mode is None:
        return "EACCES"
    if label in READS:
        return "ok"
    if mode == "ro":
        return "EROFS"
    if mode == "rw" and label in DELETES:
        return "EPERM"
    return "ok"


def classify(r: subprocess.CompletedProcess[str]) -> str:
    if r.returncode == 0:
        return "ok"
    for text, name in MESSAGES.items():
        if text in r.stderr:
            return name
    return f"rc={r.returncode}: {r.stderr.strip()}"


def populate(path: Path) -> None:
    for name in ("f", "f2", "f4", "victim", "victim2"):
        (path / name).write_text(name)
    (path / "dd").mkdir()
    os.chmod(path, 0o777)


class Container:
    """A cgroup under /docker plus a private mount namespace with the vfolder at /home/work."""

    def __init__(self) -> None:
        (CGROOT / "docker").mkdir(exist_ok=True)
        self.name = f"vft-{uuid.uuid4().hex[:8]}"
        self.cgroup = f"/docker/{self.name}"
        (CGROOT / "docker" / self.name).mkdir()

    def wrap(
        self, vf: Path | None, inner: list[str], setpriv: list[str] | None = None
    ) -> list[str]:
        """As an agent does it: bind-mount the vfolder as host root in a new mount namespace,
        then move into the container's cgroup and run the command there."""
        mount = (
            f"mount -t tmpfs tmpfs /home && mkdir -p /home/work/{vf.name} && "
            f"mount --bind {vf} /home/work/{vf.name} && cd /home/work/{vf.name} && "
            if vf is not None
            else ""
        )
        cmd = " ".join(shlex.quote(a) for a in (setpriv or []) + inner)
        script = f"{mount}echo $$ > {CGROOT}/docker/{self.name}/cgroup.procs && exec {cmd}"
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]

    def sh(
        self, vf: Path | None, script: str, setpriv: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.wrap(vf, ["sh", "-c", script], setpriv), capture_output=True, text=True, timeout=60
        )

    def close(self) -> None:
        path = CGROOT / "docker" / self.name
        for _ in range(50):
            try:
                path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


@pytest.fixture
def container() -> Iterator[Container]:
    if not (CGROOT / "cgroup.procs").exists():
        pytest.skip(f"no cgroup v2 hierarchy at {CGROOT}")
    c = Container()
    yield c
    c.close()


def grant(d: Daemon, vf: Path, principal: str, mode: str | None) -> None:
    from urllib.parse import quote

    path = f"/v1/hosts/local/vfolders/{vf.name}/grants/{quote(principal, safe='')}"
    r = d.api("PUT", path, {"mode": mode}) if mode else d.api("DELETE", path)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("mode", ["ro", "rw", "rwd", "wd", None])
def test_errno_table_in_a_container(daemon: Daemon, container: Container, mode: str | None) -> None:
    grants = [{"principal": f"cgroup:{container.cgroup}", "mode": mode}] if mode else []
    grants.append({"principal": "uid:12345", "mode": "rwd"})  # a grant that matches nobody here
    vf = daemon.vfolder(grants=grants)
    populate(vf)
    eff = {"wd": "rwd"}.get(mode or "", mode)
    got = {label: classify(container.sh(vf, cmd)) for label, cmd in OPS}
    want = {label: expected(eff, label) for label, _ in OPS}
    assert got == want
    if eff is not None:
        r = container.sh(vf, "getfattr --only-values -n user.vfusefs.mode .")
        assert r.stdout == eff
    # root in a container is never an admin: it cannot see vfolders it has no grant on
    other = daemon.vfolder(grants=[])
    r = container.sh(None, f"ls {daemon.mnt}/local")
    assert other.name not in r.stdout
    assert (vf.name in r.stdout) == (eff is not None)
    r = container.sh(None, f"stat {other}")
    assert "No such file or directory" in r.stderr
    # the host admin sees everything and is reported as admin
    assert sorted(os.listdir(daemon.mnt / "local")) == sorted([vf.name, other.name])
    assert os.getxattr(other, "user.vfusefs.mode") == b"admin"


def test_uids_and_supplementary_groups(daemon: Daemon) -> None:
    vf = daemon.vfolder(
        grants=[
            {"principal": "uid:1000", "mode": "ro"},
            {"principal": "gid:5000", "mode": "rw"},
            {"principal": "uid:1002", "mode": "rwd"},
        ]
    )
    populate(vf)

    def as_user(uid: int, groups: str, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                f"--groups={groups}" if groups else "--clear-groups",
                "sh",
                "-c",
                f"cd {vf} && {script}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert classify(as_user(1000, "", "touch a")) == "EROFS"
    assert classify(as_user(1000, "", "cat f")) == "ok"
    assert classify(as_user(1001, "5000", "touch b")) == "ok"  # via the supplementary group
    assert classify(as_user(1001, "5000", "rm -f b")) == "EPERM"
    assert classify(as_user(1000, "5000", "touch c")) == "EROFS"  # uid beats gid
    assert classify(as_user(1002, "", "rm -f victim")) == "ok"
    # no grant: the vfolder cannot even be looked up in its host dir
    r = subprocess.run(
        ["setpriv", "--reuid=1003", "--regid=1003", "--clear-groups", "cat", str(vf / "f")],
        capture_output=True,
        text=True,
    )
    assert classify(r) == "ENOENT"
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=1003",
            "--regid=1003",
            "--clear-groups",
            "ls",
            str(daemon.mnt / "local"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == ""
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=1001",
            "--regid=1001",
            "--groups=5000",
            "getfattr",
            "--only-values",
            "-n",
            "user.vfusefs.mode",
            str(vf),
        ],
        capture_output=True,
        text=True,
    )
    assert r.stdout == "rw"


PROBE = r"""
import errno, os, sys
fd = os.open("held", os.O_RDWR | os.O_CREAT, 0o644)
def attempt(fn):
    try:
        fn(); return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "write":
        print(attempt(lambda: os.pwrite(fd, b"x", 0)), flush=True)
    elif cmd == "read":
        print(attempt(lambda: os.pread(fd, 1, 0)), flush=True)
    elif cmd == "stat-new":
        print(attempt(lambda: os.stat("f")), flush=True)
    elif cmd == "unlink":
        print(attempt(lambda: os.unlink("victim")), flush=True)
"""


def test_live_grant_changes_reach_open_files(daemon: Daemon, container: Container) -> None:
    vf = daemon.vfolder(grants=[{"principal": f"cgroup:{container.cgroup}", "mode": "rw"}])
    populate(vf)
    proc = subprocess.Popen(
        container.wrap(vf, ["/usr/bin/python3", "-c", PROBE]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(cmd: str) -> str:
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        assert ask("write") == "ok" and ask("unlink") == "EPERM"
        grant(daemon, vf, f"cgroup:{container.cgroup}", "ro")
        assert ask("write") == "EROFS"  # the next write on the already open fd
        assert ask("read") == "ok"
        grant(daemon, vf, f"cgroup:{container.cgroup}", "rwd")
        assert ask("write") == "ok" and ask("unlink") == "ok"
        grant(daemon, vf, f"cgroup:{container.cgroup}", None)
        assert ask("read") == "EACCES" and ask("write") == "EACCES"
        assert ask("stat-new") == "EACCES"
        grant(daemon, vf, "*", "ro")  # a wider grant brings it back, live
        assert ask("read") == "ok" and ask("write") == "EROFS"
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_grant_api_and_cli(daemon: Daemon) -> None:
    vf = daemon.vfolder(grants=[])
    r = daemon.api(
        "PUT", f"/v1/hosts/local/vfolders/{vf.name}/grants/cgroup%3A%2Fdocker%2Fabc", {"mode": "wd"}
    )
    assert r.status_code == 200
    assert {"principal": "cgroup:/docker/abc", "mode": "rwd"} in r.json()["grants"]
    for principal, body, code in (
        ("uid%3Aabc", {"mode": "rw"}, 400),
        ("uid%3A1", {"mode": "all"}, 400),
        ("uid%3A1", {}, 400),
        ("uid%3A1", {"mode": "rw", "x": 1}, 400),
    ):
        r = daemon.api("PUT", f"/v1/hosts/local/vfolders/{vf.name}/grants/{principal}", body)
        assert r.status_code == code and set(r.json()) == {"error", "message"}, r.text
    assert (
        daemon.api("DELETE", f"/v1/hosts/local/vfolders/{vf.name}/grants/uid%3A9").status_code
        == 404
    )
    daemon.cli("grant", "local", vf.name, "gid:100", "ro")
    info = json.loads(daemon.cli("vfolder", "info", "local", vf.name, "--json").stdout)
    assert {"principal": "gid:100", "mode": "ro"} in info["grants"]
    daemon.cli("revoke", "local", vf.name, "gid:100")
    info = json.loads(daemon.cli("vfolder", "info", "local", vf.name, "--json").stdout)
    assert {"principal": "gid:100", "mode": "ro"} not in info["grants"]
    # a bad principal or mode is a usage error (2); a grant that is not there, a failure (1)
    for args, code in (
        (("grant", "local", vf.name, "bogus", "rw"), 2),
        (("grant", "local", vf.name, "uid:1", "rx"), 2),
        (("revoke", "local", vf.name, "uid:77"), 1),
    ):
        r = daemon.cli(*args, check=False)
        assert (
            r.returncode == code and r.stderr.count("\n") == 1 and r.stderr.startswith("vfusefs: ")
        )
    # grants survive a restart
    daemon.stop()
    daemon.start()
    info = json.loads(daemon.cli("vfolder", "info", "local", vf.name, "--json").stdout)
    assert {"principal": "cgroup:/docker/abc", "mode": "rwd"} in info["grants"]


def test_cross_vfolder_link_and_rename_are_exdev(daemon: Daemon, world_dir: Path) -> None:
    a = daemon.vfolder()
    b = daemon.vfolder()
    (a / "f").write_text("x")
    (a / "d").mkdir()
    for cmd in (
        ["ln", str(a / "f"), str(b / "g")],
        ["mv", "--no-copy", str(a / "f"), str(b / "g")],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if "unrecognized option" in r.stderr:
            continue
        assert classify(r) == "EXDEV", r.stderr
    with pytest.raises(OSError) as exc:
        os.rename(a / "d", b / "d")
    assert exc.value.errno == errno.EXDEV
    with pytest.raises(OSError) as exc:
        os.link(a / "f", b / "g")
    assert exc.value.errno == errno.EXDEV
    with pytest.raises(OSError) as exc:
        os.link("/etc/hostname", a / "h")
    assert exc.value.errno == errno.EXDEV
    # O_PATH + linkat(AT_EMPTY_PATH) out of the mount is a different filesystem too
    fd = os.open(a / "f", os.O_PATH)
    try:
        with pytest.raises(OSError) as exc:
            os.link(f"/proc/self/fd/{fd}", world_dir / "stolen", follow_symlinks=True)
        assert exc.value.errno == errno.EXDEV
    finally:
        os.close(fd)
    # ".." at a vfolder root is its host directory, not the native parent
    assert os.stat(a / "..").st_ino == os.stat(daemon.mnt / "local").st_ino
    assert sorted(os.listdir(a / "..")) == sorted([a.name, b.name])


def test_opath_reopen_is_checked(daemon: Daemon, container: Container) -> None:
    vf = daemon.vfolder(grants=[{"principal": f"cgroup:{container.cgroup}", "mode": "ro"}])
    populate(vf)
    script = (
        "import os, errno\nfd = os.open('f', os.O_PATH)\n"
        "try:\n    os.open('/proc/self/fd/%d' % fd, os.O_WRONLY); print('ok')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    )
    r = subprocess.run(
        container.wrap(vf, ["/usr/bin/python3", "-c", script]), capture_output=True, text=True
    )
    assert r.stdout.strip() == "EROFS"


def test_native_symlink_swaps_never_lead_outside(daemon: Daemon, world_dir: Path) -> None:
    """Race native renames and symlink swaps against creates through the mount.

    The planted symlinks are relative and would reach `outside` only if the daemon resolved
    them on the native side; the kernel resolves them in the mount, where they lead to the
    read-only host level.  Nothing may ever appear in `outside`.
    """
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    outside = native.parent / "outside"
    outside.mkdir()
    (native / "d").mkdir()
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            try:
                os.rename(native / "d", native / "d.real")
                os.symlink("../outside", native / "d")
                time.sleep(0.0005)
                os.unlink(native / "d")
                os.rename(native / "d.real", native / "d")
                time.sleep(0.002)
            except OSError:
                pass

    t = threading.Thread(target=swapper)
    t.start()
    made = 0
    try:
        # the kernel keeps what a lookup of d found for entry_timeout (1 s): a symlink caught
        # mid-swap fails every create for that long, so go on until some went through
        start = time.monotonic()
        i = 0
        while time.monotonic() < start + 4 or (made == 0 and time.monotonic() < start + 30):
            i += 1
            for path in (vf / "d" / f"x{i}", vf / "d" / f"sub{i}"):
                try:
                    if path.name.startswith("x"):
                        path.write_text("payload")
                    else:
                        path.mkdir()
                    made += 1
                except OSError:
                    pass
    finally:
        stop.set()
        t.join()
    assert made > 0
    assert list(outside.iterdir()) == [], "a create followed a native symlink out of the vfolder"
    shutil.rmtree(outside)
