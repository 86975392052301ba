"""The vfolder registry's durable state: vfolders, their grants, scopes and the trash queue.

The embedded store is one SQLite file.  Its methods are blocking and are only ever called from
worker threads (`trio.to_thread`), never from the FUSE event loop; the daemon keeps the state it
needs on the request path in memory (`registry.py`) and writes through to the store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator


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
    path: str
    host: str
    vfolder: str
    deleted: float


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vfolders (
    id TEXT PRIMARY KEY, host TEXT NOT NULL, native_path TEXT NOT NULL,
    scope TEXT NOT NULL DEFAULT '', quota_bytes INTEGER NOT NULL DEFAULT 0,
    quota_inodes INTEGER NOT NULL DEFAULT 0, grants TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS trash (
    path TEXT PRIMARY KEY, host TEXT NOT NULL, vfolder TEXT NOT NULL, deleted REAL NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    vfolder TEXT PRIMARY KEY, bytes INTEGER NOT NULL, inodes INTEGER NOT NULL, scanned REAL);
CREATE TABLE IF NOT EXISTS scopes (
    scope TEXT PRIMARY KEY, quota_bytes INTEGER NOT NULL DEFAULT 0,
    quota_inodes INTEGER NOT NULL DEFAULT 0);
"""
SCHEMA_VERSION = "1"


class SqliteStore:
    """The embedded store (`store.url = "sqlite:///abs/path.db"`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            os.chmod(path, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    def ping(self) -> None:
        self._run("SELECT 1")

    def vfolders(self) -> list[VfolderRecord]:
        rows = self._run("SELECT id, host, native_path, scope, quota_bytes, quota_inodes, grants, "
                         "created FROM vfolders ORDER BY created, id")
        return [VfolderRecord(id=r[0], host=r[1], native_path=r[2], scope=r[3], quota_bytes=r[4],
                              quota_inodes=r[5], grants=json.loads(r[6]), created=r[7])
                for r in rows]

    def has_vfolder(self, vfid: str) -> bool:
        return bool(self._run("SELECT 1 FROM vfolders WHERE id = ?", (vfid,)))

    def put_vfolder(self, rec: VfolderRecord) -> None:
        self._run("INSERT OR REPLACE INTO vfolders VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (rec.id, rec.host, rec.native_path, rec.scope, rec.quota_bytes, rec.quota_inodes,
                   json.dumps(rec.grants, sort_keys=True), rec.created))

    def delete_vfolder(self, vfid: str, trash: TrashRecord | None) -> None:
        """Forget a vfolder and, in the same transaction, queue its moved data for purging."""
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.execute("DELETE FROM vfolders WHERE id = ?", (vfid,))
                    self._db.execute("DELETE FROM usage WHERE vfolder = ?", (vfid,))
                    if trash is not None:
                        self._db.execute("INSERT OR REPLACE INTO trash VALUES (?, ?, ?, ?)",
                                         (trash.path, trash.host, trash.vfolder, trash.deleted))
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    # -- usage and scopes ------------------------------------------------------------------------
    def usage(self) -> dict[str, tuple[int, int]]:
        return {r[0]: (r[1], r[2]) for r in self._run("SELECT vfolder, bytes, inodes FROM usage")}

    def put_usage(self, rows: list[tuple[str, int, int]]) -> None:
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.executemany("INSERT OR REPLACE INTO usage (vfolder, bytes, inodes) "
                                         "VALUES (?, ?, ?)", rows)
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    def scopes(self) -> dict[str, tuple[int, int]]:
        return {r[0]: (r[1], r[2]) for r in self._run("SELECT scope, quota_bytes, quota_inodes FROM scopes")}

    def put_scope(self, scope: str, quota_bytes: int, quota_inodes: int) -> None:
        self._run("INSERT OR REPLACE INTO scopes VALUES (?, ?, ?)", (scope, quota_bytes, quota_inodes))

    def get_meta(self, key: str) -> str | None:
        rows = self._run("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._run("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def trash(self) -> Iterator[TrashRecord]:
        for r in self._run("SELECT path, host, vfolder, deleted FROM trash ORDER BY deleted"):
            yield TrashRecord(*r)

    def trash_purged(self, path: str) -> None:
        self._run("DELETE FROM trash WHERE path = ?", (path,))


def open_store(url: str) -> SqliteStore:
    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite://"):])
    raise StoreError(f"store url {url!r}: only sqlite:/// is supported by this version")
