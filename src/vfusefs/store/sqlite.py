"""The embedded store: one SQLite file (`store.url = "sqlite:///abs/path.db"`).

Schema 2: usage is a base per vfolder plus one delta per node; every change to a vfolder or a
scope appends a row to `changes` in the same transaction (the change feed); trash entries are
claimed before a purge.  A schema 1 file (before per-node usage) is upgraded in place on open.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from typing import Any

from vfusefs.store import Change, StoreError, TrashRecord, VfolderRecord

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
CREATE TABLE IF NOT EXISTS usage_deltas (
    vfolder TEXT NOT NULL, node TEXT NOT NULL, bytes INTEGER NOT NULL, inodes INTEGER NOT NULL,
    PRIMARY KEY (vfolder, node));
CREATE TABLE IF NOT EXISTS scopes (
    scope TEXT PRIMARY KEY, quota_bytes INTEGER NOT NULL DEFAULT 0,
    quota_inodes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL);
"""
SCHEMA_VERSION = "2"
KEEP_CHANGES = 10000  # feed entries kept; a reader further behind gets one "all" change


class SqliteStore:
    kind = "sqlite"
    shared = False  # one node: limits are checked in its own ledger

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=10
            )
            os.chmod(path, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._upgrade()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from None
        self._lock = threading.Lock()

    def _upgrade(self) -> None:
        """Bring an older file to SCHEMA_VERSION (tables are created above; columns here)."""
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(trash)")}
        with self._db:
            self._db.execute("BEGIN")
            if "claimed_by" not in cols:
                self._db.execute("ALTER TABLE trash ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''")
                self._db.execute(
                    "ALTER TABLE trash ADD COLUMN claimed_until REAL NOT NULL DEFAULT 0"
                )
            if "record" not in cols:
                self._db.execute("ALTER TABLE trash ADD COLUMN record TEXT NOT NULL DEFAULT ''")
            if self._db.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone():
                self._db.execute("DELETE FROM meta WHERE key = 'clean'")  # schema 1's global flag
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    def _transaction(self, *steps: tuple[str, tuple[Any, ...]]) -> None:
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    for sql, args in steps:
                        self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    def ping(self) -> None:
        self._run("SELECT 1")

    # -- vfolders -------------------------------------------------------------------------------
    _COLUMNS = "id, host, native_path, scope, quota_bytes, quota_inodes, grants, created"

    @staticmethod
    def _record(r: Any) -> VfolderRecord:
        return VfolderRecord(
            id=r[0],
            host=r[1],
            native_path=r[2],
            scope=r[3],
            quota_bytes=r[4],
            quota_inodes=r[5],
            grants=json.loads(r[6]),
            created=r[7],
        )

    @staticmethod
    def _row(rec: VfolderRecord) -> tuple[Any, ...]:
        return (
            rec.id,
            rec.host,
            rec.native_path,
            rec.scope,
            rec.quota_bytes,
            rec.quota_inodes,
            json.dumps(rec.grants, sort_keys=True),
            rec.created,
        )

    def vfolders(self) -> list[VfolderRecord]:
        rows = self._run(f"SELECT {self._COLUMNS} FROM vfolders ORDER BY created, id")
        return [self._record(r) for r in rows]

    def vfolder(self, vfid: str) -> VfolderRecord | None:
        rows = self._run(f"SELECT {self._COLUMNS} FROM vfolders WHERE id = ?", (vfid,))
        return self._record(rows[0]) if rows else None

    def has_vfolder(self, vfid: str) -> bool:
        return bool(self._run("SELECT 1 FROM vfolders WHERE id = ?", (vfid,)))

    def put_vfolder(self, rec: VfolderRecord) -> None:
        self._transaction(
            ("INSERT OR REPLACE INTO vfolders VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._row(rec)),
            *self._changed("vfolder", rec.id),
        )

    def delete_vfolder(self, vfid: str, trash: TrashRecord | None) -> None:
        steps = [
            ("DELETE FROM vfolders WHERE id = ?", (vfid,)),
            ("DELETE FROM usage WHERE vfolder = ?", (vfid,)),
            ("DELETE FROM usage_deltas WHERE vfolder = ?", (vfid,)),
            *self._changed("vfolder", vfid),
        ]
        if trash is not None:
            rec = json.dumps(trash.record.__dict__, sort_keys=True) if trash.record else ""
            steps.append(
                (
                    "INSERT OR REPLACE INTO trash (path, host, vfolder, deleted, record) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (trash.path, trash.host, trash.vfolder, trash.deleted, rec),
                )
            )
        self._transaction(*steps)

    # -- usage ----------------------------------------------------------------------------------
    def usage(self) -> dict[str, tuple[int, int]]:
        out = {r[0]: (r[1], r[2]) for r in self._run("SELECT vfolder, bytes, inodes FROM usage")}
        for vfid, nbytes, inodes in self._run(
            "SELECT vfolder, sum(bytes), sum(inodes) FROM usage_deltas GROUP BY vfolder"
        ):
            base = out.get(vfid, (0, 0))
            out[vfid] = (base[0] + nbytes, base[1] + inodes)
        return out

    def vfolder_usage(self, vfid: str) -> tuple[int, int]:
        base = self._run("SELECT bytes, inodes FROM usage WHERE vfolder = ?", (vfid,))
        delta = self._run(
            "SELECT coalesce(sum(bytes), 0), coalesce(sum(inodes), 0) FROM usage_deltas "
            "WHERE vfolder = ?",
            (vfid,),
        )
        b, i = base[0] if base else (0, 0)
        return b + delta[0][0], i + delta[0][1]

    def add_usage(self, node: str, deltas: list[tuple[str, int, int]], batch: int = 0) -> None:
        if batch:
            done = self._run("SELECT value FROM meta WHERE key = ?", (f"batch:{node}",))
            if done and int(done[0][0]) >= batch:
                return  # landed already (a retry)
        steps: list[tuple[str, tuple[Any, ...]]] = [
            (
                "INSERT INTO usage_deltas VALUES (?, ?, ?, ?) ON CONFLICT (vfolder, node) DO UPDATE "
                "SET bytes = bytes + excluded.bytes, inodes = inodes + excluded.inodes",
                (vfid, node, nbytes, inodes),
            )
            for vfid, nbytes, inodes in deltas
        ]
        if batch:
            steps.append(("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"batch:{node}", batch)))
        self._transaction(*steps)

    def set_usage(self, vfid: str, nbytes: int, inodes: int) -> None:
        self._transaction(
            (
                "INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?)",
                (vfid, nbytes, inodes, time.time()),
            ),
            ("DELETE FROM usage_deltas WHERE vfolder = ?", (vfid,)),
        )

    # -- scopes ---------------------------------------------------------------------------------
    def scopes(self) -> dict[str, tuple[int, int]]:
        return {
            r[0]: (r[1], r[2])
            for r in self._run("SELECT scope, quota_bytes, quota_inodes FROM scopes")
        }

    def put_scope(self, scope: str, quota_bytes: int, quota_inodes: int) -> None:
        self._transaction(
            ("INSERT OR REPLACE INTO scopes VALUES (?, ?, ?)", (scope, quota_bytes, quota_inodes)),
            *self._changed("scope", scope),
        )

    # -- clean flags ----------------------------------------------------------------------------
    def clean(self, node: str) -> bool:
        rows = self._run("SELECT value FROM meta WHERE key = ?", (f"clean:{node}",))
        return bool(rows) and rows[0][0] == "1"

    def set_clean(self, node: str, clean: bool) -> None:
        self._run(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"clean:{node}", "1" if clean else "0")
        )

    # -- trash ----------------------------------------------------------------------------------
    def trash(self) -> list[TrashRecord]:
        return [
            TrashRecord(r[0], r[1], r[2], r[3], VfolderRecord(**json.loads(r[4])) if r[4] else None)
            for r in self._run(
                "SELECT path, host, vfolder, deleted, record FROM trash ORDER BY deleted"
            )
        ]

    def restore_vfolder(self, rec: VfolderRecord, trash_path: str) -> bool:
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    if (
                        self._db.execute("DELETE FROM trash WHERE path = ?", (trash_path,)).rowcount
                        != 1
                    ):
                        return False
                    self._db.execute(
                        "INSERT INTO vfolders VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self._row(rec)
                    )
                    for sql, args in self._changed("vfolder", rec.id):
                        self._db.execute(sql, args)
                return True
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    def claim_trash(self, path: str, node: str, seconds: float) -> bool:
        now = time.time()
        with self._lock:
            try:
                cur = self._db.execute(
                    "UPDATE trash SET claimed_by = ?, claimed_until = ? WHERE path = ? AND "
                    "(claimed_by = ? OR claimed_until < ?)",
                    (node, now + seconds, path, node, now),
                )
                return cur.rowcount == 1
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    def claim_task(self, name: str, node: str, seconds: float) -> bool:
        now = time.time()
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    row = self._db.execute(
                        "SELECT value FROM meta WHERE key = ?", (f"task:{name}",)
                    ).fetchone()
                    if row:
                        holder, until = json.loads(row[0])
                        if holder != node and until > now:
                            return False
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        (f"task:{name}", json.dumps([node, now + seconds])),
                    )
                return True
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    def trash_purged(self, path: str) -> None:
        self._run("DELETE FROM trash WHERE path = ?", (path,))

    # -- the change feed ------------------------------------------------------------------------
    @staticmethod
    def _changed(kind: str, key: str) -> list[tuple[str, tuple[Any, ...]]]:
        return [
            ("INSERT INTO changes (kind, key) VALUES (?, ?)", (kind, key)),
            (
                "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?",
                (KEEP_CHANGES,),
            ),
        ]

    def epoch(self) -> str:
        # read on every poll of the feed: a write only the first time
        rows = self._run("SELECT value FROM meta WHERE key = 'epoch'")
        if not rows:
            self._run("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            rows = self._run("SELECT value FROM meta WHERE key = 'epoch'")
        return str(rows[0][0])

    def last_change(self) -> int:
        return int(self._run("SELECT coalesce(max(seq), 0) FROM changes")[0][0])

    def changes(self, since: int) -> list[Change]:
        rows = self._run(
            "SELECT seq, kind, key FROM changes WHERE seq > ? ORDER BY seq LIMIT 5000", (since,)
        )
        out = [Change(*r) for r in rows]
        if out and out[0].seq > since + 1:
            oldest = self._run("SELECT min(seq) FROM changes")[0][0]
            if oldest > since + 1:  # trimmed past the reader: it must look at everything
                out.insert(0, Change(out[0].seq, "all", ""))
        return out
