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
    r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", VFUSEFS,
                        "--socket", daemon.socket, "status"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vfusefs: permission denied")


def test_status_and_hosts(daemon: Daemon) -> None:
    s = daemon.api("GET", "/v1/status").json()
    assert s["mounted"] is True and s["hosts"] == {"local": "ok"} and s["mountpoint"] == str(daemon.mnt)
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
    r = daemon.api("POST", "/v1/hosts/local/vfolders",
                   {"id": vfid.upper(), "grants": [{"principal": "uid:1000", "mode": "wd"}]})
    assert r.status_code == 201, r.text
    vf = r.json()
    for key in ("id", "host", "path", "native_path", "scope", "quota_bytes", "quota_inodes",
                "usage_bytes", "usage_inodes", "grants"):
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
    for body, code in (({"id": "nope"}, "bad_id"), ({"scope": "team:x"}, "bad_scope"),
                       ({"grants": [{"principal": "uid:x", "mode": "rw"}]}, "bad_grant"),
                       ({"grants": [{"principal": "*", "mode": "write"}]}, "bad_grant"),
                       ({"quota_bytes": -1}, "bad_quota"), ({"colour": "red"}, "unknown_field")):
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
    deadline = time.monotonic() + 10
    while os.path.exists(trash) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(trash), "trash was not purged in the background"
    assert daemon.api("GET", f"/v1/hosts/local/vfolders/{vfid}").status_code == 404


def test_cli_errors_are_one_line(daemon: Daemon) -> None:
    for args in (["vfolder", "info", "local", "not-a-uuid"], ["vfolder", "info", "local", str(uuid.uuid4())],
                 ["vfolder", "create", "nohost"], ["grant", "local", str(uuid.uuid4()), "uid:1", "rw"],
                 ["vfolder", "create", "local", "--grant", "bogus"], ["vfolder", "nosuchcmd"],
                 ["vfolder", "rescan", "local", str(uuid.uuid4())]):
        r = daemon.cli(*args, check=False)
        assert r.returncode != 0, args
        assert r.stderr.startswith("vfusefs: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    r = subprocess.run([VFUSEFS, "--socket", "/nonexistent.sock", "status"], capture_output=True, text=True)
    assert r.returncode == 1 and "cannot reach the daemon" in r.stderr and r.stderr.count("\n") == 1


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
        vf = d.create_vfolder("bai", id=str(vfid), scope=f"project:{scope}",
                              grants=[{"principal": "*", "mode": "rw"}])
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
    d = Daemon(world_dir, daemon_opts={"control_listen": "127.0.0.1:36023",
                                       "control_token_file": str(token_file)}).start()
    try:
        url = "http://127.0.0.1:36023/v1/status"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
        r = httpx.get(url, headers={"Authorization": "Bearer s3cret-token-0123456789"})
        assert r.status_code == 200 and r.json()["mounted"] is True
    finally:
        assert d.stop() == 0
