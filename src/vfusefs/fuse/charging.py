"""Charging the quota around a native call (Operations' part): reserve before the first
await (EDQUOT there, nothing changed), run the call on the host's lane under the inodes' locks,
then charge exactly what it grew (`grown_bytes`, `grown_inodes` of its typed result) or refund;
leases on a shared store; a native quota refusal passed on as EDQUOT."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, Self, TypeVar

from vfusefs import native
from vfusefs.domain.quota import QuotaExceeded, Reservation
from vfusefs.fuse.inodes import Kind, Node
from vfusefs.fuse.opsbase import OpsBase
from vfusefs.state.records import Vfolder

log = logging.getLogger("vfusefs.fuse.ops")

BLOCK = native.BLOCK
RECONCILE_WINDOW = 60.0  # seconds a changed file is watched (> the kernel's 30 s writeback)
LEASE_TRIES = 4  # many nodes: times a write short of its quota lease asks the store for more


class Growth(Protocol):
    """A native result that says what it added to usage (native.Made, Written...)."""

    @property
    def grown_bytes(self) -> int: ...
    @property
    def grown_inodes(self) -> int: ...


class StatGrowth(Growth, Protocol):
    """One that also has the inode's stat after the change, and can be copied with another
    grown_bytes (NamedTuple._replace): what _tracked adjusts."""

    @property
    def st(self) -> os.stat_result: ...
    def _replace(self, *, grown_bytes: int) -> Self: ...


T = TypeVar("T")
G = TypeVar("G", bound=Growth)
S = TypeVar("S", bound=StatGrowth)


class Charging(OpsBase):
    # -- quota ----------------------------------------------------------------------------------
    async def _charged(
        self,
        node: Node,
        nbytes: int,
        inodes: int,
        fn: Callable[..., G],
        *args: Any,
        lock: tuple[Node, ...] = (),
    ) -> G:
        """Run fn on node's host with room reserved for nbytes/inodes of growth.

        The reservation is taken before the first await (EDQUOT here, nothing changed); fn
        returns a native result whose grown_bytes and grown_inodes are what it really added
        (negative: freed), and that is what the vfolder and its scope are charged.
        """
        vf = node.vf
        assert vf is not None
        try:
            res = self.ledger.reserve(vf.quota_keys, nbytes, inodes)
        except QuotaExceeded as exc:
            res = await self._reserve_leased(node, exc, nbytes, inodes)
        with changing(vf):
            try:
                result: G = await self._run(node, _locked, self._locks(lock or (node,)), fn, *args)
            except OSError as exc:
                self.ledger.refund(res)
                if self._native_quota_hit(node, vf, exc):
                    raise self._deny(node, errno.EDQUOT) from None
                raise
            except BaseException:
                self.ledger.refund(res)
                raise
            self.ledger.commit(res, result.grown_bytes, result.grown_inodes)
        return result

    @staticmethod
    def _native_quota_hit(node: Node, vf: Vfolder, exc: OSError) -> bool:
        """Whether exc is the storage's own quota refusing (SPEC §4: callers see EDQUOT),
        where the storage says so with another errno (XFS project quota: ENOSPC)."""
        quota_errno = node.host.backend.quota_errno  # type: ignore[union-attr]
        return exc.errno == quota_errno != errno.EDQUOT and bool(
            vf.record.quota_bytes or vf.record.quota_inodes
        )

    async def _reserve_leased(
        self, node: Node, exc: QuotaExceeded, nbytes: int, inodes: int
    ) -> Reservation:
        """A reservation that did not fit: if what ran short is a lease (many nodes), ask the
        store for more and try again, a few times; EDQUOT otherwise, or when there is no room."""
        vf = node.vf
        assert vf is not None
        leases = self.registry.leases
        for _ in range(LEASE_TRIES):
            if not exc.leased or leases is None:
                break
            if not await leases.grow(exc.key, exc.short_bytes, exc.short_inodes):
                break
            try:
                return self.ledger.reserve(vf.quota_keys, nbytes, inodes)
            except QuotaExceeded as again:
                exc = again
        raise self._deny(node, errno.EDQUOT)

    @staticmethod
    def _locks(nodes: tuple[Node, ...]) -> list[threading.Lock]:
        """The nodes' locks, in inode order (two renames can never wait on each other)."""
        out = []
        for n in sorted(set(nodes), key=lambda n: n.ino):
            if n.lock is None:
                n.lock = threading.Lock()
            out.append(n.lock)
        return out

    def _watch(self, node: Node) -> None:
        """node's allocation is charged through node.alloc: give it a lock and watch it for a
        while, because the native fs may settle its blocks later (Registry.reconcile)."""
        vf = node.vf
        if node.lock is None:
            node.lock = threading.Lock()
        if vf is not None and node.kind is Kind.NATIVE:
            vf.recent[node.ino] = (node, time.monotonic() + RECONCILE_WINDOW)

    def _victim_correction(
        self, vf: Vfolder | None, victim: os.stat_result | None, inodes: int
    ) -> tuple[int, int]:
        """What to add to the refund of a removed last link taken from its stat (its blocks and
        one inode): the ledger may hold another figure for it (node.alloc: the native fs settled
        it since), and a file still open keeps its blocks, and its charge, until the last close
        (the temporary-file pattern; see release)."""
        if victim is None or not inodes or vf is None:
            return 0, 0
        node = self.table.find(vf, victim)
        if node is None:
            return 0, 0
        alloc = victim.st_blocks * 512
        if node.opens:
            node.orphan = True
            if node.alloc is None:
                node.alloc = alloc
            return alloc, -inodes  # nothing freed yet
        held, node.alloc = node.alloc, None
        vf.recent.pop(node.ino, None)
        return (alloc - held if held is not None else 0), 0

    def _release(self, node: Node, nbytes: int, inodes: int) -> None:
        """Apply a change that needs no check (what an unlink freed)."""
        if node.vf is not None and (nbytes or inodes):
            self.ledger.apply(node.vf.quota_keys, nbytes, inodes)


