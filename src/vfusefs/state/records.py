"""The registry's records: a served host, a served vfolder, a background task.  Plain data
the request path reads without I/O (fuse/ops.py) and the registry's parts keep up to date."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from vfusefs.backends import Backend
from vfusefs.config import HostConfig
from vfusefs.domain import access
from vfusefs.domain.quota import QuotaLedger
from vfusefs.fuse.inodes import Node
from vfusefs.runtime.workers import HostWorkers
from vfusefs.state.health import HostHealth
from vfusefs.store import VfolderRecord

log = logging.getLogger("vfusefs.state.registry")


@dataclass(eq=False)
class Vfolder:
    id: str
    host: Host
    record: VfolderRecord
    root: Node | None = None
    modes: dict[Any, access.Mode] = field(default_factory=dict)  # Caller -> mode, per grants
    quota_keys: tuple[str, ...] = ()  # ledger accounts charged: the vfolder's, its scope's
    # files changed lately whose allocation the native fs may still adjust (delayed allocation,
    # speculative preallocation): ino -> (node, monotonic time to stop watching)
    recent: dict[int, tuple[Node, float]] = field(default_factory=dict)
    handles: int = 0  # open file and directory handles: "in use"
    deleted: bool = False
    # files with more than one link: (st_dev, st_ino) -> (st_nlink, names in the vfolder), from
    # the last scan, kept up to date by links and removals through vfusefs (Operations._own_links)
    links: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    links_scan: trio.Event | None = None  # set when the scan counting links in flight ends
    # changes through vfusefs that may move usage: begun so far, and in flight now (a rescan's
    # count is taken only from a walk that none overlapped: Registry._rescan)
    changes: int = 0
    changing: int = 0
    stored: tuple[int, int] = (0, 0)  # usage as the store holds it (the last flush or recount)

    @property
    def grants(self) -> dict[str, str]:
        return self.record.grants

    def describe(self, mountpoint: str, ledger: QuotaLedger | None = None) -> dict[str, Any]:
        r = self.record
        acc = ledger.account(self.quota_keys[0]) if ledger is not None and self.quota_keys else None
        return {
            "id": self.id,
            "host": self.host.name,
            "path": os.path.join(mountpoint, self.host.name, self.id),
            "native_path": r.native_path,
            "scope": r.scope or None,
            "quota_bytes": r.quota_bytes,
            "quota_inodes": r.quota_inodes,
            "usage_bytes": acc.used_bytes if acc else None,
            "usage_inodes": acc.used_inodes if acc else None,
            "grants": [{"principal": p, "mode": m} for p, m in sorted(r.grants.items())],
            "open_handles": self.handles,
            "created": r.created,
        }


@dataclass(eq=False)
class Host:
    name: str
    config: HostConfig
    backend: Backend
    workers: HostWorkers  # the lanes serving FUSE requests
    admin: HostWorkers  # backend calls (create, delete, quotas...): never on the lanes
    node: Node | None = None
    vfolders: dict[str, Vfolder] = field(default_factory=dict)
    health: str = "ok"  # ok, degraded, down: kept by `health_watch` (state/health.py)
    health_watch: HostHealth | None = None
    health_scope: trio.CancelScope | None = None
    fs_type: str = "?"  # of the native path, from mountinfo
    # close() of a written file is passed on (close-to-open: NFS writes back and reports errors
    # then); on a local filesystem it has nothing to do, so flush needs no worker hop there
    flush_needed: bool = True
    # reads are first tried from the page cache on the trio thread (HostWorkers.read_cached):
    # only where RWF_NOWAIT is known to mean "never wait for storage"
    cached_reads: bool = False
    bytes_read: int = 0  # through the mount, since start (metrics)
    bytes_written: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.config.backend,
            "path": self.config.path,
            "layout": self.config.layout,
            "health": self.health,
            "fs_type": self.fs_type,
            "vfolders": len(self.vfolders),
            "capabilities": self.backend.describe()["capabilities"],
        }


# the hyphenated form only (either case): uuid.UUID() also takes braces, "urn:uuid:", no
# hyphens and trailing whitespace, which would turn a typo into a different, valid id


@dataclass
class Task:
    """A background task (rescan, clone), as GET /v1/tasks/{id} shows it."""

    id: str
    kind: str
    host: str
    vfolder: str  # the vfolder recounted, or the clone's new id
    state: str = "running"  # running, done, failed
    done_files: int = 0
    done_bytes: int = 0
    total_files: int | None = None  # once known
    total_bytes: int | None = None
    error: str = ""
    applied: bool = False  # a rescan's count became the vfolder's usage (see Registry._rescan)
    source: str = ""  # a clone's source vfolder
    result: dict[str, Any] | None = None  # a clone's new vfolder, once done
    cancel: bool = False  # the daemon is stopping: a clone gives up and removes what it made
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("result", "cancel")}
        if self.kind != "clone":
            del out["source"]
        elif self.result is not None:
            out["vfolder"] = self.result  # SPEC: a clone's task names its new vfolder's object
        return out
