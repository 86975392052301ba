"""The access decision, exhaustively, without a mount (SPEC §3)."""

from __future__ import annotations

import errno
import itertools

import pytest

from vfusefs.domain import access
from vfusefs.domain.access import Caller, Mode, Need

ROOT_HOST = Caller(uid=0, gid=0, pid=1, cgroup="/user.slice/session-1.scope")
ROOT_CONTAINER = Caller(uid=0, gid=0, pid=2, cgroup="/docker/abc123")
USER = Caller(uid=1000, gid=1000, pid=3, cgroup="/user.slice", groups=frozenset({1000, 27}))
CONFINED = ("/docker", "/system.slice/docker-", "/kubepods", "/machine.slice")


def test_errno_table_is_exactly_the_spec() -> None:
    expected = {
        (Mode.NONE, Need.READ): errno.EACCES,
        (Mode.NONE, Need.WRITE): errno.EACCES,
        (Mode.NONE, Need.DELETE): errno.EACCES,
        (Mode.RO, Need.READ): 0,
        (Mode.RO, Need.WRITE): errno.EROFS,
        (Mode.RO, Need.DELETE): errno.EROFS,
        (Mode.RW, Need.READ): 0,
        (Mode.RW, Need.WRITE): 0,
        (Mode.RW, Need.DELETE): errno.EPERM,
        (Mode.RWD, Need.READ): 0,
        (Mode.RWD, Need.WRITE): 0,
        (Mode.RWD, Need.DELETE): 0,
        (Mode.ADMIN, Need.READ): 0,
        (Mode.ADMIN, Need.WRITE): 0,
        (Mode.ADMIN, Need.DELETE): 0,
    }
    for mode, need in itertools.product(Mode, Need):
        assert access.check(mode, need) == expected[(mode, need)], (mode, need)


def test_admins() -> None:
    assert access.is_admin(ROOT_HOST, [0], CONFINED)
    assert not access.is_admin(ROOT_CONTAINER, [0], CONFINED)  # root in a container is not
    assert not access.is_admin(Caller(0, 0, 9, "/system.slice/docker-abc.scope"), [0], CONFINED)
    assert not access.is_admin(USER, [0], CONFINED)
    assert access.is_admin(USER, [0, 1000], CONFINED)
    assert not access.is_admin(Caller(0, 0, 0, None), [0], CONFINED)  # unknown cgroup: fail closed


def test_most_specific_principal_wins() -> None:
    grants = {"*": "ro", "gid:27": "rw", "uid:1000": "rwd", "cgroup:/user.slice": "ro"}
    assert access.effective_mode(USER, grants) == Mode.RO  # a cgroup match beats uid
    del grants["cgroup:/user.slice"]
    assert access.effective_mode(USER, grants) == Mode.RWD  # uid beats gid
    del grants["uid:1000"]
    assert access.effective_mode(USER, grants) == Mode.RW  # gid (supplementary) beats *
    del grants["gid:27"]
    assert access.effective_mode(USER, grants) == Mode.RO
    del grants["*"]
    assert access.effective_mode(USER, grants) == Mode.NONE


def test_longest_cgroup_wins_and_matches_below() -> None:
    c = Caller(0, 0, 5, "/docker/abc/inner")
    grants = {"cgroup:/docker": "ro", "cgroup:/docker/abc": "rwd", "cgroup:/docker/ab": "rw"}
    assert access.effective_mode(c, grants) == Mode.RWD
    assert (
        access.effective_mode(Caller(0, 0, 5, "/docker/abcd"), grants) == Mode.RO
    )  # not a prefix match
    assert access.effective_mode(Caller(0, 0, 5, None), grants) == Mode.NONE
    assert access.effective_mode(c, {"cgroup:/": "ro"}) == Mode.RO


def test_equal_gid_grants_take_the_wider() -> None:
    assert access.effective_mode(USER, {"gid:1000": "ro", "gid:27": "rw"}) == Mode.RW


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("*", "*"),
        ("uid:0", "uid:0"),
        ("uid:007", "uid:7"),
        ("gid:100", "gid:100"),
        ("cgroup:/docker/x/", "cgroup:/docker/x"),
        ("cgroup:/", "cgroup:/"),
    ],
)
def test_principals(text: str, canonical: str) -> None:
    assert access.parse_principal(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "uid:",
        "uid:-1",
        "uid:x",
        "gid:1.5",
        "cgroup:rel",
        "cgroup:/a/../b",
        "cgroup:/a//b",
        "user:1",
        "**",
        "uid:99999999999",
    ],
)
def test_bad_principals(text: str) -> None:
    with pytest.raises(access.BadGrant):
        access.parse_principal(text)


def test_modes() -> None:
    assert [access.canonical_mode(m) for m in ("ro", "rw", "rwd", "wd")] == [
        "ro",
        "rw",
        "rwd",
        "rwd",
    ]
    for bad in ("", "RW", "w", "admin", None):
        with pytest.raises(access.BadGrant):
            access.parse_mode(bad)  # type: ignore[arg-type]
