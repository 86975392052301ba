"""The attack set's holes (issue 19), each replayed as a container or a client would try it.

Containers are cgroup-confined root in a private mount namespace with the vfolder bind-mounted
(`Container` from test_access_mount); host users come from setpriv; the native side is the
host's own view of the vfolder's directory.  Every test here failed before its fix.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import Daemon, renameat2, run
from test_access_mount import Container, classify, container, grant  # noqa: F401 (fixture)
from test_quota import du, native_of, usage, wait_usage_equals_du

pytestmark = pytest.mark.mount

RENAME_WHITEOUT = 4


# -- escapes and plants -------------------------------------------------------------------------
def test_native_hard_link_to_a_file_outside_is_refused(
    daemon: Daemon, container: Container, world_dir: Path
) -> None:
    elsewhere = world_dir / "elsewhere"
    elsewhere.mkdir()
    secret = elsewhere / "secret"
    secret.write_text("SECRET\n")
    secret.chmod(0o644)
    vf = daemon.vfolder()
    native = native_of(daemon, vf)
    os.link(secret, native / "hl")  # planted on the native side
    (native / "a").write_text("A\n")
    for script in (
        "cat hl",
        "echo x >> hl",
        "setfattr -n user.k -v v hl",
        "chmod 600 hl",
        "getfattr -d hl",
        "ln hl hl2",
        "truncate -s 0 hl",
    ):
        r = container.sh(vf, script)
        assert classify(r) == "EACCES", (script, r.stderr)
    assert secret.read_text() == "SECRET\n" and stat.S_IMODE(secret.stat().st_mode) == 0o644
    assert os.listxattr(secret) == [] and secret.stat().st_nlink == 2
    # links made through vfusefs, and native links inside the vfolder, keep working
    r = container.sh(vf, "ln a b && cat b && echo more >> b && cat a")
    assert r.returncode == 0 and r.stdout == "A\nA\nmore\n", r.stderr
    os.link(native / "a", native / "c")  # an admin's link on the native side, inside
    r = container.sh(vf, "cat c && chmod 640 c && ls -l hl")
    assert r.returncode == 0 and r.stdout.startswith("A\nmore\n"), r.stderr
    # the planted name itself may go (rwd): the outside file stays
    assert container.sh(vf, "rm hl").returncode == 0
    assert secret.read_text() == "SECRET\n" and secret.stat().st_nlink == 1
    # and once its outside name is gone, a file is the vfolder's alone
    os.link(native / "a", elsewhere / "alias")
    assert classify(container.sh(vf, "cat a")) == "EACCES"
    os.unlink(elsewhere / "alias")
    assert container.sh(vf, "cat a").returncode == 0


def test_confined_callers_cannot_plant_privilege(world_dir: Path, container: Container) -> None:
    d = Daemon(
        world_dir,
        hosts={
            "local": {"path": str(world_dir / "native")},
            "lab": {"path": str(world_dir / "lab"), "allow_privileged": True},
        },
    )
    d.start()
    try:
        vf = d.vfolder()
        native = native_of(d, vf)
        refused = {
            "char device": "mknod k c 1 11",
            "block device": "mknod b b 7 0",
            "setuid chmod": "cp /usr/bin/id id && chmod 4755 id",
            "setgid chmod": "cp /usr/bin/id id2 && chmod 2755 id2",
            "setuid create": "python3 -c \"import os; os.open('s', os.O_CREAT | os.O_WRONLY, 0o4755)\"",
            "capability": "touch cap && setfattr -n security.capability "
            "-v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= cap",
        }
        for label, script in refused.items():
            r = container.sh(vf, script)
            assert classify(r) == "EPERM", (label, r.stdout, r.stderr)
        for name in ("k", "b", "s"):
            assert not os.path.lexists(native / name)
        for name in ("id", "id2", "cap"):
            st = os.lstat(native / name)
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), name
        assert "security.capability" not in os.listxattr(native / "cap")
        # what plants nothing still works: FIFOs, set-group-ID directories, plain chmod
        r = container.sh(vf, "mkfifo p && mkdir g && chmod 2775 g && chmod 755 id")
        assert r.returncode == 0, r.stderr
        assert os.lstat(native / "g").st_mode & stat.S_ISGID
        # admins on the host may, and so may containers on a host that allows it
        os.mknod(vf / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.chmod(vf / "id", 0o4755)
        assert os.lstat(native / "id").st_mode & stat.S_ISUID
        lab = d.vfolder("lab")
        r = container.sh(lab, "mknod k c 1 3 && cp /usr/bin/id id && chmod 4755 id")
        assert r.returncode == 0, r.stderr
        assert stat.S_ISCHR(os.lstat(native_of_host(d, "lab", lab) / "k").st_mode)
    finally:
        assert d.stop() == 0


def native_of_host(d: Daemon, host: str, vf: Path) -> Path:
    return Path(d.api("GET", f"/v1/hosts/{host}/vfolders/{vf.name}").json()["native_path"])


# -- access -------------------------------------------------------------------------------------
SYNCER = r"""
import errno, os, sys
fd = os.open("held", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"x")
dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
print("ready", flush=True)
sys.stdin.readline()
def attempt(fn):
    try:
        fn(); return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
