"""Who sent a FUSE request: uid/gid from the request, cgroup and groups from /proc/<pid>.

Reading /proc costs three syscalls, so results are cached per pid for `TTL` seconds.  A pid can
be reused by another process, but not within a second (it takes a full wrap of pid_max), and a
process moved between cgroups is seen within a second; file handles keep the identity captured at
open(), so a stream of writes or reads costs no /proc reads at all.

When /proc/<pid> cannot be read (the process already exited, or pid 0 for requests the kernel
makes on its own), the cgroup is unknown: such a caller matches no cgroup grant and is never an
admin.  We fail closed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vfusefs.domain.access import Caller, is_admin

TTL = 1.0
MAX_ENTRIES = 8192


def read_cgroup(pid: int) -> str | None:
    """The cgroup-v2 path of pid ("0::/path" line), or None if it cannot be read."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for line in data.split(b"\n"):
        if line.startswith(b"0::"):
            return line[3:].decode(errors="replace") or "/"
    return None


def read_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass
class FilesContext:
    """What a FUSE handler reads of pyfuse3's RequestContext, for a request of the file API
    (fuse/files.py): the caller is given (a TokenCaller, or the daemon itself for its own
    housekeeping with admin=True), not read from /proc; uid and gid own what it makes."""

    caller: Caller
    admin: bool
    uid: int
    gid: int
    pid: int = 0
    umask: int = 0o022


class CallerCache:
    """pid -> (Caller, is admin), fresh for TTL seconds; the same Caller object is handed out
    while fresh, so callers can key further caches on it cheaply."""

    def __init__(self, admin_uids: tuple[int, ...] = (0,), confined: tuple[str, ...] = ()) -> None:
        self.admin_uids = admin_uids
        self.confined = confined
        self._callers: dict[int, tuple[float, int, int, Caller, bool]] = {}
        self._groups: dict[int, tuple[float, frozenset[int]]] = {}

    def caller(self, uid: int, gid: int, pid: int) -> tuple[Caller, bool]:
        now = time.monotonic()
        hit = self._callers.get(pid)
        if hit is not None and hit[0] >= now and hit[1] == uid and hit[2] == gid:
            return hit[3], hit[4]
        if len(self._callers) >= MAX_ENTRIES:
            self._callers.clear()
        caller = Caller(uid, gid, pid, read_cgroup(pid))
        admin = is_admin(caller, self.admin_uids, self.confined)
        self._callers[pid] = (now + TTL, uid, gid, caller, admin)
        return caller, admin

    def in_container(self, caller: Caller) -> bool:
        """Whether caller runs in a container (or we cannot tell where it runs: fail closed)."""
        return caller.cgroup is None or any(caller.cgroup.startswith(p) for p in self.confined)

    def with_groups(self, caller: Caller) -> Caller:
        """The caller with supplementary groups filled in (only needed for gid: grants)."""
        if caller.groups:
            return caller
        now = time.monotonic()
        hit = self._groups.get(caller.pid)
        if hit is None or hit[0] < now:
            if len(self._groups) >= MAX_ENTRIES:
                self._groups.clear()
            hit = (now + TTL, read_groups(caller.pid) if caller.pid > 0 else frozenset())
            self._groups[caller.pid] = hit
        return Caller(caller.uid, caller.gid, caller.pid, caller.cgroup, hit[1] | {caller.gid})
