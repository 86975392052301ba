"""`vfusefs serve`: start-up, the services around the mount, and shutdown.

Start-up order matters: config, store, registry (native dirs opened), control socket, then the
mount; shutdown runs the same cleanups in reverse from one AsyncExitStack, each registered right
after its resource exists.  SIGINT/SIGTERM end the FUSE loop and unmount cleanly; the process then
exits 0.  The daemon never forks itself away: systemd (or the terminal) supervises it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from typing import Any

import pyfuse3
import trio

from vfusefs import config as config_mod
from vfusefs import statfs_ino
from vfusefs.backends import load_backend
from vfusefs.config import Config, ConfigError
from vfusefs.control import build_app
from vfusefs.inodes import InodeTable
from vfusefs.logs import setup_logging
from vfusefs.ops import Operations
from vfusefs.registry import Registry
from vfusefs.store import StoreError, open_store

log = logging.getLogger(__name__)
TRASH_PURGE_INTERVAL = 60.0
USAGE_FLUSH_INTERVAL = 5.0


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


def clear_stale_mount(mountpoint: str) -> None:
    """A daemon that crashed leaves a dead FUSE mount (ENOTCONN): detach it and go on."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        os.makedirs(mountpoint, mode=0o755, exist_ok=True)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise StartupError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        log.warning("mountpoint %s has a stale mount (transport endpoint not connected): "
                    "unmounting it lazily", mountpoint)
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
        try:
            os.stat(mountpoint)
        except OSError as exc2:
            raise StartupError(f"mountpoint {mountpoint}: stale mount could not be cleared: "
                               f"{exc2.strerror}") from None
    if os.path.ismount(mountpoint) and _is_fuse_vfusefs(mountpoint):
        raise StartupError(f"mountpoint {mountpoint}: a vfusefs daemon is already mounted there")


def _is_fuse_vfusefs(mountpoint: str) -> bool:
    real = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == real and line.split()[0] == "vfusefs" for line in f)
    except OSError:
        return False


def check_socket_free(path: str) -> None:
    """Refuse to start if another daemon answers on our control socket."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return  # stale socket file: hypercorn replaces it
    raise StartupError(f"control socket {path}: another vfusefs daemon is answering there")


async def serve_control(registry: Registry, cfg: Config, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve

    d = cfg.daemon
    async with trio.open_nursery() as nursery:
        hc = HyperConfig()
        hc.bind = [f"unix:{d.control_socket}"]
        hc.umask = 0o177  # the socket file is created 0600: root only
        hc.accesslog = None
        hc.errorlog = logging.getLogger("vfusefs.control.http")
        hc.graceful_timeout = 1.0
        await nursery.start(serve, build_app(registry), hc)
        if d.control_listen:
            token = read_token(d.control_token_file)
            tc = HyperConfig()
            tc.bind = [d.control_listen]
            tc.accesslog = None
            tc.errorlog = hc.errorlog
            tc.graceful_timeout = 1.0
            await nursery.start(serve, build_app(registry, token), tc)
        task_status.started()


def read_token(path: str) -> str:
    if not path:
        raise StartupError("daemon.control_listen is set but daemon.control_token_file is not")
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise StartupError(f"daemon.control_token_file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise StartupError(f"daemon.control_token_file {path}: token must be at least 16 characters")
    return token


async def purge_trash_periodically(registry: Registry) -> None:
    """Purge right after a delete, and retry leftovers (say, after a restart) every minute."""
    while True:
        try:
            await registry.purge_trash()
        except Exception:
            log.exception("trash purge failed")
        with trio.move_on_after(TRASH_PURGE_INTERVAL):
            await registry.trash_waiting.wait()
        registry.trash_waiting = trio.Event()


async def run(cfg: Config) -> None:
    d = cfg.daemon
    token = trio.lowlevel.current_trio_token()
    try:
        store = open_store(cfg.store_url)
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(store.close)
        table = InodeTable()
        registry = Registry(cfg, store, table, token)
        stack.callback(registry.close)
        await registry.load()
        clear_stale_mount(d.mountpoint)
        check_socket_free(d.control_socket)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        await nursery.start(serve_control, registry, cfg)
        registry.nursery = nursery
        for vf in registry.needs_scan:  # usage not trusted after an unclean stop
            registry.start_rescan(vf)

        ops = Operations(registry, d)
        options = set(pyfuse3.default_options)  # default_permissions: the kernel checks mode bits
        options |= {"fsname=vfusefs", "subtype=vfusefs", "allow_other"}
        os.umask(0)  # native nodes get exactly the mode the caller asked for (already masked)
        try:
            pyfuse3.init(ops, d.mountpoint, options)
        except RuntimeError as exc:
            raise StartupError(f"cannot mount {d.mountpoint}: {exc}") from None
        registry.mounted = True
        if not statfs_ino.active():
            log.warning("statfs shim not active (vfusefs/_statfs_ino*.so missing?): df will show "
                        "host totals instead of each vfolder's quota")
        unmounted = False

        def unmount() -> None:
            if not unmounted:
                registry.mounted = False
                pyfuse3.close(unmount=True)

        stack.callback(unmount)
        log.info("serving %d host(s), %d vfolder(s) at %s", len(registry.hosts),
                 len(registry.vfolders), d.mountpoint)
        nursery.start_soon(watch_signals)
        nursery.start_soon(purge_trash_periodically, registry)
        nursery.start_soon(ops.keep_fd_budget)
        nursery.start_soon(flush_usage_periodically, registry)
        nursery.start_soon(rescan_periodically, registry, d.scan_interval)
        await pyfuse3.main(min_tasks=1, max_tasks=d.max_tasks)
        log.info("FUSE loop ended; unmounting %s", d.mountpoint)
        await registry.mark_clean()  # usage persisted: the next start may trust it
        for (op, code), (count, seconds) in sorted(ops.stats.items()):
            log.debug("served %-12s errno %-3d x%-8d %8.1f us each", op, code, count,
                      seconds / count * 1e6)
        unmount()
        unmounted = True


async def flush_usage_periodically(registry: Registry) -> None:
    """Usage is persisted every few seconds; after a crash a rescan recounts it anyway."""
    while True:
        await trio.sleep(USAGE_FLUSH_INTERVAL)
        try:
            for vf in list(registry.vfolders.values()):
                await registry.reconcile(vf)
            await registry.flush_usage()
        except Exception:
            log.exception("persisting usage failed")


async def rescan_periodically(registry: Registry, interval: float) -> None:
    if not interval:
        return
    while True:
        await trio.sleep(interval)
        for vf in list(registry.vfolders.values()):
            task = registry.start_rescan(vf)
            while task.state == "running":  # one vfolder at a time
                await trio.sleep(1)


async def watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


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
        print("vfusefs: serve must run as root (it mounts with allow_other and serves all users)",
              file=sys.stderr)
        return 1
    fds = raise_fd_limit()
    if fds < 65536:
        log.warning("only %d file descriptors allowed (RLIMIT_NOFILE): the kernel will be asked "
                    "to forget cached entries often; raise it (systemd: LimitNOFILE=1048576)", fds)
    try:
        trio.run(run, cfg)
    except BaseException as exc:  # trio wraps errors raised inside nurseries in groups
        found = first_of(exc, (StartupError, ConfigError, KeyboardInterrupt))
        if isinstance(found, KeyboardInterrupt):
            return 0
        if isinstance(found, StartupError):
            log.error("%s", found)
            return 1
        if isinstance(found, ConfigError):
            log.error("%s: %s", cfg.path, found)
            return 2
        raise
    log.info("clean exit")
    return 0
