"""What Operations' parts share (fuse/ops.py puts them together): the attributes
`Operations.__init__` sets, declared so each part type-checks alone, and the methods one part
calls in another."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pyfuse3

from vfusefs.config import DaemonConfig
from vfusefs.domain.access import Caller, Mode, Need
from vfusefs.domain.quota import QuotaLedger
from vfusefs.fuse.callers import CallerCache
from vfusefs.fuse.fdbudget import FdBudget
from vfusefs.fuse.inodes import InodeTable, Node
from vfusefs.service.metrics import OpStat
from vfusefs.state.records import Vfolder
from vfusefs.state.registry import Registry

if TYPE_CHECKING:
    from vfusefs.fuse.ops import DirHandle, FileHandle


class OpsBase(pyfuse3.Operations):
    registry: Registry
    table: InodeTable
    ledger: QuotaLedger
    daemon: DaemonConfig
    timeout: float  # entry and attribute timeout
    callers: CallerCache
    handles: dict[int, FileHandle | DirHandle]
    started_ns: int
    checks: bool  # access checks on (off only for bench/)
    stats: dict[tuple[str, str, int], OpStat]  # (host, op, errno) -> stats
    denied: dict[tuple[str, str], int]  # (host, reason) -> refused requests
    fds: FdBudget

    if TYPE_CHECKING:  # defined in one part, called from another

        def _deny(self, node: Node, code: int, reason: str | None = None) -> pyfuse3.FUSEError: ...
        async def _run(self, node: Node, fn: Any, *args: Any) -> Any: ...
        def _caller(self, ctx: pyfuse3.RequestContext) -> tuple[Caller, bool]: ...
        def _mode(self, caller: Caller, admin: bool, vf: Vfolder) -> Mode: ...
        def _allow(
            self, ctx: pyfuse3.RequestContext, node: Node, need: Need
        ) -> tuple[Caller, bool]: ...
        def _attrs(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes: ...