print(attempt(lambda: os.fsync(fd)), attempt(lambda: os.fdatasync(fd)),
      attempt(lambda: os.fsync(dfd)), attempt(lambda: os.close(fd)), flush=True)
"""


def test_fsync_and_close_after_a_revoke_fail(daemon: Daemon, container: Container) -> None:
    vf = daemon.vfolder(grants=[{"principal": f"cgroup:{container.cgroup}", "mode": "rw"}])
    os.chmod(vf, 0o777)
    p = subprocess.Popen(
        container.wrap(vf, [sys.executable, "-c", SYNCER]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "ready"
        grant(daemon, vf, f"cgroup:{container.cgroup}", None)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["EACCES"] * 4
    finally:
        p.kill()
        p.wait()


# -- quota --------------------------------------------------------------------------------------
def test_whiteout_renames_are_charged(daemon: Daemon) -> None:
    vf = daemon.vfolder(quota_inodes=5)
    native = native_of(daemon, vf)
    for i in range(4):
        (vf / f"f{i}").write_text("x")
    renameat2(vf / "f0", vf / "g0", RENAME_WHITEOUT)  # leaves a whiteout at f0: 5 inodes
    assert stat.S_ISCHR(os.lstat(native / "f0").st_mode)
    assert usage(daemon, vf)[1] == 5 == du(native)[1]
    with pytest.raises(OSError) as exc:
        renameat2(vf / "f1", vf / "g1", RENAME_WHITEOUT)
    assert exc.value.errno == errno.EDQUOT and (vf / "f1").exists()
    os.unlink(vf / "f0")  # the whiteout goes: its inode is refunded
    assert usage(daemon, vf) == du(native)
    renameat2(vf / "f1", vf / "g1", RENAME_WHITEOUT | 1)  # with NOREPLACE too
    assert usage(daemon, vf) == du(native)


def test_writes_into_holes_of_files_that_look_whole_stay_in_quota(daemon: Daemon) -> None:
    limit = 1 << 20
    vf = daemon.vfolder(quota_bytes=limit)
    native = native_of(daemon, vf)
    names = [f"h{i}" for i in range(40)]
    for name in names:  # 4 KiB of hole, with the xattr's block making st_blocks cover it
        fd = os.open(vf / name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.truncate(fd, 4096)
        os.close(fd)
        os.setxattr(vf / name, "user.pad", b"p" * 3000)
    whole = [n for n in names if os.stat(native / n).st_blocks * 512 >= 4096]
    assert whole, "the native filesystem keeps this xattr in the inode: nothing to test"
    # blocks preallocated past the end of a sparse file fool the same guess
    run("truncate", "-s", "8192", str(native / "pre"))
    run("fallocate", "--keep-size", "-o", "8192", "-l", "8192", str(native / "pre"))
    r = daemon.api("POST", f"/v1/hosts/local/vfolders/{vf.name}/rescan")
    assert r.status_code == 202
    for _ in range(100):
        if daemon.api("GET", f"/v1/tasks/{r.json()['id']}").json()["state"] == "done":
            break
        time.sleep(0.05)
    for bs, name in (("64k", "fill"), ("4k", "rest")):  # fill to the last block
        r = run("dd", "if=/dev/zero", f"of={vf}/{name}", f"bs={bs}", "count=1000", check=False)
        assert "Disk quota exceeded" in r.stderr
    time.sleep(1.1)  # the stats the mount remembers expire: the next ones show the xattr block
    for name in whole + ["pre"]:
        os.stat(vf / name)
    refused = 0
    for name in whole + ["pre"]:
        fd = os.open(vf / name, os.O_WRONLY)
        try:
            os.pwrite(fd, b"w" * 4096, 0)
        except OSError as exc:
            assert exc.errno == errno.EDQUOT
            refused += 1
        finally:
            os.close(fd)
    assert refused == len(whole) + 1
    nbytes, _ = du(native)
    assert nbytes <= limit and usage(daemon, vf) == du(native)


UNLINKED = r"""
import os, sys, tempfile
d = sys.argv[1]
with tempfile.TemporaryFile(dir=d) as t:           # O_TMPFILE or create + unlink
    t.write(b"t" * (2 << 20)); t.flush()
