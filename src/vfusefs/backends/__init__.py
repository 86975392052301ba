"""Storage backends: how a host's vfolders are created, deleted and measured on native storage.

A backend is small: it never sees FUSE requests.  The data path (`ops.py`) works on the native
directory itself; a backend only manages vfolder directories and, where the storage has them,
native quotas, fast usage and health.  Backends are found through the entry-point group
`vfusefs.backends`; each declares `known_options`, and an unknown option is a config error.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from importlib.metadata import entry_points
from typing import Any, ClassVar

from vfusefs.config import ConfigError, HostConfig

TRASH_DIR = ".vfusefs-trash"


class BackendError(Exception):
    """A backend operation failed; the message is for the operator."""


class Backend:
    """The contract every backend implements (blocking methods run in worker threads)."""

    name: ClassVar[str] = "?"
    known_options: ClassVar[dict[str, type]] = {}

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        for key, value in host.options.items():
            if key not in self.known_options:
                known = ", ".join(sorted(self.known_options)) or "none"
                raise ConfigError(f"hosts.{host.name}.options.{key}: unknown option for backend "
                                  f"{self.name!r} (known: {known})")
            kind = self.known_options[key]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise ConfigError(f"hosts.{host.name}.options.{key}: must be {kind.__name__}")

    # -- layout ---------------------------------------------------------------------------------
    def native_path(self, vfid: uuid.UUID, scope: str) -> str:
        """Where a vfolder's data lives on native storage, by the host's layout."""
        if self.host.layout == "flat":
            return os.path.join(self.host.path, str(vfid))
        scope_id = scope.partition(":")[2]
        if not scope_id:
            raise BackendError("the backendai layout needs a quota scope (user:<uuid> or project:<uuid>)")
        h = vfid.hex
        return os.path.join(self.host.path, uuid.UUID(scope_id).hex, h[0:2], h[2:4], h[4:])

    def trash_dir(self) -> str:
        return os.path.join(self.host.path, TRASH_DIR)

    # -- vfolder lifecycle ----------------------------------------------------------------------
    def create_vfolder(self, path: str, adopt: bool = False) -> bool:
        """Make the vfolder's directory (or, with adopt, use the one there); True if made."""
        if os.path.lexists(path) and not adopt:
            raise BackendError(f"native directory {path} already exists (adopt it with --adopt)")
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, 0o755)
            return True
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                raise BackendError(f"native path {path} exists and is not a directory") from None
            return False

    def remove_new_vfolder(self, path: str) -> None:
        """Undo create_vfolder after a later step failed: the directory is still empty (nothing
        could reach it before it was served)."""
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass

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

    def purge(self, trash_path: str) -> None:
        """Remove trashed data for good (slow; runs in the background)."""
        shutil.rmtree(trash_path, ignore_errors=True)
        if os.path.lexists(trash_path):
            raise BackendError(f"could not remove all of {trash_path}")

    # -- health ---------------------------------------------------------------------------------
    def probe(self) -> str:
        """'ok', 'degraded' or 'down' (blocking; the daemon bounds it with op_timeout)."""
        return "ok" if os.path.isdir(self.host.path) else "down"

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "path": self.host.path, "layout": self.host.layout}


def load_backend(host: HostConfig) -> Backend:
    """Instantiate the backend named by a host's config (ConfigError if unknown)."""
    found = {ep.name: ep for ep in entry_points(group="vfusefs.backends")}
    if host.backend not in found:
        names = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(f"hosts.{host.name}.backend: unknown backend {host.backend!r} (known: {names})")
    cls = found[host.backend].load()
    return cls(host)
