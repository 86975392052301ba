"""The file API's way into vfolders (files over HTTP, SPEC §8), on the mount's own code.

Every request is done by the FUSE handlers of `Operations` themselves, called as the kernel calls
them, with a `FilesContext` in place of the kernel's request context: the token's mode is the
caller's mode (`TokenCaller`), so access is decided by the same checks, every change is charged
by the same ledger (EDQUOT before a byte lands), and every native call is the same O_PATH/`*at`
call on the same worker lanes.  A path is walked one component at a time with `lookup`, which
never takes "." or ".." (domain/files.py refuses them first) and never follows a symlink; a
symlink on the way is refused (403), so no name leads out of the vfolder.

What the kernel does for the mount and nobody does here: POSIX permission bits.  The token's
mode is the whole decision, as for an admin on the mount; what the API makes is owned by the
vfolder's owner (its root directory's uid and gid).

A `Walk` remembers the nodes one request looked up and forgets them when it ends (the kernel's
lookup counts are separate and untouched), so the inode table holds nothing for the API
between requests.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import pyfuse3
import trio

from vfusefs import native
from vfusefs.domain.access import Caller, Mode, TokenCaller
from vfusefs.domain.files import Path, show
from vfusefs.domain.validation import RegistryError
from vfusefs.fuse.callers import FilesContext
from vfusefs.fuse.errors import fail
from vfusefs.fuse.inodes import ROOT_INODE
from vfusefs.fuse.ops import Operations

UPLOADS = b".vfusefs-uploads"  # where unfinished uploads grow, at the top of their vfolder
DAEMON = Caller(0, 0, 0, None)  # the daemon's own housekeeping of its upload files
FILE_MODE = 0o666  # before the umask (0o022), as a shell's `>` makes files
DIR_MODE = 0o777

# errno of a handler -> HTTP status and error code (the JSON errors of SPEC §6)
ERRNO_STATUS = {
    errno.ENOENT: (404, "not_found"),
    errno.ENOTDIR: (404, "not_found"),
    errno.EACCES: (403, "no_access"),
    errno.EROFS: (403, "read_only"),
    errno.EPERM: (403, "no_delete"),  # rw may neither delete nor replace
    errno.ELOOP: (403, "symlink"),
    errno.EEXIST: (409, "exists"),
    errno.ENOTEMPTY: (409, "not_empty"),
    errno.EISDIR: (409, "is_directory"),
    errno.EXDEV: (409, "cross_device"),
    errno.EBUSY: (409, "busy"),
    errno.EDQUOT: (413, "quota"),
    errno.ENOSPC: (413, "no_space"),
    errno.EFBIG: (413, "too_large"),
    errno.ENAMETOOLONG: (400, "bad_path"),
    errno.EINVAL: (400, "invalid"),
}
MESSAGES = {
    errno.EROFS: "the token is read-only",
    errno.EPERM: "an rw token may not delete or replace (rwd may)",
    errno.ELOOP: "a symbolic link is on the way; the file API does not follow links",
    errno.EDQUOT: "the vfolder's or its scope's quota is exceeded",
}


def refusal(exc: pyfuse3.FUSEError, what: Path | str) -> RegistryError:
    """The HTTP error for a handler's errno (502 "storage" for one storage answered with)."""
    status, code = ERRNO_STATUS.get(exc.errno, (502, "storage"))
    where = what if isinstance(what, str) else show(what)
    message = MESSAGES.get(exc.errno) or os.strerror(exc.errno).lower()
    return RegistryError(status, code, f"{where}: {message}")


def through(attrs: pyfuse3.EntryAttributes) -> None:
    """A path goes on through a directory only: never through a symlink (ELOOP), nor a file."""
    if stat.S_ISLNK(attrs.st_mode):
        raise fail(errno.ELOOP)
    if not stat.S_ISDIR(attrs.st_mode):
        raise fail(errno.ENOTDIR)