def _locked(locks: list[threading.Lock], fn: Callable[..., T], *args: Any) -> T:
    """Run fn holding locks: concurrent changes to one inode must not measure each other's
    allocation (two appends each seeing the other's blocks would count them twice)."""
    for lock in locks:
        lock.acquire()
    try:
        return fn(*args)
    finally:
        for lock in reversed(locks):
            lock.release()


class changing:  # noqa: N801 (used as a with-statement, like contextlib's)
    """Mark a change through vfusefs that may move vf's usage, from before its native call
    until its charge or refund is applied (see Vfolder.changes).  A plain class, not a
    generator: it is on every write's path, where contextlib's costs ~1.5 us."""

    __slots__ = ("vf",)

    def __init__(self, vf: Vfolder | None) -> None:
        self.vf = vf

    def __enter__(self) -> None:
        if self.vf is not None:
            self.vf.changes += 1
            self.vf.changing += 1

    def __exit__(self, *exc: object) -> None:
        if self.vf is not None:
            self.vf.changing -= 1


def _tracked(node: Node, fn: Callable[..., S]) -> Callable[..., S]:
    """Adapt fn for _charged: charge the inode's allocation relative to what the ledger holds
    for it (node.alloc), so growth the native fs made on its own since our last look (delayed
    allocation) is charged too, then remember it.  Runs on the worker thread under node.lock
    (see _charged)."""

    def tracked(*args: Any) -> S:
        result = fn(*args)
        alloc = result.st.st_blocks * 512
        if node.alloc is not None:
            result = result._replace(grown_bytes=alloc - node.alloc)
        node.alloc = alloc
        return result

    tracked.__name__ = getattr(fn, "__name__", "tracked")
    return tracked
