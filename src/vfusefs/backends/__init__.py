"""Storage backends: how a host's vfolders are created, deleted and measured on native storage.

A backend is small: it never sees FUSE requests.  The data path works on the native directory
itself; a backend only manages vfolder directories and, where the storage has them, native
quotas, fast usage, clones, snapshots and what to watch for health.  What a backend can do is
declared once (`capabilities`), and so are its options (`options`: type, default and doc, shown
in docs/config.md; an unknown option is a config error).  Every method is blocking and runs on
the host's admin threads, never on the lanes that serve FUSE requests.  Backends are found
through the entry-point group `vfusefs.backends`; `tests/test_backends.py` is the contract every
backend runs.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

from vfusefs.config import ConfigError, HostConfig
from vfusefs.native import copytree, mounts

TRASH_DIR = ".vfusefs-trash"
NETWORK_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "ceph",
        "fuse.ceph-fuse",
        "cifs",
        "smb3",
        "lustre",
        "glusterfs",
        "fuse.glusterfs",
        "gpfs",
        "wekafs",
    }
)


class BackendError(Exception):
    """A backend operation failed; the message is for the operator."""


class NotSupported(BackendError):
    """The backend does not have this capability (see Backend.capabilities)."""


class AlreadyThere(BackendError):
    """A vfolder's native directory exists already (adopt it, or remove it)."""


