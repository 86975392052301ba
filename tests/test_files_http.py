"""Files over HTTP (SPEC §8) against a real daemon and mount, with real clients: curl for
downloads and ranges, tuspy (the tus project's Python client) for uploads, httpx for the rest.

Access, quota and path rules are the mount's own (the handlers decide), so each test also looks
at the native directory and the mount: what the API answers must be what happened there."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from tusclient import client as tus

from conftest import Daemon, free_port, run
from test_quota import settled_usage, usage

pytestmark = pytest.mark.mount

MiB = 1 << 20
KEY = "k" * 16 + os.urandom(16).hex()


class Api:
    """The file API of a daemon, as a client sees it."""

    def __init__(self, d: Daemon, port: int) -> None:
        self.d = d
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.base, timeout=60)

    def token(self, vf: Path, mode: str, **extra: Any) -> str:
        r = self.d.api(
            "POST", f"/v1/hosts/local/vfolders/{vf.name}/tokens", {"mode": mode, **extra}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def url(self, vf: Path, path: str = "") -> str:
        return f"/v1/files/local/{vf.name}/{path}"

    def get(self, vf: Path, path: str, token: str, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}", **kw.pop("headers", {})}
        return self.http.get(self.url(vf, path), headers=headers, **kw)

    def op(
        self, vf: Path, path: str, token: str, op: str, body: Any = None, **q: str
    ) -> httpx.Response:
        return self.http.post(
            self.url(vf, path),
            params={"op": op, **q},
            json=body,
            headers={"authorization": f"Bearer {token}"},
        )

    def tus(self, token: str) -> tus.TusClient:
        return tus.TusClient(
            self.base + "/v1/uploads", headers={"Authorization": f"Bearer {token}"}
        )

    def create(
        self, token: str, vf: Path, path: str, length: int, **headers: str
    ) -> httpx.Response:
        meta = ",".join(
            f"{k} {base64.b64encode(v.encode()).decode()}".rstrip()
            for k, v in (("host", "local"), ("vfolder", vf.name), ("path", path))
        )
        return self.http.post(
            "/v1/uploads",
            headers={
                "tus-resumable": "1.0.0",
                "upload-length": str(length),
                "upload-metadata": meta,
                "authorization": f"Bearer {token}",
                **headers,
            },
        )

    def patch(self, token: str, location: str, offset: int, data: bytes) -> httpx.Response:
        return self.http.patch(
            location,
            content=data,
            headers={
                "tus-resumable": "1.0.0",
                "upload-offset": str(offset),
                "content-type": "application/offset+octet-stream",
                "authorization": f"Bearer {token}",
            },
        )


def files_daemon(world_dir: Path, **opts: Any) -> tuple[Daemon, Api]:
    key = world_dir / "files.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    port = free_port()
    d = Daemon(
        world_dir,
        daemon_opts={
            "files_listen": f"127.0.0.1:{port}",
            "files_secret_file": str(key),
            **opts,
        },
    ).start()
    return d, Api(d, port)


@pytest.fixture
def api(world_dir: Path) -> Iterator[Api]:
    d, a = files_daemon(world_dir)
    try:
        yield a
    finally:
        a.http.close()
        d.stop()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-s", "-S", *args], capture_output=True, timeout=60)


# -- tokens -------------------------------------------------------------------------------------
def test_tokens_missing_forged_expired_and_foreign_are_refused(api: Api) -> None:
    vf, other = api.d.vfolder(), api.d.vfolder()
    (vf / "f").write_bytes(b"data")
    good = api.token(vf, "ro")
    assert api.get(vf, "f", good).content == b"data"
    # the token in the query string works as well (links handed to a browser)
    assert api.http.get(api.url(vf, "f"), params={"token": good}).content == b"data"

    def status(token: str, target: Path = vf) -> tuple[int, str]:
        r = api.get(target, "f", token)
        return r.status_code, r.json()["error"]

    assert api.http.get(api.url(vf, "f")).status_code == 401  # none
    claims = {"host": "local", "vfolder": vf.name, "mode": "ro", "exp": int(time.time()) + 60}
    assert status(jwt.encode(claims, "x" * 40, algorithm="HS256")) == (401, "bad_token")  # forged
    expired = {**claims, "exp": int(time.time()) - 60}
    assert status(jwt.encode(expired, KEY, algorithm="HS256")) == (401, "bad_token")
    unsigned = jwt.encode(claims, None, algorithm="none")  # "alg": "none"
    assert status(unsigned) == (401, "bad_token")
    no_exp = {k: v for k, v in claims.items() if k != "exp"}
    assert status(jwt.encode(no_exp, KEY, algorithm="HS256")) == (401, "bad_token")
    # a manager holding the key signs its own, as Backend.AI's manager does for its proxy
    assert api.get(vf, "f", jwt.encode(claims, KEY, algorithm="HS256")).content == b"data"
    assert status(good, other) == (403, "wrong_vfolder")  # another vfolder's token
    # the control API refuses bad token requests in one line, nothing minted
    r = api.d.api("POST", f"/v1/hosts/local/vfolders/{vf.name}/tokens", {"mode": "rx"})
    assert r.status_code == 400 and r.json()["error"] == "bad_mode"
    r = api.d.api(
        "POST", f"/v1/hosts/local/vfolders/{vf.name}/tokens", {"mode": "ro", "ttl": "99d"}
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_ttl"
    r = api.d.api(
        "POST",
        f"/v1/hosts/local/vfolders/{'0' * 8}-0000-4000-8000-{'0' * 12}/tokens",
        {"mode": "ro"},
    )
    assert r.status_code == 404


def test_cli_prints_a_token_the_api_takes(api: Api) -> None:
    vf = api.d.vfolder()
    (vf / "f").write_bytes(b"cli")
    token = api.d.cli(
        "vfolder", "token", "local", vf.name, "--mode", "ro", "--ttl", "5m"
    ).stdout.strip()
    assert api.get(vf, "f", token).content == b"cli"
    bad = api.d.cli("vfolder", "token", "local", vf.name, "--mode", "admin", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# -- downloads ----------------------------------------------------------------------------------
def test_curl_downloads_whole_ranges_and_conditionals(api: Api) -> None:
    vf = api.d.vfolder()
    data = os.urandom(3 * MiB + 123)
    (vf / "blob").write_bytes(data)
    token = api.token(vf, "ro")
    url = api.base + api.url(vf, "blob")
    auth = ["-H", f"Authorization: Bearer {token}"]
    assert curl(*auth, url).stdout == data
    assert curl(*auth, "-r", "100-199", url).stdout == data[100:200]
    assert curl(*auth, "-r", "-10", url).stdout == data[-10:]
    assert curl(*auth, "-r", f"{3 * MiB}-", url).stdout == data[3 * MiB :]
    # several ranges: multipart/byteranges, each part with its Content-Range
    r = api.get(vf, "blob", token, headers={"range": "bytes=0-9,1000-1009"})
    assert r.status_code == 206
    assert r.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert data[0:10] in r.content and data[1000:1010] in r.content
    assert f"bytes 1000-1009/{len(data)}".encode() in r.content
    # outside the file: 416 with the size
    r = api.get(vf, "blob", token, headers={"range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    # validators: HEAD, ETag, If-None-Match, If-Range
    head = api.http.head(api.url(vf, "blob"), headers={"authorization": f"Bearer {token}"})
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    tag = head.headers["etag"]
    assert api.get(vf, "blob", token, headers={"if-none-match": tag}).status_code == 304
    r = api.get(vf, "blob", token, headers={"range": "bytes=0-1", "if-range": tag})
    assert r.status_code == 206 and r.content == data[:2]
    (vf / "blob").write_bytes(b"changed")  # through the mount: a new version
    r = api.get(vf, "blob", token, headers={"range": "bytes=0-1", "if-range": tag})
    assert r.status_code == 200 and r.content == b"changed"  # stale If-Range: the whole file


def test_listing_is_paged_and_typed(api: Api) -> None:
    vf = api.d.vfolder()
    for i in range(5):
        (vf / f"f{i}").write_bytes(b"x" * i)
    (vf / "sub").mkdir()
    os.symlink("f1", vf / "link")
    token = api.token(vf, "ro")
    seen: list[dict[str, Any]] = []
    after = None
    while True:
        r = api.get(vf, "", token, params={"limit": 3, **({"after": after} if after else {})})
        assert r.status_code == 200
        page = r.json()
        assert page["path"] == "/" and len(page["entries"]) <= 3
        seen += page["entries"]
        after = page["next"]
        if after is None:
            break
    assert [e["name"] for e in seen] == ["f0", "f1", "f2", "f3", "f4", "link", "sub"]
    kinds = {e["name"]: (e["type"], e["size"]) for e in seen}
    assert kinds["f3"] == ("file", 3) and kinds["sub"][0] == "dir" and kinds["link"][0] == "symlink"
    assert api.get(vf, "sub/", token).json() == {"path": "/sub/", "entries": [], "next": None}
    assert api.get(vf, "f1/", token).status_code == 404  # "f1/" asks for a directory
    assert api.get(vf, "", token, params={"limit": 0}).status_code == 400


# -- access: the token's mode is the caller's mode ------------------------------------------------
def test_modes_decide_as_on_the_mount(api: Api) -> None:
    vf = api.d.vfolder()
    (vf / "keep").write_bytes(b"k")
    ro, rw, rwd = (api.token(vf, m) for m in ("ro", "rw", "rwd"))

    def err(r: httpx.Response) -> tuple[int, str]:
        return r.status_code, r.json().get("error")

    assert err(api.op(vf, "d", ro, "mkdir")) == (403, "read_only")
    assert err(api.create(ro, vf, "new", 3)) == (403, "read_only")
    assert api.op(vf, "d", rw, "mkdir").status_code == 201
    assert (vf / "d").is_dir()
    assert api.op(vf, "keep", rw, "rename", {"to": "d/kept"}).status_code == 200
    assert (vf / "d" / "kept").read_bytes() == b"k"
    (vf / "other").write_bytes(b"o")
    # rw may not replace (EPERM on the mount) nor delete
    assert err(api.op(vf, "other", rw, "rename", {"to": "d/kept"})) == (403, "no_delete")
    assert err(api.op(vf, "other", rw, "delete")) == (403, "no_delete")
    assert (vf / "other").exists() and (vf / "d" / "kept").read_bytes() == b"k"
    assert api.op(vf, "other", rwd, "rename", {"to": "d/kept"}).status_code == 200
    assert (vf / "d" / "kept").read_bytes() == b"o"
    assert err(api.op(vf, "d", rwd, "delete")) == (409, "not_empty")
    assert api.op(vf, "d", rwd, "delete", recursive="1").status_code == 200
    assert not (vf / "d").exists()
    assert err(api.op(vf, "nothing", rwd, "delete")) == (404, "not_found")
    assert err(api.op(vf, "x", rwd, "chmod")) == (400, "bad_op")
    # a grant change on the mount does not touch a token (its mode is its own) ...
    api.d.api("PUT", f"/v1/hosts/local/vfolders/{vf.name}/grants/%2A", {"mode": "ro"})
    assert api.op(vf, "still", rw, "mkdir").status_code == 201
    # ... but a deleted vfolder is gone for tokens too
    assert api.d.api("DELETE", f"/v1/hosts/local/vfolders/{vf.name}?force=1").status_code == 200
    assert api.get(vf, "", ro).status_code == 404


def test_no_path_leaves_the_vfolder_or_the_tokens_path(api: Api, world_dir: Path) -> None:
    vf = api.d.vfolder()
    nat = Path(api.d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    secret = world_dir / "secret"
    secret.write_bytes(b"SECRET")
    (vf / "pub").mkdir()
    (vf / "pub" / "ok").write_bytes(b"ok")
    (vf / "priv").write_bytes(b"private")
    os.symlink(str(secret), nat / "pub" / "out")  # planted natively
    os.symlink(str(world_dir), nat / "pub" / "dirlink")
    token = api.token(vf, "rwd", path="pub")
    raw = httpx.Client(base_url=api.base, timeout=10)
    auth = {"authorization": f"Bearer {token}"}
    for path in (
        "pub/out",
        "pub/dirlink/secret",
        "pub/%2e%2e/priv",
        "pub/..%2fpriv",
        "pub/%2E%2E%2Fpriv",
        "pub/.%2e/priv",
        "priv",
        "",
    ):
        r = raw.get(api.url(vf, path), headers=auth)
        assert r.status_code in (400, 403, 404), (path, r.status_code)
        assert b"SECRET" not in r.content and b"private" not in r.content, path
    r = raw.get(api.url(vf, "pub/out"), headers=auth)
    assert (r.status_code, r.json()["error"]) == (403, "symlink")
    assert raw.get(api.url(vf, "pub/ok"), headers=auth).content == b"ok"
    # renames and uploads stay inside the token's path as well
    assert api.op(vf, "pub/ok", token, "rename", {"to": "moved"}).status_code == 403
    assert api.op(vf, "pub/ok", token, "rename", {"to": "pub/../moved"}).status_code == 400
    assert api.create(token, vf, "outside", 1).status_code == 403
    # deleting through a symlinked directory removes the link, never what it points at
    assert api.op(vf, "pub/dirlink", token, "delete", recursive="1").status_code == 200
    assert secret.read_bytes() == b"SECRET"
    raw.close()


# -- uploads ------------------------------------------------------------------------------------
def test_tuspy_upload_resumes_after_a_broken_connection(api: Api, world_dir: Path) -> None:
    vf = api.d.vfolder(owner="1000:1000")
    src = world_dir / "src.bin"
    data = os.urandom(6 * MiB + 7)
    src.write_bytes(data)
    token = api.token(vf, "rw")
    # a client starts an upload and loses its connection halfway through a PATCH
    r = api.create(token, vf, "deep/dir/file.bin", len(data))
    assert r.status_code == 201, r.text
    location = r.headers["location"]
    import socket

    with socket.create_connection(("127.0.0.1", int(api.base.rsplit(":", 1)[1]))) as s:
        head = (
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            f"Authorization: Bearer {token}\r\nUpload-Offset: 0\r\n"
            f"Content-Type: application/offset+octet-stream\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        s.sendall(head + data[: 2 * MiB + 5])
        time.sleep(0.5)
    # tuspy takes it up where the server says it is (HEAD), and finishes it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = api.http.head(
            location, headers={"tus-resumable": "1.0.0", "authorization": f"Bearer {token}"}
        )
        if h.status_code == 200 and int(h.headers["upload-offset"]) > 0:
            break
        time.sleep(0.1)
    offset = int(h.headers["upload-offset"])
    assert 0 < offset <= 2 * MiB + 5
    assert not (vf / "deep").exists()  # not at its path until complete
    up = api.tus(token).uploader(
        str(src),
        url=api.base + location,
        chunk_size=MiB,
        metadata={"host": "local", "vfolder": vf.name, "path": "deep/dir/file.bin"},
    )
    assert up.offset == offset  # resumed, not restarted
    up.upload()
    assert (vf / "deep" / "dir" / "file.bin").read_bytes() == data
    st = os.stat(vf / "deep" / "dir" / "file.bin")
    assert (st.st_uid, st.st_gid) == (1000, 1000)  # the vfolder's owner owns what the API makes
    deadline = time.monotonic() + 10
    while (vf / ".vfusefs-uploads").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (vf / ".vfusefs-uploads").exists()  # tidied once no upload is left
    assert (
        api.http.head(
            location, headers={"tus-resumable": "1.0.0", "authorization": f"Bearer {token}"}
        ).status_code
        == 404
    )
    nat = Path(api.d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    got, real = settled_usage(api.d, vf, nat)
    assert got == real


def test_tus_protocol_details(api: Api) -> None:
    vf = api.d.vfolder()
    token = api.token(vf, "rwd")
    opts = api.http.options("/v1/uploads")
    assert opts.status_code == 204
    assert set(opts.headers["tus-extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "termination",
        "expiration",
    }
    # no Tus-Resumable: 412; creation-with-upload; a wrong offset: 409; wrong type: 415
    r = api.http.post(
        "/v1/uploads", headers={"upload-length": "3", "authorization": f"Bearer {token}"}
    )
    assert r.status_code == 412 and r.headers["tus-version"] == "1.0.0"
    r = api.create(token, vf, "a.txt", 10, **{"content-type": "application/offset+octet-stream"})
    assert r.status_code == 201
    loc = r.headers["location"]
    assert r.headers["upload-offset"] == "0" and "upload-expires" in r.headers
    assert api.patch(token, loc, 3, b"abc").status_code == 409
    bad = api.http.patch(
        loc,
        content=b"x",
        headers={
            "tus-resumable": "1.0.0",
            "upload-offset": "0",
            "authorization": f"Bearer {token}",
        },
    )
    assert bad.status_code == 415
    r = api.patch(token, loc, 0, b"hello")
    assert r.status_code == 204 and r.headers["upload-offset"] == "5"
    assert api.patch(token, loc, 5, b"world!!").status_code == 400  # past Upload-Length
    r = api.patch(token, loc, 5, b"world")
    assert r.status_code == 204 and (vf / "a.txt").read_bytes() == b"helloworld"
    # an empty file is complete at creation
    assert api.create(token, vf, "empty", 0).status_code == 201
    assert (vf / "empty").read_bytes() == b""
    # termination frees what was written
    r = api.create(token, vf, "t.bin", 5 * MiB)
    loc = r.headers["location"]
    assert api.patch(token, loc, 0, os.urandom(2 * MiB)).status_code == 204
    before = usage(api.d, vf)[0]
    d = api.http.delete(loc, headers={"tus-resumable": "1.0.0", "authorization": f"Bearer {token}"})
    assert d.status_code == 204
    assert usage(api.d, vf)[0] <= before - 2 * MiB
    assert api.patch(token, loc, 2 * MiB, b"x").status_code == 404
    # an rw token may not replace a file, and is told before it sends a byte
    rw = api.token(vf, "rw")
    r = api.create(rw, vf, "a.txt", 3)
    assert (r.status_code, r.json()["error"]) == (403, "no_delete")
    assert api.create(rw, vf, "", 3).status_code == 400


def test_upload_over_quota_is_refused_before_any_byte(api: Api) -> None:
    vf = api.d.vfolder(quota_bytes=8 * MiB)
    nat = Path(api.d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    token = api.token(vf, "rw")
    before = usage(api.d, vf)
    r = api.create(token, vf, "big", 9 * MiB)
    assert (r.status_code, r.json()["error"]) == (413, "quota")
    assert usage(api.d, vf) == before and sorted(os.listdir(nat)) == []
    # two uploads that fit alone and not together: one is cut at the quota, by one request
    # at most, and usage still equals du
    locs = [api.create(token, vf, f"u{i}", 5 * MiB).headers["location"] for i in range(2)]
    results: list[httpx.Response] = []

    def send(loc: str) -> None:
        with httpx.Client(base_url=api.base, timeout=60) as c:
            results.append(
                c.patch(
                    loc,
                    content=os.urandom(5 * MiB),
                    headers={
                        "tus-resumable": "1.0.0",
                        "upload-offset": "0",
                        "content-type": "application/offset+octet-stream",
                        "authorization": f"Bearer {token}",
                    },
                )
            )

    threads = [threading.Thread(target=send, args=(loc,)) for loc in locs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # interleaved, both may be cut; together they end within one request (1 MiB) of the
    # limit, never past it, and what landed is what the uploads report
    assert 413 in [r.status_code for r in results], [r.text for r in results]
    for r in results:
        if r.status_code == 413:
            assert r.json()["error"] == "quota" and int(r.headers["upload-offset"]) < 5 * MiB
    landed = sum(int(r.headers["upload-offset"]) for r in results)
    assert 8 * MiB - 2 * MiB < landed <= 8 * MiB
    got, real = settled_usage(api.d, vf, nat)
    assert got == real and got[0] <= 8 * MiB
    # the cut upload can still be terminated, which frees its bytes
    for loc in locs:
        api.http.delete(loc, headers={"tus-resumable": "1.0.0", "authorization": f"Bearer {token}"})
    got, real = settled_usage(api.d, vf, nat)
    assert got == real and got[0] < 6 * MiB


def test_mount_and_api_on_one_vfolder_stay_consistent(api: Api) -> None:
    vf = api.d.vfolder()
    nat = Path(api.d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    token = api.token(vf, "rwd")
    for i in range(20):
        (vf / f"m{i}").write_bytes(os.urandom(10000 + i))  # made on the mount ...
        up = api.create(
            token, vf, f"h{i}", 5000 + i, **{"content-type": "application/offset+octet-stream"}
        )
        assert up.status_code == 201
        assert api.patch(token, up.headers["location"], 0, b"y" * (5000 + i)).status_code == 204
        assert (vf / f"h{i}").stat().st_size == 5000 + i  # ... seen at once on the mount
        assert api.get(vf, f"m{i}", token).content == (vf / f"m{i}").read_bytes()
        if i % 2:
            assert api.op(vf, f"m{i}", token, "delete").status_code == 200
            assert not (vf / f"m{i}").exists()
            os.unlink(vf / f"h{i}")  # removed on the mount: gone for the API
            assert api.get(vf, f"h{i}", token).status_code == 404
    names = {e["name"] for e in api.get(vf, "", token).json()["entries"]}
    assert names == set(os.listdir(vf))
    got, real = settled_usage(api.d, vf, nat)
    assert got == real


def test_big_transfers_keep_memory_flat(api: Api, world_dir: Path) -> None:
    """A 256 MiB upload and download: the daemon's RSS must not grow with the file (bench/
    files.py does 1 GiB and prints the figures)."""
    vf = api.d.vfolder()
    size = 256 * MiB
    src = world_dir / "big.bin"
    with open(src, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    token = api.token(vf, "rw")
    pid = api.d.proc.pid  # type: ignore[union-attr]

    def rss() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    start = rss()
    api.tus(token).uploader(
        str(src), chunk_size=64 * MiB, metadata={"host": "local", "vfolder": vf.name, "path": "big"}
    ).upload()
    after_up = rss()
    out = world_dir / "back.bin"
    r = curl("-H", f"Authorization: Bearer {token}", "-o", str(out), api.base + api.url(vf, "big"))
    assert r.returncode == 0
    after_down = rss()
    assert run("cmp", str(src), str(out)).returncode == 0
    assert after_up - start < 64 * MiB, (start, after_up)
    assert after_down - start < 64 * MiB, (start, after_down)


def test_unfinished_uploads_expire_and_survive_a_restart(world_dir: Path) -> None:
    d, a = files_daemon(world_dir, upload_expiry=2)
    try:
        vf = d.vfolder()
        nat = Path(d.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
        token = a.token(vf, "rw")
        loc = a.create(token, vf, "x", 4 * MiB).headers["location"]
        assert a.patch(token, loc, 0, os.urandom(MiB)).status_code == 204
        assert usage(d, vf)[0] >= MiB
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (nat / ".vfusefs-uploads").exists():
            time.sleep(0.2)
        assert not (nat / ".vfusefs-uploads").exists()  # expired: its file and space are gone
        assert a.patch(token, loc, MiB, b"x").status_code == 404
        got, real = settled_usage(d, vf, nat)
        assert got == real
    finally:
        a.http.close()
        d.stop()
    # a longer expiry: an upload outlives a restart and is finished by the next daemon
    d.daemon_opts["upload_expiry"] = 3600
    d.write_config()
    d.start()
    a = Api(d, int(d.daemon_opts["files_listen"].rsplit(":", 1)[1]))
    try:
        token = a.token(vf, "rw")
        loc = a.create(token, vf, "later", 6).headers["location"]
        assert a.patch(token, loc, 0, b"abc").status_code == 204
        d.stop()
        d.start()
        h = a.http.head(loc, headers={"tus-resumable": "1.0.0", "authorization": f"Bearer {token}"})
        assert h.status_code == 200 and h.headers["upload-offset"] == "3"
        assert a.patch(token, loc, 3, b"def").status_code == 204
        assert (vf / "later").read_bytes() == b"abcdef"
    finally:
        a.http.close()
        d.stop()


def test_metrics_count_requests_bytes_and_uploads(world_dir: Path) -> None:
    port = free_port()
    d, a = files_daemon(world_dir, metrics_listen=f"127.0.0.1:{port}")
    try:
        vf = d.vfolder()
        (vf / "f").write_bytes(b"z" * 1000)
        token = a.token(vf, "rw")
        a.get(vf, "f", token)
        a.get(vf, "nope", token)
        a.create(token, vf, "open", 10)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'vfusefs_files_requests_total{code="200",op="get"} 1.0' in text
        assert 'vfusefs_files_requests_total{code="404",op="get"} 1.0' in text
        assert 'vfusefs_files_bytes_total{direction="out"} 1000.0' in text
        assert 'vfusefs_uploads{state="waiting"} 1.0' in text
    finally:
        a.http.close()
        d.stop()


def test_bad_files_config_stops_start_up_in_one_line(world_dir: Path) -> None:
    key = world_dir / "k"
    key.write_text(KEY)
    key.chmod(0o644)  # others may read it
    cases = [
        ({"files_listen": "127.0.0.1:1"}, "files_secret_file is not"),
        ({"files_listen": "127.0.0.1:1", "files_secret_file": str(key)}, "readable by others"),
    ]
    for opts, words in cases:
        d = Daemon(world_dir, daemon_opts=opts)
        checked = d.cli("check-config", check=False)  # check-config says what serve would
        assert checked.returncode == 2 and words in checked.stderr, checked.stderr
        assert "Traceback" not in checked.stderr
        with pytest.raises(RuntimeError) as exc:
            d.start(timeout=10)
        assert words in str(exc.value) and "Traceback" not in str(exc.value)
        d.stop(check=False)


def test_example_script_runs_as_written(api: Api, world_dir: Path) -> None:
    import sys

    vf = api.d.vfolder()
    src = world_dir / "hello.txt"
    src.write_bytes(b"hello from the files example\n" * 100)
    script = Path(__file__).parent.parent / "examples" / "files-api.sh"
    env = {
        **os.environ,
        "VFUSEFS_CONFIG": str(api.d.config),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    r = subprocess.run(
        [str(script), "local", vf.name, str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert f"upload-offset: {src.stat().st_size}" in r.stdout.lower()
    assert '"name":"hello.txt"' in r.stdout and "h   e   l   l   o" in r.stdout
    assert '"deleted":true' in r.stdout
    assert not (vf / "uploads").exists()


def test_a_client_leaving_mid_download_leaves_nothing_open(api: Api) -> None:
    vf = api.d.vfolder()
    with open(vf / "big", "wb") as f:
        f.write(os.urandom(64 * MiB))
    token = api.token(vf, "ro")
    for _ in range(5):
        with httpx.Client(base_url=api.base, timeout=30) as c:
            with c.stream(
                "GET", api.url(vf, "big"), headers={"authorization": f"Bearer {token}"}
            ) as r:
                assert r.status_code == 200
                next(r.iter_bytes())  # a first piece, then the client goes away
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = api.d.api("GET", "/v1/status").json()
        if status["open_handles"] == 0:
            break
        time.sleep(0.2)
    assert status["open_handles"] == 0, status
    assert api.get(vf, "big", token, headers={"range": "bytes=0-3"}).status_code == 206
