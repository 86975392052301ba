"""How the FUSE session loop waits for requests (fuseloop.py): on the CPU while they flow.

These drive the read lock and the waiter with real trio tasks and a real pipe standing in for
/dev/fuse; that pyfuse3 picks them up, and that a parked request does not stop the others, is
shown through real mounts (test_mount_tools.py: the hung host; test_service.py: idle CPU).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterator

import pyfuse3
import pytest
import trio
import trio.testing

from vfusefs.runtime import fuseloop
from vfusefs.runtime.workers import HostWorkers


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe standing in for /dev/fuse: a byte written to it is a request."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


class Ticks:
    """A task that counts how often it gets to run."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await trio.sleep(0)


async def test_the_releasing_task_takes_the_read_lock_back_without_a_task_switch() -> None:
    lock = fuseloop.ReadLock()
    order: list[str] = []

    async def other() -> None:
        async with lock:
            order.append("other")

    async with trio.open_nursery() as n:
        await lock.__aenter__()
        n.start_soon(other)
        await trio.testing.wait_all_tasks_blocked()  # other waits for the lock
        with trio.testing.assert_no_checkpoints():
            for _ in range(100):  # a request served from memory, then the next wait
                await lock.__aexit__(None, None, None)
                order.append("me")
                await lock.__aenter__()
        assert lock.woken == 1  # other was woken once, and only re-checks when it runs
        await lock.__aexit__(None, None, None)
        # the holder parked (a slow request): the waiting task reads the next one
    assert order == ["me"] * 100 + ["other"]
    assert lock.woken == 0


async def test_a_waiting_task_gets_the_lock_while_the_holder_is_parked() -> None:
    lock = fuseloop.ReadLock()
    got = trio.Event()

    async def other() -> None:
        async with lock:
            got.set()

    async with trio.open_nursery() as n:
        async with lock:
            n.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(2):
            await got.wait()


async def test_a_request_already_there_is_taken_without_a_checkpoint(pipe: tuple[int, int]) -> None:
    r, w = pipe
    waiter = fuseloop.Waiter(spin=0.0)
    os.write(w, b"x")
    with trio.testing.assert_no_checkpoints():
        await waiter.wait_readable(r)