@dataclass(frozen=True)
class BackendOption:
    """One key of `[hosts.X.options]`: its type, default (None: required) and doc line.
    Secrets are never inline: they are `*_file` keys naming a file."""

    key: str
    kind: type
    default: Any
    doc: str


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond plain directories (shown in GET /v1/hosts/{host})."""

    native_quota: bool = False  # set_native_quota pushes limits down to the storage
    fast_usage: bool = False  # native_usage answers without walking the tree
    clone: str | None = "copy"  # "snapshot" (O(1)) or "copy" (Backend.clone); None: cannot
    snapshots: bool = False  # snapshot()
    health_targets: bool = True  # health_targets() names servers to watch


class Backend:
    """The contract every backend implements.

    Required: the layout and lifecycle methods below (the base class has them for plain
    directories, and clone by copy).  Optional, per `capabilities`: `set_native_quota`,
    `native_usage`, `snapshot`; the base class raises NotSupported.
    """

    name: ClassVar[str] = "?"
    options: ClassVar[tuple[BackendOption, ...]] = ()
    capabilities: ClassVar[Capabilities] = Capabilities()
    # the errno the storage answers a native quota overrun with (XFS: ENOSPC); callers always
    # get EDQUOT for it on a vfolder with a limit (SPEC §4)
    quota_errno: ClassVar[int] = errno.EDQUOT

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        self.config = self.parse_options(host)

    @classmethod
    def parse_options(cls, host: HostConfig) -> dict[str, Any]:
        """host.options checked against `options`, defaults filled in (ConfigError if not)."""
        declared = {o.key: o for o in cls.options}
        for key in host.options:
            if key not in declared:
                known = ", ".join(sorted(declared)) or "none"
                raise ConfigError(
                    f"hosts.{host.name}.options.{key}: unknown option for backend "
                    f"{cls.name!r} (known: {known})"
                )
        out = {}
        for opt in cls.options:
            value = host.options.get(opt.key, opt.default)
            if value is None:
                raise ConfigError(
                    f"hosts.{host.name}.options.{opt.key}: required by backend "
                    f"{cls.name!r} ({opt.doc})"
                )
            if not isinstance(value, opt.kind) or isinstance(value, bool) and opt.kind is not bool:
                raise ConfigError(
                    f"hosts.{host.name}.options.{opt.key}: must be {opt.kind.__name__}"
                )
            out[opt.key] = value
        return out

    # -- layout ---------------------------------------------------------------------------------
    def native_path(self, vfid: uuid.UUID, scope: str) -> str:
        """Where a vfolder's data lives on native storage, by the host's layout."""
        if self.host.layout == "flat":
            return os.path.join(self.host.path, str(vfid))
        scope_id = scope.partition(":")[2]
        if not scope_id:
            raise BackendError(
                "the backendai layout needs a quota scope (user:<uuid> or project:<uuid>)"
            )
        h = vfid.hex
        return os.path.join(self.host.path, uuid.UUID(scope_id).hex, h[0:2], h[2:4], h[4:])

    def trash_dir(self) -> str:
        return os.path.join(self.host.path, TRASH_DIR)

    def inventory(self) -> tuple[list[str], list[str]]:
        """What the host's native directory holds, by its layout: (vfolder directories,
        unfinished clones: hidden `.<uuid>.clone` entries a crash mid-clone left)."""
        found: list[str] = []
        unfinished: list[str] = []
        levels = 1 if self.host.layout == "flat" else 4  # <scope>/<u[0:2]>/<u[2:4]>/<u[4:]>
        self._walk_layout(self.host.path, levels, "", found, unfinished)
        return sorted(found), sorted(unfinished)

    def _walk_layout(
        self, path: str, levels: int, prefix: str, found: list[str], unfinished: list[str]
    ) -> None:
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            name = entry.name
            if levels == 1:
                if name.startswith(".") and name.endswith(".clone"):
                    unfinished.append(entry.path)
                elif entry.is_dir(follow_symlinks=False) and _looks_like_vfolder(prefix + name):
                    found.append(entry.path)
            elif entry.is_dir(follow_symlinks=False) and not name.startswith("."):
                part = "" if levels == 4 else prefix + name  # the scope dir is not in the id
                self._walk_layout(entry.path, levels - 1, part, found, unfinished)

    # -- vfolder lifecycle ----------------------------------------------------------------------
    def create_vfolder(self, path: str, adopt: bool = False) -> bool:
        """Make the vfolder's directory (or, with adopt, use the one there); True if made."""
        if os.path.lexists(path) and not adopt:
            raise AlreadyThere(f"native directory {path} already exists")
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, 0o755)
            return True
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                raise BackendError(f"native path {path} exists and is not a directory") from None
            return False

    def remove_new_vfolder(self, path: str) -> None:
        """Undo create_vfolder (or a clone) after a later step failed: nothing could reach it
        before it was served, so all of it goes."""
        if not os.path.lexists(path):
            return
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def delete_vfolder(self, path: str, vfid: str) -> str:
        """Move the vfolder's data into the host's trash (a rename) and return where it went."""
        trash = self.trash_dir()
        os.makedirs(trash, mode=0o700, exist_ok=True)
        target = os.path.join(trash, f"{vfid}.{time.time_ns()}")
        if os.path.isdir(path):
            os.rename(path, target)
            return target
        return ""

    def find_in_trash(self, vfid: str) -> str | None:
        """Where delete_vfolder moved vfid's data, if it is still in the trash."""
        try:
            names = sorted(n for n in os.listdir(self.trash_dir()) if n.startswith(vfid + "."))
        except FileNotFoundError:
            return None
        return os.path.join(self.trash_dir(), names[-1]) if names else None

    def restore_vfolder(self, trash_path: str, path: str) -> None:
        """Move a deleted vfolder's data back from the trash to its directory."""
        if os.path.lexists(path):
            raise AlreadyThere(f"native directory {path} already exists")
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.rename(trash_path, path)

    def purge(self, trash_path: str) -> None:
        """Remove trashed data for good (slow; runs in the background)."""
        shutil.rmtree(trash_path, ignore_errors=True)
        if os.path.lexists(trash_path):
            raise BackendError(f"could not remove all of {trash_path}")

    # -- optional capabilities ------------------------------------------------------------------
    def set_native_quota(self, path: str, quota_bytes: int, quota_inodes: int) -> None:
        """Push a vfolder's limits (0: none) down to the storage."""
        raise NotSupported(f"backend {self.name!r} has no native quota")

    def native_limit(self, path: str) -> int:
        """The byte limit the storage enforces on a vfolder (0: none)."""
        raise NotSupported(f"backend {self.name!r} has no native quota")

    def native_usage(self, path: str) -> tuple[int, int]:
        """(bytes, inodes) of a vfolder as the storage counts them, without a walk."""
        raise NotSupported(f"backend {self.name!r} has no fast usage")

    def clone(
        self,
        src: str,
        dst: str,
        snapshot: str | None = None,
        progress: Callable[[int, int], None] = lambda files, nbytes: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        """Make dst (which must not exist) a copy of src, or of src's snapshot, by
        `capabilities.clone`; progress(files, bytes) as it goes.  On failure dst may be left
        half made: the caller removes it (remove_new_vfolder).

        Here: a copy (native/copytree.py: contents by copy_file_range, which reflinks where
        the filesystem can, holes, modes, owners, times, xattrs, symlinks, hard links), of the
        tree or of what `snapshot_origin` names; a backend whose snapshots are writable clones
        (btrfs) overrides this."""
        origin = src if snapshot is None else self.snapshot_origin(src, snapshot)
        if os.path.lexists(dst):
            raise AlreadyThere(f"native directory {dst} already exists")
        self.create_vfolder(dst)
        src_fd = os.open(origin, copytree.DIR_FLAGS)
        try:
            dst_fd = os.open(dst, copytree.DIR_FLAGS)
            try:
                copytree.copy_tree(src_fd, dst_fd, progress, cancelled)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)

    def snapshot_origin(self, path: str, name: str) -> str:
        """Where snapshot `name` of a vfolder can be read, for a clone to copy it from."""
        raise BackendError(f"backend {self.name!r} has no snapshots to clone from")

    def snapshot(self, path: str, name: str) -> str:
        """Take a read-only snapshot of a vfolder; returns where it is."""
        raise NotSupported(f"backend {self.name!r} has no snapshots")

    def snapshots(self, path: str) -> list[str]:
        """The names of a vfolder's snapshots."""
        raise NotSupported(f"backend {self.name!r} has no snapshots")

    def delete_snapshot(self, path: str, name: str) -> None:
        raise NotSupported(f"backend {self.name!r} has no snapshots")

    # -- health ---------------------------------------------------------------------------------
    def probe(self) -> str:
        """'ok', 'degraded' or 'down' (blocking; the daemon bounds it with op_timeout)."""
        return "ok" if os.path.isdir(self.host.path) else "down"

    def health_targets(self) -> list[str]:
        """Storage servers whose network path decides the host's health: `servers` if given,
        else the server of the network filesystem holding the host's path (from the mount
        table; none for local storage)."""
        if self.host.servers:
            return list(self.host.servers)
        m = mounts.mount_of(self.host.path)
        if m is None or m.fstype not in NETWORK_FS_TYPES:
            return []
        server = mounts.source_server(m.source)
        return [server] if server else []

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "path": self.host.path,
            "layout": self.host.layout,
            "capabilities": asdict(self.capabilities),
        }


