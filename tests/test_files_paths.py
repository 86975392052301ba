"""The file API's pure checks (domain/files.py) and its tokens (service/tokens.py): no daemon,
no mount."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt
import pytest

from vfusefs.domain import files
from vfusefs.domain.access import Mode
from vfusefs.domain.validation import RegistryError
from vfusefs.service.tokens import BadKey, FileTokens, read_key

KEY = b"0123456789abcdef0123456789abcdef"
VFID = "6f1c2a3e-0000-4000-8000-00000000d3e0"


def test_paths_are_split_per_component_and_never_climb() -> None:
    assert files.split_path(b"a/b%20c/") == ((b"a", b"b c"), True)
    assert files.split_path(b"a//b") == ((b"a", b"b"), False)
    assert files.split_path(b"") == ((), True)
    assert files.split_path(b"%C3%A9t%C3%A9") == (("été".encode(),), False)
    for bad in (b"..", b"a/../b", b"%2e%2e", b"a/%2E%2e/b", b"..%2fx", b"a%2Fb", b"a%00b", b"."):
        with pytest.raises(RegistryError) as exc:
            files.split_path(bad)
        assert exc.value.status == 400, bad
    with pytest.raises(RegistryError):
        files.split_path(b"x" * 256)
    assert files.parse_path("/a/b/") == (b"a", b"b")
    assert files.parse_path("") == ()
    with pytest.raises(RegistryError):
        files.parse_path("a/../b")
    with pytest.raises(RegistryError):
        files.parse_path(3)


def test_covers_compares_whole_components() -> None:
    assert files.covers((b"pub",), (b"pub", b"x"))
    assert files.covers((b"pub",), (b"pub",))
    assert files.covers((), (b"anything",))
    assert not files.covers((b"pub",), (b"public",))
    assert not files.covers((b"pub",), ())


def test_ranges() -> None:
    r = files.parse_ranges
    assert r(None, 10) is None
    assert r("bytes=0-3", 10) == [files.Range(0, 3)]
    assert r("bytes=5-", 10) == [files.Range(5, 9)]
    assert r("bytes=-3", 10) == [files.Range(7, 9)]
    assert r("bytes=-30", 10) == [files.Range(0, 9)]
    assert r("bytes=8-20", 10) == [files.Range(8, 9)]
    assert r("bytes=0-0,5-6", 10) == [files.Range(0, 0), files.Range(5, 6)]
    assert r("bytes=3-1", 10) is None  # not a valid set: the whole file
    assert r("items=0-1", 10) is None
    assert r("bytes=" + ",".join(["0-1"] * 40), 10) is None  # too many: the whole file
    for unsatisfiable in ("bytes=10-", "bytes=10-20", "bytes=-0"):
        with pytest.raises(files.Unsatisfiable):
            r(unsatisfiable, 10)
    with pytest.raises(files.Unsatisfiable):
        r("bytes=0-", 0)


def test_metadata_cursor_ttl_length() -> None:
    meta = files.parse_metadata("path L2EvYg==,flag,host bG9jYWw=")
    assert meta == {"path": b"/a/b", "flag": b"", "host": b"local"}
    assert files.parse_metadata(files.encode_metadata(meta)) == meta
    for bad in ("path !!!", "path a b", "a 1,a 1"):
        with pytest.raises(RegistryError):
            files.parse_metadata(bad)
    for name in (b"", b"plain", b"\xff\xfe odd/ish"):
        assert files.decode_cursor(files.encode_cursor(name)) == name
    assert files.parse_ttl("30m") == 1800 and files.parse_ttl(60) == 60
    for bad in ("0", "31d", "1y", True, None, "-5"):
        with pytest.raises(RegistryError):
            files.parse_ttl(bad)
    assert files.parse_length("12", "Upload-Length") == 12
    for bad in (None, "-1", "1e3", ""):
        with pytest.raises(RegistryError):
            files.parse_length(bad, "Upload-Offset")


def test_tokens_round_trip_and_refusals() -> None:
    t = FileTokens(KEY)
    token, exp = t.sign("local", VFID, "rw", "/pub", 60)
    c = t.verify(token)
    assert (c.host, c.vfolder, c.mode, c.path) == ("local", VFID, Mode.RW, (b"pub",))
    assert exp - time.time() <= 60
    claims = {"host": "local", "vfolder": VFID, "mode": "rwd", "exp": int(time.time()) + 60}
    refused = [
        jwt.encode(claims, b"another key, long enough to be a key", algorithm="HS256"),
        jwt.encode({**claims, "exp": int(time.time()) - 60}, KEY, algorithm="HS256"),
        jwt.encode(claims, None, algorithm="none"),
        jwt.encode(claims, KEY * 2, algorithm="HS512"),  # another algorithm
        jwt.encode({**claims, "mode": "admin"}, KEY, algorithm="HS256"),
        jwt.encode({**claims, "vfolder": "../x"}, KEY, algorithm="HS256"),
        jwt.encode({**claims, "path": "a/../../b"}, KEY, algorithm="HS256"),
        jwt.encode({k: v for k, v in claims.items() if k != "host"}, KEY, algorithm="HS256"),
        "not a token",
    ]
    for bad in refused:
        with pytest.raises(RegistryError) as exc:
            t.verify(bad)
        assert exc.value.status == 401
    with pytest.raises(RegistryError) as exc:
        FileTokens().sign("local", VFID, "ro", "", 60)  # no key configured
    assert exc.value.status == 409


def test_key_file_rules(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(KEY + b"\nignored second line\n")
    key.chmod(0o600)
    assert read_key(str(key)) == KEY
    key.chmod(0o640)
    with pytest.raises(BadKey, match="readable by others"):
        read_key(str(key))
    key.chmod(0o600)
    key.write_bytes(b"short\n")
    with pytest.raises(BadKey, match="at least 32 bytes"):
        read_key(str(key))
    with pytest.raises(BadKey, match="No such file"):
        read_key(str(tmp_path / "missing"))
    assert os.path.exists(key)
