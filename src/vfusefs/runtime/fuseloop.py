"""How pyfuse3's session loop waits for the next request: on the CPU, not in the event loop.

pyfuse3 serves requests from session tasks.  Before each request, its loop takes a `trio.Lock`
(one task reads /dev/fuse at a time) and awaits `trio.lowlevel.wait_readable(fd)`, which parks
the task and goes once round trio's scheduler and epoll even when the request is already there.
For a request answered from memory that round costs more than the answer: a getattr took
44 us from a client, against 27 us for bindfs (C), measured on a 2-vCPU VM.

pyfuse3 looks both up through its module global `trio` (its asyncio mode replaces that global
the same way, in every 3.x release), so `install()` puts a namespace there which is trio except
for the two below.  Should a later pyfuse3 no longer use them, the namespace is plain trio to it
and the loop waits as pyfuse3 does: slower, never wrong.

- `lowlevel.wait_readable`: first polls the fd, spinning up to `spin` seconds with the GIL
  released (shim/hop.c), and returns without a checkpoint once a request is there.  A process
  working through a tree sends its next request tens of microseconds after our reply, so the
  task that just replied usually finds it on the CPU, without a scheduler round or a wake-up
  of a sleeping CPU.  Only when nothing comes within `spin`, when other tasks are runnable or
  wait for a slow native call, or when the task has gone `YIELD_EVERY` without a checkpoint
  does it wait in trio as before (so other tasks wait for the loop at most YIELD_EVERY, plus
  the request being served).
- `Lock`: the read lock lets the task that just replied take it back at once (barging), where
  trio's fair lock would hand it to the waiting task and force a task switch per request.  A
  waiting task is woken on each release and tries again when it runs, so as soon as a handler
  parks (a slow native call) another task reads the next request: concurrency is unchanged.

Before it waits in trio, the loop also starts closing the fds that release and forget handed
to the workers in batches (workers.close_soon): it is about to be idle, or has served requests
for YIELD_EVERY.

With these, the same getattr takes 29 us (19 us in a pyfuse3 filesystem doing nothing else).
Spinning uses idle CPU only: at most `spin` after each request, none while the daemon is idle
(`daemon.busy_poll_us`; 0 turns it off, and with it the keeper of shim/hop.c, which keeps a
reading process's CPU awake while the loop spins for a read from the device).
"""

from __future__ import annotations

import time
from typing import Any

import pyfuse3
import trio

from vfusefs.runtime import workers
from vfusefs.runtime._hop import poll_fd, set_keeper

YIELD_EVERY = 0.001  # seconds the loop may serve requests without letting other tasks run


class ReadLock:
    """pyfuse3's read lock: held while a task waits for the next request; barging."""

    def __init__(self) -> None:
        self.held = False
        self.waiters = trio.lowlevel.ParkingLot()
        self.woken = 0  # waiters woken that have not run yet (runnable, but only to re-check)

    async def __aenter__(self) -> None:
        while self.held:
            await self.waiters.park()
            self.woken -= 1
        self.held = True

    async def __aexit__(self, *exc: object) -> None:
        self.held = False
        if self.waiters:
            self.waiters.unpark()  # it takes the lock if the releasing task has not retaken it
            self.woken += 1


# where this trio keeps its run loop's state (None: not where we expect it, see runnable)
_RUN_CONTEXT = getattr(
    getattr(getattr(trio, "_core", None), "_run", None), "GLOBAL_RUN_CONTEXT", None
)


def runnable() -> int:
    """How many tasks are runnable: the length of trio's run queue, read where this trio keeps
    it.  `current_statistics()` says the same but computes four other figures too: 1.9 us,
    against 0.1 us here, once per request.  Should a later trio keep it elsewhere, ask it."""
    try:
        return len(_RUN_CONTEXT.runner.runq)  # type: ignore[union-attr]
    except AttributeError:
        return trio.lowlevel.current_statistics().tasks_runnable


class Waiter:
    """`wait_readable` for pyfuse3's session fd."""

    def __init__(self, spin: float) -> None:
        self.spin = spin
        self.lock = ReadLock()
        self.checkpointed = time.perf_counter()  # when the loop last let other tasks run

    def set_spin(self, spin: float) -> None:
        """How long to poll for the next request (busy_poll_us; may change on reload), and
        whether the keeper runs (off with the polling)."""
        self.spin = spin
        set_keeper(spin > 0)

    async def wait_readable(self, fd: int) -> None:
        left = YIELD_EVERY - (time.perf_counter() - self.checkpointed)
        if left > 0:
            if poll_fd(fd, 0.0):
                return  # already there
            # tasks woken and not run yet count as runnable; those in the scheduler's current
            # batch do not, and wait at most `left` (which is why spinning stops there).  A
            # task waiting for a slow native call is woken through trio's wakeup fd, which
            # spinning on ours would not see.
            if self.spin and not workers.parked and runnable() <= self.lock.woken:
                if poll_fd(fd, min(self.spin, left)):
                    return
        workers.flush_closes()  # fds released while busy: close them while we wait
        await trio.lowlevel.wait_readable(fd)
        self.checkpointed = time.perf_counter()


class _Lowlevel:
    """trio.lowlevel, but for wait_readable."""

    def __init__(self, waiter: Waiter) -> None:
        self.wait_readable = waiter.wait_readable

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


class _Trio:
    """trio as pyfuse3 sees it: trio, but for lowlevel.wait_readable and the first Lock it
    makes (its read lock: pyfuse3 3.x makes no other)."""

    def __init__(self, waiter: Waiter) -> None:
        self.lowlevel = _Lowlevel(waiter)
        self._read_lock: ReadLock | None = waiter.lock

    def Lock(self) -> ReadLock | trio.Lock:  # noqa: N802 (trio's name)
        lock, self._read_lock = self._read_lock, None
        return lock if lock is not None else trio.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(spin: float) -> Waiter:
    """Make pyfuse3's session loop wait as described above; before pyfuse3.main()."""
    waiter = Waiter(spin)
    waiter.set_spin(spin)
    pyfuse3.trio = _Trio(waiter)  # type: ignore[attr-defined]
    return waiter


def uninstall() -> None:
    pyfuse3.trio = trio  # type: ignore[attr-defined]
    set_keeper(False)
