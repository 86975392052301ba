"""`vfusefs serve`: start-up, the services around the mount, and shutdown.

Start-up order matters: config, store, registry (native dirs opened), a stale mount cleared,
control socket, metrics, then the mount; READY=1 goes to systemd once the mount answers a request.
Shutdown runs the same cleanups in reverse from one AsyncExitStack, each registered right after
its resource exists.  SIGINT/SIGTERM: STOPPING=1, no new requests, usage flushed, unmount (lazily
if busy, logged), exit 0.  SIGHUP reloads the config file without unmounting (`Service.reload`).
The daemon never forks itself away: systemd (or the terminal) supervises it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from typing import Any

import pyfuse3
import trio

from vfusefs import config as config_mod
from vfusefs.backends import load_backend
from vfusefs.config import Config, ConfigError, DaemonConfig
from vfusefs.fuse.callers import CallerCache
from vfusefs.fuse.inodes import InodeTable
from vfusefs.fuse.ops import Operations
from vfusefs.native import mounts
from vfusefs.runtime import fuseloop, fuseshim
from vfusefs.runtime.workers import StoppedError
from vfusefs.service import doctor, metrics
from vfusefs.service.control import build_app
from vfusefs.service.files import FileService
from vfusefs.service.logs import setup_logging
from vfusefs.service.notify import Notifier
from vfusefs.service.tokens import BadKey, FileTokens, read_key
from vfusefs.state.leases import NameTaken
from vfusefs.state.registry import Registry
from vfusefs.store import SharedStore, StoreError, open_store

log = logging.getLogger(__name__)
TRASH_PURGE_INTERVAL = 60.0
USAGE_FLUSH_INTERVAL = 5.0
STORE_FOLLOW_INTERVAL = 0.5  # seconds between reads of the store's change feed
LAG_CHECK = 1.0  # seconds between looks at the loop's lag when systemd has no watchdog


class StartupError(Exception):
    """Start-up cannot go on; the message is one line for the operator."""


def raise_fd_limit() -> int:
    """Every inode the kernel knows holds an O_PATH fd: allow as many as the system does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = hard
    for target in (ceiling, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            return target
        except (ValueError, OSError):
            continue  # raising the hard limit needs CAP_SYS_RESOURCE (systemd: LimitNOFILE=)
    return soft


async def clear_stale_mount(mountpoint: str) -> None:
    """A daemon that crashed leaves a dead FUSE mount (ENOTCONN): detach it and go on.

    The kernel still answers stat() of a dead mount's root from its attribute cache, so a
    vfusefs mount found in the mount table is probed with statvfs(), which always reaches the
    daemon behind it: ENOTCONN means nobody is, an answer means another daemon is serving."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        try:
            os.makedirs(mountpoint, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"mountpoint {mountpoint}: cannot create it: {exc.strerror}"
            ) from None
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise StartupError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    top = mounts.mount_at(mountpoint)
    if top is None or top.fstype != mounts.VFUSEFS_TYPE:
        if not os.path.isdir(mountpoint):
            raise StartupError(f"mountpoint {mountpoint}: not a directory")
        return
    with trio.move_on_after(10) as scope:
        try:
            await trio.to_thread.run_sync(os.statvfs, mountpoint, abandon_on_cancel=True)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise StartupError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        else:
            raise StartupError(
                f"mountpoint {mountpoint}: a vfusefs daemon is already serving there"
            )
    if scope.cancelled_caught:
        raise StartupError(
            f"mountpoint {mountpoint}: the vfusefs mount there does not answer "
            f"(a hung daemon?): stop it, or run umount -l {mountpoint}"
        )
    log.warning(
        "mountpoint %s has a stale mount (transport endpoint not connected): unmounting it lazily",
        mountpoint,
    )
    try:
        mounts.umount(mountpoint, lazy=True)
        os.stat(mountpoint)
    except OSError as exc:
        raise StartupError(
            f"mountpoint {mountpoint}: stale mount could not be cleared: {exc.strerror}"
        ) from None


def check_socket_free(path: str) -> None:
    """Refuse to start if another daemon answers on our control socket."""
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"control socket {path}: cannot create its directory: {exc.strerror}"
            ) from None
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return  # stale socket file: hypercorn replaces it
    raise StartupError(f"control socket {path}: another vfusefs daemon is answering there")


async def serve_asgi(
    app: Any,
    bind: str,
    what: str,
    *,
    unix_umask: int | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an ASGI app with hypercorn on the event loop; a bind failure is a StartupError."""
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve

    hc = HyperConfig()
    hc.bind = [bind]
    if unix_umask is not None:
        hc.umask = unix_umask
    hc.accesslog = None
    hc.errorlog = logging.getLogger("vfusefs.control.http")
    hc.graceful_timeout = 1.0
    try:
        await serve(app, hc, task_status=task_status)
    except (OSError, BaseExceptionGroup) as exc:  # hypercorn's nurseries wrap a bind error
        found = first_of(exc, (OSError,))
        if found is None:
            raise
        raise StartupError(f"{what} {bind}: {getattr(found, 'strerror', None) or found}") from None


def read_token(path: str) -> str:
    if not path:
        raise StartupError("daemon.control_listen is set but daemon.control_token_file is not")
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise StartupError(f"daemon.control_token_file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise StartupError(
            f"daemon.control_token_file {path}: token must be at least 16 characters"
        )
    return token


def file_key(d: DaemonConfig) -> bytes | None:
    """The file API's signing key (None when files_secret_file is not set)."""
    if not d.files_secret_file:
        if d.files_listen:
            raise StartupError("daemon.files_listen is set but daemon.files_secret_file is not")
        return None
    try:
        return read_key(d.files_secret_file)
    except BadKey as exc:
        raise StartupError(str(exc)) from None


async def purge_trash_periodically(registry: Registry) -> None:
    """Purge what has been in the trash for trash_retention: when the next entry is due, right
    after a delete (retention 0), and at least every minute (leftovers, a changed retention)."""
    while True:
        due = None
        try:
            due = await registry.purge_trash()
        except StoppedError:
            # stopping (the store's or a host's threads are gone): what is left stays queued in
            # the store, and the next start goes on with it
            return
        except Exception:
            log.exception("trash purge failed")
        wait = (
            TRASH_PURGE_INTERVAL
            if due is None
            else min(TRASH_PURGE_INTERVAL, max(0.0, due - time.time()) + 0.05)
        )
        with trio.move_on_after(wait):
            await registry.trash_waiting.wait()
        registry.trash_waiting = trio.Event()


def set_read_ahead(mountpoint: str, kb: int) -> None:
    """Let sequential reads reach us in large requests: the kernel caps a FUSE mount's read-ahead
    at 128 KiB, so a 1 GiB read is 8192 requests; at 1024 KiB it is 1024 (libfuse already allows
    1 MiB writes).  Call it once the mount has answered: the kernel sets it when FUSE_INIT is
    answered, and finding our device resolves the mountpoint (a request to the mount)."""
    try:
        top = mounts.mount_at(mountpoint)
        if top is None:
            raise OSError(errno.ENOENT, "not in /proc/self/mountinfo")
        with open(f"/sys/class/bdi/{top.dev}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as exc:
        log.warning(
            "cannot set read-ahead of %s to %d KiB (%s): sequential reads stay at "
            "128 KiB per request",
            mountpoint,
            kb,
            exc.strerror or exc,
        )


class Service:
    """One running daemon: the mount, the servers around it, signals, reload and systemd."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.notifier = Notifier()
        self.registry: Registry | None = None
        self.ops: Operations | None = None
        self.tcp_app: Any = None  # BearerAuth around the TCP control API, for token reloads
        self.stopping = False
        self.ready = False  # READY=1 sent: an error from now on stops a running daemon
        self.last_status = ""
        self.nursery: trio.Nursery | None = None
        self.waiter: fuseloop.Waiter | None = None
        self.tokens = FileTokens()  # the file API's key (files_secret_file), shared with control
        self.files: FileService | None = None  # the file API, when files_listen is set
        self.flush_asked = False  # another node asked for a flush, not started yet
        self.loop_lag_max = 0.0  # seconds the event loop woke late, the worst of the last minute

    # -- systemd --------------------------------------------------------------------------------
    def status_line(self) -> str:
        r = self.registry
        if r is None:
            return "starting"
        health = ", ".join(f"{name} {h.health}" for name, h in r.hosts.items()) or "none"
        handles = len(self.ops.handles) if self.ops is not None else 0
        store = "" if r.store_connected else f"; store {r.store.kind} unreachable"
        return (
            f"serving {len(r.vfolders)} vfolder(s) of {len(r.hosts)} host(s) at "
            f"{self.cfg.daemon.mountpoint}; hosts: {health}; {handles} open handle(s){store}"
        )

    def update_status(self) -> None:
        line = self.status_line()
        if line != self.last_status and not self.stopping:
            self.last_status = line
            self.notifier.status(line)

    async def watchdog(self) -> None:
        """Ping systemd from the event loop itself: if the loop wedges, the pings stop.  How
        late the loop woke for it (the worst of the last minute) is exported, so an alert can
        fire before systemd's WatchdogSec runs out (vfusefs_loop_lag_max_seconds)."""
        interval = self.notifier.watchdog_seconds / 3 or LAG_CHECK
        if self.notifier.watchdog_seconds:
            log.debug("pinging the systemd watchdog every %.1f s", interval)
        window: list[float] = []
        while True:
            if self.notifier.watchdog_seconds:
                self.notifier.watchdog()
            due = trio.current_time() + interval
            await trio.sleep(interval)
            window = [*window[-(int(60 / interval) or 1) + 1 :], trio.current_time() - due]
            self.loop_lag_max = max(window)

    async def announce_ready(self) -> None:
        """READY=1 only once the mount answers: a round trip through our own FUSE loop."""
        mp = self.cfg.daemon.mountpoint
        with trio.move_on_after(60) as scope:
            await trio.to_thread.run_sync(os.listdir, mp, abandon_on_cancel=True)
        if scope.cancelled_caught:
            raise StartupError(f"mountpoint {mp}: the new mount does not answer")
        if self.cfg.daemon.read_ahead_kb:  # after FUSE_INIT, whose reply resets it
            await trio.to_thread.run_sync(set_read_ahead, mp, self.cfg.daemon.read_ahead_kb)
        self.last_status = self.status_line()
        self.ready = True
        self.notifier.ready(self.last_status)
        log.info("ready: %s", self.last_status)

    # -- signals and reload ---------------------------------------------------------------------
    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP and not self.stopping:
                    if self.registry is None or self.ops is None or not self.registry.mounted:
                        log.warning("SIGHUP ignored: still starting (send it again once ready)")
                    else:
                        await self.reload()
                    continue
                if self.stopping:
                    log.info("%s received: already stopping", signal.Signals(signum).name)
                    continue
                if self.registry is None or not self.registry.mounted:
                    log.info("%s received while starting: giving up", signal.Signals(signum).name)
                    self.notifier.stopping("stopping before the mount was up")
                    assert self.nursery is not None
                    self.stopping = True
                    self.nursery.cancel_scope.cancel()
                    continue
                log.info(
                    "%s received: stopping (no new requests, usage flushed, then unmount)",
                    signal.Signals(signum).name,
                )
                self.stopping = True
                self.notifier.stopping(f"stopping: unmounting {self.cfg.daemon.mountpoint}")
                pyfuse3.terminate()  # further signals are absorbed above until we are gone

    async def reload(self) -> None:
        """SIGHUP: read the config file again and apply it without unmounting; a bad file is
        refused with a logged reason and the running configuration stays."""
        assert self.registry is not None and self.ops is not None
        self.notifier.reloading()
        path = self.cfg.path
        log.info("SIGHUP received: reloading %s", path)
        try:
            new = config_mod.load(path)
            for hc in new.hosts.values():
                load_backend(hc)
        except ConfigError as exc:
            text = str(exc)
            log.error(
                "reload refused, the previous configuration stays in force: %s",
                text if text.startswith(path) else f"{path}: {text}",
            )
            self.notifier.ready(self.status_line())
            return
        changes = self._apply_daemon(new.daemon)
        try:
            changes += await self.registry.reload_hosts(new.hosts)
        except Exception as exc:  # a host's backend failing to start: the others stay applied
            log.exception("reload partly applied: %s", exc)
        d = self.cfg.daemon
        self.cfg = self.registry.config = dataclasses.replace(
            new,
            daemon=d,
            store_url=self.cfg.store_url,
            hosts={name: h.config for name, h in self.registry.hosts.items()},
        )
        log.info("configuration reloaded: %s", "; ".join(changes) if changes else "nothing changed")
        self.last_status = self.status_line()
        self.notifier.ready(self.last_status)

    def _apply_daemon(self, new: DaemonConfig) -> list[str]:
        """Apply what may change live ([daemon] options declared reloadable); keep the rest,
        saying it needs a restart."""
        assert self.registry is not None and self.ops is not None
        old = self.cfg.daemon
        changed = {
            o.key: o
            for o in config_mod.DAEMON_OPTIONS
            if getattr(old, o.key) != getattr(new, o.key)
        }
        applied: dict[str, Any] = {}
        for key, opt in changed.items():
            if opt.reloadable:
                applied[key] = getattr(new, key)
            else:
                log.warning(
                    "daemon.%s changed to %r: takes effect at the next restart (still %r)",
                    key,
                    getattr(new, key),
                    getattr(old, key),
                )
        if "control_token_file" in applied and self.tcp_app is not None:
            try:
                self.tcp_app.token = read_token(applied["control_token_file"]).encode()
            except StartupError as exc:
                log.error("reload: %s; the old token stays valid", exc)
                del applied["control_token_file"]
        if "files_secret_file" in applied:
            try:
                self.tokens.key = file_key(new)
            except StartupError as exc:
                log.error("reload: %s; the old key stays", exc)
                del applied["files_secret_file"]
        if "upload_expiry" in applied and self.files is not None:
            self.files.upload_expiry = applied["upload_expiry"]
        merged = dataclasses.replace(old, **applied)
        if {"admin_uids", "confined_cgroups"} & set(applied):
            self.ops.callers = CallerCache(merged.admin_uids, merged.confined_cgroups)
            for vf in self.registry.vfolders.values():
                vf.modes = {}
        if "busy_poll_us" in applied and self.waiter is not None:
            self.waiter.set_spin(applied["busy_poll_us"] / 1e6)
        if {"log_format", "log_level"} & set(applied):
            setup_logging(merged.log_format, merged.log_level)
        self.cfg = dataclasses.replace(self.cfg, daemon=merged)
        self.registry.config = self.cfg
        return [f"daemon.{key} = {value!r}" for key, value in applied.items()]

    # -- the run --------------------------------------------------------------------------------
    async def run(self) -> None:
        d = self.cfg.daemon
        token = trio.lowlevel.current_trio_token()
        try:
            store = open_store(self.cfg.store_url)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(store.close)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            nursery.start_soon(self.watchdog)
            self.nursery = nursery
            nursery.start_soon(
                self.watch_signals
            )  # early: SIGHUP must never kill a starting daemon
            self.notifier.status("loading vfolders")
            table = InodeTable()
            registry = self.registry = Registry(self.cfg, store, table, token)
            stack.callback(registry.close)
            await registry.load()
            for check in doctor.check_request_timeout(self.cfg):  # doctor's check, at start
                if check.level != "ok":
                    log.warning("%s; %s", check.detail, check.fix)
            if registry.leases is not None:
                try:
                    await registry.leases.join()
                except NameTaken as exc:
                    raise StartupError(str(exc)) from None
                except StoreError as exc:
                    raise StartupError(f"joining the nodes that share the store: {exc}") from None
                self.listen_for_events(store, token, stack)  # type: ignore[arg-type]
            await clear_stale_mount(d.mountpoint)
            check_socket_free(d.control_socket)
            self.tokens = FileTokens(file_key(d))
            await nursery.start(
                functools.partial(
                    serve_asgi,
                    build_app(registry, tokens=self.tokens),
                    f"unix:{d.control_socket}",
                    "control_socket",
                    unix_umask=0o177,
                )
            )  # socket file 0600
            if d.control_listen:
                self.tcp_app = build_app(
                    registry, read_token(d.control_token_file), tokens=self.tokens
                )
                await nursery.start(serve_asgi, self.tcp_app, d.control_listen, "control_listen")
            registry.nursery = nursery
            registry.on_health_change = self.update_status
            for served in list(registry.hosts.values()):  # each host's storage probed from now
                nursery.start_soon(registry.watch_health, served)
            await registry.watch_network()  # and the way to its servers
            for vf in registry.needs_scan:  # usage not trusted after an unclean stop
                registry.start_rescan(vf)

            ops = self.ops = Operations(registry, d)
            if d.metrics_listen:
                await nursery.start(
                    serve_asgi,
                    metrics.build_app(ops, registry, self),
                    d.metrics_listen,
                    "metrics_listen",
                )
            if d.files_listen:  # files over HTTP, in a task group of its own
                self.files = FileService(ops, registry, self.tokens, d.upload_expiry)
                await self.files.load()
                files_nursery = await stack.enter_async_context(trio.open_nursery())
                stack.callback(files_nursery.cancel_scope.cancel)
                await files_nursery.start(
                    serve_asgi, self.files.app(), d.files_listen, "files_listen"
                )
                files_nursery.start_soon(self.files.keep)
            options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
            options |= {"fsname=vfusefs", "subtype=vfusefs", "allow_other"}
            os.umask(0)  # native nodes get exactly the mode the caller asked for (already masked)
            try:
                pyfuse3.init(ops, d.mountpoint, options)
            except RuntimeError as exc:
                raise StartupError(f"cannot mount {d.mountpoint}: {exc}") from None
            registry.mounted = True
            if not fuseshim.active():
                log.warning(
                    "statfs shim not active (vfusefs/_fuseshim*.so missing?): df will "
                    "show host totals instead of each vfolder's quota"
                )
            session_open = True

            def close_session() -> None:  # on errors: libfuse unmounts (lazily) and closes
                if session_open:
                    registry.mounted = False
                    pyfuse3.close(unmount=True)

            stack.callback(close_session)
            self.waiter = fuseloop.install(d.busy_poll_us / 1e6)
            stack.callback(fuseloop.uninstall)
            nursery.start_soon(self.announce_ready)
            nursery.start_soon(purge_trash_periodically, registry)
            nursery.start_soon(ops.fds.keep)
            nursery.start_soon(self.flush_usage_periodically)
            nursery.start_soon(self.rescan_periodically)
            nursery.start_soon(self.follow_store)
            if registry.leases is not None:
                nursery.start_soon(registry.leases.keep)
            await pyfuse3.main(min_tasks=1, max_tasks=d.max_tasks)
            log.info("FUSE loop ended: no more requests are served")
            try:
                await registry.mark_clean()  # usage persisted: the next start may trust it
                if registry.leases is not None:
                    await registry.leases.leave()  # every lease given back
            except (StoreError, trio.TooSlowError) as exc:
                log.warning(
                    "usage not persisted at stop (the store is away: %s): the next start "
                    "recounts it",
                    exc,
                )
            for (host, op, code), st in sorted(ops.stats.items()):
                log.debug(
                    "served %-8s %-12s errno %-3d x%-8d %8.1f us each",
                    host,
                    op,
                    code,
                    st.count,
                    st.seconds / st.count * 1e6,
                )
            registry.mounted = False
            await self.unmount()
            pyfuse3.close(unmount=False)
            session_open = False

    def listen_for_events(
        self, store: SharedStore, token: trio.lowlevel.TrioToken, stack: contextlib.AsyncExitStack
    ) -> None:
        """A thread of its own follows the store's events channel (pub/sub; redis-py blocks)
        and hands each message to the event loop: a change wakes the feed follower at once, a
        reclaim makes this node give back lease it does not spend."""
        stop = threading.Event()

        def deliver(message: str) -> None:
            try:
                trio.from_thread.run_sync(self.on_store_event, message, trio_token=token)
            except trio.RunFinishedError:
                stop.set()

        thread = threading.Thread(
            target=store.listen, args=(stop, deliver), daemon=True, name="vfusefs-events"
        )
        thread.start()
        stack.callback(stop.set)

    def on_store_event(self, message: str) -> None:
        registry = self.registry
        if registry is None:
            return
        if message in ("changed", "resync"):
            registry.store_wake.set()
        elif message.startswith("flush|") and self.nursery:  # another node is recounting
            if not self.flush_asked:  # one flush answers every request made before it starts
                self.flush_asked = True
                self.nursery.start_soon(self.flush_quietly)
        elif message.startswith("reclaim|") and registry.leases and self.nursery:
            _, key, node = message.split("|", 2)
            self.nursery.start_soon(registry.leases.reclaim, key, node)

    async def flush_quietly(self) -> None:
        assert self.registry is not None
        self.flush_asked = False
        try:
            await self.registry.flush_usage()
        except StoreError:
            pass  # said by the feed follower, once per outage

    async def unmount(self) -> None:
        """Unmount; if something still uses the mount (open files, a cwd inside), detach it
        lazily and say so: it then goes away when its last user leaves."""
        mp = self.cfg.daemon.mountpoint

        def attempt() -> str:
            try:
                mounts.umount(mp, lazy=False)
                return "unmounted"
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
            mounts.umount(mp, lazy=True)
            return "busy"

        with trio.move_on_after(10) as scope:
            try:
                result = await trio.to_thread.run_sync(attempt, abandon_on_cancel=True)
            except OSError as exc:
                log.warning("unmounting %s: %s; closing the FUSE session anyway", mp, exc.strerror)
                return
        if scope.cancelled_caught:
            log.warning("unmounting %s did not finish in 10 s: closing the FUSE session", mp)
        elif result == "busy":
            log.warning(
                "%s is busy (open files or a working directory inside): detached it "
                "lazily; processes still using it get ENOTCONN from now on",
                mp,
            )
        else:
            log.info("unmounted %s", mp)

    async def flush_usage_periodically(self) -> None:
        """Usage is persisted every few seconds; after a crash a rescan recounts it anyway."""
        registry = self.registry
        assert registry is not None
        while True:
            await trio.sleep(USAGE_FLUSH_INTERVAL)
            stuck: set[str] = set()  # hosts that did not answer this round: skip the rest
            for vf in list(registry.vfolders.values()):
                if vf.host.name in stuck or vf.host.health == "down":  # said once, by health
                    continue
                try:
                    await registry.reconcile(vf)
                except (trio.TooSlowError, StoppedError) as exc:  # a hung or removed host
                    stuck.add(vf.host.name)
                    log.warning(
                        "host %s: usage of recently written files not reconciled this round: %s",
                        vf.host.name,
                        exc,
                    )
            try:
                await registry.refresh_usage()  # and, many nodes, take in the others' writes
            except StoreError as exc:
                self.store_down(exc)
            except Exception:
                log.exception("persisting usage failed")
            self.update_status()

    async def follow_store(self) -> None:
        """Apply the store's change feed every STORE_FOLLOW_INTERVAL seconds (so a change by
        another writer reaches this node within one second); a store error is logged once
        until it recovers."""
        registry = self.registry
        assert registry is not None
        failing = False
        while True:
            with trio.move_on_after(STORE_FOLLOW_INTERVAL):  # or at once when told (pub/sub)
                await registry.store_wake.wait()
            registry.store_wake = trio.Event()
            try:
                await registry.apply_changes()
            except StoppedError:
                return
            except StoreError as exc:
                self.store_down(exc)
                continue
            except Exception:  # a bug or a host failing: the feed goes on, said once per spell
                if not failing:
                    log.exception("applying the store's change feed failed (retrying)")
                failing = True
                continue
            failing = False
            if not registry.store_connected:
                log.info("store reachable again")
                registry.store_connected, registry.store_since = True, time.time()
                self.update_status()

    def store_down(self, exc: StoreError) -> None:
        """The store did not answer: say so once per outage (log, status, STATUS line).  What
        it would have been told stays in memory and goes out once it answers again."""
        registry = self.registry
        assert registry is not None
        if registry.store_connected:
            log.warning("store unreachable: %s (retrying every %.1f s)", exc, STORE_FOLLOW_INTERVAL)
            registry.store_connected, registry.store_since = False, time.time()
            self.update_status()

    async def rescan_periodically(self) -> None:
        """Recount every vfolder every scan_interval seconds (read live: SIGHUP may change it)."""
        registry = self.registry
        assert registry is not None
        waited = 0.0
        while True:
            await trio.sleep(1)
            waited += 1
            interval = self.cfg.daemon.scan_interval
            if not interval or waited < interval:
                continue
            waited = 0.0
            for vf in list(registry.vfolders.values()):
                if vf.deleted:
                    continue
                try:  # on a shared store one node recounts each vfolder per interval
                    mine = await registry.store_workers.run(
                        registry.store.claim_task, f"rescan:{vf.id}", registry.node, interval
                    )
                except StoreError:
                    break  # said by the feed follower; the next round tries again
                if not mine:
                    continue
                task = registry.start_rescan(vf)
                while task.state == "running":  # one vfolder at a time
                    await trio.sleep(1)


def first_of(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := first_of(inner, kinds)) is not None:
                return found
    return None


def serve(config_path: str | None) -> int:
    """Entry point of `vfusefs serve`; returns the exit code."""
    try:
        cfg = config_mod.load(config_path)
    except ConfigError as exc:
        print(f"vfusefs: {exc}", file=sys.stderr)
        return 2
    try:
        for host in cfg.hosts.values():
            load_backend(host)  # unknown backends and backend options are config errors too
    except ConfigError as exc:
        print(f"vfusefs: {cfg.path}: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.daemon.log_format, cfg.daemon.log_level)
    if os.geteuid() != 0:
        print(
            "vfusefs: serve must run as root (it mounts with allow_other and serves all users)",
            file=sys.stderr,
        )
        return 1
    fds = raise_fd_limit()
    if fds < 65536:
        log.warning(
            "only %d file descriptors allowed (RLIMIT_NOFILE): the kernel will be asked "
            "to forget cached entries often; raise it (systemd: LimitNOFILE=1048576)",
            fds,
        )
    service = Service(cfg)
    try:
        trio.run(service.run)
    except BaseException as exc:  # trio wraps errors raised inside nurseries in groups
        found = first_of(exc, (StartupError, ConfigError, KeyboardInterrupt))
        oserr = first_of(exc, (OSError,)) if found is None else None
        if oserr is not None:
            # a system call failed where we did not expect it: one line, not a traceback
            found = StartupError(f"{'stopped' if service.ready else 'cannot start'}: {oserr}")
            log.debug("unexpected OSError", exc_info=exc)
        if isinstance(found, KeyboardInterrupt):
            return 0
        if isinstance(found, StartupError):
            log.error("%s", found)
            service.notifier.status(f"failed: {found}")  # what `systemctl status` shows
            return 1
        if isinstance(found, ConfigError):
            log.error("%s: %s", cfg.path, found)
            service.notifier.status(f"failed: {found}")
            return 2
        raise
    log.info("clean exit")
    return 0
