"""What every part of the registry shares (state/registry.py puts them together): the state
`Registry.__init__` sets up, declared here so each part type-checks on its own, and the few
methods one part calls in another."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import trio

from vfusefs.config import Config
from vfusefs.domain.quota import QuotaLedger
from vfusefs.fuse.inodes import InodeTable
from vfusefs.fuse.kernel import KernelCache
from vfusefs.runtime.workers import HostWorkers
from vfusefs.state.leases import LeaseKeeper
from vfusefs.state.netwatch import NetWatch
from vfusefs.state.records import Host, Task, Vfolder
from vfusefs.store import Store, VfolderRecord


class RegistryBase:
    config: Config
    store: Store
    node: str  # this daemon's name in shared state
    store_connected: bool  # the store answered the last read of its change feed ...
    store_since: float  # ... since then
    seen_change: int  # the last change-feed entry applied
    store_epoch: str  # the store's identity when loaded (a new one: write back)
    table: InodeTable
    token: trio.lowlevel.TrioToken
    hosts: dict[str, Host]
    vfolders: dict[str, Vfolder]
    started: float
    store_workers: HostWorkers  # the store's own thread
    kernel: KernelCache  # the one way to make the kernel forget (fuse/kernel.py)
    trash_waiting: trio.Event  # set when a delete queued data for purging
    store_wake: trio.Event  # set when the store says it changed (pub/sub)
    ledger: QuotaLedger
    tasks: dict[str, Task]
    nursery: trio.Nursery | None  # for background tasks, set by the daemon
    needs_scan: list[Vfolder]  # usage not trusted after an unclean stop
    untrusted: set[str]  # vfolders whose usage stays untrusted until a rescan finishes
    on_health_change: Callable[[], None] | None  # the daemon's STATUS line
    netwatch: NetWatch | None
    usage_seen: int  # shared store: the usage changes taken in so far
    leases: LeaseKeeper | None  # many nodes: quota leases (state/leases.py)
    _id_locks: dict[str, trio.Lock]
    _flushing: trio.Lock  # one usage flush (or refresh) at a time
    _batch: int  # the number of the last usage batch
    _unsent: tuple[int, list[tuple[str, int, int]]] | None  # a batch the store has not taken

    if TYPE_CHECKING:  # defined in one part, called from another

        def _lifecycle(self, vfid: str) -> AbstractAsyncContextManager[None]: ...
        def _set_limits_of(self, key: str, quota_bytes: int, quota_inodes: int) -> None: ...
        def host(self, name: str) -> Host: ...
        def vfolder(self, host: str, vfid: str) -> Vfolder: ...
        async def _attach(self, host: Host, rec: VfolderRecord) -> Vfolder: ...
        async def _attach_stored(
            self, host: Host, rec: VfolderRecord, usage: dict[str, tuple[int, int]]
        ) -> Vfolder | None: ...
        def _invalidate_entry(self, host: Host, name: str) -> None: ...
        async def _push_native_quota(self, host: Host, path: str, qb: int, qi: int) -> None: ...
        def _stop_serving(self, vf: Vfolder) -> None: ...
        def set_usage(self, vf: Vfolder, nbytes: int, inodes: int) -> None: ...
        async def _grants_changed(self, vf: Vfolder) -> None: ...
        def start_rescan(self, vf: Vfolder) -> Task: ...
        async def flush_usage(self) -> None: ...


def open_dir(path: str) -> tuple[int, os.stat_result]:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return fd, os.fstat(fd)
