"""The control API and the CLI against a running daemon: vfolder lifecycle, errors, auth."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import VFUSEFS, Daemon

pytestmark = pytest.mark.mount


def test_socket_is_root_only(daemon: Daemon) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            VFUSEFS,
            "--socket",
            daemon.socket,
            "status",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vfusefs: permission denied")


def test_status_and_hosts(daemon: Daemon) -> None:
    s = daemon.api("GET", "/v1/status").json()
    assert (
        s["mounted"] is True
        and s["hosts"] == {"local": "ok"}
        and s["mountpoint"] == str(daemon.mnt)
    )
    hosts = daemon.api("GET", "/v1/hosts").json()
    assert [h["name"] for h in hosts] == ["local"]
    assert daemon.api("GET", "/v1/hosts/local").json()["backend"] == "vfs"
    r = daemon.api("GET", "/v1/hosts/nope")
    assert r.status_code == 404 and r.json()["error"] == "no_such_host"
    out = daemon.cli("status").stdout
    assert "local" in out and "ok" in out
    assert json.loads(daemon.cli("hosts", "--json").stdout)[0]["name"] == "local"


def test_vfolder_lifecycle(daemon: Daemon) -> None:
    vfid = str(uuid.uuid4())
    r = daemon.api(
        "POST",
        "/v1/hosts/local/vfolders",
        {"id": vfid.upper(), "grants": [{"principal": "uid:1000", "mode": "wd"}]},
    )
    assert r.status_code == 201, r.text
    vf = r.json()
    for key in (
        "id",
        "host",
        "path",
        "native_path",
        "scope",
        "quota_bytes",
        "quota_inodes",
        "usage_bytes",
        "usage_inodes",
        "grants",
    ):
        assert key in vf
    assert vf["id"] == vfid and vf["path"] == str(daemon.mnt / "local" / vfid)
    assert vf["grants"] == [{"principal": "uid:1000", "mode": "rwd"}]
    assert os.path.isdir(vf["native_path"]) and os.path.isdir(vf["path"])
    # listed by API and CLI, shown by info
    assert [v["id"] for v in daemon.api("GET", "/v1/hosts/local/vfolders").json()] == [vfid]
    assert vfid in daemon.cli("vfolder", "ls").stdout
    listed = json.loads(daemon.cli("vfolder", "ls", "--json").stdout)
    assert listed[0]["native_path"] == vf["native_path"]
    assert vf["native_path"] in daemon.cli("vfolder", "info", "local", vfid).stdout
    # duplicate id: 409; bad input: 400, nothing created
    assert daemon.api("POST", "/v1/hosts/local/vfolders", {"id": vfid}).status_code == 409
    for body, code in (
        ({"id": "nope"}, "bad_id"),
        ({"scope": "team:x"}, "bad_scope"),
        ({"grants": [{"principal": "uid:x", "mode": "rw"}]}, "bad_grant"),
        ({"grants": [{"principal": "*", "mode": "write"}]}, "bad_grant"),
        ({"quota_bytes": -1}, "bad_quota"),
        ({"colour": "red"}, "unknown_field"),
    ):
        r = daemon.api("POST", "/v1/hosts/local/vfolders", body)
        assert r.status_code == 400 and r.json()["error"] == code, (body, r.text)
    assert len(daemon.api("GET", "/v1/hosts/local/vfolders").json()) == 1
    # in use: refused unless forced; data goes to trash, then purged
    f = open(Path(vf["path"]) / "keep", "w")
    f.write("x")
    f.flush()
    r = daemon.api("DELETE", f"/v1/hosts/local/vfolders/{vfid}")
    assert r.status_code == 409 and r.json()["error"] == "in_use"
    f.close()
    r = daemon.cli("vfolder", "rm", "local", vfid, "--json")
    trash = json.loads(r.stdout)["trash"]
    assert not os.path.exists(vf["native_path"])
    assert os.listdir(daemon.mnt / "local") == []
    assert not os.path.exists(vf["path"])
    assert daemon.api("GET", f"/v1/hosts/local/vfolders/{vfid}").status_code == 404
    # kept in the trash for trash_retention (24 h by default), and restorable as it was
    time.sleep(0.5)
    assert Path(trash, "keep").read_text() == "x"
    (listed,) = json.loads(daemon.cli("vfolder", "trash", "local", "--json").stdout)
    assert listed["id"] == vfid and listed["restorable"]
    assert listed["purge_after"] - listed["deleted"] == 86400
    assert vfid in daemon.cli("vfolder", "trash", "local").stdout
    restored = json.loads(daemon.cli("vfolder", "restore", "local", vfid, "--json").stdout)
    assert restored["grants"] == vf["grants"] and restored["native_path"] == vf["native_path"]
    assert Path(vf["path"], "keep").read_text() == "x" and not os.path.exists(trash)
    deadline = time.monotonic() + 10
    while daemon.api("GET", f"/v1/hosts/local/vfolders/{vfid}").json()["usage_inodes"] != 1:
        assert time.monotonic() < deadline, "the restored vfolder was not recounted"
        time.sleep(0.1)
    r = daemon.cli("vfolder", "restore", "local", vfid, check=False)  # it is back: nothing to do
    assert r.returncode == 1 and "exists" in r.stderr
    r = daemon.cli("vfolder", "restore", "local", str(uuid.uuid4()), check=False)
    assert r.returncode == 1 and "not in the trash" in r.stderr and "vfolder trash" in r.stderr


def test_trash_retention_zero_purges_at_once(world_dir: Path) -> None:
    d = Daemon(world_dir, daemon_opts={"trash_retention": 0})
    d.start()
    try:
        vf = d.vfolder()
        (vf / "f").write_text("x")
        trash = d.api("DELETE", f"/v1/hosts/local/vfolders/{vf.name}").json()["trash"]
        deadline = time.monotonic() + 10
        while os.path.exists(trash) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(trash), "trash was not purged in the background"
        assert d.api("GET", "/v1/hosts/local/trash").json() == []
        r = d.api("POST", f"/v1/hosts/local/vfolders/{vf.name}/restore")
        assert r.status_code == 404 and r.json()["error"] == "not_in_trash"
    finally:
        assert d.stop() == 0


def test_cli_errors_are_one_line(daemon: Daemon) -> None:
    for args in (
        ["vfolder", "info", "local", "not-a-uuid"],
        ["vfolder", "info", "local", str(uuid.uuid4())],
        ["vfolder", "create", "nohost"],
        ["grant", "local", str(uuid.uuid4()), "uid:1", "rw"],
        ["vfolder", "create", "local", "--grant", "bogus"],
        ["vfolder", "nosuchcmd"],
        ["vfolder", "rescan", "local", str(uuid.uuid4())],
    ):
        r = daemon.cli(*args, check=False)
        assert r.returncode != 0, args
        assert r.stderr.startswith("vfusefs: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    r = subprocess.run(
        [VFUSEFS, "--socket", "/nonexistent.sock", "status"], capture_output=True, text=True
    )
    assert r.returncode == 1 and "cannot reach the daemon" in r.stderr and r.stderr.count("\n") == 1


def test_cli_for_people_and_for_scripts(daemon: Daemon) -> None:
    vfid = str(uuid.uuid4())
    daemon.api("POST", "/v1/hosts/local/vfolders", {"id": vfid, "quota_bytes": "10G"})
    (Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vfid}").json()["path"]) / "f").write_bytes(
        b"x" * 3_000_000
    )
    # --json before the command or after it, on every command
    assert json.loads(daemon.cli("--json", "status").stdout)["vfolders"] == 1
    assert json.loads(daemon.cli("--json", "vfolder", "ls").stdout)[0]["id"] == vfid
    assert json.loads(daemon.cli("check-config", "--json").stdout)["ok"] is True
    assert any(
        o["key"] == "daemon.trash_retention"
        for o in json.loads(daemon.cli("--json", "config-doc").stdout)
    )
    # sizes for people: 10G, 2.9M, '-' for unlimited
    table = daemon.cli("vfolder", "ls").stdout
    assert " 10G " in table and " 2.9M " in table, table
    quota = daemon.cli("vfolder", "quota", "local", vfid).stdout
    assert " - " in quota and " 10G " in quota, quota  # no inode limit
    assert "10G (10737418240 bytes)" in daemon.cli("vfolder", "info", "local", vfid).stdout
    # usage errors exit 2, other failures 1; hints name CLI flags
    for args in (
        ["grant", "local", vfid, "uid:1000", "write"],
        ["vfolder", "info", "local", "nope"],
        ["vfolder", "quota", "local", vfid, "--bytes", "lots"],
        ["scope", "team:x", "--bytes", "1G"],
        ["vfolder", "create", "local", "--id", "x"],
        ["vfolder", "create", "local", "--grant", "bogus"],
        ["--nosuchflag", "status"],
    ):
        r = daemon.cli(*args, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.returncode, r.stderr)
    r = daemon.cli("vfolder", "info", "local", str(uuid.uuid4()), check=False)
    assert r.returncode == 1
    held = open(Path(daemon.mnt, "local", vfid, "f"))
    r = daemon.cli("vfolder", "rm", "local", vfid, check=False)
    held.close()
    assert (
        r.returncode == 1
        and "add --force to delete anyway" in r.stderr
        and "force=1" not in r.stderr
    )
    other = str(uuid.uuid4())
    os.mkdir(Path(daemon.hosts["local"]["path"]) / other)
    r = daemon.cli("vfolder", "create", "local", "--id", other, check=False)
    assert r.returncode == 1 and "add --adopt" in r.stderr, r.stderr
    # bare groups print their usage, cleanly
    for args in ([], ["vfolder"]):
        r = subprocess.run([VFUSEFS, *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("Usage: vfusefs"), r.stderr
        assert "see --help" not in r.stderr and "Commands:" in r.stderr
    r = daemon.cli(check=False)  # options, but no command: one line
    assert r.returncode == 2 and r.stderr == "vfusefs: Missing command. (see --help)\n"
    # rm asks on a terminal; 'n' keeps the vfolder
    cmd = " ".join([VFUSEFS, "--config", str(daemon.config), "vfolder", "rm", "local", vfid])
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"],
        input="n\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "delete vfolder" in r.stdout and r.returncode != 0, r.stdout
    assert daemon.api("GET", f"/v1/hosts/local/vfolders/{vfid}").status_code == 200
    r = subprocess.run(
        ["script", "-qec", cmd + " --yes", "/dev/null"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0 and "delete vfolder" not in r.stdout, r.stdout
    assert daemon.api("GET", f"/v1/hosts/local/vfolders/{vfid}").status_code == 404


def test_state_survives_restart(daemon: Daemon) -> None:
    path = daemon.vfolder()
    (path / "file").write_text("kept")
    assert daemon.stop() == 0
    daemon.start()
    assert (path / "file").read_text() == "kept"
    assert os.listdir(daemon.mnt / "local") == [path.name]


def test_backendai_layout(world_dir: Path) -> None:
    native = world_dir / "bai"
    d = Daemon(world_dir, hosts={"bai": {"path": str(native), "layout": "backendai"}}).start()
    try:
        r = d.api("POST", "/v1/hosts/bai/vfolders", {})
        assert r.status_code == 409 and "scope" in r.json()["message"]
        scope = uuid.uuid4()
        vfid = uuid.uuid4()
        vf = d.create_vfolder(
            "bai", id=str(vfid), scope=f"project:{scope}", grants=[{"principal": "*", "mode": "rw"}]
        )
        h = vfid.hex
        assert vf["native_path"] == str(native / scope.hex / h[0:2] / h[2:4] / h[4:])
        assert vf["scope"] == f"project:{scope}"
        (Path(vf["path"]) / "x").write_text("y")
        assert (Path(vf["native_path"]) / "x").read_text() == "y"
    finally:
        assert d.stop() == 0


def test_tcp_listener_needs_token(world_dir: Path) -> None:
    token_file = world_dir / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    d = Daemon(
        world_dir,
        daemon_opts={"control_listen": "127.0.0.1:36023", "control_token_file": str(token_file)},
    ).start()
    try:
        url = "http://127.0.0.1:36023/v1/status"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
        r = httpx.get(url, headers={"Authorization": "Bearer s3cret-token-0123456789"})
        assert r.status_code == 200 and r.json()["mounted"] is True
    finally:
        assert d.stop() == 0


def test_create_sets_the_roots_owner_and_mode(daemon: Daemon) -> None:
    """SPEC §6: `owner` and `mode` at create, so a container user can write at the top level
    of its vfolder; checked through the mount with real tools and other uids."""
    r = daemon.cli(
        "--json", "vfolder", "create", "local", "--owner", "1000:1000", "--mode", "0770",
        "--grant", "uid:1000=rw", "--grant", "uid:1001=rw",
    )  # fmt: skip
    vf = Path(json.loads(r.stdout)["path"])
    assert (
        subprocess.run(["stat", "-c", "%u:%g %a", str(vf)], capture_output=True, text=True).stdout
        == "1000:1000 770\n"
    )
    as_1000 = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]
    as_1001 = ["setpriv", "--reuid=1001", "--regid=1001", "--clear-groups"]
    assert subprocess.run([*as_1000, "touch", f"{vf}/top"]).returncode == 0
    assert (vf / "top").stat().st_uid == 1000
    r2 = subprocess.run([*as_1001, "touch", f"{vf}/other"], capture_output=True, text=True)
    assert r2.returncode != 0 and "Permission denied" in r2.stderr  # rw grant, but mode 0770
    # adopting: only what is given changes (the directory keeps its owner)
    native = Path(daemon.hosts["local"]["path"]) / str(uuid.uuid4())
    native.mkdir()
    os.chown(native, 1234, 1234)
    daemon.cli("vfolder", "create", "local", "--id", native.name, "--adopt", "--mode", "0700")
    assert (native.stat().st_uid, stat.S_IMODE(native.stat().st_mode)) == (1234, 0o700)
    # without them: root's 0755, as before
    plain = daemon.vfolder()
    assert stat.S_IMODE(plain.stat().st_mode) == 0o755 and plain.stat().st_uid == 0
    # bad values: one line, 400 (CLI exit 2), nothing made
    before = sorted(os.listdir(daemon.hosts["local"]["path"]))
    for args in (["--owner", "1000"], ["--owner", "a:b"], ["--mode", "999"], ["--mode", "rwx"]):
        bad = daemon.cli("vfolder", "create", "local", *args, check=False)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, (args, bad.stderr)
    r3 = daemon.api("POST", "/v1/hosts/local/vfolders", {"mode": 493})  # a number, not a string
    assert r3.status_code == 400 and r3.json()["error"] == "bad_mode"
    assert sorted(os.listdir(daemon.hosts["local"]["path"])) == before


def test_native_storage_against_the_store_is_reported_never_changed(daemon: Daemon) -> None:
    """GET /v1/hosts/{host} and doctor name orphan directories, vfolders whose directory is
    gone and unfinished clones, say what to do about each, and delete nothing."""
    native = Path(daemon.hosts["local"]["path"])
    kept = daemon.create_vfolder()
    gone = daemon.create_vfolder()
    orphan = native / str(uuid.uuid4())
    orphan.mkdir()
    (orphan / "data").write_text("someone's\n")
    (native / f".{uuid.uuid4()}.clone").mkdir()  # what a clone stopped by a crash leaves
    (native / "not-a-vfolder").mkdir()  # other names are none of our business
    os.rename(gone["native_path"], native / "elsewhere")
    c = daemon.api("GET", "/v1/hosts/local").json()["consistency"]
    assert c["orphans"] == [str(orphan)] and c["missing"] == [gone["id"]]
    assert len(c["unfinished_clones"]) == 1 and c["limit_drift"] == []
    checks = {x["name"]: x for x in json.loads(daemon.cli("doctor", "--json", check=False).stdout)}
    line = checks["host local: vfolders against the store"]
    assert line["level"] == "warn" and "1 directory(ies) no vfolder names" in line["detail"]
    assert f"vfusefs vfolder create local --id UUID --adopt (first: {orphan})" in line["fix"]
    assert f"vfusefs vfolder rm local {gone['id']}" in line["fix"]
    assert (orphan / "data").read_text() == "someone's\n"  # reported, not touched
    daemon.cli("vfolder", "create", "local", "--id", orphan.name, "--adopt")
    c = daemon.api("GET", "/v1/hosts/local").json()["consistency"]
    assert c["orphans"] == [] and os.path.isdir(kept["native_path"])