class Walk:
    """One request's way through one vfolder: `async with Files.walk(...) as w:`.  The nodes it
    looked up are forgotten when the block ends, whatever ends it."""

    def __init__(self, ops: Operations, caller: Caller, admin: bool = False) -> None:
        self.ops = ops
        self.ctx = FilesContext(caller, admin, 0, 0)
        self.looked: list[int] = []

    async def __aenter__(self) -> Walk:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.looked:
            looked, self.looked = self.looked, []
            with trio.CancelScope(shield=True):
                await self.ops.forget([(ino, 1) for ino in looked])

    async def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        attrs = await self.ops.lookup(parent, name, self.ctx)  # type: ignore[arg-type]
        self.looked.append(attrs.st_ino)
        return attrs

    async def vfolder(self, host: str, vfid: str) -> pyfuse3.EntryAttributes:
        """The vfolder's root, looked up as the kernel looks it up (ENOENT unless the caller
        may see it); from here on, what this walk makes is owned by the vfolder's owner."""
        top = await self.lookup(ROOT_INODE, host.encode())
        root = await self.lookup(top.st_ino, vfid.encode())
        self.ctx.uid, self.ctx.gid = root.st_uid, root.st_gid
        return root

    async def path(self, root: pyfuse3.EntryAttributes, parts: Path) -> pyfuse3.EntryAttributes:
        """The entry at parts under root.  A symlink may be the last component (the caller
        decides what to do with it), never one on the way."""
        attrs = root
        for name in parts:
            through(attrs)
            attrs = await self.lookup(attrs.st_ino, name)
        return attrs

    async def parent(
        self, root: pyfuse3.EntryAttributes, parts: Path
    ) -> tuple[pyfuse3.EntryAttributes, bytes]:
        """The directory holding parts, and its last name."""
        if not parts:
            raise fail(errno.EBUSY)  # the vfolder's top itself: not to be made or removed
        parent = await self.path(root, parts[:-1])
        through(parent)
        return parent, parts[-1]


