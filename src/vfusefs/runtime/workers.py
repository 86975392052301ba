"""Per-host worker threads: where native syscalls run (but for one kind of read, below).

pyfuse3 runs every handler on one trio thread, so a syscall on a hung NFS server would stall
every host and the daemon itself.  Each host gets its own `HostWorkers` pool; a handler awaits
`workers.run(fn, *args)`, which hands `fn` to one of the host's threads.

The hand-off is the hot path of the whole daemon (a FUSE request is usually exactly one hop).
With Python's queues and locks a hop costs two futex wake-ups, 50 to 70 us on a small VM where a
local fstat takes 2 us.  So each thread has a `Lane` (C, `shim/hop.c`): a one-job mailbox on
which both sides spin for a bounded time, with the GIL released, before they sleep.  `run`
posts the job to a free lane and spins up to `FAST_WAIT` for it: a fast native call comes back
in a few microseconds, without the loop ever sleeping.  A worker that finished a job spins up
to `WORKER_SPIN` for the next one (requests from one process come tens of microseconds apart),
then sleeps on a futex.  Spinning yields the CPU to anything else runnable, so it only uses
idle time.

Only a slower call parks the task in trio, so the loop then serves other requests.  The loop is
thus held for at most FAST_WAIT per request, and not at all for a host whose recent calls were
slow (`slow_ewma` above FAST_WAIT) or whose threads are all busy: a hung host costs the loop
nothing, and its requests fail with EIO after `op_timeout`.

Background calls (`submit`) have nobody waiting; their worker hands the lane back on a deque
the next `run` drains, because the loop may serve requests for a while without looking at its
callbacks (fuseloop.py).  They must not slow the requests down, and on a machine with a few
cores the threads that serve those compete for the CPU: a background call goes to the
coldest free lane, its worker sleeps at once when done (no spinning), and its duration does
not count in `slow_ewma`.

Closing fds after forget or release is the most frequent background call (one or two per file
when a tree is read or removed), so those are batched (`close_soon`): a background call then
closes up to CLOSE_BATCH fds at once, with the GIL released once (`close_fds`).  One call per
fd cost the trio thread more than the close itself: the worker waking for it took the GIL
whenever the loop made a syscall, and the loop waited for it back.  The FUSE loop starts the
batch before it waits for requests (`flush_closes`), so fds stay open at most until the loop
is idle, or for 1 ms under load (fuseloop.YIELD_EVERY); statfs closes them first (`settle`),
so space freed by removing a file that was open shows in `df` at once.

Measured on a 2-vCPU VM, reading a tree of 20,000 small files back and removing it
(medians of 3, fresh ext4): 3.59 s and 3.06 s with a background call per fd, 3.1 s and
2.5 s batched, 2.61 s and 2.20 s with background calls kept off the hot lanes as above.

One native call runs on the trio thread itself: `read_cached`, a read with RWF_NOWAIT, which
the kernel answers from the page cache or refuses at once, and only on filesystems where that
holds (native.NOWAIT_FS_TYPES: local ones; NFS, CephFS and FUSE are never asked).  A cached read
then needs no hop at all.  On a miss the kernel has already started reading the pages in, so
the loop spins (up to FAST_WAIT, as it would for a worker) asking again, and answers as soon as
the device is done: the hand-off to a worker no longer adds to the wait, nor does the wake-up
of a worker sleeping in pread.  4 KiB random reads of a cold 1 GiB file through the mount, on
a 2-vCPU VM (interleaved runs): 90-113 us a read with a worker's pread, 79-95 us this way;
18-22 us instead of 32-46 us when the backing file is cached.  Only reads up to SPIN_READ_MAX
wait so: larger ones are readahead, which the kernel sends several at a time and workers serve
side by side (spinning for each, cold sequential reads of 1 GiB took 0.85-1.06 s instead of
0.57-0.73 s).  While the loop spins on a miss, the keeper (shim/hop.c) keeps the CPU of the
process reading awake, so that the reply does not have to wake it from sleep.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import outcome
import trio

from vfusefs.runtime._hop import PARKED, Lane, close_fds, pread_cached

log = logging.getLogger(__name__)
T = TypeVar("T")

FAST_WAIT = 0.0003  # seconds the loop may spin for a fast native call before parking the task
WORKER_SPIN = 0.0002  # seconds a worker spins for its next job before it sleeps
# largest read the loop spins for (read_cached): one waiting for a small read is latency a
# process feels; larger ones are readahead, which is faster on workers, several at a time
SPIN_READ_MAX = 64 << 10

CLOSE_BATCH = 64  # fds closed by one background call

# tasks (of every pool) that a worker will wake through trio: while there are any, the FUSE loop
# does not spin on /dev/fuse (fuseloop.py), as their wake-up comes through trio's own wakeup fd
parked = 0

# pools holding fds batched for closing (close_soon), until flush_closes
_closing: set[HostWorkers] = set()


def flush_closes() -> None:
    """Start closing every pool's batched fds in the background (the FUSE loop calls this
    before it waits for requests)."""
    while _closing:
        _closing.pop().flush_closes()


def _name(fn: Callable[..., Any]) -> Any:
    """What to call a native call in a log line."""
    return getattr(fn, "__name__", fn)


class StoppedError(Exception):
    """The host's pool was stopped (the host is no longer served): answered with EIO."""


