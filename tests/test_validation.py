"""What the control API hands in (domain/validation.py), checked on its own: no I/O, no mount.
The same refusals through the API, with nothing changed after them, are in test_attacks.py."""

from __future__ import annotations

import uuid

import pytest

from vfusefs.domain.validation import (
    RegistryError,
    canonical_uuid,
    parse_grants,
    parse_limits,
    parse_mode,
    parse_owner,
    parse_scope,
    strict_uuid,
)

U = "6f1c2a3e-0000-4000-8000-00000000d3e0"


def refused(fn: object, *args: object) -> str:
    with pytest.raises(RegistryError) as exc:
        fn(*args)  # type: ignore[operator]
    assert exc.value.status == 400 and "\n" not in exc.value.message
    return exc.value.code


def test_vfolder_ids_are_canonical_uuids() -> None:
    assert canonical_uuid(U.upper()) == U and strict_uuid(U) == U
    for bad in (U[:-1], U + "\n", "{" + U + "}", uuid.UUID(U).hex, f"urn:uuid:{U}", 12, None):
        assert strict_uuid(bad) is None
        assert refused(canonical_uuid, bad) == "bad_id"


def test_scopes() -> None:
    assert parse_scope(None) == parse_scope("") == ""
    assert parse_scope(f"user:{U.upper()}") == f"user:{U}"
    assert parse_scope(f"project:{U}") == f"project:{U}"
    for bad in ("team:" + U, "user:" + U[:-1], "user", 7, ["user:" + U], True):
        assert refused(parse_scope, bad) == "bad_scope"


def test_limits() -> None:
    assert parse_limits("10G", 100) == (10 << 30, 100)
    assert parse_limits(None, None) == (None, None)  # unchanged
    assert parse_limits(0, "0") == (0, 0)  # unlimited
    for bad in (-1, 2**63, "9" * 30, 1.5, "10G\n", "lots"):
        assert refused(parse_limits, bad, None) == "bad_quota"


def test_grants() -> None:
    got = parse_grants([{"principal": "uid:1000", "mode": "wd"}, {"principal": "*", "mode": "ro"}])
    assert got == {"uid:1000": "rwd", "*": "ro"}
    for bad in (
        {"principal": "*"},
        [{"principal": "*"}],
        [{"principal": "uid:x", "mode": "rw"}],
        [{"principal": "cgroup:/a\0b", "mode": "rw"}],
        [{"principal": "*", "mode": "rx"}],
        [{"principal": "*", "mode": "rw", "extra": 1}],
    ):
        assert refused(parse_grants, bad) == "bad_grant"


def test_owner_and_mode_of_a_vfolder_root() -> None:
    assert parse_owner(None) is None and parse_mode(None) is None
    assert parse_owner("1000:100") == (1000, 100)
    assert parse_mode("0755") == 0o755 and parse_mode("2775") == 0o2775
    assert parse_mode("700") == 0o700 and parse_mode("0o750") == 0o750
    for bad in ("1000", "-1:0", "a:b", "4294967296:0", 1000, "1000:1000:1"):
        with pytest.raises(RegistryError) as exc:
            parse_owner(bad)
        assert exc.value.status == 400 and exc.value.code == "bad_owner"
    for bad in ("999", "rwxr-xr-x", "12345", 493, "", "075555"):
        with pytest.raises(RegistryError) as exc:
            parse_mode(bad)
        assert exc.value.code == "bad_mode"
