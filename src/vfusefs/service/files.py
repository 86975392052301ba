"""Files over HTTP (SPEC §8): downloads with ranges, listings, tus 1.0.0 uploads and mkdir /
rename / delete, for clients that do not mount (web UI, SDKs, CI jobs).

Served by hypercorn on the daemon's event loop, on `files_listen`, apart from the control API.
Every request carries a token (`Authorization: Bearer`, or `?token=`; service/tokens.py).  What
it may do is decided by the FUSE handlers themselves with the token's mode as the caller's mode
(fuse/files.py), so access, quota and path rules are the mount's, to the errno:

    ENOENT 404 · EACCES/EROFS/EPERM 403 · EEXIST/ENOTEMPTY 409 · EDQUOT 413 · storage 502

Bodies are streamed in 1 MiB pieces both ways (hypercorn holds a few messages per connection),
so a download or an upload of any size keeps the daemon's memory flat.  tus adds its own
statuses where its protocol says so: 412 (no `Tus-Resumable: 1.0.0`), 415 (a PATCH without
`application/offset+octet-stream`), 409 (an `Upload-Offset` that is not the upload's), 416
(a range outside the file).
"""

from __future__ import annotations

import email.utils
import errno
import logging
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import pyfuse3
import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vfusefs.domain import files as paths
from vfusefs.domain.access import Mode
from vfusefs.domain.quota import short_of
from vfusefs.domain.validation import RegistryError, strict_uuid
from vfusefs.fuse.files import Files, Walk, refusal
from vfusefs.fuse.ops import Operations
from vfusefs.native import BLOCK
from vfusefs.service.control import json_body
from vfusefs.service.tokens import Claims, FileTokens
from vfusefs.state.registry import Registry
from vfusefs.state.uploads import Upload, UploadFiles

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read or written per handler call
TICK = 2.0  # seconds between looks for expired uploads and idle upload directories
TIDY_AFTER = 2.0  # seconds a vfolder's directory of uploads stays once its last one ended
TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,termination,expiration"
OFFSET_TYPE = "application/offset+octet-stream"
LIST_LIMIT = 1000  # entries of a listing page unless ?limit= (at most MAX_LIST)
MAX_LIST = 10000
TUS_HEADERS = [
    "Location",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Metadata",
    "Upload-Expires",
    "Tus-Resumable",
    "Tus-Version",
    "Tus-Extension",
    "Tus-Max-Size",
]


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def http_date(seconds: float) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


def kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def need_tus(request: Request) -> None:
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise RegistryError(412, "tus_version", f"send Tus-Resumable: {TUS_VERSION}")


def tus_headers(request: Request) -> dict[str, str] | None:
    """What every tus response carries (errors too)."""
    if not request.url.path.startswith("/v1/uploads"):
        return None
    return {"tus-resumable": TUS_VERSION, "tus-version": TUS_VERSION}


def not_modified(request: Request, tag: str, mtime: float) -> bool:
    """Whether the client's copy is current (If-None-Match, else If-Modified-Since)."""
    match = request.headers.get("if-none-match")
    if match is not None:
        return match.strip() == "*" or tag in (t.strip() for t in match.split(","))
    since = request.headers.get("if-modified-since")
    if since is None:
        return False
    try:
        return int(mtime) <= email.utils.parsedate_to_datetime(since).timestamp()
    except (TypeError, ValueError):
        return False


def files_url(path: str) -> tuple[str, str, str] | None:
    """host, vfolder and the path inside it of a /v1/files/ URL path (None for others), as
    messages and log lines show them; requests themselves are parsed by FileService.target."""
    pieces = path.split("/", 5)  # "", v1, files, host, id, rest
    if not path.startswith("/v1/files/") or len(pieces) < 5:
        return None
    return unquote(pieces[3]), unquote(pieces[4]), "/" + (pieces[5] if len(pieces) > 5 else "")


def shown(request: Request) -> str:
    """What a request is about, for its error message: the path inside the vfolder."""
    url = files_url(request.url.path)
    return url[2] if url is not None else request.url.path


def quota_name(key: str) -> str:
    return f"scope {key[6:]}" if key.startswith("scope:") else "the vfolder"


