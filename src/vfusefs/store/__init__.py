"""The durable state every node shares: vfolders, their grants, limits, scopes, usage and trash.

`Store` is the contract; `sqlite` is the embedded single-node store, and a Redis store (many
nodes) implements the same protocol.  Stores are blocking and are only ever called from the
registry's store thread (`trio.to_thread`), never from the FUSE event loop.  The registry keeps
what the request path needs in memory and follows the store's change feed (`Store.changes`), so
a grant or limit another writer changed reaches it the same way as its own.

Usage is kept as a base (the last recount) plus one delta per node, so no node's flush can
overwrite another's.  Nothing here knows about FUSE, trio or native storage.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

__all__ = [
    "Change",
    "Grant",
    "NodeInfo",
    "SharedStore",
    "Store",
    "StoreError",
    "TrashRecord",
    "VfolderRecord",
    "open_store",
    "sqlite_path",
]


class StoreError(Exception):
    """The store could not be read or written."""


@dataclass
class VfolderRecord:
    id: str
    host: str
    native_path: str  # absolute native directory
    scope: str = ""
    quota_bytes: int = 0
    quota_inodes: int = 0
    grants: dict[str, str] = field(default_factory=dict)  # principal -> mode
    created: float = field(default_factory=time.time)


@dataclass
class TrashRecord:
    path: str  # where the data was moved
    host: str
    vfolder: str
    deleted: float
    record: VfolderRecord | None = None  # what was deleted (None: not restorable)


class Change(NamedTuple):
    """One entry of the change feed: what changed (`vfolder` or `scope`) and its key (the
    vfolder id or the scope name); read the store for what it is now.  Kind `all`: the reader
    fell behind what the feed keeps and must compare everything."""

    seq: int
    kind: str
    key: str


class Grant(NamedTuple):
    """A lease grant (SharedStore.acquire): what was added to the node's lease, the account's
    usage and limits as the store has them, what the node now holds in the store's view (its
    lease less what it flushed as usage since), and what the other nodes hold."""

    bytes: int
    inodes: int
    usage_bytes: int
    usage_inodes: int
    limit_bytes: int
    limit_inodes: int
    held_bytes: int
    held_inodes: int
    others_bytes: int
    others_inodes: int


class NodeInfo(NamedTuple):
    """A node sharing the store: what it said of itself, how many seconds ago it last did,
    and its leases (account -> bytes, inodes, seconds left)."""

    name: str
    info: dict[str, Any]
    seen_ago: float
    leases: dict[str, tuple[int, int, float]]


class Store(Protocol):
    """What the registry needs of durable state.  Every method may raise StoreError."""

    kind: str  # "sqlite", "redis"
    shared: bool  # many nodes share it: this is a SharedStore (quota through leases)

    def ping(self) -> None: ...
    def close(self) -> None: ...

    # vfolders (a put or delete also appends to the change feed)
    def vfolders(self) -> list[VfolderRecord]: ...
    def vfolder(self, vfid: str) -> VfolderRecord | None: ...
    def has_vfolder(self, vfid: str) -> bool: ...
    def put_vfolder(self, rec: VfolderRecord) -> None: ...
    def delete_vfolder(self, vfid: str, trash: TrashRecord | None) -> None:
        """Forget a vfolder (and its usage) and queue its moved data for purging, at once."""

    # usage: base + every node's delta
    def usage(self) -> dict[str, tuple[int, int]]: ...
    def vfolder_usage(self, vfid: str) -> tuple[int, int]:
        """One vfolder's usage ((0, 0) if none is stored)."""

    def add_usage(self, node: str, deltas: list[tuple[str, int, int]], batch: int = 0) -> None:
        """Add (vfolder, bytes, inodes) deltas to node's share of usage.  batch > 0 numbers
        the call (rising per node): a batch sent again after an error that left it unknown
        whether it landed (a failover) is added once."""

    def set_usage(self, vfid: str, nbytes: int, inodes: int) -> None:
        """A recount: the base becomes this and every node's delta for it is dropped."""

    # scopes (a put appends to the change feed)
    def scopes(self) -> dict[str, tuple[int, int]]: ...
    def put_scope(self, scope: str, quota_bytes: int, quota_inodes: int) -> None: ...

    # a node's clean flag: its last stop flushed everything it knew
    def clean(self, node: str) -> bool: ...
    def set_clean(self, node: str, clean: bool) -> None: ...

    # the trash queue: a purge claims an entry first, so two nodes never purge one path
    def trash(self) -> list[TrashRecord]: ...
    def claim_trash(self, path: str, node: str, seconds: float) -> bool:
        """Take path for purging for `seconds` (False: another node holds it)."""

    def trash_purged(self, path: str) -> None: ...
    def restore_vfolder(self, rec: VfolderRecord, trash_path: str) -> bool:
        """Serve rec again and take its data out of the trash queue, at once (False if the
        trash entry is gone: purged meanwhile)."""

    # background work many nodes could each do: one does it
    def claim_task(self, name: str, node: str, seconds: float) -> bool:
        """Take task `name` for `seconds` (False: another node holds it; a node that dies
        leaves it to the others once its claim runs out)."""

    # the change feed
    def epoch(self) -> str:
        """This store's identity, made on first use: a different one (or a new one, after the
        store lost its data) means what a node knows must be written back."""

    def last_change(self) -> int: ...
    def changes(self, since: int) -> list[Change]:
        """Changes after seq `since`, oldest first (at most a few thousand at a time)."""


