"""Per-host worker threads: the only place native syscalls run.

pyfuse3 runs every handler on one trio thread, so a syscall on a hung NFS server would stall
every host and the daemon itself.  Each host gets its own `HostWorkers` pool; a handler awaits
`workers.run(fn, *args)`, which hands `fn` to one of the host's threads and parks the task.

Why not `trio.to_thread.run_sync` with a CapacityLimiter?  It costs about 160 us per call on a
2-core VM (thread-cache handoff plus a `from_thread` re-entry); this pool costs about 90 us,
and a FUSE request is usually exactly one such hop.

What it must never do: block the trio thread.  `run()` gives up after the host's `op_timeout`
with `TooSlowError` (mapped to EIO); the thread stays stuck on the native call and its result is
dropped when it finally comes back.  A host whose threads are all stuck queues further calls,
which time out the same way; no other host shares its threads.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, TypeVar

import trio

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Job:
    __slots__ = ("fn", "args", "task", "ok", "value", "abandoned")

    def __init__(self, fn: Callable[..., Any], args: tuple, task: Any) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.ok = False
        self.value: Any = None
        self.abandoned = False


class HostWorkers:
    """A fixed pool of daemon threads running blocking calls for one storage host."""

    def __init__(self, name: str, threads: int, op_timeout: float,
                 token: trio.lowlevel.TrioToken) -> None:
        self.name = name
        self.op_timeout = op_timeout
        self._token = token
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"vfusefs-{name}-{i}", daemon=True)
                         for i in range(threads)]
        self.busy = 0  # jobs handed out and not yet finished (for health: all stuck = hung)
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        get = self._queue.get
        while (job := get()) is not None:
            try:
                job.value = job.fn(*job.args)
                job.ok = True
            except BaseException as exc:  # handed back to the awaiting task, raised there
                job.value = exc
            try:
                self._token.run_sync_soon(self._finish, job)
            except trio.RunFinishedError:
                return

    def _finish(self, job: _Job) -> None:
        self.busy -= 1
        if not job.abandoned:
            trio.lowlevel.reschedule(job.task)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on one of this host's threads; TooSlowError after op_timeout."""
        job = _Job(fn, args, trio.lowlevel.current_task())
        self.busy += 1
        self._queue.put(job)

        def abort(_: Any) -> trio.lowlevel.Abort:
            job.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(self.op_timeout) as scope:
            await trio.lowlevel.wait_task_rescheduled(abort)
        if scope.cancelled_caught and job.abandoned:
            raise trio.TooSlowError(f"host {self.name}: native call {getattr(fn, '__name__', fn)} "
                                    f"took longer than {self.op_timeout}s")
        if job.ok:
            return job.value  # type: ignore[no-any-return]
        raise job.value

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the background, nobody waiting (closing fds after a reply)."""
        job = _Job(fn, args, None)
        job.abandoned = True
        self.busy += 1
        self._queue.put(job)

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
