"""Who may do what in a vfolder: pure decisions, no I/O.

A grant is (vfolder, principal, mode).  `effective_mode` picks the caller's mode from a vfolder's
grants (most specific principal wins: longest matching cgroup, then uid, then gid, then `*`);
`check` turns a mode and the kind of operation into 0 or an errno, per SPEC §3:

    none -> EACCES (ENOENT when looking the vfolder up in its host dir: decided by the caller)
    ro   -> EROFS for every change
    rw   -> EPERM for unlink, rmdir and a rename that replaces an existing entry
    rwd  -> everything

Nothing here reads /proc or the store; callers pass plain values, so it is tested exhaustively.
"""

from __future__ import annotations

import enum
import errno
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class Mode(enum.IntEnum):
    NONE = 0
    RO = 1
    RW = 2
    RWD = 3
    ADMIN = 4

    @property
    def label(self) -> str:
        return {
            Mode.NONE: "none",
            Mode.RO: "ro",
            Mode.RW: "rw",
            Mode.RWD: "rwd",
            Mode.ADMIN: "admin",
        }[self]


class Need(enum.Enum):
    READ = "read"  # lookup, getattr, readdir, open for read, read, readlink, get/listxattr, statfs
    WRITE = (
        "write"  # create, mkdir, mknod, symlink, link, write, truncate, setattr, set/removexattr
    )
    DELETE = "delete"  # unlink, rmdir, rename that replaces an existing entry


MODE_NAMES = {"ro": Mode.RO, "rw": Mode.RW, "rwd": Mode.RWD, "wd": Mode.RWD}


class BadGrant(ValueError):
    """A principal or mode that does not parse; the message is for the user."""


def parse_mode(text: str) -> Mode:
    try:
        return MODE_NAMES[text]
    except (KeyError, TypeError):
        raise BadGrant(
            f"bad mode {str(text)[:40]!r}: use ro, rw or rwd (wd is an alias of rwd)"
        ) from None


def canonical_mode(text: str) -> str:
    return parse_mode(text).label


# ASCII digits only (str.isdigit also takes "²"), at most 10 of them before the range check
_ID_RE = re.compile(r"[0-9]{1,10}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def parse_principal(text: str) -> str:
    """Validate a principal and return its canonical spelling (control characters, non-ASCII
    digits and out-of-range ids are refused: what is stored is exactly what matches)."""
    if not isinstance(text, str):
        raise BadGrant(f"bad principal {text!r}: must be a string")
    if text == "*":
        return text
    kind, sep, value = text.partition(":")
    if sep and kind in ("uid", "gid"):
        if _ID_RE.fullmatch(value) and int(value) < 2**32:
            return f"{kind}:{int(value)}"
        raise BadGrant(f"bad principal {text[:80]!r}: {kind}: needs a number below 2^32")
    if sep and kind == "cgroup":
        if (
            value.startswith("/")
            and not _CONTROL_RE.search(value)
            and "//" not in value
            and len(value) <= 4096
            and not any(part in (".", "..") for part in value.split("/"))
        ):
            return "cgroup:" + (value.rstrip("/") or "/")
        raise BadGrant(
            f"bad principal {text[:80]!r}: cgroup: needs an absolute cgroup-v2 path "
            f"(no control characters, '//', '.' or '..')"
        )
    raise BadGrant(f"bad principal {text[:80]!r}: use cgroup:/path, uid:N, gid:N or *")


@dataclass(frozen=True, eq=False)
class Caller:
    """Who is asking: from the FUSE request context plus its pid's cgroup (None if unknown).

    Compared and hashed by identity: the caller cache hands out one object per pid while it is
    fresh, and per-vfolder decisions are cached on that object."""

    uid: int
    gid: int
    pid: int
    cgroup: str | None
    groups: frozenset[int] = frozenset()


@dataclass(frozen=True, eq=False)
class TokenCaller(Caller):
    """A request of the file API (files over HTTP): its mode is the token's, on the token's
    vfolder only, whatever that vfolder's grants say; never an admin, never "in a container"
    that could be told apart (its cgroup is unknown: fail closed)."""

    vfolder: str = ""
    mode: Mode = Mode.NONE

    def mode_on(self, vfid: str) -> Mode:
        return self.mode if vfid == self.vfolder else Mode.NONE


def is_admin(caller: Caller, admin_uids: Iterable[int], confined: Iterable[str]) -> bool:
    """Admins: uid in admin_uids and cgroup known and not under a confined prefix."""
    if caller.uid not in admin_uids or caller.cgroup is None:
        return False
    return not any(caller.cgroup.startswith(prefix) for prefix in confined)


def _in_cgroup(cgroup: str, grant_path: str) -> bool:
    return grant_path == "/" or cgroup == grant_path or cgroup.startswith(grant_path + "/")


def effective_mode(caller: Caller, grants: Mapping[str, str], admin: bool = False) -> Mode:
    """The caller's mode on a vfolder with these grants (principal -> mode name)."""
    if admin:
        return Mode.ADMIN
    best_cgroup: tuple[int, Mode] | None = None
    uid_mode = gid_mode = any_mode = None
    for principal, mode_name in grants.items():
        mode = MODE_NAMES.get(mode_name, Mode.NONE)
        if principal.startswith("cgroup:"):
            path = principal[7:]
            if caller.cgroup is not None and _in_cgroup(caller.cgroup, path):
                if best_cgroup is None or len(path) > best_cgroup[0]:
                    best_cgroup = (len(path), mode)
        elif principal.startswith("uid:"):
            if principal == f"uid:{caller.uid}":
                uid_mode = mode
        elif principal.startswith("gid:"):
            gid = int(principal[4:])
            if gid == caller.gid or gid in caller.groups:
                # two matching group grants are equally specific: the wider one wins
                gid_mode = mode if gid_mode is None else max(gid_mode, mode)
        elif principal == "*":
            any_mode = mode
    if best_cgroup is not None:
        return best_cgroup[1]
    for mode_or_none in (uid_mode, gid_mode, any_mode):
        if mode_or_none is not None:
            return mode_or_none
    return Mode.NONE


def needs_groups(grants: Mapping[str, str]) -> bool:
    """Whether deciding needs the caller's supplementary groups (costly to read)."""
    return any(p.startswith("gid:") for p in grants)


def check(mode: Mode, need: Need) -> int:
    """0 if mode allows the operation, else the errno to answer with."""
    if mode == Mode.NONE:
        return errno.EACCES
    if need is Need.READ:
        return 0
    if mode == Mode.RO:
        return errno.EROFS
    if need is Need.DELETE and mode == Mode.RW:
        return errno.EPERM
    return 0