class SharedStore(Store, Protocol):
    """A store many nodes share (Redis): quota leases, node heartbeats and wake-up events.
    A limited account grows on a node only by what the node holds in a lease; a flush of
    usage (add_usage) turns the flushed part of the node's lease into usage at once."""

    def acquire(
        self,
        node: str,
        account: str,
        want: tuple[int, int],
        ttl: float,
        floor: tuple[int, int],
        fresh: tuple[int, int] | None = None,
        have: tuple[int, int] = (0, 0),
    ) -> Grant | None: ...
    def release(self, node: str, account: str, nbytes: int, inodes: int, drop: bool) -> None: ...
    def usage_since(self, seq: int) -> tuple[int, dict[str, tuple[int, int]]]: ...
    def heartbeat(self, node: str, instance: str, info: dict[str, Any], ttl: float) -> str: ...
    def leave(self, node: str) -> None: ...
    def nodes(self) -> list[NodeInfo]: ...
    def publish(self, message: str) -> None: ...
    def listen(self, stop: threading.Event, deliver: Callable[[str], None]) -> None: ...


def sqlite_path(url: str) -> str:
    """The absolute file path of a `sqlite:///abs/path` URL (`sqlite:////abs/path`, the
    SQLAlchemy spelling, is the same file); StoreError for anything else."""
    if not url.startswith("sqlite://"):
        raise StoreError(f"store url {url!r}: not a sqlite:/// URL")
    path = url[len("sqlite://") :]
    if not path.startswith("/"):
        raise StoreError(f"store url {url!r}: the path must be absolute (sqlite:///var/lib/...)")
    return "/" + path.lstrip("/")


REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")


def open_store(url: str) -> Store:
    if url.startswith("sqlite:"):
        from vfusefs.store.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url))
    if url.startswith(REDIS_SCHEMES):
        from vfusefs.store.redis import RedisStore

        return RedisStore(url)
    raise StoreError(
        f"store url {url!r}: use sqlite:///ABS/PATH, redis://, rediss://, unix://, "
        "redis+sentinel:// or redis+cluster://"
    )


def node_name(configured: str = "") -> str:
    """This node's name in shared state (usage, leases, clean flags, trash claims): the
    configured `[store] node`, else the host name."""
    return configured or os.uname().nodename