fd = os.open(os.path.join(d, "tmp"), os.O_RDWR | os.O_CREAT, 0o644)
os.unlink(os.path.join(d, "tmp"))
os.write(fd, b"u" * (2 << 20))
os.close(fd)
fd = os.open(os.path.join(d, "old"), os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"o" * (1 << 20))
open(os.path.join(d, "new"), "wb").close()
os.rename(os.path.join(d, "new"), os.path.join(d, "old"))  # renamed over while open
os.write(fd, b"o" * (1 << 20))
os.close(fd)
"""


def test_open_but_unlinked_files_are_refunded_at_the_last_close(daemon: Daemon) -> None:
    vf = daemon.vfolder(quota_bytes=64 << 20)
    native = native_of(daemon, vf)
    run(sys.executable, "-c", UNLINKED, str(vf))
    wait_usage_equals_du(daemon, vf, native)
    # while open, such a file is charged (as a native quota charges it): no way around the limit
    small = daemon.vfolder(quota_bytes=1 << 20)
    script = (
        "import os, sys\nfd = os.open(sys.argv[1] + '/t', os.O_RDWR | os.O_CREAT)\n"
        "os.unlink(sys.argv[1] + '/t')\nn = 0\ntry:\n    while n < 8 << 20:\n"
        "        n += os.write(fd, b'x' * 65536)\nexcept OSError as e:\n    print(e.errno, n)\n"
    )
    out = run(sys.executable, "-c", script, str(small)).stdout.split()
    assert int(out[0]) == errno.EDQUOT and int(out[1]) <= 1 << 20
    wait_usage_equals_du(daemon, small, native_of(daemon, small))


def test_usage_follows_files_the_kernel_forgot(daemon: Daemon) -> None:
    vf = daemon.vfolder()
    native = native_of(daemon, vf)
    # a file written in many pieces: ext4 allocates its extent tree blocks at writeback,
    # after the kernel may have forgotten the file (and we closed our fd for it)
    for n in range(4):
        fd = os.open(vf / f"frag{n}", os.O_CREAT | os.O_WRONLY, 0o644)
        for i in range(0, 600, 2):
            os.pwrite(fd, b"f" * 4096, i * 4096)
        os.close(fd)
    Path("/proc/sys/vm/drop_caches").write_text("2")  # the kernel forgets (FORGET)
    time.sleep(0.3)
    os.sync()  # now the native fs allocates
    wait_usage_equals_du(daemon, vf, native)
    # unlinking a forgotten, settled file refunds what it holds now
    for n in range(4):
        os.unlink(vf / f"frag{n}")
    assert usage(daemon, vf) == du(native)


# -- control API and store ----------------------------------------------------------------------
BAD_BODIES = [
    ({"scope": 7}, "bad_scope"),
    ({"scope": ["user:x"]}, "bad_scope"),
    ({"scope": True}, "bad_scope"),
    ({"grants": [{"principal": "uid:²", "mode": "rw"}]}, "bad_grant"),
    ({"grants": [{"principal": "uid:" + "9" * 5000, "mode": "rw"}]}, "bad_grant"),
    ({"grants": [{"principal": "cgroup:/a\0b", "mode": "rw"}]}, "bad_grant"),
    ({"grants": [{"principal": "cgroup:/a\rb", "mode": "rw"}]}, "bad_grant"),
    ({"grants": [{"principal": 5, "mode": "rw"}]}, "bad_grant"),
    ({"grants": [{"principal": "*", "mode": ["rw"]}]}, "bad_grant"),
    ({"grants": {"principal": "*"}}, "bad_grant"),
    ({"quota_bytes": 2**63}, "bad_quota"),
    ({"quota_bytes": 2**64}, "bad_quota"),
    ({"quota_inodes": 2**70}, "bad_quota"),
    ({"quota_bytes": "9" * 30}, "bad_quota"),
    ({"quota_bytes": 1.5}, "bad_quota"),
    ({"quota_bytes": "10G\n"}, "bad_quota"),
    ({"id": str(uuid.uuid4())[:-1] + "\n"}, "bad_id"),
    ({"id": f"{{{uuid.uuid4()}}}"}, "bad_id"),
    ({"id": uuid.uuid4().hex}, "bad_id"),
    ({"id": f"urn:uuid:{uuid.uuid4()}"}, "bad_id"),
    ({"id": 12}, "bad_id"),
    ({"adopt": "no"}, "bad_adopt"),
]


def native_dirs(d: Daemon) -> set[str]:
    return {n for n in os.listdir(d.hosts["local"]["path"]) if not n.startswith(".")}


def store_and_native_agree_across_a_restart(d: Daemon) -> None:
    """Every served vfolder has its directory and every directory its vfolder, before and
    after a restart (nothing vanished from the store, nothing left orphaned)."""
    served = {v["id"] for v in d.api("GET", "/v1/hosts/local/vfolders").json()}
    assert native_dirs(d) == served
    d.stop()
    d.start()
    assert {v["id"] for v in d.api("GET", "/v1/hosts/local/vfolders").json()} == served
    assert native_dirs(d) == served


def test_control_api_refuses_bad_input_and_changes_nothing(daemon: Daemon) -> None:
    for body, code in BAD_BODIES:
        r = daemon.api("POST", "/v1/hosts/local/vfolders", body)
        assert r.status_code == 400 and r.json()["error"] == code, (body, r.text)
    nested = b"[" * 200_000 + b"]" * 200_000
    with httpx.Client(transport=httpx.HTTPTransport(uds=daemon.socket), base_url="http://x") as c:
        r = c.post("/v1/hosts/local/vfolders", content=b'{"grants": ' + nested + b"}")
        assert r.status_code == 400 and r.json()["error"] == "bad_json"
    vf = daemon.vfolder()
    for principal in ("uid%3A1000%0A", "cgroup%3A%2Fa%00b", "uid%3A%C2%B2", "gid%3A-1"):
        r = daemon.api(
            "PUT", f"/v1/hosts/local/vfolders/{vf.name}/grants/{principal}", {"mode": "rw"}
        )
        assert r.status_code == 400 and r.json()["error"] == "bad_grant", (principal, r.text)
    r = daemon.api("PATCH", f"/v1/hosts/local/vfolders/{vf.name}", {"quota_bytes": 2**64})
    assert r.status_code == 400
    r = daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name.upper()}")
    assert r.status_code == 200 and r.json()["id"] == vf.name
    assert daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}%0A").status_code == 400
    assert native_dirs(daemon) == {vf.name}
    listed = daemon.api("GET", "/v1/hosts/local/vfolders").json()
    assert [v["id"] for v in listed] == [vf.name] and listed[0]["grants"] == [
        {"principal": "*", "mode": "rwd"}
    ]


def test_concurrent_creates_and_deletes_of_one_id_stay_consistent(daemon: Daemon) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    statuses: list[int] = []

    def hammer(seed: int) -> None:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=daemon.socket), base_url="http://x", timeout=30
        ) as c:
            for i in range(15):
                vfid = ids[(seed + i) % len(ids)]
                if (seed * 7 + i) % 2:
                    r = c.post("/v1/hosts/local/vfolders", json={"id": vfid})
                else:
                    r = c.delete(f"/v1/hosts/local/vfolders/{vfid}?force=1")
                statuses.append(r.status_code)
                assert r.headers["content-type"] == "application/json"

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 201, 404, 409}, sorted(set(statuses))
    store_and_native_agree_across_a_restart(daemon)


def test_a_stop_during_a_purge_is_quiet_and_the_purge_resumes(world_dir: Path) -> None:
    daemon = Daemon(world_dir, daemon_opts={"trash_retention": 0}).start()
    vf = daemon.vfolder()
    native = native_of(daemon, vf)
    for i in range(60):
        sub = native / f"d{i}"
        sub.mkdir()
        for j in range(500):
            (sub / f"f{j}").write_bytes(b"")
    r = daemon.api("DELETE", f"/v1/hosts/local/vfolders/{vf.name}")
    assert r.status_code == 200
    trash = r.json()["trash"]
    time.sleep(0.05)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.stop() == 0  # the log holds no ERROR and no traceback
    daemon.start()
    for _ in range(200):
        if not os.path.exists(trash):
            break
        time.sleep(0.05)
    assert not os.path.exists(trash)
    assert daemon.stop() == 0


def test_random_control_bodies_never_break_the_api(daemon: Daemon) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
        st.sampled_from(
            [
                "ro",
                "rw",
                "rwd",
                "*",
                "uid:1000",
                "cgroup:/docker/x",
                "user:" + str(uuid.uuid4()),
                "10G",
                str(uuid.uuid4()),
            ]
        ),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.sampled_from(["principal", "mode", "id", "x"]), inner, max_size=3),
        ),
        max_leaves=8,
    )
    keys = st.sampled_from(["id", "scope", "quota_bytes", "quota_inodes", "grants", "adopt"])
    bodies = st.dictionaries(keys, values, max_size=4)
    target = daemon.vfolder()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        body=bodies,
        patch=st.dictionaries(st.sampled_from(["quota_bytes", "quota_inodes"]), values, max_size=2),
        principal=st.text(max_size=20),
        mode=values,
    )
    def attempt(body: dict, patch: dict, principal: str, mode: object) -> None:
        from urllib.parse import quote

        for r in (
            daemon.api("POST", "/v1/hosts/local/vfolders", body),
            daemon.api("PATCH", f"/v1/hosts/local/vfolders/{target.name}", patch),
            daemon.api(
                "PUT",
                f"/v1/hosts/local/vfolders/{target.name}/grants/{quote(principal, safe='')}",
                {"mode": mode},
            ),
        ):
            assert r.status_code < 500, r.text
            if r.status_code >= 400:
                assert set(r.json()) == {"error", "message"} and "\n" not in r.json()["message"]

    attempt()
    store_and_native_agree_across_a_restart(daemon)


MAPPER = r"""
import errno, mmap, os, sys
fd = os.open("shared", os.O_RDWR)
m = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
print("ready", flush=True)
for line in sys.stdin:
    off, byte = line.split()
    m[int(off)] = ord(byte)
    try:
        m.flush()
        print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
