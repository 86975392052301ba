"""The one place that tells the kernel to forget what it caches of the mount: names (dentries),
attributes, and a file's pages.  Everyone else (the registry on a grant change, a delete, a
reload; the fd budget) asks here.  Before the mount is up, and after it is gone, every call is
a no-op: there is nothing cached, and pyfuse3 would fail."""

from __future__ import annotations

import pyfuse3
import trio


class KernelCache:
    def __init__(self) -> None:
        self.mounted = False  # set by the daemon around pyfuse3.init/close

    def forget_entry(self, parent_ino: int, name: bytes) -> None:
        """The kernel asks again who name in parent is (a vfolder that appeared or went, an
        entry the fd budget wants forgotten).  Queued: it never blocks the event loop."""
        if self.mounted:
            pyfuse3.invalidate_entry_async(parent_ino, name, ignore_enoent=True)

    def forget_attrs(self, ino: int) -> None:
        """The kernel asks again for ino's attributes (its link count changed, say)."""
        if self.mounted:
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except FileNotFoundError:
                pass  # the kernel does not know it (any more): nothing cached

    async def forget_names(self, names: list[tuple[int, bytes]]) -> None:
        """The kernel forgets each (directory, name) and the directory's attributes, and this
        returns once it has (a change made around the kernel, that the next request through
        the mount must see).  On a thread: the kernel waits for a request in flight on that
        directory, which this event loop serves."""
        if not self.mounted or not names:
            return

        def invalidate() -> None:
            for parent, name in names:
                for call, args in (
                    (pyfuse3.invalidate_entry, (parent, name)),
                    (pyfuse3.invalidate_inode, (parent, True)),
                ):
                    try:
                        call(*args)
                    except OSError:
                        pass  # the kernel does not know it: nothing cached

        await trio.to_thread.run_sync(invalidate)

    async def forget_inodes(self, inos: list[int]) -> None:
        """The kernel drops attributes and cached pages of every inode in inos (a narrowed
        grant: nothing may be served from the cache the caller could no longer read).  On a
        thread: the kernel may wait for pages being written back."""
        if not self.mounted or not inos:
            return

        def invalidate() -> None:
            for ino in inos:
                try:
                    pyfuse3.invalidate_inode(ino, attr_only=False)
                except OSError:
                    pass  # the kernel no longer knows it

        await trio.to_thread.run_sync(invalidate)
