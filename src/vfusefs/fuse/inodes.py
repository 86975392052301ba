"""The inode table: FUSE inode numbers <-> native inodes held open as O_PATH fds.

A native inode is keyed by (vfolder id, st_dev, st_ino).  The vfolder is part of the key so a hard
link planted natively between two vfolders still gives two nodes, each judged by its own
vfolder's grants.  The node's O_PATH fd is the only handle we ever use to reach the inode again:
no path is rebuilt, so a rename or a swapped symlink cannot redirect us elsewhere.

The root (inode 1) and one node per host are virtual; a vfolder's root directory is a pinned
native node that the kernel's forget never drops.  Every other node lives while the kernel holds
a lookup reference to it (lookup, create, mkdir, readdirplus... each count one; forget subtracts).
"""

from __future__ import annotations

import collections
import enum
import itertools
from collections.abc import Container, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vfusefs.state.records import Host, Vfolder

ROOT_INODE = 1


class Kind(enum.Enum):
    ROOT = "root"
    HOST = "host"
    VFROOT = "vfolder"
    NATIVE = "native"


class Node:
    __slots__ = (
        "ino",
        "kind",
        "fd",
        "key",
        "nlookup",
        "vf",
        "host",
        "parent",
        "name",
        "xattrs",
        "xattrs_until",
        "st",
        "st_until",
        "lock",
        "alloc",
        "opens",
        "orphan",
    )

    def __init__(
        self,
        ino: int,
        kind: Kind,
        fd: int = -1,
        key: tuple[Any, ...] | None = None,
        vf: Vfolder | None = None,
        host: Host | None = None,
    ) -> None:
        self.ino = ino
        self.kind = kind
        self.fd = fd
        self.key = key
        self.nlookup = 0
        self.vf = vf
        self.host = host
        self.parent = ino  # the inode number of the parent we last reached it from
        self.name = b""  # and the name there: a hint for asking the kernel to forget it
        # names of the native xattrs, trusted until xattrs_until (monotonic), like cached attrs
        self.xattrs: frozenset[bytes] | None = None
        self.xattrs_until = 0.0
        self.st: Any = None  # the last native stat we replied with
        self.st_until = 0.0  # st was taken after our last change to the node: valid until then
        self.lock: Any = None  # serializes changes whose allocated-bytes delta we measure
        self.alloc: int | None = None  # allocated bytes the quota ledger holds for this inode
        self.opens = 0  # open file handles (FileHandle) on it
        self.orphan = False  # its last name went while open: charged until the last close

    @property
    def pinned(self) -> bool:
        return self.kind is not Kind.NATIVE

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.kind.value} fd={self.fd} n={self.nlookup}>"


class InodeTable:
    def __init__(self) -> None:
        self._next = itertools.count(ROOT_INODE + 1)
        self.by_ino: dict[int, Node] = {}
        self.by_key: dict[tuple[Any, ...], Node] = {}  # read (never written) from worker threads
        self.root = Node(ROOT_INODE, Kind.ROOT)
        self.by_ino[ROOT_INODE] = self.root
        self.native_fds = 0  # O_PATH fds held for NATIVE nodes
        # NATIVE nodes the kernel has forgotten that stay while their allocation is watched
        # (Vfolder.recent): their fds count in native_fds
        self.lingering: dict[int, Node] = {}
        self._age: collections.deque[int] = collections.deque()  # NATIVE inos, oldest first

    def __len__(self) -> int:
        return len(self.by_ino)

    def get(self, ino: int) -> Node | None:
        return self.by_ino.get(ino)

    def new_virtual(self, kind: Kind, host: Host) -> Node:
        node = Node(next(self._next), kind, host=host)
        self.by_ino[node.ino] = node
        return node

    def add(
        self, kind: Kind, fd: int, st: Any, vf: Vfolder, parent: int, name: bytes = b""
    ) -> Node:
        key = (vf.id, st.st_dev, st.st_ino)
        node = Node(next(self._next), kind, fd, key, vf, vf.host)
        node.parent = parent
        node.name = name
        self.by_ino[node.ino] = node
        self.by_key[key] = node
        if kind is Kind.NATIVE:
            self.native_fds += 1
            self._age.append(node.ino)
        return node

    def oldest(self, count: int, busy: Container[int] = ()) -> list[Node]:
        """Up to count NATIVE nodes the kernel holds, oldest first (candidates to forget),
        none in a directory whose inode is in busy."""
        out: list[Node] = []
        for _ in range(len(self._age)):
            if len(out) >= count:
                break
            ino = self._age.popleft()
            node = self.by_ino.get(ino)
            if node is None or node.kind is not Kind.NATIVE:
                continue
            self._age.append(ino)  # still alive: back of the queue until the kernel forgets it
            if node.nlookup > 0 and node.name and node.parent not in busy:
                out.append(node)
        return out

    def find(self, vf: Vfolder, st: Any) -> Node | None:
        return self.by_key.get((vf.id, st.st_dev, st.st_ino))

    def unlinger(self, node: Node) -> int:
        """A lingering node's watch has ended: drop it; its fd to close, or -1 if it was not
        lingering (the kernel knows it again)."""
        if self.lingering.pop(node.ino, None) is None:
            return -1
        return self.remove(node)

    def remove(self, node: Node) -> int:
        """Drop a node; returns its fd for the caller to close on a worker thread."""
        if (
            self.by_ino.pop(node.ino, None) is not None
            and node.kind is Kind.NATIVE
            and node.fd >= 0
        ):
            self.native_fds -= 1
        if node.key is not None and self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        fd, node.fd = node.fd, -1
        return fd

    def forget(self, ino: int, count: int) -> int:
        """Subtract kernel references; returns an fd to close if the node went away, else -1."""
        node = self.by_ino.get(ino)
        if node is None:
            return -1
        node.nlookup = max(0, node.nlookup - count)
        if node.nlookup == 0 and not node.pinned:
            return self.remove(node)
        return -1

    def detach(self, vf: Vfolder) -> list[int]:
        """A vfolder stops being served (deleted, or its host removed by a reload): its nodes stay
        until the kernel forgets them, but lookups must never find them again.  Keys hold the
        vfolder id, so a vfolder served again under the same id (its host added back) would
        otherwise get the old, dead nodes for its inodes.  Returns the fds of its lingering
        nodes, to close."""
        for node in self.of_vfolder(vf):
            if node.key is not None and self.by_key.get(node.key) is node:
                del self.by_key[node.key]
        fds = [self.unlinger(node) for node in list(self.lingering.values()) if node.vf is vf]
        return [fd for fd in fds if fd >= 0]

    def of_vfolder(self, vf: Vfolder) -> Iterator[Node]:
        return (n for n in list(self.by_ino.values()) if n.vf is vf)