"""


def test_a_narrowed_caller_cannot_write_through_a_shared_mapping(daemon: Daemon) -> None:
    a, b = Container(), Container()
    try:
        vf = daemon.vfolder(
            grants=[
                {"principal": f"cgroup:{a.cgroup}", "mode": "rw"},
                {"principal": f"cgroup:{b.cgroup}", "mode": "rw"},
            ]
        )
        (vf / "shared").write_bytes(b"." * 8192)
        native = native_of(daemon, vf)
        procs = [
            subprocess.Popen(
                c.wrap(vf, [sys.executable, "-c", MAPPER]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for c in (a, b)
        ]
        try:

            def ask(p: subprocess.Popen[str], line: str) -> str:
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write(line + "\n")
                p.stdin.flush()
                return p.stdout.readline().strip()

            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            assert ask(procs[0], "0 a") == "ok" and ask(procs[1], "1 b") == "ok"
            assert (native / "shared").read_bytes()[:2] == b"ab"
            grant(daemon, vf, f"cgroup:{a.cgroup}", "ro")
            # A's page is written back through whichever writable handle the kernel picks
            assert ask(procs[0], "4096 A") != "ok"
            assert (native / "shared").read_bytes()[4096] == ord(".")
            # once A has let go of the file, B's mapping writes again
            procs[0].kill()
            procs[0].wait()
            deadline = time.monotonic() + 10
            while ask(procs[1], "2 c") != "ok" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert (native / "shared").read_bytes()[:3] == b"abc"
        finally:
            for p in procs:
                p.kill()
                p.wait()
    finally:
        a.close()
        b.close()
