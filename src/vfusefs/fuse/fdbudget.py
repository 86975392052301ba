"""The fd budget: every inode the kernel caches holds an O_PATH fd in the inode table, and the
kernel only forgets inodes when it drops their dentries, which on a big machine may be never.
Above `high` fds the oldest entries (not in use) are invalidated, which makes the kernel send
FORGET and their fds close, down to `low`; listings never take the table past `hard`, so that
room stays for data fds, sockets and the store.  A forgotten entry is simply looked up again
when next used."""

from __future__ import annotations

import collections
import contextlib
import logging
import resource
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

from vfusefs.fuse.inodes import Node
from vfusefs.runtime import workers

if TYPE_CHECKING:
    from vfusefs.state.registry import Registry

log = logging.getLogger(__name__)
FD_WAIT = 0.05  # seconds without a FORGET after which a listing at the fd limit stops waiting


class FdBudget:
    def __init__(self, registry: Registry, inode_fds: int = 0) -> None:
        self.registry = registry
        self.table = registry.table
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # keep room for data fds of open files, sockets and the store
        self.high = max(64, self.limit - max(256, self.limit // 8))
        if inode_fds:
            self.high = min(self.high, inode_fds)
        self.low = max(32, self.high - max(16, self.high // 8))
        # listings never take the table past hard: half the room left above high stays for
        # data fds, sockets and the store (readdir)
        self.hard = self.high + (self.limit - self.high) // 2
        self.pruned_at = 0.0  # when prune last asked; it asks again after a while...
        self.prune_level = 0  # ...or once the table holds this many fds
        self.prune_logged = 0.0
        self.forgotten = 0  # inodes the kernel has forgotten (room watches it; forget counts)
        # directories the kernel has locked for a request of ours (a readdir, or a lookup waiting
        # in room) until we reply: invalidating an entry in one would wait for that, and hold up
        # every invalidation queued after it (pyfuse3 sends them from one thread)
        self.busy_dirs: collections.Counter[int] = collections.Counter()

    def prune(self, again_after: float = 0.2) -> None:
        """Near the fd limit: ask the kernel to forget its oldest cached entries.

        Every inode the kernel knows holds an O_PATH fd here; the kernel only forgets inodes
        when it drops their dentries, which on a big machine may be never.  Invalidating the
        oldest entries (not in use: the kernel keeps those) makes it send FORGET, and we close
        their fds.  A forgotten entry is simply looked up again when next used.
        """
        now = time.monotonic()
        held = self.table.native_fds
        # give the FORGETs time to arrive before asking again, unless the table keeps growing
        # meanwhile (a listing brings in entries far faster than 0.2 s apart)
        if not self.registry.mounted or (
            now < self.pruned_at + again_after and held < self.prune_level
        ):
            return
        self.pruned_at = now
        self.prune_level = held + max(16, (self.high - self.low) // 4)
        nodes = self.table.oldest(held - self.low, self.busy_dirs)
        if nodes and now >= self.prune_logged + 10:
            self.prune_logged = now
            log.info(
                "%d native fds held (limit %d): asking the kernel to forget %d old entries",
                held,
                self.limit,
                len(nodes),
            )
        for node in nodes:
            self.registry.kernel.forget_entry(node.parent, node.name)

    async def room(self, parent: Node) -> int:
        """Wait until the kernel has forgotten enough entries to leave room for more fds
        below hard, for a request on an entry of parent; the room.  Gives up (room <= 0)
        once no FORGET has come for FD_WAIT: the kernel cannot forget entries in use, nor
        those of a directory it has locked for one of our requests (readdir, lookup)."""
        forgotten, since = self.forgotten, time.monotonic()
        with self.busy(parent):
            while (room := self.hard - self.held()) <= 0:
                if self.forgotten != forgotten:
                    forgotten, since = self.forgotten, time.monotonic()
                elif time.monotonic() - since > FD_WAIT:
                    break
                self.prune(again_after=0.01)
                workers.flush_closes()
                await trio.sleep(0.001)
        return room

    @contextlib.contextmanager
    def busy(self, directory: Node) -> Iterator[None]:
        """While the kernel holds directory locked for a request of ours (see prune)."""
        self.busy_dirs[directory.ino] += 1
        try:
            yield
        finally:
            self.busy_dirs[directory.ino] -= 1
            if not self.busy_dirs[directory.ino]:
                del self.busy_dirs[directory.ino]

    def held(self) -> int:
        """The table's O_PATH fds and those it dropped that are not closed yet."""
        held = self.table.native_fds
        for host in self.registry.hosts.values():
            held += host.workers.unclosed
        return held

    async def keep(self) -> None:
        """After a burst (an untar, an ls -lR) ends, keep asking until the budget holds again.
        Also closes the fds batched for closing, should the FUSE loop not have (fuseloop.py),
        and, past the budget, the fds of forgotten files still watched (after one last look)."""
        while True:
            await trio.sleep(0.5)
            workers.flush_closes()
            if self.table.native_fds > self.low + (self.high - self.low) // 2:
                self.prune()
            if self.table.lingering and self.held() > self.high:
                await self.registry.settle_lingering()
