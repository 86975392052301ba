"""The control API (SPEC §6): HTTP/1.1 + JSON, served by hypercorn on the daemon's trio loop.

Routes are thin: parse and validate the request, call the registry, render JSON.  Every error is
`{"error": code, "message": one line}` with 400, 401, 403, 404, 409, 502 (a backend's storage
refused, or the store is away: error "store"); no traceback ever reaches a client.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vfusefs import __version__
from vfusefs.domain import access, files
from vfusefs.service.tokens import FileTokens
from vfusefs.state.registry import Registry, RegistryError
from vfusefs.store import StoreError

log = logging.getLogger(__name__)
Endpoint = Callable[[Request], Awaitable[Response]]


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def endpoint(fn: Endpoint) -> Endpoint:
    async def wrapper(request: Request) -> Response:
        try:
            return await fn(request)
        except RegistryError as exc:
            return error(exc.status, exc.code, exc.message)
        except StoreError as exc:  # the store is away (a failover, an outage): nothing changed
            log.warning("control API %s %s: %s", request.method, request.url.path, exc)
            return error(502, "store", f"{exc}; try again once the store answers")
        except Exception:
            log.exception("control API %s %s failed", request.method, request.url.path)
            return error(500, "internal", "internal error; see the daemon's log")

    return wrapper


DEFAULT_TOKEN_TTL = 3600  # seconds a file API token lives unless ttl says otherwise
MAX_BODY = 1 << 20  # bytes of JSON a control request may carry
MAX_DEPTH = 8  # nesting of JSON values (a create's grants are three deep)


def _depth(value: Any) -> int:
    """How deeply value nests (iterative: a deep body must not exhaust the Python stack)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
    return deepest


async def json_body(request: Request, allowed: set[str]) -> dict[str, Any]:
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY:
            raise RegistryError(413, "too_large", f"request body is larger than {MAX_BODY} bytes")
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise RegistryError(
            400, "bad_json", "request body is not valid JSON (or nests too deeply)"
        ) from None
    if _depth(body) > MAX_DEPTH:
        raise RegistryError(400, "bad_json", f"request body nests deeper than {MAX_DEPTH} levels")
    if not isinstance(body, dict):
        raise RegistryError(400, "bad_json", "request body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise RegistryError(
            400,
            "unknown_field",
            f"unknown field(s): {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(allowed))})",
        )
    return body


