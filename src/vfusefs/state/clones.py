"""The registry's clones and snapshots: a clone is a background task that makes the new
vfolder under a hidden name, checks it against its limits and places it only once complete;
snapshots go to the backend."""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from typing import Any

import trio

from vfusefs import native
from vfusefs.backends import AlreadyThere, BackendError
from vfusefs.domain.validation import (
    RegistryError,
    canonical_uuid,
    parse_grants,
    parse_limits,
    parse_scope,
)
from vfusefs.native import copytree
from vfusefs.state.base import RegistryBase, open_dir
from vfusefs.state.records import Task, Vfolder
from vfusefs.store import VfolderRecord

log = logging.getLogger("vfusefs.state.registry")

SNAPSHOT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Clones(RegistryBase):
    # -- clones and snapshots -------------------------------------------------------------------
    async def start_clone(
        self,
        host_name: str,
        vfid: str,
        new_id: Any = None,
        scope: Any = None,
        quota_bytes: Any = None,
        quota_inodes: Any = None,
        grants: Any = None,
        snapshot: Any = None,
    ) -> Task:
        """Check a clone of vfid (everything, before anything is made) and start it in the
        background; the new vfolder exists only once it is complete (Registry._clone).  It
        gets the source's scope, limits and grants unless given."""
        src = self.vfolder(host_name, vfid)
        host = src.host
        if host.backend.capabilities.clone is None:
            raise RegistryError(409, "backend", f"backend {host.backend.name} cannot clone")
        new_id = str(uuid.uuid4()) if new_id is None else canonical_uuid(new_id)
        scope = src.record.scope if scope is None else parse_scope(scope)
        grant_map = dict(src.record.grants) if grants is None else parse_grants(grants)
        qb, qi = parse_limits(quota_bytes, quota_inodes)
        qb = src.record.quota_bytes if qb is None else qb
        qi = src.record.quota_inodes if qi is None else qi
        if snapshot is not None and not isinstance(snapshot, str):
            raise RegistryError(400, "bad_snapshot", "snapshot must be a snapshot's name")
        if snapshot is not None and not host.backend.capabilities.snapshots:
            raise RegistryError(409, "backend", f"backend {host.backend.name} has no snapshots")
        try:
            path = host.backend.native_path(uuid.UUID(new_id), scope)
        except BackendError as exc:
            raise RegistryError(409, "backend", str(exc)) from None
        if new_id in self.vfolders or await self.store_workers.run(self.store.has_vfolder, new_id):
            raise RegistryError(409, "exists", f"vfolder {new_id} already exists")
        if any(t.vfolder == new_id and t.state == "running" for t in self.tasks.values()):
            raise RegistryError(409, "exists", f"a clone into {new_id} is running")
        if await host.admin.run(os.path.lexists, path):  # never a syscall on the event loop
            raise RegistryError(409, "native_exists", f"native directory {path} already exists")
        used = self.ledger.account(src.quota_keys[0])
        self._check_fits(new_id, scope, qb, qi, used.used_bytes, used.used_inodes)
        if self.nursery is None:
            raise RegistryError(409, "not_ready", "the daemon is not ready for background tasks")
        task = Task(
            id=str(uuid.uuid4()), kind="clone", host=host.name, vfolder=new_id, source=src.id
        )
        task.total_files, task.total_bytes = used.used_inodes, used.used_bytes
        self.tasks[task.id] = task
        rec = VfolderRecord(
            id=new_id,
            host=host.name,
            native_path=path,
            scope=scope,
            quota_bytes=qb,
            quota_inodes=qi,
            grants=grant_map,
        )
        self.nursery.start_soon(self._clone, src, rec, snapshot, task)
        log.info(
            "clone of vfolder %s into %s started (%s)",
            src.id,
            new_id,
            host.backend.capabilities.clone,
            extra={"host": host.name, "vfolder": src.id},
        )
        return task

    def _check_fits(
        self, vfid: str, scope: str, qb: int, qi: int, nbytes: int, inodes: int
    ) -> None:
        """RegistryError (409 quota) unless a vfolder using this much fits its limits and its
        scope's room."""
        if (qb and nbytes > qb) or (qi and inodes > qi):
            raise RegistryError(
                409,
                "quota",
                f"the clone {vfid} would use {nbytes} bytes and {inodes} inodes: more than its "
                f"limits ({qb or 'no'} bytes, {qi or 'no'} inodes); give larger ones",
            )
        if scope:
            acc = self.ledger.account(f"scope:{scope}")
            if (acc.limit_bytes and acc.used_bytes + nbytes > acc.limit_bytes) or (
                acc.limit_inodes and acc.used_inodes + inodes > acc.limit_inodes
            ):
                raise RegistryError(
                    409, "quota", f"the clone {vfid} does not fit the room left in scope {scope}"
                )

    async def _clone(
        self, src: Vfolder, rec: VfolderRecord, snapshot: str | None, task: Task
    ) -> None:
        """Make the copy under a hidden name, check it still fits, then give it its name, its
        native limits and its record: until then nothing lists it, and on any failure what
        was made is removed."""
        host = src.host
        hidden = os.path.join(
            os.path.dirname(rec.native_path), f".{os.path.basename(rec.native_path)}.clone"
        )

        def progress(files: int, nbytes: int) -> None:
            task.done_files, task.done_bytes = files, nbytes

        placed = False
        try:
            async with self._lifecycle(rec.id):
                await trio.to_thread.run_sync(
                    host.backend.clone,
                    src.record.native_path,
                    hidden,
                    snapshot,
                    progress,
                    lambda: task.cancel,
                )
                fd, _ = await trio.to_thread.run_sync(open_dir, hidden)
                try:
                    found = await trio.to_thread.run_sync(native.scan, fd)
                finally:
                    os.close(fd)
                task.done_files, task.done_bytes = found.inodes, found.bytes
                task.total_files, task.total_bytes = found.inodes, found.bytes
                self._check_fits(
                    rec.id, rec.scope, rec.quota_bytes, rec.quota_inodes, found.bytes, found.inodes
                )
                if await self.store_workers.run(self.store.has_vfolder, rec.id):
                    raise RegistryError(409, "exists", f"vfolder {rec.id} was made meanwhile")
                await trio.to_thread.run_sync(_place, hidden, rec.native_path)
                placed = True
                if rec.quota_bytes or rec.quota_inodes:
                    await self._push_native_quota(
                        host, rec.native_path, rec.quota_bytes, rec.quota_inodes
                    )
                await self.store_workers.run(self.store.put_vfolder, rec)
                try:
                    vf = await self._attach(host, rec)
                    await self.store_workers.run(
                        self.store.set_usage, vf.id, found.bytes, found.inodes
                    )
                    self.set_usage(vf, found.bytes, found.inodes)
                    vf.stored = (found.bytes, found.inodes)
                except BaseException:
                    stale = self.vfolders.get(rec.id)
                    if stale is not None:
                        self._stop_serving(stale)
                    with trio.CancelScope(shield=True):
                        await self.store_workers.run(self.store.delete_vfolder, rec.id, None)
                    raise
                self._invalidate_entry(host, rec.id)  # the kernel may remember it as absent
                task.result = vf.describe(self.config.daemon.mountpoint, self.ledger)
                task.state = "done"
                log.info(
                    "clone of vfolder %s into %s done: %d files, %d bytes",
                    src.id,
                    rec.id,
                    found.inodes,
                    found.bytes,
                    extra={"host": host.name, "vfolder": rec.id},
                )
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                for made in (hidden, rec.native_path) if placed else (hidden,):
                    try:
                        await trio.to_thread.run_sync(host.backend.remove_new_vfolder, made)
                    except (OSError, BackendError) as cleanup:
                        log.error("clone into %s: could not remove %s: %s", rec.id, made, cleanup)
            task.state = "failed"
            task.error = (
                exc.message
                if isinstance(exc, RegistryError)
                else "the daemon stopped"
                if isinstance(exc, (trio.Cancelled, copytree.CopyCancelled))
                else getattr(exc, "strerror", None) or str(exc)
            )
            log.warning(
                "clone of vfolder %s into %s failed (nothing left of it): %s",
                src.id,
                rec.id,
                task.error,
                extra={"host": host.name, "vfolder": src.id},
            )
            if not isinstance(exc, Exception):
                raise
        finally:
            task.finished = time.time()

    async def snapshots(self, host_name: str, vfid: str) -> list[str]:
        vf = self.vfolder(host_name, vfid)
        backend = vf.host.backend
        if not backend.capabilities.snapshots:
            raise RegistryError(409, "backend", f"backend {backend.name} has no snapshots")
        return await vf.host.admin.run(backend.snapshots, vf.record.native_path)

    async def take_snapshot(self, host_name: str, vfid: str, name: Any) -> str:
        vf = self.vfolder(host_name, vfid)
        backend = vf.host.backend
        if not backend.capabilities.snapshots:
            raise RegistryError(409, "backend", f"backend {backend.name} has no snapshots")
        if not isinstance(name, str) or not SNAPSHOT_NAME_RE.fullmatch(name):
            raise RegistryError(
                400, "bad_snapshot", "a snapshot name is 1-100 letters, digits, '.', '_' or '-'"
            )
        try:
            await vf.host.admin.run(backend.snapshot, vf.record.native_path, name)
        except AlreadyThere as exc:
            raise RegistryError(409, "exists", str(exc)) from None
        except BackendError as exc:
            raise RegistryError(502, "backend", str(exc)) from None
        return name

    async def delete_snapshot(self, host_name: str, vfid: str, name: str) -> None:
        vf = self.vfolder(host_name, vfid)
        backend = vf.host.backend
        if not backend.capabilities.snapshots:
            raise RegistryError(409, "backend", f"backend {backend.name} has no snapshots")
        if name not in await vf.host.admin.run(backend.snapshots, vf.record.native_path):
            raise RegistryError(404, "no_such_snapshot", f"no snapshot {name!r} of {vfid}")
        try:
            await vf.host.admin.run(backend.delete_snapshot, vf.record.native_path, name)
        except BackendError as exc:
            raise RegistryError(502, "backend", str(exc)) from None


def _place(hidden: str, path: str) -> None:
    """Give a finished clone its name (a rename: it appears whole, or not at all)."""
    if os.path.lexists(path):
        raise RegistryError(409, "native_exists", f"native directory {path} appeared meanwhile")
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    os.rename(hidden, path)