def consistency(backend: Backend, recorded: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """Native storage against the store, for one host (blocking: its admin threads or doctor).

    recorded: native path -> (vfolder id, byte limit) of every vfolder the store has on the
    host.  Returns native directories no vfolder record names (`orphans`: adopt them or remove
    them by hand), records whose directory is gone (`missing`), unfinished clones a crash left,
    and limits the storage enforces that differ from the store's (`limit_drift`).  It reports;
    it never deletes anything."""
    found, unfinished = backend.inventory()
    orphans = sorted(set(found) - set(recorded))
    missing = sorted(vfid for path, (vfid, _) in recorded.items() if not os.path.isdir(path))
    drift = []
    if backend.capabilities.native_quota:
        gone = set(missing)
        for path, (vfid, limit) in sorted(recorded.items()):
            if vfid in gone:
                continue
            try:
                native = backend.native_limit(path)
            except BackendError:
                continue
            if native != limit:
                drift.append({"id": vfid, "store": limit, "native": native})
    return {
        "orphans": orphans,
        "missing": missing,
        "unfinished_clones": unfinished,
        "limit_drift": drift,
    }


def _looks_like_vfolder(name: str) -> bool:
    """A canonical UUID (flat layout), or its 32 hex digits split as the backendai layout does."""
    text = name if "-" in name else name.replace("/", "")
    try:
        u = uuid.UUID(text)
    except ValueError:
        return False
    return str(u) == text or u.hex == text


def installed() -> dict[str, type[Backend]]:
    """Every backend installed (entry-point group vfusefs.backends), by name."""
    return {ep.name: ep.load() for ep in entry_points(group="vfusefs.backends")}


def options_markdown() -> str:
    """The backends' reference for docs/config.md: capabilities and `[hosts.NAME.options]`."""
    lines = [
        "| backend | native quota | fast usage | clone | snapshots | options |",
        "|---|---|---|---|---|---|",
    ]
    for name, cls in sorted(installed().items()):
        c = cls.capabilities
        opts = (
            "<br>".join(
                f"`{o.key}` ({o.kind.__name__}, {'required' if o.default is None else repr(o.default)}):"
                f" {o.doc}"
                for o in cls.options
            )
            or "none"
        )
        lines.append(
            f"| `{name}` | {'yes' if c.native_quota else 'no'} | "
            f"{'yes' if c.fast_usage else 'no'} | {c.clone or 'not yet'} | "
            f"{'yes' if c.snapshots else 'no'} | {opts} |"
        )
    return "\n".join(lines) + "\n"


def load_backend(host: HostConfig) -> Backend:
    """Instantiate the backend named by a host's config (ConfigError if unknown)."""
    found = {ep.name: ep for ep in entry_points(group="vfusefs.backends")}
    if host.backend not in found:
        names = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(
            f"hosts.{host.name}.backend: unknown backend {host.backend!r} (known: {names})"
        )
    cls: type[Backend] = found[host.backend].load()
    return cls(host)