def build_app(
    registry: Registry, token: str | None = None, tokens: FileTokens | None = None
) -> Starlette:
    """The ASGI app; with a token, every request needs `Authorization: Bearer <token>`.
    tokens signs file API tokens (POST …/tokens)."""
    mountpoint = registry.config.daemon.mountpoint
    signer = tokens if tokens is not None else FileTokens()

    def vf_json(vf: Any) -> dict[str, Any]:
        return vf.describe(mountpoint, registry.ledger)  # type: ignore[no-any-return]

    async def nodes() -> list[dict[str, Any]] | None:
        """The nodes sharing the store and their leases (None: the store did not answer)."""
        if registry.leases is None:
            return None
        with trio.move_on_after(2):
            try:
                found = await registry.store_workers.run(registry.leases.store.nodes)
            except (StoreError, trio.TooSlowError):
                return None
            ttl = registry.config.lease_ttl
            return [
                {
                    "node": n.name,
                    "alive": n.seen_ago < ttl,
                    "seen_ago": round(n.seen_ago, 1),
                    "mountpoint": n.info.get("mountpoint"),
                    "hosts": n.info.get("hosts"),
                    "leases": {
                        key: {"bytes": b, "inodes": i, "expires_in": round(left, 1)}
                        for key, (b, i, left) in sorted(n.leases.items())
                    },
                }
                for n in found
            ]
        return None

    @endpoint
    async def status(request: Request) -> Response:
        store: dict[str, Any] = {
            "kind": registry.store.kind,
            "connected": registry.store_connected,
            "since": registry.store_since,
            "node": registry.node,
        }
        if registry.leases is not None:
            store["nodes"] = await nodes()
            store["leases"] = registry.leases.describe()
        return JSONResponse(
            {
                "version": __version__,
                "mountpoint": mountpoint,
                "mounted": registry.mounted,
                "started": registry.started,
                "config": registry.config.path,
                "files_listen": registry.config.daemon.files_listen or None,
                "hosts": {name: h.health for name, h in registry.hosts.items()},
                "store": store,
                "vfolders": len(registry.vfolders),
                "inodes": len(registry.table),
                "open_handles": sum(vf.handles for vf in registry.vfolders.values()),
            }
        )

    @endpoint
    async def hosts(request: Request) -> Response:
        return JSONResponse([h.describe() for h in registry.hosts.values()])

    @endpoint
    async def host(request: Request) -> Response:
        out = registry.host(request.path_params["host"]).describe()
        try:  # native storage against the store; a hung host answers the rest anyway
            out["consistency"] = await registry.host_consistency(request.path_params["host"])
        except (trio.TooSlowError, OSError) as exc:
            out["consistency"] = {"error": getattr(exc, "strerror", None) or str(exc)}
        return JSONResponse(out)

    @endpoint
    async def vfolders(request: Request) -> Response:
        h = registry.host(request.path_params["host"])
        if request.method == "GET":
            for vf in list(h.vfolders.values()):
                await registry.reconcile(vf)
            return JSONResponse([vf_json(vf) for vf in h.vfolders.values()])
        body = await json_body(
            request,
            {"id", "scope", "quota_bytes", "quota_inodes", "grants", "adopt", "owner", "mode"},
        )
        vf = await registry.create_vfolder(
            h.name,
            body.get("id"),
            body.get("scope"),
            body.get("quota_bytes", 0),
            body.get("quota_inodes", 0),
            body.get("grants"),
            body.get("adopt", False),
            body.get("owner"),
            body.get("mode"),
        )
        return JSONResponse(vf_json(vf), status_code=201)

    @endpoint
    async def vfolder(request: Request) -> Response:
        p = request.path_params
        if request.method == "GET":
            vf = registry.vfolder(p["host"], p["id"])
            await registry.reconcile(vf)
            return JSONResponse(vf_json(vf))
        if request.method == "DELETE":
            force = request.query_params.get("force", "0") in ("1", "true", "yes")
            moved = await registry.delete_vfolder(p["host"], p["id"], force)
            return JSONResponse({"deleted": p["id"], "trash": moved}, status_code=200)
        body = await json_body(request, {"quota_bytes", "quota_inodes"})
        vf = await registry.set_limits(
            p["host"], p["id"], body.get("quota_bytes"), body.get("quota_inodes")
        )
        return JSONResponse(vf_json(vf))

    @endpoint
    async def rescan(request: Request) -> Response:
        p = request.path_params
        task = registry.start_rescan(registry.vfolder(p["host"], p["id"]))
        return JSONResponse(task.describe(), status_code=202)

    @endpoint
    async def clone(request: Request) -> Response:
        p = request.path_params
        body = await json_body(
            request, {"id", "scope", "quota_bytes", "quota_inodes", "grants", "snapshot"}
        )
        task = await registry.start_clone(
            p["host"],
            p["id"],
            body.get("id"),
            body.get("scope"),
            body.get("quota_bytes"),
            body.get("quota_inodes"),
            body.get("grants"),
            body.get("snapshot"),
        )
        return JSONResponse(task.describe(), status_code=202)

    @endpoint
    async def snapshots(request: Request) -> Response:
        p = request.path_params
        if request.method == "GET":
            names = await registry.snapshots(p["host"], p["id"])
            return JSONResponse([{"name": n} for n in names])
        body = await json_body(request, {"name"})
        name = await registry.take_snapshot(p["host"], p["id"], body.get("name"))
        return JSONResponse({"name": name}, status_code=201)

    @endpoint
    async def snapshot(request: Request) -> Response:
        p = request.path_params
        await registry.delete_snapshot(p["host"], p["id"], p["name"])
        return JSONResponse({"deleted": p["name"]})

    @endpoint
    async def file_token(request: Request) -> Response:
        """A token for the file API (SPEC §8) on this vfolder: mode, optional path, ttl."""
        p = request.path_params
        body = await json_body(request, {"mode", "path", "ttl"})
        vf = registry.vfolder(p["host"], p["id"])
        try:
            mode = access.canonical_mode(body.get("mode", ""))
        except access.BadGrant as exc:
            raise RegistryError(400, "bad_mode", str(exc)) from None
        path = files.show(files.parse_path(body.get("path", ""))) if body.get("path") else ""
        ttl = files.parse_ttl(body.get("ttl", DEFAULT_TOKEN_TTL))
        signed, exp = signer.sign(vf.host.name, vf.id, mode, path, ttl)
        return JSONResponse(
            {
                "token": signed,
                "host": vf.host.name,
                "vfolder": vf.id,
                "mode": mode,
                "path": path or "/",
                "expires": exp,
            },
            status_code=201,
        )

    @endpoint
    async def restore(request: Request) -> Response:
        p = request.path_params
        await json_body(request, set())  # nothing to say: an empty body or {}
        vf = await registry.restore_vfolder(p["host"], p["id"])
        return JSONResponse(vf_json(vf), status_code=200)

    @endpoint
    async def trash(request: Request) -> Response:
        return JSONResponse(await registry.trash_list(request.path_params["host"]))

    @endpoint
    async def task(request: Request) -> Response:
        t = registry.tasks.get(request.path_params["task"])
        if t is None:
            raise RegistryError(404, "no_such_task", f"no task {request.path_params['task']!r}")
        return JSONResponse(t.describe())

    @endpoint
    async def scope(request: Request) -> Response:
        name = request.path_params["scope"]
        if request.method == "GET":
            for vf in list(registry.vfolders.values()):
                if vf.record.scope and vf.record.scope == name:
                    await registry.reconcile(vf)
            return JSONResponse(registry.scope_info(name))
        body = await json_body(request, {"quota_bytes", "quota_inodes"})
        return JSONResponse(
            await registry.set_scope(name, body.get("quota_bytes"), body.get("quota_inodes"))
        )

    @endpoint
    async def grant(request: Request) -> Response:
        p = request.path_params
        # the principal as sent: the route's pattern stops at a newline and lets one trail
        principal = request.scope["path"].partition("/grants/")[2]
        if request.method == "DELETE":
            vf = await registry.set_grant(p["host"], p["id"], principal, None)
            return JSONResponse(vf_json(vf))
        body = await json_body(request, {"mode"})
        if "mode" not in body:
            raise RegistryError(400, "bad_grant", 'body needs {"mode": "ro|rw|rwd"}')
        vf = await registry.set_grant(p["host"], p["id"], principal, body["mode"])
        return JSONResponse(vf_json(vf))

    @endpoint
    async def stall(request: Request) -> Response:
        """Test hook (VFUSEFS_TEST_HOOKS=1 only): block the event loop, as a wedged daemon would,
        so tests can watch the systemd watchdog pings stop."""
        body = await json_body(request, {"seconds"})
        seconds = float(body.get("seconds", 1.0))
        log.warning("test hook: blocking the event loop for %.1f s", seconds)
        time.sleep(seconds)
        return JSONResponse({"stalled": seconds})

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, "not_found", f"no such endpoint: {request.method} {request.url.path}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error(
            405, "method_not_allowed", f"{request.method} not allowed on {request.url.path}"
        )

    routes = [
        Route("/v1/status", status),
        Route("/v1/hosts", hosts),
        Route("/v1/hosts/{host}", host),
        Route("/v1/hosts/{host}/vfolders", vfolders, methods=["GET", "POST"]),
        Route("/v1/hosts/{host}/vfolders/{id}", vfolder, methods=["GET", "PATCH", "DELETE"]),
        Route(
            "/v1/hosts/{host}/vfolders/{id}/grants/{principal:path}",
            grant,
            methods=["PUT", "DELETE"],
        ),
        Route("/v1/hosts/{host}/vfolders/{id}/clone", clone, methods=["POST"]),
        Route("/v1/hosts/{host}/vfolders/{id}/snapshots", snapshots, methods=["GET", "POST"]),
        Route("/v1/hosts/{host}/vfolders/{id}/snapshots/{name}", snapshot, methods=["DELETE"]),
        Route("/v1/hosts/{host}/vfolders/{id}/rescan", rescan, methods=["POST"]),
        Route("/v1/hosts/{host}/vfolders/{id}/restore", restore, methods=["POST"]),
        Route("/v1/hosts/{host}/vfolders/{id}/tokens", file_token, methods=["POST"]),
        Route("/v1/hosts/{host}/trash", trash),
        Route("/v1/tasks/{task}", task),
        Route("/v1/scopes/{scope}", scope, methods=["GET", "PUT"]),
    ]
    if os.environ.get("VFUSEFS_TEST_HOOKS") == "1":
        routes.append(Route("/v1/debug/stall", stall, methods=["POST"]))
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
    if token is None:
        return app
    return BearerAuth(app, token)  # type: ignore[return-value]


class BearerAuth:
    """ASGI wrapper: 401 without a token, 403 with a wrong one (for control_listen over TCP)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not auth.startswith(b"Bearer "):
                return await error(401, "unauthorized", "missing Authorization: Bearer <token>")(
                    scope, receive, send
                )
            if not hmac.compare_digest(auth[7:].strip(), self.token):
                return await error(403, "forbidden", "wrong token")(scope, receive, send)
        await self.app(scope, receive, send)