class Files:
    """What the file API does in a vfolder, each step a FUSE handler."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.kernel = ops.registry.kernel

    async def _changed(self, *names: tuple[int, bytes]) -> None:
        """Names the API changed: the mount's kernel forgets what it cached of them (and of
        their directories' attributes) before the API answers, as it never saw the change go
        by, and the client's next look may be through the mount."""
        await self.kernel.forget_names(list(names))

    async def _unlink(self, w: Walk, parent: int, name: bytes, missing_ok: bool = False) -> None:
        await self._remove(self.ops.unlink, w, parent, name, missing_ok)

    async def _rmdir(self, w: Walk, parent: int, name: bytes, missing_ok: bool = False) -> None:
        await self._remove(self.ops.rmdir, w, parent, name, missing_ok)

    async def _remove(
        self,
        handler: Callable[[int, bytes, Any], Awaitable[None]],
        w: Walk,
        parent: int,
        name: bytes,
        missing_ok: bool,
    ) -> None:
        """unlink or rmdir name in parent (gone already: fine with missing_ok)."""
        try:
            await handler(parent, name, w.ctx)
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT or not missing_ok:
                raise
        await self._changed((parent, name))

    def walk(self, host: str, vfid: str, mode: Mode) -> Walk:
        return Walk(self.ops, TokenCaller(0, 0, 0, None, vfolder=vfid, mode=mode))

    def housekeeping(self) -> Walk:
        """A walk of the daemon's own, for upload files whatever the token may do (an expired
        upload of an rw token is removed all the same); still charged and refunded."""
        return Walk(self.ops, DAEMON, admin=True)

    # -- reading --------------------------------------------------------------------------------
    async def listing(
        self, w: Walk, attrs: pyfuse3.EntryAttributes, after: bytes, limit: int
    ) -> native.Listed:
        return await self.ops.listing(attrs.st_ino, after, limit, w.ctx)  # type: ignore[arg-type]

    async def open(self, w: Walk, attrs: pyfuse3.EntryAttributes, flags: int) -> int:
        """A file handle (the caller must `close` it); its stat is `stat(fh)`."""
        if stat.S_ISLNK(attrs.st_mode):
            raise fail(errno.ELOOP)
        if not stat.S_ISREG(attrs.st_mode):
            raise fail(errno.EISDIR if stat.S_ISDIR(attrs.st_mode) else errno.EACCES)
        info = await self.ops.open(attrs.st_ino, flags, w.ctx)  # type: ignore[arg-type]
        return int(info.fh)

    def stat(self, fh: int) -> os.stat_result:
        st = self.ops.handles[fh].node.st
        assert st is not None  # open() remembered the stat of what it opened
        return st  # type: ignore[no-any-return]

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.ops.read(fh, off, size, 0)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await self.ops.write(fh, off, data, False)

    async def close(self, fh: int) -> None:
        with trio.CancelScope(shield=True):
            await self.ops.release(fh)

    # -- changing names -------------------------------------------------------------------------
    async def mkdir(
        self, w: Walk, root: pyfuse3.EntryAttributes, parts: Path, parents: bool
    ) -> pyfuse3.EntryAttributes:
        """Make the directory parts (and, with parents, every missing one above it; one that is
        there already is then fine)."""
        if not parents:
            parent, name = await w.parent(root, parts)
            return await self._mkdir(w, parent, name)
        attrs = root
        for i, name in enumerate(parts):
            try:
                attrs = await w.path(attrs, (name,))
            except pyfuse3.FUSEError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                attrs = await self._mkdir(w, attrs, name, exist_ok=True)
            if not stat.S_ISDIR(attrs.st_mode):  # a file (or symlink) has the name
                raise fail(errno.ENOTDIR if i < len(parts) - 1 else errno.EEXIST)
        return attrs

    async def _mkdir(
        self, w: Walk, parent: pyfuse3.EntryAttributes, name: bytes, exist_ok: bool = False
    ) -> pyfuse3.EntryAttributes:
        try:
            attrs = await self.ops.mkdir(parent.st_ino, name, DIR_MODE, w.ctx)  # type: ignore[arg-type]
        except pyfuse3.FUSEError as exc:  # made by someone else a moment ago
            if exc.errno != errno.EEXIST or not exist_ok:
                raise
            return await w.path(parent, (name,))
        w.looked.append(attrs.st_ino)
        await self._changed((parent.st_ino, name))
        return attrs

    async def remove(
        self, w: Walk, root: pyfuse3.EntryAttributes, parts: Path, recursive: bool
    ) -> None:
        """Remove a file, a symlink or an empty directory (with recursive, a whole tree: each
        entry unlinked by the handler, so each is refunded and refused as on the mount)."""
        parent, name = await w.parent(root, parts)
        attrs = await w.path(parent, (name,))
        if not stat.S_ISDIR(attrs.st_mode):
            return await self._unlink(w, parent.st_ino, name)
        if recursive:
            await self._empty(w, attrs)
        await self._rmdir(w, parent.st_ino, name)

    async def _empty(self, w: Walk, top: pyfuse3.EntryAttributes) -> None:
        """Remove everything under top, depth first, without recursion (a tree may be deeper
        than Python's stack)."""
        stack: list[tuple[int, bytes]] = [(top.st_ino, b"")]  # (directory, its name in the next)
        while stack:
            ino, name = stack[-1]
            page = await self.ops.listing(ino, b"", 256, w.ctx)  # type: ignore[arg-type]
            if not page.entries:
                stack.pop()
                if stack:  # now empty: out of its parent (top itself is the caller's)
                    await self._rmdir(w, stack[-1][0], name, missing_ok=True)
                continue
            for name, st in page.entries:
                if stat.S_ISDIR(st.st_mode):
                    child = await w.lookup(ino, name)
                    stack.append((child.st_ino, name))
                    break
                await self._unlink(w, ino, name, missing_ok=True)

    async def rename(self, w: Walk, root: pyfuse3.EntryAttributes, src: Path, dst: Path) -> None:
        """Rename src to dst inside the vfolder (rw may not replace an entry; rwd may)."""
        if dst[: len(src)] == src:
            raise fail(errno.EINVAL)  # into itself (or onto itself)
        old, old_name = await w.parent(root, src)
        new, new_name = await w.parent(root, dst)
        await self.ops.rename(old.st_ino, old_name, new.st_ino, new_name, 0, w.ctx)  # type: ignore[arg-type]
        await self._changed((old.st_ino, old_name), (new.st_ino, new_name))

    # -- uploads --------------------------------------------------------------------------------
    async def upload_dir(self, w: Walk, root: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """The vfolder's directory of unfinished uploads, made when first needed."""
        try:
            return await w.path(root, (UPLOADS,))
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
        return await self._mkdir(w, root, UPLOADS, exist_ok=True)

    async def upload_file(self, w: Walk, root: pyfuse3.EntryAttributes, name: bytes) -> int:
        """Make an upload's file, empty, and return a handle to write it through."""
        updir = await self.upload_dir(w, root)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        info, attrs = await self.ops.create(updir.st_ino, name, FILE_MODE, flags, w.ctx)  # type: ignore[arg-type]
        w.looked.append(attrs.st_ino)
        await self._changed((updir.st_ino, name))
        return int(info.fh)

    async def open_upload(self, w: Walk, root: pyfuse3.EntryAttributes, name: bytes) -> int:
        attrs = await w.path(root, (UPLOADS, name))
        return await self.open(w, attrs, os.O_WRONLY)

    async def finish_upload(
        self, w: Walk, root: pyfuse3.EntryAttributes, name: bytes, target: Path
    ) -> None:
        """Move a complete upload to its path (its directories made as needed); rw may not
        replace a file that is there (403), rwd may."""
        if len(target) > 1:
            await self.mkdir(w, root, target[:-1], parents=True)
        await self.rename(w, root, (UPLOADS, name), target)

    async def drop_upload(self, w: Walk, root: pyfuse3.EntryAttributes, name: bytes) -> None:
        """Remove an upload's file (terminated, expired, or failed)."""
        try:
            updir = await w.path(root, (UPLOADS,))
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return  # removed behind our back: nothing left to free
        await self._unlink(w, updir.st_ino, name, missing_ok=True)

    async def tidy(self, w: Walk, root: pyfuse3.EntryAttributes) -> None:
        """Remove the directory of uploads if nothing is in it (else leave it)."""
        try:
            await self._rmdir(w, root.st_ino, UPLOADS, missing_ok=True)
        except pyfuse3.FUSEError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
