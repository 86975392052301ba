"""Unfinished tus uploads of this node (files over HTTP, SPEC §8).

An upload's bytes grow in a file of its vfolder (`.vfusefs-uploads/<id>` at the vfolder's top,
charged to the vfolder as they arrive, so usage always equals `du`); what it is for (host,
vfolder, target path, length, metadata, expiry) is kept here, one small JSON file per upload in
`<state_dir>/uploads/`, so a restarted daemon takes its uploads up again.  How far an upload has
come is the size of its file, read again after a restart.

Uploads belong to the node that started them: with many nodes, send an upload's requests to
one node (as a load balancer's sticky sessions do).  The files are written off the event loop by
the caller (`trio.to_thread`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass
class Upload:
    id: str
    host: str
    vfolder: str
    path: str  # where the file goes once complete, inside the vfolder ("/a/b.bin")
    length: int
    metadata: str  # Upload-Metadata as the client sent it (echoed by HEAD)
    expires: float  # Unix time; pushed back by every PATCH
    offset: int | None = None  # bytes received; None: read the file's size first
    lock: trio.Lock = field(default_factory=trio.Lock, compare=False, repr=False)

    @property
    def name(self) -> bytes:
        """Its file's name in the vfolder's directory of uploads."""
        return self.id.encode()

    def record(self) -> dict[str, object]:
        return {
            "id": self.id,
            "host": self.host,
            "vfolder": self.vfolder,
            "path": self.path,
            "length": self.length,
            "metadata": self.metadata,
            "expires": self.expires,
        }


class UploadFiles:
    """The JSON records of a node's uploads (blocking calls: run them on a thread)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, upload_id: str) -> str:
        return os.path.join(self.directory, upload_id + ".json")

    def save(self, up: Upload) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        tmp = self._path(up.id) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(up.record(), f)
        os.replace(tmp, self._path(up.id))

    def remove(self, upload_id: str) -> None:
        try:
            os.unlink(self._path(upload_id))
        except FileNotFoundError:
            pass

    def load(self) -> list[Upload]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = []
        for name in sorted(names):
            upload_id, ext = os.path.splitext(name)
            if ext != ".json" or not ID_RE.fullmatch(upload_id):
                continue
            try:
                with open(os.path.join(self.directory, name)) as f:
                    r = json.load(f)
                found.append(
                    Upload(
                        upload_id,
                        str(r["host"]),
                        str(r["vfolder"]),
                        str(r["path"]),
                        int(r["length"]),
                        str(r.get("metadata", "")),
                        float(r["expires"]),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("upload record %s unreadable (%s): left alone", name, exc)
        return found
