"""The exception -> errno mapping is complete and never lets anything escape a handler."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest
import trio

from vfusefs.backends import BackendError
from vfusefs.fuse import errors
from vfusefs.store import StoreError


def test_mapping_is_complete() -> None:
    for kind, code in errors.MAPPED:
        assert isinstance(code, int) and code > 0
        assert errors.to_errno(kind("x") if kind is not trio.TooSlowError else kind()) == code
    assert errors.to_errno(pyfuse3.FUSEError(errno.EROFS)) == errno.EROFS
    assert errors.to_errno(FileNotFoundError(errno.ENOENT, "x")) == errno.ENOENT
    assert errors.to_errno(OSError("no errno")) == errno.EIO
    assert errors.to_errno(StoreError("db locked")) == errno.EIO
    assert errors.to_errno(BackendError("x")) == errno.EIO


class Fake:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def host_label(self, op: str, args: tuple) -> str:
        return "h1"

    def observe(self, host: str, op: str, code: int, seconds: float) -> None:
        assert host == "h1"
        self.seen.append((op, code))

    @errors.handler
    async def boom(self) -> None:
        raise KeyError("a bug")

    @errors.handler
    async def native(self) -> None:
        raise PermissionError(errno.EACCES, "denied")

    @errors.handler
    async def fine(self) -> int:
        return 7


async def test_handler_turns_bugs_into_eio(caplog: pytest.LogCaptureFixture) -> None:
    f = Fake()
    with caplog.at_level(logging.ERROR):
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await f.boom()
    assert exc.value.errno == errno.EIO
    assert "unexpected error" in caplog.text and "KeyError" in caplog.text
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await f.native()
    assert exc.value.errno == errno.EACCES
    assert await f.fine() == 7
    assert f.seen == [("boom", errno.EIO), ("native", errno.EACCES), ("fine", 0)]


def test_request_failures_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            assert errors.to_errno(trio.TooSlowError("host h1 hangs"), "read", "h1") == errno.EIO
        assert errors.to_errno(trio.TooSlowError("host h2 hangs"), "read", "h2") == errno.EIO
    lines = [r for r in caplog.records if "hangs" in r.getMessage()]
    assert len(lines) == 2  # one for h1 (99 suppressed), one for h2
    assert lines[0].host == "h1" and lines[0].op == "read"
