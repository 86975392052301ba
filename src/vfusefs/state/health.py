"""Host health: is a host's storage answering, and how fast (SPEC §7).

Every PROBE_INTERVAL seconds, a probe stats the host's native path and writes and reads back a
small hidden file in it (`.vfusefs-probe`), on a thread of its own, bounded by the host's
`op_timeout`:

- `ok`: probes answer within op_timeout / 10;
- `degraded`: they answer, but slower;
- `down`: a probe did not answer within op_timeout, or failed (the path is gone, I/O errors).

What netlink says of the way to the host's `servers` (state/netwatch.py) counts too: the
worse of the two wins.

A host goes `down` at the first probe that does not answer, or the first request that gets no
answer within op_timeout.  Its operations, new and already waiting, then fail with EIO at once
(HostWorkers.set_down) instead of each waiting op_timeout, so no caller waits much more than
op_timeout for one system call, however many the kernel queued behind one another.  Coming back
takes RECOVER probes in a row that answer (and leaving `degraded` as many fast ones), so a
flapping link does not flap the state.  A probe thread stuck in the kernel (a hard NFS mount)
is never joined by another: the host stays down until it returns.  Each change is logged once
and shown in `user.vfusefs.health`, `vfusefs_host_up`, `vfusefs_host_health`, `vfusefs status`
and the systemd STATUS line.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from vfusefs.state.netwatch import NetState

if TYPE_CHECKING:
    from vfusefs.state.registry import Host

log = logging.getLogger(__name__)

PROBE_INTERVAL = 2.0  # seconds between probes of a host
RECOVER = 2  # probes in a row that must agree before the state gets better
PROBE_FILE = ".vfusefs-probe"
STATES = ("ok", "degraded", "down")


def probe(path: str) -> None:
    """Stat the host's path, then write and read back a few bytes in a hidden file there (on a
    read-only export only the stat and the read count).  OSError when the storage fails."""
    os.stat(path)
    target = os.path.join(path, PROBE_FILE)
    stamp = str(time.time_ns()).encode()
    try:
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            os.listdir(path)  # read-only storage: reading it is what is left to try
            return
        raise
    try:
        os.pwrite(fd, stamp, 0)
        if os.pread(fd, len(stamp), 0) != stamp:
            raise OSError(errno.EIO, "the probe read back other bytes than it wrote")
    finally:
        os.close(fd)


class HostHealth:
    """The health of one host, fed by its probe; `changed(host, old, new)` on every change."""

    def __init__(self, host: Host, changed: Callable[[Host, str, str], None]) -> None:
        self.host = host
        self.changed = changed
        self.wake = trio.Event()  # a request timed out: probe now
        self.running: threading.Event | None = None  # set when the probe thread returns
        self.streak = 0  # probes in a row that said the same better state
        self.last_error = ""
        self.probes = 0
        self.abandoned = 0  # probe threads that never returned (stuck in the kernel)
        self.net = NetState("ok", "")  # what netlink says of the way to the servers

    @property
    def state(self) -> str:
        return self.host.health

    def network(self, net: NetState) -> None:
        """The way to the host's servers changed (state/netwatch.py): worse at once, better
        with the probes (RECOVER in a row)."""
        self.net = net
        if STATES.index(net.state) > STATES.index(self.state):
            self.streak = 0
            self._set(net.state, net.why)
        else:
            self.wake.set()

    def suspect(self) -> None:
        """A request on this host got no answer within op_timeout: that is a probe that did
        not answer.  Down at once, so the requests the kernel queued behind it (lookups in one
        directory go one at a time) fail now instead of each waiting op_timeout; the probes
        bring it back (RECOVER in a row)."""
        self._set("down", f"a request got no answer within {self.host.config.op_timeout:g} s")
        self.wake.set()

    async def watch(self) -> None:
        while True:
            await self.check()
            with trio.move_on_after(PROBE_INTERVAL):
                await self.wake.wait()
            self.wake = trio.Event()

    async def check(self) -> None:
        """One probe, and what it says about the state."""
        timeout = self.host.config.op_timeout
        if self.running is not None and not self.running.is_set():
            self._set("down", f"the probe started {timeout:.0f}+ s ago has not returned")
            return
        done = threading.Event()
        self.running = done
        result: list[BaseException | None] = []

        def run() -> None:
            try:
                probe(self.host.config.path)
                result.append(None)
            except OSError as exc:
                result.append(exc)
            finally:
                done.set()

        self.probes += 1
        started = time.monotonic()
        with trio.move_on_after(timeout):
            await trio.to_thread.run_sync(run, abandon_on_cancel=True)
        took = time.monotonic() - started
        if not done.is_set():
            self.abandoned += 1
            self._set("down", f"the storage did not answer a probe within {timeout:.0f} s")
            return
        failure = result[0] if result else None
        if failure is not None:
            self._set("down", f"the probe failed: {failure}")
            return
        state, why = "ok", ""
        if took > timeout / 10:
            state, why = "degraded", f"a probe took {took:.2f} s (> op_timeout / 10)"
        if STATES.index(self.net.state) > STATES.index(state):  # the network says worse
            state, why = self.net.state, self.net.why
        self._better_or_worse(state, why)

    def _better_or_worse(self, state: str, why: str) -> None:
        """Worse at once; better only after RECOVER probes in a row say so."""
        if STATES.index(state) >= STATES.index(self.state):
            self.streak = 0
            self._set(state, why)
            return
        self.streak += 1
        if self.streak >= RECOVER:
            self.streak = 0
            self._set(state, why or f"{RECOVER} probes in a row answered in time")

    def _set(self, state: str, why: str) -> None:
        if state == "down":
            self.streak = 0
        old = self.host.health
        if state == old:
            return
        self.host.health = state
        self.last_error = why
        self.host.workers.set_down(state == "down")
        self.changed(self.host, old, state)
        level = logging.WARNING if state != "ok" else logging.INFO
        log.log(
            level,
            "host %s is %s (was %s): %s",
            self.host.name,
            state,
            old,
            why,
            extra={"host": self.host.name},
        )
