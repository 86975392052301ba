"""The one place exceptions become errno for the kernel.

Rules (which error wins, written down once):
- `FUSEError` raised on purpose (access, quota, policy) passes through unchanged.
- `OSError` from a native syscall passes its errno through, so callers see what the native
  filesystem said (ENOENT, ENOTEMPTY, EDQUOT, ENOSPC...); an OSError without errno is EIO.
- `trio.TooSlowError` (a host did not answer within its op_timeout) is EIO; so is `HostDown`
  (a host marked down answers at once, and is not logged per request: its health change is).
- Store and backend failures are EIO: the request cannot be decided safely.
- Anything else is a bug: EIO plus one logged traceback.  pyfuse3 ends its main loop on any
  exception that is not a FUSEError, so nothing else may ever escape a handler.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from vfusefs.backends import BackendError
from vfusefs.domain.quota import QuotaExceeded
from vfusefs.runtime.workers import HostDown, StoppedError
from vfusefs.store import StoreError

log = logging.getLogger("vfusefs.ops")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# exception type -> errno, checked in order; tests assert every class in here maps to an int
MAPPED: tuple[tuple[type[BaseException], int], ...] = (
    (QuotaExceeded, errno.EDQUOT),
    (trio.TooSlowError, errno.EIO),
    (StoreError, errno.EIO),
    (BackendError, errno.EIO),
    (StoppedError, errno.EIO),
    (HostDown, errno.EIO),
    (UnicodeError, errno.EINVAL),
    (OverflowError, errno.EINVAL),
)


LOG_EVERY = 10.0  # seconds: at most one line per (host, op, kind of failure) in that time
_last_logged: dict[tuple[str, str, type], tuple[float, int]] = {}


def fail(code: int) -> pyfuse3.FUSEError:
    """The error a handler raises to answer errno code."""
    return pyfuse3.FUSEError(code)


def _should_log(host: str, op: str, kind: type) -> int | None:
    """None to stay quiet; else how many like it were suppressed since the last line.

    A hung host fails every request with EIO: one line per request would flood the journal, so
    request failures are logged at most once per LOG_EVERY seconds per host, op and kind."""
    now = time.monotonic()
    key = (host, op, kind)
    last = _last_logged.get(key)
    if last is not None and now - last[0] < LOG_EVERY:
        _last_logged[key] = (last[0], last[1] + 1)
        return None
    if len(_last_logged) > 10000:
        _last_logged.clear()
    _last_logged[key] = (now, 0)
    return last[1] if last is not None else 0


def to_errno(exc: BaseException, op: str = "", host: str = "-") -> int:
    """The errno to answer with for exc (logs a traceback for unexpected ones, rate-limited)."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc.errno
    if isinstance(exc, OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, HostDown):  # said once, when the host went down (state/health.py)
        return errno.EIO
    fields = {"op": op, "host": host, "errno": errno.EIO}
    for kind, code in MAPPED:
        if isinstance(exc, kind):
            if code == errno.EIO and (quiet := _should_log(host, op, kind)) is not None:
                log.warning(
                    "%s on host %s: %s: %s%s",
                    op,
                    host,
                    type(exc).__name__,
                    exc,
                    f" ({quiet} more like it not logged)" if quiet else "",
                    extra=fields,
                )
            return code
    if (quiet := _should_log(host, op, type(exc))) is not None:
        log.error(
            "unexpected error in FUSE handler %s (host %s), answering EIO%s",
            op,
            host,
            f" ({quiet} more like it not logged)" if quiet else "",
            exc_info=exc,
            extra=fields,
        )
    return errno.EIO


def handler(fn: F) -> F:
    """Decorate an Operations method: map every exception, count and time the operation per
    host (`self.host_label(op, args)` names it, `self.observe(...)` records it)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s%r",
                name,
                tuple(a for a in args if not isinstance(a, (bytes, bytearray)) or len(a) < 64),
                extra={"op": name},
            )
        host = self.host_label(name, args)  # before fn: release drops the handle it names
        start = time.perf_counter()
        try:
            result = await fn(self, *args)
        except pyfuse3.FUSEError as exc:
            self.observe(host, name, exc.errno, time.perf_counter() - start)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> errno %d", name, exc.errno, extra={"op": name, "errno": exc.errno})
            raise
        except trio.Cancelled:
            raise
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            code = to_errno(exc, name, host)
            self.observe(host, name, code, time.perf_counter() - start)
            raise pyfuse3.FUSEError(code) from None
        self.observe(host, name, 0, time.perf_counter() - start)
        return result

    return wrapper  # type: ignore[return-value]