async def test_a_request_coming_within_the_spin_is_taken_without_a_checkpoint(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    # only the spin bounds the wait: on a loaded machine the timer's thread may start later
    # than YIELD_EVERY (which has its own test below)
    monkeypatch.setattr(fuseloop, "YIELD_EVERY", 10.0)
    r, w = pipe
    waiter = fuseloop.Waiter(spin=2.0)
    threading.Timer(0.0002, os.write, (w, b"x")).start()  # a client's next request
    with trio.testing.assert_no_checkpoints():
        await waiter.wait_readable(r)


async def test_without_a_request_the_loop_waits_in_trio(pipe: tuple[int, int]) -> None:
    r, w = pipe
    waiter = fuseloop.Waiter(spin=0.001)
    async with trio.open_nursery() as n:
        n.start_soon(waiter.wait_readable, r)
        await trio.sleep(0.1)  # the spin is long over: the waiter sleeps in trio
        assert n.child_tasks
        os.write(w, b"x")


async def test_another_runnable_task_stops_the_spinning(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    monkeypatch.setattr(fuseloop, "YIELD_EVERY", 10.0)  # only the runnable task may stop it
    r, w = pipe
    waiter = fuseloop.Waiter(spin=5.0)
    go, ran = trio.Event(), trio.Event()

    async def other() -> None:
        await go.wait()
        ran.set()

    async with trio.open_nursery() as n:
        n.start_soon(other)
        await trio.testing.wait_all_tasks_blocked()
        go.set()  # other is runnable now
        threading.Timer(0.3, os.write, (w, b"x")).start()
        await waiter.wait_readable(r)  # returns at 0.3 s either way
        assert ran.is_set()  # it ran while we waited: we did not spin


async def test_a_task_waiting_for_a_slow_native_call_stops_the_spinning(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    # a cold 1 MiB read parks its request; its worker wakes it through trio's wakeup fd, which
    # spinning on /dev/fuse would not see (the reads came up to 100 us late each)
    monkeypatch.setattr(fuseloop, "YIELD_EVERY", 10.0)
    r, w = pipe
    pool = HostWorkers("t", 2, 5.0, trio.lowlevel.current_trio_token())
    try:
        waiter = fuseloop.Waiter(spin=5.0)
        done = trio.Event()

        async def slow_read() -> None:
            await pool.run(time.sleep, 0.05)  # longer than FAST_WAIT: parks
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(slow_read)
            await trio.testing.wait_all_tasks_blocked()
            threading.Timer(0.3, os.write, (w, b"x")).start()
            await waiter.wait_readable(r)  # the next request comes at 0.3 s
            assert done.is_set()  # the slow call's task ran meanwhile
    finally:
        pool.stop()


async def test_a_long_spin_still_lets_other_tasks_run_every_yield_interval(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    waiter = fuseloop.Waiter(spin=5.0)  # busy_poll_us has no upper bound
    ticks = Ticks()
    async with trio.open_nursery() as n:
        n.start_soon(ticks.run)
        await trio.sleep(0)
        before = ticks.count
        threading.Timer(0.3, os.write, (w, b"x")).start()
        await waiter.wait_readable(r)
        assert ticks.count - before > 10
        n.cancel_scope.cancel()


async def test_requests_flowing_for_long_still_let_other_tasks_run(pipe: tuple[int, int]) -> None:
    r, w = pipe
    waiter = fuseloop.Waiter(spin=0.0)
    os.write(w, b"x")  # never read: a request is always there
    ticks = Ticks()
    async with trio.open_nursery() as n:
        n.start_soon(ticks.run)
        await trio.sleep(0)
        start, before = time.perf_counter(), ticks.count
        while time.perf_counter() - start < 0.05:
            await waiter.wait_readable(r)
        assert ticks.count - before >= 0.05 / fuseloop.YIELD_EVERY / 2
        n.cancel_scope.cancel()


def test_install_gives_pyfuse3_the_lock_and_the_waiter_and_uninstall_restores_trio() -> None:
    waiter = fuseloop.install(0.0001)
    try:
        facade = pyfuse3.trio  # type: ignore[attr-defined]
        assert facade.Lock() is waiter.lock
        assert isinstance(facade.Lock(), trio.Lock)  # any other lock is trio's own
        assert facade.lowlevel.wait_readable == waiter.wait_readable
        # everything else pyfuse3 uses is trio's own
        assert facade.open_nursery is trio.open_nursery
        assert facade.ClosedResourceError is trio.ClosedResourceError
        assert facade.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
        assert facade.lowlevel.notify_closing is trio.lowlevel.notify_closing
    finally:
        fuseloop.uninstall()
    assert pyfuse3.trio is trio  # type: ignore[attr-defined]


async def test_runnable_counts_what_trio_counts_and_falls_back_to_asking_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The waiter reads the run queue's length itself (current_statistics costs 1.9 us a
    request); with a trio that keeps it elsewhere, it asks trio."""
    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(trio.sleep, 0)
        assert fuseloop.runnable() == trio.lowlevel.current_statistics().tasks_runnable == 3
        monkeypatch.setattr(fuseloop, "_RUN_CONTEXT", object())
        assert fuseloop.runnable() == 3
    assert fuseloop.runnable() == 0


async def test_the_installed_trio_and_pyfuse3_have_what_the_fast_path_reads() -> None:
    """The versions setup.cfg allows keep the internals fuseloop reads; when this fails after an
    upgrade, the daemon still works (the fallbacks), only slower: update fuseloop and the pins."""
    assert isinstance(fuseloop._RUN_CONTEXT.runner.runq, collections.deque)  # type: ignore[union-attr]
    assert pyfuse3.trio is trio  # type: ignore[attr-defined]  # the global install() replaces