class HostDown(trio.TooSlowError):
    """The host is down (its health probe did not answer): answered with EIO at once.  A kind
    of TooSlowError, so whatever copes with a host that does not answer copes with this."""


class _Job:
    __slots__ = ("fn", "args", "task", "ok", "value", "abandoned")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], task: Any) -> None:
        self.fn = fn
        self.args = args
        self.task = task  # None: nobody waits (a background call)
        self.ok = False
        self.value: Any = None
        self.abandoned = False  # its task gave up waiting (op_timeout)


class HostWorkers:
    """A fixed pool of daemon threads running blocking calls for one storage host."""

    def __init__(
        self, name: str, threads: int, op_timeout: float, token: trio.lowlevel.TrioToken
    ) -> None:
        self.name = name
        self.op_timeout = op_timeout
        self._token = token
        self._lanes = [Lane() for _ in range(threads)]
        # free lanes, the trio thread's alone; the last freed (still spinning) is used first
        self._free = list(self._lanes)
        self._lane_free = trio.lowlevel.ParkingLot()  # tasks waiting for a free lane
        self._waiting = 0  # tasks between deciding to wait for a lane and getting one
        # lanes whose background call ended, handed back by their workers (deque: thread-safe)
        self._returned: collections.deque[Lane] = collections.deque()
        self._backlog: collections.deque[_Job] = collections.deque()  # background calls
        self.slow_ewma = 0.0  # recent native call latency, seconds
        self.stopped = False
        # the host is down (state/health.py): calls fail at once, and so do calls waiting
        self.down = False
        self._waiting_jobs: set[_Job] = set()  # jobs whose task is parked in trio for them
        # what to do with the result of a call that ended after its request gave up (op_timeout)
        self.on_abandoned: Callable[[Any], None] | None = None
        self.on_timeout: Callable[[], None] | None = None  # a call gave up after op_timeout
        self._to_close: list[int] = []  # fds batched for closing (close_soon)
        # fds handed to background close calls that have not ended: each call gets at least
        # one, so settle waits until this is 0
        self._closes_fds = 0
        self._closes_lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=self._loop, args=(lane,), daemon=True, name=f"vfusefs-{name}-{i}"
            )
            for i, lane in enumerate(self._lanes)
        ]
        for t in self._threads:
            t.start()

    def _loop(self, lane: Lane) -> None:
        job = lane.take(WORKER_SPIN)
        while job is not None:
            start = time.perf_counter()
            try:
                job.value = job.fn(*job.args)
                job.ok = True
            except BaseException as exc:  # handed back to the awaiting task, raised there
                job.value = exc
            if job.task is not None:  # what requests wait for; not a batch of closes
                self.slow_ewma = self.slow_ewma * 0.9 + (time.perf_counter() - start) * 0.1
            nxt = lane.finish_and_take(WORKER_SPIN)
            if nxt is PARKED:  # nobody spins for this one
                try:
                    if job.task is None:
                        self._background_done(lane, job)
                    else:  # wake its task through trio
                        self._token.run_sync_soon(self._wake, lane, job)
                except trio.RunFinishedError:
                    return
                # after a background call, sleep at once: its lane goes to the cold end of
                # the free list (_release), and spinning would only take a CPU from the
                # worker and the client that serve the requests
                nxt = lane.take(WORKER_SPIN if job.task is not None else 0.0)
            job = nxt

    def _background_done(self, lane: Lane, job: _Job) -> None:
        """In the worker: hand the lane back without a trip through the event loop (which may
        be busy serving requests without looking at its callbacks for a while), unless a task
        or a background call waits for a lane: only trio can give it one."""
        if not job.ok:
            log.warning(
                "host %s: background call %s failed: %s", self.name, _name(job.fn), job.value
            )
        self._returned.append(lane)
        if self._waiting or self._backlog:  # checked after the append: see _reclaim
            self._token.run_sync_soon(self._reclaim)

    def _reclaim(self) -> None:
        """Take back the lanes workers handed back (_background_done).  Whoever starts to
        wait for a lane (a task, or a call in the backlog) says so first and reclaims after, so
        a lane handed back in between is either reclaimed here or makes its worker call this."""
        while self._returned:
            self._release(self._returned.popleft(), cold=True)

    def _wake(self, lane: Lane, job: _Job) -> None:
        self._release(lane)
        if job.abandoned:  # its request already failed with EIO after op_timeout
            log.info(
                "host %s: %s ended %s after its request gave up",
                self.name,
                _name(job.fn),
                "well" if job.ok else f"with {job.value!r}",
            )
            if job.ok and self.on_abandoned is not None:
                self.on_abandoned(job.value)  # e.g. close the fds it opened: nobody else will
            return
        trio.lowlevel.reschedule(job.task)

    def _release(self, lane: Lane, cold: bool = False) -> None:
        """A lane's job is over: give it the next background call, or to a waiting task.

        Free lanes are kept hottest last: `run` takes the last (its worker is likely still
        spinning), `submit` the first (a sleeping worker: background calls can wait for the
        wake-up); a lane back from a background call (`cold`) goes first."""
        if self._backlog and not self.stopped:
            lane.post_parked(self._backlog.popleft())
            return
        if cold:
            self._free.insert(0, lane)
        else:
            self._free.append(lane)
        self._lane_free.unpark()

    async def _lane(self) -> Lane:
        global parked
        parked += 1
        self._waiting += 1
        try:
            self._reclaim()
            while not self._free:
                if self.stopped:
                    raise StoppedError(f"host {self.name} is no longer served")
                if self.down:
                    raise HostDown(f"host {self.name} is down")
                await self._lane_free.park()
            return self._free.pop()
        finally:
            self._waiting -= 1
            parked -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on one of this host's threads; TooSlowError after op_timeout."""
        if self.stopped:
            raise StoppedError(f"host {self.name} is no longer served")
        if self.down:
            raise HostDown(f"host {self.name} is down")
        job = _Job(fn, args, trio.lowlevel.current_task())
        deadline = trio.current_time() + self.op_timeout
        if self._returned:
            self._reclaim()
        if self._free:
            lane = self._free.pop()
            if lane.post_and_wait(job, FAST_WAIT if self.slow_ewma < FAST_WAIT else 0.0):
                self._release(lane)
                return cast(T, self._result(job))  # the fast path: no await, no cancel scope
            with trio.move_on_at(deadline):
                return cast(T, await self._parked(job))
        else:  # every thread busy (a slow or hung host): wait for one, never hold the loop
            with trio.move_on_at(deadline):
                lane = await self._lane()
                if lane.post_and_wait(job, 0.0):
                    self._release(lane)
                    return cast(T, self._result(job))
                return cast(T, await self._parked(job))
        if self.on_timeout is not None:
            self.on_timeout()  # e.g. probe the host's health now
        raise trio.TooSlowError(
            f"host {self.name}: native call {_name(fn)} took longer than {self.op_timeout}s"
        )

    def read_cached(self, fd: int, size: int, off: int, tid: int = 0) -> tuple[bytes, bool]:
        """Read from the page cache on the trio thread (see the module's doc): (data, whole);
        unless whole, data is what came within the spin, and a worker reads the rest.  Spins
        only for reads up to SPIN_READ_MAX and while native calls are fast (as `run` does),
        keeping the CPU of thread tid (the process reading) awake meanwhile; the time spent
        counts in slow_ewma.  OSError if the filesystem refuses RWF_NOWAIT (the caller stops
        asking for that file)."""
        if self.slow_ewma >= FAST_WAIT or size > SPIN_READ_MAX:
            return pread_cached(fd, size, off, 0.0)
        start = time.perf_counter()
        data, whole = pread_cached(fd, size, off, FAST_WAIT, tid)
        # a read that did not come within the spin took longer than it, by an unknown amount
        took = time.perf_counter() - start if whole else 2 * FAST_WAIT
        self.slow_ewma = self.slow_ewma * 0.9 + took * 0.1
        return data, whole

    async def _parked(self, job: _Job) -> Any:
        """Wait in trio for a job the worker will report through _wake."""

        def abort(_: Any) -> trio.lowlevel.Abort:
            job.abandoned = True  # the lane comes back when the call ends (_wake)
            return trio.lowlevel.Abort.SUCCEEDED

        global parked
        parked += 1
        self._waiting_jobs.add(job)
        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            parked -= 1
            self._waiting_jobs.discard(job)
        return self._result(job)

    def set_down(self, down: bool) -> None:
        """The host went down (or came back): from now on calls fail at once with HostDown,
        and so do the calls already waiting, for a thread or for their native call (whose
        thread is left to finish, or to hang in the kernel: the pool's threads are all a dead
        host can hold, and new calls start no more)."""
        self.down = down
        if not down:
            return
        for job in list(self._waiting_jobs):
            job.abandoned = True  # its lane comes back if the call ever ends (_wake)
            self._waiting_jobs.discard(job)
            trio.lowlevel.reschedule(job.task, outcome.Error(HostDown(f"host {self.name} is down")))
        self._lane_free.unpark_all()

    @property
    def stuck(self) -> int:
        """Threads busy with a call whose request gave up (a hung host holds them)."""
        return len(self._lanes) - len(self._free) - len(self._returned)

    @staticmethod
    def _result(job: _Job) -> Any:
        if job.ok:
            return job.value
        raise job.value

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the background, nobody waiting (closing fds: close_soon).

        Once the pool is stopped (its host removed by a reload), fn runs right here: what is
        submitted is closing fds, which must not leak, and close(2) of our fds does not block."""
        if self.stopped:
            try:
                fn(*args)
            except OSError as exc:
                log.warning("host %s: %s failed: %s", self.name, _name(fn), exc)
            return
        job = _Job(fn, args, None)
        if self._returned:
            self._reclaim()
        if self._free:
            self._free.pop(0).post_parked(job)
        else:
            self._backlog.append(job)
            self._reclaim()  # a lane handed back since the check above takes it

    def close_soon(self, fds: list[int]) -> None:
        """Close fds in the background, batched (see the module's doc): for fds nothing will
        use again, whose close the caller need not wait for (after forget and release)."""
        self._to_close.extend(fds)
        if len(self._to_close) >= CLOSE_BATCH or self.stopped:
            self.flush_closes()
        elif self._to_close:
            _closing.add(self)

    def flush_closes(self) -> None:
        """Start closing the batched fds now."""
        _closing.discard(self)
        if self._to_close:
            fds, self._to_close = self._to_close, []
            with self._closes_lock:
                self._closes_fds += len(fds)
            self.submit(self._close, fds)

    def _close(self, fds: list[int]) -> None:
        try:
            close_fds(fds)
        finally:
            with self._closes_lock:
                self._closes_fds -= len(fds)

    @property
    def unclosed(self) -> int:
        """fds handed to close_soon and still open: they count against RLIMIT_NOFILE."""
        return len(self._to_close) + self._closes_fds

    async def settle(self) -> None:
        """Close the batched fds and wait until every close started has ended: before a
        statfs, so the blocks of a removed file are free.  The close of our last fd on an
        unlinked file is what frees its blocks, which takes milliseconds for a large file
        (about 5 ms for 96 MiB on ext4), and that close follows the FORGET, so it may still
        run when the `df` after an `rm` asks.  TooSlowError after op_timeout (a hung host)."""
        self.flush_closes()
        with trio.fail_after(self.op_timeout):
            while self._closes_fds:
                await trio.sleep(0.0005)

    def stop(self) -> None:
        """Calls in progress finish; the threads then end, and later calls fail."""
        self.flush_closes()
        self.stopped = True
        while self._backlog:  # closes waiting for a thread: see submit
            job = self._backlog.popleft()
            self.submit(job.fn, *job.args)
        for lane in self._lanes:
            lane.stop()
        self._lane_free.unpark_all()
