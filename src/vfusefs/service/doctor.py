"""`vfusefs doctor`: check what the daemon needs on this node and say what to fix.

Every check is read-only (nothing is created, mounted or written) and bounded in time: a probe
of a mount or a storage path that could hang (a dead NFS server, a wedged daemon) runs on a
helper thread and counts as a failure after a few seconds.
"""

from __future__ import annotations

import errno
import os
import pathlib
import resource
import shutil
import socket
import sqlite3
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vfusefs import config as config_mod
from vfusefs.backends import BackendError, consistency, load_backend
from vfusefs.config import Config, ConfigError
from vfusefs.native import mounts
from vfusefs.store import REDIS_SCHEMES, StoreError, open_store, sqlite_path

PROBE_SECONDS = 5.0


@dataclass
class Check:
    name: str
    level: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""

    def describe(self) -> dict[str, str]:
        return dict(self.__dict__)


def bounded(fn: Callable[..., Any], *args: Any, seconds: float = PROBE_SECONDS) -> Any:
    """fn(*args) on a helper thread; TimeoutError if it does not return in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_system() -> list[Check]:
    out = []
    root = os.geteuid() == 0
    out.append(
        Check(
            "root",
            "ok" if root else "fail",
            "running as root" if root else f"running as uid {os.geteuid()}",
            "" if root else "run `vfusefs serve` (and this check) as root; systemd does",
        )
    )
    try:
        with open("/proc/filesystems") as f:
            has_fuse = any(line.split()[-1] == "fuse" for line in f if line.strip())
    except OSError:
        has_fuse = False
    out.append(
        Check(
            "kernel fuse",
            "ok" if has_fuse else "fail",
            "fuse filesystem registered" if has_fuse else "no fuse in /proc/filesystems",
            "" if has_fuse else "modprobe fuse",
        )
    )
    out.append(_dev_fuse())
    tool = shutil.which("fusermount3")
    out.append(
        Check(
            "fusermount3",
            "ok" if tool else "warn",
            tool or "not found in PATH",
            "" if tool else "apt-get install fuse3 (used to unmount when not root)",
        )
    )
    if root:
        out.append(Check("user_allow_other", "ok", "not needed: allow_other as root"))
    else:
        allowed = _fuse_conf_allows_other()
        out.append(
            Check(
                "user_allow_other",
                "ok" if allowed else "fail",
                "set in /etc/fuse.conf" if allowed else "missing in /etc/fuse.conf",
                "" if allowed else "add a line `user_allow_other` to /etc/fuse.conf",
            )
        )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    enough = hard >= 65536
    out.append(
        Check(
            "open files",
            "ok" if enough else "warn",
            f"RLIMIT_NOFILE soft {soft}, hard {hard}",
            ""
            if enough
            else "raise the hard limit (systemd: LimitNOFILE=1048576, as "
            "systemd/vfusefs.service sets): each cached inode holds a fd",
        )
    )
    return out


def _dev_fuse() -> Check:
    try:
        st = os.stat("/dev/fuse")
    except OSError as exc:
        return Check(
            "/dev/fuse",
            "fail",
            exc.strerror or str(exc),
            "modprobe fuse; in a container, pass --device /dev/fuse",
        )
    if not stat.S_ISCHR(st.st_mode):
        return Check(
            "/dev/fuse",
            "fail",
            "exists but is not a character device",
            "remove it and `modprobe fuse` (udev recreates it)",
        )
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return Check(
            "/dev/fuse",
            "fail",
            f"cannot open: {exc.strerror}",
            "run as root; in a container, allow the device (cgroup devices c 10:229)",
        )
    return Check("/dev/fuse", "ok", "character device, opens read-write")


def _fuse_conf_allows_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_config(path: str | None) -> tuple[Config | None, list[Check]]:
    try:
        cfg = config_mod.load(path, check_paths=False)  # host paths get their own checks
        for hc in cfg.hosts.values():
            load_backend(hc)
    except ConfigError as exc:
        return None, [
            Check(
                "config", "fail", str(exc), "fix the file; `vfusefs check-config` checks it again"
            )
        ]
    return cfg, [Check("config", "ok", f"{cfg.path}: {len(cfg.hosts)} host(s)")]


def check_mountpoint(mp: str) -> Check:
    name = f"mountpoint {mp}"
    try:
        os.lstat(mp)
    except FileNotFoundError:
        return Check(name, "ok", "does not exist yet: created at start")
    except OSError:
        pass  # a dead mount answers ENOTCONN even to lstat (once its cached attributes expire)
    top = mounts.mount_at(mp)
    mounted = top.fstype if top is not None else ""
    if mounted == mounts.VFUSEFS_TYPE:
        try:
            bounded(os.statvfs, mp)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return Check(
                    name,
                    "fail",
                    "stale vfusefs mount (its daemon died)",
                    f"umount -l {mp} (vfusefs serve also clears it at start)",
                )
            return Check(name, "fail", f"vfusefs mount answers {exc.strerror}", f"umount -l {mp}")
        except TimeoutError:
            return Check(
                name,
                "fail",
                "vfusefs mount does not answer (a hung daemon?)",
                f"stop the daemon (systemctl restart vfusefs) or umount -l {mp}",
            )
        return Check(name, "ok", "served by a running vfusefs daemon")
    if mounted:
        return Check(
            name,
            "warn",
            f"a {mounted} filesystem is mounted there: vfusefs would hide it",
            "pick another daemon.mountpoint or unmount it",
        )
    if not os.path.isdir(mp):
        return Check(
            name, "fail", "exists but is not a directory", "remove it or pick another path"
        )
    if os.listdir(mp):
        return Check(
            name,
            "warn",
            "directory is not empty: its files are hidden while mounted",
            "use an empty directory",
        )
    return Check(name, "ok", "empty directory")


def check_state(cfg: Config) -> list[Check]:
    out = []
    sd = cfg.daemon.state_dir
    if os.path.isdir(sd):
        ok = os.access(sd, os.W_OK | os.X_OK)
        out.append(
            Check(
                f"state_dir {sd}",
                "ok" if ok else "fail",
                "writable" if ok else "not writable",
                "" if ok else f"chown root {sd}",
            )
        )
    else:
        parent = _existing_parent(sd)
        ok = os.access(parent, os.W_OK | os.X_OK)
        out.append(
            Check(
                f"state_dir {sd}",
                "ok" if ok else "fail",
                "created at start" if ok else f"cannot be created under {parent}",
                "" if ok else f"mkdir -p {sd}",
            )
        )
    url = cfg.store_url
    if url.startswith(REDIS_SCHEMES):
        out.append(check_shared_store(url))
        return out
    try:
        path = sqlite_path(url)
    except StoreError:
        out.append(
            Check(
                "store",
                "fail",
                f"{url}: not a store URL this version knows",
                "use sqlite:///ABS/PATH (or leave store.url unset), redis:// or unix://",
            )
        )
        return out
    if not os.path.exists(path):
        out.append(Check(f"store {path}", "ok", "does not exist yet: created at start"))
        return out
    try:
        db = sqlite3.connect(
            f"{pathlib.Path(path).as_uri()}?mode=ro", uri=True, timeout=PROBE_SECONDS
        )
        try:
            (n,) = db.execute("SELECT count(*) FROM vfolders").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        out.append(
            Check(
                f"store {path}",
                "fail",
                f"cannot read: {exc}",
                "restore it from a backup, or move it aside to start empty (vfolder "
                "data stays on the hosts; re-create with adopt)",
            )
        )
        return out
    out.append(Check(f"store {path}", "ok", f"readable, {n} vfolder(s)"))
    return out


def check_shared_store(url: str) -> Check:
    """A Redis store answers, and how many vfolders it holds (read only)."""
    try:
        store = bounded(open_store, url)
        try:
            n = len(bounded(store.vfolders))
        finally:
            store.close()
    except (StoreError, TimeoutError) as exc:
        return Check(
            f"store {url}",
            "fail",
            f"cannot reach it: {exc or 'no answer'}",
            "start redis-server there, or fix store.url",
        )
    return Check(f"store {url}", "ok", f"reachable, {n} vfolder(s)")


def _existing_parent(path: str) -> str:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return path or "/"


def check_hosts(cfg: Config) -> list[Check]:
    out = []
    for name, hc in cfg.hosts.items():
        label = f"host {name} ({hc.backend}, {hc.path})"
        try:
            st = bounded(os.statvfs, hc.path)
            ok = bounded(os.access, hc.path, os.R_OK | os.W_OK | os.X_OK)
            health = bounded(load_backend(hc).probe)
        except TimeoutError as exc:
            out.append(
                Check(
                    label,
                    "fail",
                    f"storage does not answer: {exc}",
                    "check the storage server and network path, then `mount` of it",
                )
            )
            continue
        except (OSError, BackendError, ConfigError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc)
            out.append(
                Check(
                    label,
                    "fail",
                    detail,
                    f"mount the storage at {hc.path} or fix hosts.{name}.path",
                )
            )
            continue
        if not ok:
            out.append(
                Check(
                    label,
                    "fail",
                    "not readable and writable by root",
                    f"fix permissions (or root squashing) on {hc.path}",
                )
            )
            continue
        free = st.f_bavail * st.f_frsize
        level = "ok" if health == "ok" else "fail"
        out.append(
            Check(
                label,
                level,
                f"{mounts.fs_type(hc.path)}, {free / 2**30:.1f} GiB free, backend says {health}",
                "" if level == "ok" else "see the backend's docs",
            )
        )
    if not cfg.hosts:
        out.append(
            Check(
                "hosts",
                "warn",
                "no [hosts.NAME] configured: the mount will be empty",
                "add a host (see examples/)",
            )
        )
    out.extend(check_request_timeout(cfg))
    out.extend(check_consistency(cfg))
    return out


def check_consistency(cfg: Config) -> list[Check]:
    """Each host's native storage against the store's records: orphan directories, records
    with no directory, unfinished clones, native limits that drifted (nothing is changed)."""
    if cfg.store_url.startswith("sqlite:"):
        try:
            if not os.path.exists(sqlite_path(cfg.store_url)):
                return []  # no store yet: nothing to compare (and doctor makes none)
        except StoreError:
            return []
    try:
        store = bounded(open_store, cfg.store_url)
    except (StoreError, TimeoutError):
        return []  # check_state says what is wrong with the store
    try:
        records = bounded(store.vfolders)
    except (StoreError, TimeoutError):
        return []
    finally:
        store.close()
    out = []
    for name, hc in cfg.hosts.items():
        recorded = {r.native_path: (r.id, r.quota_bytes) for r in records if r.host == name}
        try:
            found = bounded(consistency, load_backend(hc), recorded)
        except (TimeoutError, OSError, BackendError, ConfigError):
            continue  # check_hosts says so
        label = f"host {name}: vfolders against the store"
        problems = []
        fixes = []
        if found["orphans"]:
            problems.append(f"{len(found['orphans'])} directory(ies) no vfolder names")
            fixes.append(
                f"serve one: vfusefs vfolder create {name} --id UUID --adopt "
                f"(first: {found['orphans'][0]})"
            )
        if found["missing"]:
            problems.append(f"{len(found['missing'])} vfolder(s) whose directory is gone")
            fixes.append(f"restore the data, or: vfusefs vfolder rm {name} {found['missing'][0]}")
        if found["unfinished_clones"]:
            problems.append(f"{len(found['unfinished_clones'])} unfinished clone(s)")
            fixes.append(f"remove what a stopped clone left: {found['unfinished_clones'][0]}")
        if found["limit_drift"]:
            d = found["limit_drift"][0]
            problems.append(f"{len(found['limit_drift'])} native limit(s) differ from the store")
            fixes.append(f"re-apply: vfusefs vfolder quota {name} {d['id']} --bytes {d['store']}")
        total = len(recorded)
        if problems:
            out.append(Check(label, "warn", "; ".join(problems), "; ".join(fixes)))
        else:
            out.append(Check(label, "ok", f"{total} vfolder(s), each with its directory"))
    return out


def fuse_request_timeout() -> int:
    """fs.fuse.default_request_timeout: seconds after which the kernel aborts a FUSE connection
    whose request is unanswered (0 or absent: never)."""
    try:
        with open("/proc/sys/fs/fuse/default_request_timeout") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def check_request_timeout(cfg: Config) -> list[Check]:
    """Every request must be answered before the kernel would abort the whole mount: each
    host's op_timeout must stay below fs.fuse.default_request_timeout."""
    limit = fuse_request_timeout()
    if not limit:
        return []
    late = [f"{n} ({hc.op_timeout:g} s)" for n, hc in cfg.hosts.items() if hc.op_timeout >= limit]
    if not late:
        return [Check("fuse request timeout", "ok", f"{limit} s, above every op_timeout")]
    return [
        Check(
            "fuse request timeout",
            "fail",
            f"fs.fuse.default_request_timeout is {limit} s: a hung request of host(s) "
            f"{', '.join(late)} would abort the whole mount before it fails with EIO",
            f"set op_timeout below {limit} for them, or raise the sysctl",
        )
    ]


def check_daemon(cfg: Config) -> Check:
    path = cfg.daemon.control_socket
    if not os.path.exists(path):
        return Check("daemon", "ok", "not running (no control socket)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(PROBE_SECONDS)
        try:
            s.connect(path)
        except OSError:
            return Check("daemon", "ok", f"not running (stale socket {path} is replaced at start)")
    return Check("daemon", "ok", f"running, control socket {path} answers")


def run_checks(config_path: str | None) -> list[Check]:
    checks = check_system()
    cfg, found = check_config(config_path)
    checks += found
    if cfg is not None:
        checks.append(check_mountpoint(cfg.daemon.mountpoint))
        checks += check_state(cfg)
        checks += check_hosts(cfg)
        checks.append(check_daemon(cfg))
    return checks