class _Done(Exception):
    """A download answered without its body (304, 416, HEAD): close what was opened."""

    def __init__(self, response: Response) -> None:
        self.response = response


class Download(StreamingResponse):
    """A streamed download that closes its file handle and ends its walk however the response
    ends: sent, failed, or cut short by the client (the body's generator may then never run
    to its end, or not start at all)."""

    def __init__(
        self, body: AsyncIterator[bytes], done: Callable[[], Awaitable[None]], **kw: Any
    ) -> None:
        super().__init__(body, **kw)
        self.done = done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with trio.CancelScope(shield=True):
                await self.done()


class FileService:
    """The file API of one daemon: its routes, its node's uploads, and its counters."""

    def __init__(
        self, ops: Operations, registry: Registry, tokens: FileTokens, upload_expiry: float
    ) -> None:
        self.files = Files(ops)
        self.registry = registry
        self.tokens = tokens
        self.upload_expiry = upload_expiry
        self.records = UploadFiles(os.path.join(registry.config.daemon.state_dir, "uploads"))
        self.uploads: dict[str, Upload] = {}
        # counters for /metrics (service/metrics.py reads them at scrape time)
        self.requests: dict[tuple[str, int], int] = {}  # (op, status) -> requests
        self.bytes_out = 0  # file bytes sent
        self.bytes_in = 0  # upload bytes written
        self.outcomes: dict[str, int] = {}  # completed, terminated, expired, failed -> uploads
        self.idle: dict[tuple[str, str], float] = {}  # (host, vfolder) -> its last upload ended

    # -- start-up and expiry --------------------------------------------------------------------
    async def load(self) -> None:
        for up in await trio.to_thread.run_sync(self.records.load):
            self.uploads[up.id] = up
        if self.uploads:
            log.info("taking up %d unfinished upload(s)", len(self.uploads))

    async def keep(self) -> None:
        """Every TICK: end expired uploads, and remove directories of uploads that have been
        idle for a moment (not at once: a client sending many files in a row would have it
        made and removed for each)."""
        while True:
            await trio.sleep(TICK)
            try:
                await self.expire()
                await self.tidy()
            except (RegistryError, pyfuse3.FUSEError) as exc:  # a host away: next time
                log.warning("upload housekeeping: %s", getattr(exc, "message", exc))
            except Exception:
                log.exception("upload housekeeping failed")

    async def expire(self) -> None:
        """Remove uploads whose time is up (their bytes are refunded to the vfolder), and
        records of uploads whose vfolder is gone."""
        now = time.time()
        for up in list(self.uploads.values()):
            if up.expires > now and up.vfolder in self.registry.vfolders:
                continue
            if up.lock.locked():
                continue  # a PATCH is writing it: it pushes the expiry back
            try:
                await self.drop(up, "expired")
            except (RegistryError, pyfuse3.FUSEError) as exc:
                log.warning("upload %s: expired, but its file stays for now: %s", up.id, exc)

    async def tidy(self) -> None:
        now = time.monotonic()
        busy = {up.vfolder for up in self.uploads.values()}
        for (host, vfid), since in list(self.idle.items()):
            if vfid in busy:
                del self.idle[(host, vfid)]
            elif now - since >= TIDY_AFTER:
                del self.idle[(host, vfid)]
                if vfid in self.registry.vfolders:
                    async with self.files.housekeeping() as w:
                        await self.files.tidy(w, await w.vfolder(host, vfid))

    async def drop(self, up: Upload, outcome: str) -> None:
        """Remove an upload's file (which the daemon does whatever the token), then end it.
        If the file cannot be removed (its host away), the upload stays, to be dropped again:
        ending it first would leave a file nobody knows of, charged to the vfolder for good."""
        if up.vfolder in self.registry.vfolders:
            async with self.files.housekeeping() as w:
                root = await w.vfolder(up.host, up.vfolder)
                await self.files.drop_upload(w, root, up.name)
        await self.ended(up, outcome)

    async def ended(self, up: Upload, outcome: str) -> None:
        self.uploads.pop(up.id, None)
        await trio.to_thread.run_sync(self.records.remove, up.id)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if not any(other.vfolder == up.vfolder for other in self.uploads.values()):
            self.idle[(up.host, up.vfolder)] = time.monotonic()
        log.info(
            "upload %s to %s %s",
            up.id,
            up.path,
            outcome,
            extra={"host": up.host, "vfolder": up.vfolder, "op": "upload"},
        )

    # -- requests -------------------------------------------------------------------------------
    def claims(self, request: Request) -> Claims:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            token = request.query_params.get("token", "")
        if not token:
            raise RegistryError(401, "no_token", "no token: send Authorization: Bearer <token>")
        return self.tokens.verify(token.strip())

    @staticmethod
    def target(request: Request) -> tuple[str, str, paths.Path, bool]:
        """host, vfolder id, path parts and "asked for a directory" of /v1/files/...; taken
        from the raw URL path, so each component is percent-decoded on its own."""
        raw = request.scope.get("raw_path") or request.url.path.encode()
        raw = raw.split(b"?", 1)[0]
        pieces = raw.split(b"/", 5)  # "", v1, files, host, id, rest
        if len(pieces) < 5 or not pieces[3] or not pieces[4]:
            raise RegistryError(404, "not_found", "use /v1/files/{host}/{vfolder}/{path}")
        host = unquote(pieces[3].decode("ascii", "replace"))
        vfid = strict_uuid(unquote(pieces[4].decode("ascii", "replace")))
        if vfid is None:
            raise RegistryError(404, "not_found", "the vfolder must be given by its UUID")
        parts, as_dir = paths.split_path(pieces[5] if len(pieces) > 5 else b"/")
        return host, vfid, parts, as_dir

    @staticmethod
    def allowed(claims: Claims, host: str, vfid: str, parts: paths.Path, need: Mode) -> None:
        """The token's own limits, before any lookup: its vfolder, its path, its mode."""
        if claims.host != host or claims.vfolder != vfid:
            raise RegistryError(403, "wrong_vfolder", "the token is for another vfolder")
        if not paths.covers(claims.path, parts):
            raise RegistryError(
                403, "outside_path", f"the token only reaches {paths.show(claims.path)}"
            )
        if claims.mode < need:
            if need is Mode.RWD:
                raise RegistryError(403, "no_delete", "deleting needs an rwd token")
            raise RegistryError(403, "read_only", "the token is read-only")

    def about(self, request: Request) -> dict[str, str]:
        """The host and vfolder a request is about, for its log line (JSON logs' fields)."""
        url = files_url(request.url.path)
        if url is not None:
            return {"host": url[0], "vfolder": url[1]}
        up = self.uploads.get(request.path_params.get("upload", ""))
        return {"host": up.host, "vfolder": up.vfolder} if up is not None else {}

    def count(self, op: str, status: int) -> None:
        self.requests[(op, status)] = self.requests.get((op, status), 0) + 1

    def endpoint(
        self, op: str, fn: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapper(request: Request) -> Response:
            start = time.perf_counter()
            fields = self.about(request)  # before: a finished upload is forgotten after
            try:
                response = await fn(request)
            except RegistryError as exc:
                response = error(exc.status, exc.code, exc.message, tus_headers(request))
            except pyfuse3.FUSEError as exc:
                e = refusal(exc, shown(request))
                response = error(e.status, e.code, e.message, tus_headers(request))
            except Exception:
                log.exception("files API %s %s failed", request.method, request.url.path)
                response = error(500, "internal", "internal error; see the daemon's log")
            self.count(op, response.status_code)
            # reads that went well at debug, as the mount's requests; changes and refusals at info
            quiet = request.method in ("GET", "HEAD") and response.status_code < 400
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %d %.3fs",
                request.method,
                request.url.path[:300],
                response.status_code,
                time.perf_counter() - start,
                extra={"op": op, **fields},
            )
            return response

        return wrapper

    # -- reading --------------------------------------------------------------------------------
    async def get(self, request: Request) -> Response:
        claims = self.claims(request)
        host, vfid, parts, as_dir = self.target(request)
        self.allowed(claims, host, vfid, parts, Mode.RO)
        w = self.files.walk(host, vfid, claims.mode)
        try:
            root = await w.vfolder(host, vfid)
            attrs = await w.path(root, parts)
            if stat.S_ISDIR(attrs.st_mode):
                response = await self.listing(request, w, attrs, parts)
                await w.__aexit__(None, None, None)
                return response
            if as_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)  # "x/" names a directory
            fh = await self.files.open(w, attrs, os.O_RDONLY)
        except BaseException:
            await w.__aexit__(None, None, None)
            raise
        return await self.download(request, w, fh)

    async def listing(
        self, request: Request, w: Walk, attrs: pyfuse3.EntryAttributes, parts: paths.Path
    ) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", LIST_LIMIT))
            after = paths.decode_cursor(q.get("after", ""))
        except ValueError:
            raise RegistryError(
                400, "bad_query", f"limit must be 1..{MAX_LIST}; after is a `next` value"
            ) from None
        if not 0 < limit <= MAX_LIST:
            raise RegistryError(400, "bad_query", f"limit must be 1..{MAX_LIST}")
        page = await self.files.listing(w, attrs, after, limit)
        entries = [
            {
                "name": name.decode("utf-8", "backslashreplace"),
                "type": kind(st.st_mode),
                "size": st.st_size,
                "mtime": st.st_mtime_ns / 1e9,
            }
            for name, st in page.entries
        ]
        nxt = paths.encode_cursor(page.entries[-1][0]) if page.more and page.entries else None
        body = {"path": paths.show(parts).rstrip("/") + "/", "entries": entries, "next": nxt}
        if request.method == "HEAD":
            return Response(headers={"content-type": "application/json"})
        return JSONResponse(body)

    async def download(self, request: Request, w: Walk, fh: int) -> Response:
        """A file's bytes: whole, one range (206) or several (206 multipart/byteranges)."""
        try:
            st = self.files.stat(fh)
            size = st.st_size
            tag = paths.etag(st.st_ino, size, st.st_mtime_ns)
            modified = http_date(st.st_mtime_ns / 1e9)
            headers = {
                "etag": tag,
                "last-modified": modified,
                "accept-ranges": "bytes",
                "content-type": "application/octet-stream",
            }
            if not_modified(request, tag, st.st_mtime_ns / 1e9):
                raise _Done(Response(status_code=304, headers=headers))
            ranges = None
            if_range = request.headers.get("if-range")
            if if_range is None or if_range in (tag, modified):
                try:
                    ranges = paths.parse_ranges(request.headers.get("range"), size)
                except paths.Unsatisfiable:
                    raise _Done(
                        error(
                            416,
                            "bad_range",
                            f"no range falls inside {size} bytes",
                            {"content-range": f"bytes */{size}"},
                        )
                    ) from None
            if ranges is None:
                pieces = [(b"", 0, size)]
                status = 200
            elif len(ranges) == 1:
                r = ranges[0]
                headers["content-range"] = f"bytes {r.start}-{r.end}/{size}"
                pieces = [(b"", r.start, r.length)]
                status = 206
            else:
                boundary = secrets.token_hex(12)
                headers["content-type"] = f"multipart/byteranges; boundary={boundary}"
                pieces = [
                    (
                        (
                            f"\r\n--{boundary}\r\ncontent-type: application/octet-stream\r\n"
                            f"content-range: bytes {r.start}-{r.end}/{size}\r\n\r\n"
                        ).encode(),
                        r.start,
                        r.length,
                    )
                    for r in ranges
                ]
                pieces.append((f"\r\n--{boundary}--\r\n".encode(), 0, 0))
                status = 206
            headers["content-length"] = str(sum(len(h) + n for h, _, n in pieces))
            if request.method == "HEAD":
                raise _Done(Response(status_code=status, headers=headers))
        except _Done as done:
            await self.files.close(fh)
            await w.__aexit__(None, None, None)
            return done.response
        except BaseException:
            await self.files.close(fh)
            await w.__aexit__(None, None, None)
            raise

        async def finish() -> None:
            await self.files.close(fh)
            await w.__aexit__(None, None, None)

        return Download(self.stream(fh, pieces), finish, status_code=status, headers=headers)

    async def stream(self, fh: int, pieces: list[tuple[bytes, int, int]]) -> AsyncIterator[bytes]:
        """The bytes of a download, CHUNK at a time."""
        for head, off, n in pieces:
            if head:
                yield head
            end = off + n
            while off < end:
                data = await self.files.read(fh, off, min(CHUNK, end - off))
                if not data:  # the file shrank since its stat: the client sees it short
                    return
                off += len(data)
                self.bytes_out += len(data)
                yield data

    # -- changing names -------------------------------------------------------------------------
    async def post(self, request: Request) -> Response:
        claims = self.claims(request)
        host, vfid, parts, _ = self.target(request)
        op = request.query_params.get("op", "")
        flag = request.query_params.get
        if op == "mkdir":
            self.allowed(claims, host, vfid, parts, Mode.RW)
            async with self.files.walk(host, vfid, claims.mode) as w:
                root = await w.vfolder(host, vfid)
                await self.files.mkdir(w, root, parts, truthy(flag("parents")))
            return JSONResponse({"path": paths.show(parts), "type": "dir"}, status_code=201)
        if op == "delete":
            self.allowed(claims, host, vfid, parts, Mode.RWD)
            async with self.files.walk(host, vfid, claims.mode) as w:
                root = await w.vfolder(host, vfid)
                await self.files.remove(w, root, parts, truthy(flag("recursive")))
            return JSONResponse({"path": paths.show(parts), "deleted": True})
        if op == "rename":
            body = await json_body(request, {"to"})
            to = paths.parse_path(body.get("to"), "to")
            self.allowed(claims, host, vfid, parts, Mode.RW)
            self.allowed(claims, host, vfid, to, Mode.RW)
            if not parts or not to:
                raise RegistryError(400, "bad_path", "the vfolder's top cannot be renamed")
            async with self.files.walk(host, vfid, claims.mode) as w:
                root = await w.vfolder(host, vfid)
                await self.files.rename(w, root, parts, to)
            return JSONResponse({"path": paths.show(to), "from": paths.show(parts)})
        raise RegistryError(400, "bad_op", "op must be mkdir, rename or delete")

    # -- tus uploads ----------------------------------------------------------------------------
    async def options(self, request: Request) -> Response:
        return Response(
            status_code=204,
            headers={
                "tus-resumable": TUS_VERSION,
                "tus-version": TUS_VERSION,
                "tus-extension": TUS_EXTENSIONS,
            },
        )

    def upload_headers(self, up: Upload) -> dict[str, str]:
        return {
            "tus-resumable": TUS_VERSION,
            "upload-offset": str(up.offset),
            "upload-length": str(up.length),
            "upload-expires": http_date(up.expires),
            "cache-control": "no-store",
        }

    async def create(self, request: Request) -> Response:
        """POST /v1/uploads: a new upload (and its first bytes, with a body)."""
        need_tus(request)
        claims = self.claims(request)
        if request.headers.get("upload-defer-length"):
            raise RegistryError(400, "bad_header", "Upload-Defer-Length is not supported")
        length = paths.parse_length(request.headers.get("upload-length"), "Upload-Length")
        raw_meta = request.headers.get("upload-metadata", "")
        meta = paths.parse_metadata(raw_meta)
        host = meta.get("host", claims.host.encode()).decode("utf-8", "replace")
        vfid = strict_uuid(meta.get("vfolder", claims.vfolder.encode()).decode("ascii", "replace"))
        if "path" not in meta:
            raise RegistryError(400, "bad_metadata", "Upload-Metadata must name the file's path")
        parts = paths.parse_path(os.fsdecode(meta["path"]), "path")
        if not parts:
            raise RegistryError(400, "bad_path", "path must name a file inside the vfolder")
        if vfid is None:
            raise RegistryError(400, "bad_metadata", "vfolder must be a UUID")
        self.allowed(claims, host, vfid, parts, Mode.RW)
        up = Upload(
            secrets.token_hex(16),
            host,
            vfid,
            paths.show(parts),
            length,
            raw_meta,
            time.time() + self.upload_expiry,
            offset=0,
        )
        async with self.files.walk(host, vfid, claims.mode) as w:
            root = await w.vfolder(host, vfid)
            await self.fits(w, vfid, root, parts, length, claims.mode)
            # recorded before its file is made: a crash between the two leaves no file
            # nobody knows of, and housekeeping sees the vfolder is busy
            self.uploads[up.id] = up
            try:
                await trio.to_thread.run_sync(self.records.save, up)
                fh = await self.files.upload_file(w, root, up.name)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.ended(up, "failed")
                raise
            await self.files.close(fh)
        log.info(
            "upload %s of %d bytes to %s started",
            up.id,
            length,
            up.path,
            extra={"host": host, "vfolder": vfid, "op": "upload"},
        )
        headers = self.upload_headers(up)
        headers["location"] = f"/v1/uploads/{up.id}"
        body_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if body_type == OFFSET_TYPE or length == 0:
            async with up.lock:
                status = await self.receive(request, claims, up, 0)
            headers.update(self.upload_headers(up))
            if status:
                return error(*status, headers)
        return Response(status_code=201, headers=headers)

    async def fits(
        self,
        w: Walk,
        vfid: str,
        root: pyfuse3.EntryAttributes,
        parts: paths.Path,
        length: int,
        mode: Mode,
    ) -> None:
        """Refuse an upload before any byte is written: one its quota has no room for (413),
        one whose path is a directory (409), one an rw token could not finish (403)."""
        vf = self.registry.vfolders.get(vfid)
        if vf is not None:
            # the file's blocks, and a block and an inode each for it and the uploads directory
            short = short_of(
                self.registry.ledger, vf.quota_keys, -(-length // BLOCK) * BLOCK + 2 * BLOCK, 2
            )
            if short is not None:
                raise RegistryError(
                    413,
                    "quota",
                    f"{length} bytes do not fit in the quota of {quota_name(short)}; "
                    f"nothing was written",
                )
        try:
            there = await w.path(root, parts)
        except pyfuse3.FUSEError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # made on completion (or refused then)
                return
            raise
        if stat.S_ISDIR(there.st_mode):
            raise RegistryError(409, "is_directory", f"{paths.show(parts)} is a directory")
        if mode < Mode.RWD:
            raise RegistryError(
                403, "no_delete", f"{paths.show(parts)} exists; an rw token may not replace it"
            )

    async def upload_for(self, request: Request) -> tuple[Claims, Upload]:
        need_tus(request)
        claims = self.claims(request)
        up = self.uploads.get(request.path_params["upload"])
        if up is None:
            raise RegistryError(404, "not_found", "no such upload (finished, ended or expired)")
        self.allowed(claims, up.host, up.vfolder, paths.parse_path(up.path), Mode.RW)
        return claims, up

    async def offset(self, claims: Claims, up: Upload) -> int:
        """How many bytes the upload has: its file's size (read once after a restart)."""
        if up.offset is None:
            async with self.files.walk(up.host, up.vfolder, claims.mode) as w:
                root = await w.vfolder(up.host, up.vfolder)
                fh = await self.files.open_upload(w, root, up.name)
                try:
                    up.offset = self.files.stat(fh).st_size
                finally:
                    await self.files.close(fh)
        return up.offset

    async def head(self, request: Request) -> Response:
        claims, up = await self.upload_for(request)
        await self.offset(claims, up)
        headers = self.upload_headers(up)
        if up.metadata:
            headers["upload-metadata"] = up.metadata
        return Response(status_code=200, headers=headers)

    async def patch(self, request: Request) -> Response:
        claims, up = await self.upload_for(request)
        body_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if body_type != OFFSET_TYPE:
            raise RegistryError(415, "bad_type", f"a PATCH carries {OFFSET_TYPE}")
        at = paths.parse_length(request.headers.get("upload-offset"), "Upload-Offset")
        if up.lock.locked():
            raise RegistryError(409, "busy", "another request is writing this upload")
        async with up.lock:
            if at != await self.offset(claims, up):
                raise RegistryError(
                    409, "bad_offset", f"Upload-Offset {at} is not the upload's {up.offset}"
                )
            status = await self.receive(request, claims, up, at)
        headers = self.upload_headers(up)
        if status:
            return error(*status, headers)
        return Response(status_code=204, headers=headers)

    async def receive(
        self, request: Request, claims: Claims, up: Upload, at: int
    ) -> tuple[int, str, str] | None:
        """Write the request's body at `at`, CHUNK at a time through the handlers (each piece
        charged as it lands), then finish the upload if it is complete.  Returns an error's
        (status, code, message) once what did land is counted, else None."""
        up.expires = time.time() + self.upload_expiry
        problem = None
        async with self.files.walk(up.host, up.vfolder, claims.mode) as w:
            root = await w.vfolder(up.host, up.vfolder)
            if at < up.length:
                fh = await self.files.open_upload(w, root, up.name)
                try:
                    problem = await self.write_body(request, up, fh)
                finally:
                    await self.files.close(fh)
            if problem is None and up.offset == up.length:
                try:
                    await self.files.finish_upload(w, root, up.name, paths.parse_path(up.path))
                except pyfuse3.FUSEError as exc:
                    e = refusal(exc, up.path)
                    await self.drop(up, "failed")
                    return e.status, e.code, e.message + " (the upload is dropped)"
                await self.ended(up, "completed")
        if up.id in self.uploads:  # still open: its pushed-back expiry outlives a restart too
            await trio.to_thread.run_sync(self.records.save, up)
        return problem

    async def write_body(
        self, request: Request, up: Upload, fh: int
    ) -> tuple[int, str, str] | None:
        assert up.offset is not None
        parts: list[bytes] = []  # the body as it came, written once CHUNK of it is here
        held = 0

        async def put() -> None:
            nonlocal held
            data = parts[0] if len(parts) == 1 else b"".join(parts)  # one copy, not two
            parts.clear()
            held = 0
            while data:
                assert up.offset is not None
                n = await self.files.write(fh, up.offset, data)
                up.offset += n
                self.bytes_in += n
                data = data[n:]

        try:
            async for part in request.stream():
                if up.offset + held + len(part) > up.length:
                    await put()
                    return 400, "too_long", f"the body runs past Upload-Length {up.length}"
                parts.append(part)
                held += len(part)
                if held >= CHUNK:
                    await put()
            await put()
        except pyfuse3.FUSEError as exc:
            e = refusal(exc, up.path)
            return e.status, e.code, f"{e.message}; {up.offset} bytes are kept"
        except ClientDisconnect:  # the client went away mid-body: what landed stays
            log.info("upload %s: client left at %d bytes", up.id, up.offset)
        return None

    async def terminate(self, request: Request) -> Response:
        _, up = await self.upload_for(request)
        if up.lock.locked():
            raise RegistryError(409, "busy", "another request is writing this upload")
        async with up.lock:
            await self.drop(up, "terminated")
        return Response(status_code=204, headers={"tus-resumable": TUS_VERSION})

    # -- the app --------------------------------------------------------------------------------
    def app(self) -> Starlette:
        routes = [
            Route("/v1/files/{rest:path}", self.endpoint("get", self.get), methods=["GET"]),
            Route("/v1/files/{rest:path}", self.endpoint("post", self.post), methods=["POST"]),
            Route("/v1/uploads", self.endpoint("options", self.options), methods=["OPTIONS"]),
            Route("/v1/uploads", self.endpoint("create", self.create), methods=["POST"]),
            Route("/v1/uploads/{upload}", self.endpoint("head", self.head), methods=["HEAD"]),
            Route("/v1/uploads/{upload}", self.endpoint("patch", self.patch), methods=["PATCH"]),
            Route(
                "/v1/uploads/{upload}",
                self.endpoint("terminate", self.terminate),
                methods=["DELETE"],
            ),
        ]
        # browsers (the web UI) upload from another origin; tokens travel in headers, never
        # in cookies, so any origin may ask
        cors = Middleware(
            CORSMiddleware,
            allow_origins=["*"],
            allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=TUS_HEADERS + ["ETag", "Content-Range", "Accept-Ranges"],
            max_age=3600,
        )
        return Starlette(routes=routes, middleware=[cors])
