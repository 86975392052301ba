"""Per-host worker threads: the only place native syscalls run.

pyfuse3 runs every handler on one trio thread, so a syscall on a hung NFS server would stall
every host and the daemon itself.  Each host gets its own `HostWorkers` pool; a handler awaits
`workers.run(fn, *args)`, which hands `fn` to one of the host's threads.

The hand-off is the hot path of the whole daemon (a FUSE request is usually exactly one hop), and
on a small VM every cross-thread wake-up costs tens of microseconds.  Parking the trio task and
being woken through trio's wake-up socket costs about 215 us per hop inside the daemon, while a
local fstat takes 2 us.  So `run` first waits for the worker on a plain lock, with the GIL
released, for at most `FAST_WAIT` seconds; a fast native call completes inside that window and
costs one wake-up each way.  Only a slower call parks the task in trio, so the loop then serves
other requests.  The loop is thus held for at most FAST_WAIT per request, and not at all for a
host whose recent calls were slow (`slow_ewma` above FAST_WAIT) or whose threads are all busy:
a hung host costs the loop nothing, and its requests fail with EIO after `op_timeout`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable, TypeVar

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")

FAST_WAIT = 0.0003  # seconds the loop may wait for a fast native call before parking the task
_DONE = 2
_PARKED = 1
_WAITING = 0


class StoppedError(Exception):
    """The host's pool was stopped (the host is no longer served): answered with EIO."""


class _Job:
    __slots__ = ("fn", "args", "task", "ok", "value", "state", "mutex", "done", "abandoned")

    def __init__(self, fn: Callable[..., Any], args: tuple, task: Any) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.ok = False
        self.value: Any = None
        self.state = _WAITING
        self.mutex = threading.Lock()
        self.done = threading.Lock()
        self.done.acquire()
        self.abandoned = False


class HostWorkers:
    """A fixed pool of daemon threads running blocking calls for one storage host."""

    def __init__(self, name: str, threads: int, op_timeout: float,
                 token: trio.lowlevel.TrioToken) -> None:
        self.name = name
        self.op_timeout = op_timeout
        self._token = token
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._size = threads
        self._threads = [threading.Thread(target=self._loop, name=f"vfusefs-{name}-{i}", daemon=True)
                         for i in range(threads)]
        self._submitted = 0  # written by the trio thread only
        self._finished = itertools.count()  # next() is atomic: safe from every worker
        self._finished_n = 0
        self.slow_ewma = 0.0  # recent native call latency, seconds
        self.stopped = False
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        get = self._queue.get
        while (job := get()) is not None:
            start = time.perf_counter()
            try:
                job.value = job.fn(*job.args)
                job.ok = True
            except BaseException as exc:  # handed back to the awaiting task, raised there
                job.value = exc
            elapsed = time.perf_counter() - start
            self.slow_ewma = self.slow_ewma * 0.9 + elapsed * 0.1
            self._finished_n = next(self._finished) + 1
            with job.mutex:
                parked = job.state == _PARKED
                job.state = _DONE
            if parked:
                try:
                    self._token.run_sync_soon(self._wake, job)
                except trio.RunFinishedError:
                    return
            else:
                job.done.release()

    @property
    def busy(self) -> int:
        """Jobs handed out and not finished (all threads busy for long: the host may hang)."""
        return self._submitted - self._finished_n

    def _wake(self, job: _Job) -> None:
        if job.abandoned:
            if not job.ok:
                log.warning("host %s: background call %s failed: %s", self.name,
                            getattr(job.fn, "__name__", job.fn), job.value)
            return
        trio.lowlevel.reschedule(job.task)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on one of this host's threads; TooSlowError after op_timeout."""
        if self.stopped:
            raise StoppedError(f"host {self.name} is no longer served")
        job = _Job(fn, args, trio.lowlevel.current_task())
        self._submitted += 1
        self._queue.put(job)
        if self.busy <= self._size and self.slow_ewma < FAST_WAIT and job.done.acquire(timeout=FAST_WAIT):
            return self._result(job)
        with job.mutex:
            if job.state == _DONE:
                return self._result(job)
            job.state = _PARKED

        def abort(_: Any) -> trio.lowlevel.Abort:
            job.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(self.op_timeout) as scope:
            await trio.lowlevel.wait_task_rescheduled(abort)
        if scope.cancelled_caught and job.abandoned:
            raise trio.TooSlowError(f"host {self.name}: native call {getattr(fn, '__name__', fn)} "
                                    f"took longer than {self.op_timeout}s")
        return self._result(job)

    @staticmethod
    def _result(job: _Job) -> Any:
        if job.ok:
            return job.value
        raise job.value

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the background, nobody waiting (closing fds after a reply).

        Once the pool is stopped (its host removed by a reload), fn runs right here: what is
        submitted is closing fds, which must not leak, and close(2) of our fds does not block."""
        if self.stopped:
            try:
                fn(*args)
            except OSError as exc:
                log.warning("host %s: %s failed: %s", self.name, getattr(fn, "__name__", fn), exc)
            return
        job = _Job(fn, args, None)
        job.state = _PARKED
        job.abandoned = True
        self._submitted += 1
        self._queue.put(job)

    def stop(self) -> None:
        self.stopped = True
        for _ in self._threads:
            self._queue.put(None)
