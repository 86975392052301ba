"""The configuration file: every key declared once, validated into plain dataclasses.

Each option is declared exactly once below with its type, default, whether a SIGHUP reload may
change it, and one line of documentation (`docs/config.md` is generated from the same table by
`vfusefs config-doc`).  Loading never raises anything but `ConfigError`, whose message is one line
naming the file, the key and the problem: start-up prints it and exits 2, a reload logs it and
keeps the old configuration.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import tomlkit
import tomlkit.exceptions

from vfusefs.domain.quota import parse_size

DEFAULT_CONFIG_PATH = "/etc/vfusefs/vfusefs.toml"
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(Exception):
    """A configuration problem, already phrased as one line for the operator."""


@dataclass(frozen=True)
class Option:
    key: str
    kind: type | tuple[type, ...]
    default: Any
    reloadable: bool
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns a problem or None
    item: type | None = None  # element type for lists


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def _absolute(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def _absolute_or_empty(value: str) -> str | None:
    return None if value == "" or value.startswith("/") else "must be an absolute path or empty"


def _listen_address(value: str) -> str | None:
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must look like HOST:PORT (or be empty to disable)"
    return None


def _store_url(value: str) -> str | None:
    schemes = (
        "sqlite:///",
        "redis://",
        "rediss://",
        "unix://",
        "redis+sentinel://",
        "redis+cluster://",
    )
    if value == "" or value.startswith(schemes):
        return None
    return (
        "must start with sqlite:/// (absolute path), redis://, rediss://, unix://, "
        f"redis+sentinel:// or redis+cluster://, not {value!r}"
    )


def _node_name(value: str) -> str | None:
    if value == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}", value):
        return None
    return "must be 1-63 letters, digits, '.', '_', ':' or '-' (or empty: the host name)"


def _size(value: str | int) -> str | None:
    try:
        parse_size(value)
    except ValueError as exc:
        return str(exc)
    return None


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


DAEMON_OPTIONS: tuple[Option, ...] = (
    Option("mountpoint", str, "/mnt/vfroot", False, "where the vfusefs tree is mounted", _absolute),
    Option(
        "state_dir",
        str,
        "/var/lib/vfusefs",
        False,
        "embedded store, trash bookkeeping, pid",
        _absolute,
    ),
    Option(
        "control_socket",
        str,
        "/run/vfusefs/control.sock",
        False,
        "HTTP+JSON control API on a unix socket, mode 0600 (root only)",
        _absolute,
    ),
    Option(
        "control_listen",
        str,
        "",
        False,
        "optional TCP HOST:PORT for the control API (Bearer token)",
        _listen_address,
    ),
    Option(
        "control_token_file",
        str,
        "",
        True,
        "file holding the Bearer token for control_listen",
        _absolute_or_empty,
    ),
    Option(
        "files_listen",
        str,
        "",
        False,
        "HOST:PORT of the file API (files over HTTP: downloads, listings, tus uploads) for "
        "clients that do not mount; empty disables",
        _listen_address,
    ),
    Option(
        "files_secret_file",
        str,
        "",
        True,
        "file holding the HS256 key file API tokens are signed with (first line, at least "
        "32 bytes; only its owner may read it)",
        _absolute_or_empty,
    ),
    Option(
        "upload_expiry",
        (int, float),
        86400.0,
        True,
        "seconds an unfinished upload is kept after its last bytes arrived; then its file is "
        "removed and its space freed",
        _positive,
    ),
    Option(
        "metrics_listen",
        str,
        "127.0.0.1:9321",
        False,
        "Prometheus HOST:PORT; empty disables",
        _listen_address,
    ),
    Option(
        "metrics_vfolders",
        bool,
        True,
        True,
        "export per-vfolder usage and quota gauges (one series each: switch off for very "
        "large installations)",
    ),
    Option(
        "admin_uids",
        list,
        [0],
        True,
        "uids that are admins when not in a confined cgroup",
        item=int,
    ),
    Option(
        "confined_cgroups",
        list,
        ["/docker", "/system.slice/docker-", "/kubepods", "/machine.slice"],
        True,
        "cgroup-v2 path prefixes of containers: callers there are never admins",
        item=str,
    ),
    Option(
        "log_format",
        str,
        "text",
        True,
        "'text' for people, 'json' (one object a line) for Loki",
        _one_of("text", "json"),
    ),
    Option(
        "log_level",
        str,
        "info",
        True,
        "debug, info, warning or error",
        _one_of("debug", "info", "warning", "error"),
    ),
    Option(
        "writeback_cache",
        bool,
        False,
        False,
        "let the kernel batch writes in its page cache: faster small writes, but a narrowed "
        "grant or EDQUOT then surfaces at fsync/close instead of at write()",
    ),
    Option(
        "entry_timeout",
        (int, float),
        1.0,
        False,
        "seconds the kernel may cache names and attributes inside vfolders",
        _non_negative,
    ),
    Option(
        "read_ahead_kb",
        int,
        1024,
        False,
        "kernel read-ahead for the mount, KiB (sequential reads reach the daemon in requests "
        "this large, up to 1024; 0 keeps the kernel's default of 128)",
        _non_negative,
    ),
    Option("io_threads", int, 16, False, "worker threads per host for native syscalls", _positive),
    Option(
        "busy_poll_us",
        int,
        100,
        True,
        "after each reply, microseconds the daemon polls /dev/fuse for the next request "
        "before its event loop sleeps (waking a sleeping CPU costs more than most requests; "
        "0: off, and so is keeping a reading process's CPU awake while its read waits for "
        "the disk)",
        _non_negative,
    ),
    Option(
        "inode_fds",
        int,
        0,
        False,
        "O_PATH fds kept for inodes the kernel caches (0: from RLIMIT_NOFILE); above it the "
        "kernel is asked to forget its oldest entries",
        _non_negative,
    ),
    Option(
        "max_tasks",
        int,
        64,
        False,
        "concurrent FUSE requests the daemon works on at once",
        _positive,
    ),
    Option(
        "trash_retention",
        (int, float),
        86400.0,
        True,
        "seconds a deleted vfolder's data stays in its host's trash, restorable with "
        "`vfusefs vfolder restore`, before it is purged in the background (0: at once)",
        _non_negative,
    ),
    Option(
        "scan_interval",
        (int, float),
        3600.0,
        True,
        "seconds between background rescans that correct usage for changes made behind "
        "vfusefs (0: only on request and after an unclean stop)",
        _non_negative,
    ),
)

STORE_OPTIONS: tuple[Option, ...] = (
    Option(
        "url",
        str,
        "",
        False,
        "sqlite:///ABS/PATH (default: state.db in state_dir); redis://host:port/db, "
        "rediss:// (TLS), unix:///path/redis.sock?db=0, "
        "redis+sentinel://h1:26379,h2:26379/SERVICE[/DB] or redis+cluster://h1:7000,h2:7001 "
        "for a Redis store many nodes share",
        _store_url,
    ),
    Option(
        "node",
        str,
        "",
        False,
        "this daemon's name among the nodes sharing the store (default: the host name); two "
        "daemons on one machine sharing a store need different names",
        _node_name,
    ),
    Option(
        "lease_floor",
        (str, int),
        "1M",
        False,
        "smallest byte quota lease a node holds while there is room (shared stores; one inode "
        "is the inode floor): the total across N nodes ends at most N x this over a limit",
        _size,
    ),
    Option(
        "lease_ttl",
        (int, float),
        30.0,
        False,
        "seconds a node may spend a quota lease it cannot renew (the store unreachable); then "
        "writes into limited vfolders and scopes fail with EDQUOT",
        _positive,
    ),
)

HOST_OPTIONS: tuple[Option, ...] = (
    Option("backend", str, "vfs", True, "backend entry point in group vfusefs.backends"),
    Option("path", str, None, True, "native directory holding the host's vfolders", _absolute),
    Option(
        "layout",
        str,
        "flat",
        True,
        "'flat' (<path>/<uuid>) or 'backendai'",
        _one_of("flat", "backendai"),
    ),
    Option("servers", list, [], True, "storage network endpoints watched for health", item=str),
    Option(
        "op_timeout",
        (int, float),
        30.0,
        True,
        "seconds before an operation on a stuck host fails with EIO",
        _positive,
    ),
    Option(
        "allow_privileged",
        bool,
        False,
        True,
        "let confined callers (containers) create block/char device nodes, set setuid/setgid "
        "bits on files and set security.capability (off: EPERM; native storage is often "
        "mounted without nosuid/nodev on hosts that are not this mount)",
    ),
    Option("options", dict, {}, True, "backend-specific options (see the backend's docs)"),
)


@dataclass(frozen=True)
class DaemonConfig:
    mountpoint: str
    state_dir: str
    control_socket: str
    control_listen: str
    control_token_file: str
    files_listen: str
    files_secret_file: str
    upload_expiry: float
    metrics_listen: str
    metrics_vfolders: bool
    admin_uids: tuple[int, ...]
    confined_cgroups: tuple[str, ...]
    log_format: str
    log_level: str
    writeback_cache: bool
    entry_timeout: float
    read_ahead_kb: int
    io_threads: int
    busy_poll_us: int
    inode_fds: int
    max_tasks: int
    scan_interval: float
    trash_retention: float


@dataclass(frozen=True)
class HostConfig:
    name: str
    backend: str
    path: str
    layout: str
    servers: tuple[str, ...]
    op_timeout: float
    options: dict[str, Any] = field(default_factory=dict)
    allow_privileged: bool = False


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig
    store_url: str
    hosts: dict[str, HostConfig]
    store_node: str = ""  # [store] node ("": the host name)
    lease_floor: int = 1 << 20
    lease_ttl: float = 30.0


def _plain(value: Any) -> Any:
    """tomlkit items -> plain Python values."""
    return value.unwrap() if hasattr(value, "unwrap") else value


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    if isinstance(kind, tuple):
        return "a number"
    return names.get(kind, kind.__name__)


def _read_section(
    path: str, section: str, table: Any, options: tuple[Option, ...]
) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {section}: must be a table")
    known = {o.key for o in options}
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{path}: {section}.{key}: unknown key (known: {', '.join(sorted(known))})"
            )
    values: dict[str, Any] = {}
    for opt in options:
        name = f"{section}.{opt.key}"
        if opt.key not in table:
            if opt.default is None:
                raise ConfigError(f"{path}: {name}: missing (required)")
            values[opt.key] = opt.default
            continue
        value = _plain(table[opt.key])
        kind = opt.kind
        # bool is an int subclass: never accept true for a number or 1 for a bool
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ConfigError(f"{path}: {name}: must be {_type_name(kind)}, not {value!r}")
        if opt.item is not None:
            elements = cast(list[Any], value)  # a list: checked just above
            for element in elements:
                if isinstance(element, bool) or not isinstance(element, opt.item):
                    raise ConfigError(
                        f"{path}: {name}: every element must be "
                        f"{_type_name(opt.item)}, not {element!r}"
                    )
        if opt.check is not None and (problem := opt.check(value)) is not None:
            raise ConfigError(f"{path}: {name}: {problem}")
        values[opt.key] = value
    return values


def parse(text: str, path: str = "<config>", check_paths: bool = True) -> Config:
    """Validate configuration text; raise ConfigError with one line on any problem."""
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key in doc:
        if key not in ("daemon", "store", "hosts"):
            raise ConfigError(f"{path}: {key}: unknown section (known: daemon, store, hosts)")
    daemon = _read_section(path, "daemon", doc.get("daemon", {}), DAEMON_OPTIONS)
    daemon["admin_uids"] = tuple(daemon["admin_uids"])
    daemon["confined_cgroups"] = tuple(daemon["confined_cgroups"])
    daemon["entry_timeout"] = float(daemon["entry_timeout"])
    daemon["upload_expiry"] = float(daemon["upload_expiry"])
    store = _read_section(path, "store", doc.get("store", {}), STORE_OPTIONS)
    store_url = store["url"] or f"sqlite://{daemon['state_dir']}/state.db"

    hosts_table = doc.get("hosts", {})
    if not isinstance(hosts_table, dict):
        raise ConfigError(f"{path}: hosts: must be a table of [hosts.<name>] sections")
    hosts: dict[str, HostConfig] = {}
    native_paths: dict[str, str] = {}
    for name, table in hosts_table.items():
        if not HOST_NAME_RE.match(name):
            raise ConfigError(
                f"{path}: hosts.{name}: host name must be 1-63 letters, digits, "
                f"'.', '_' or '-', starting with a letter or digit"
            )
        values = _read_section(path, f"hosts.{name}", table, HOST_OPTIONS)
        # without check_paths (the CLI, reading the file for the socket) nothing on the host
        # paths is touched: one may be a hung NFS mount
        real = os.path.realpath(values["path"]) if check_paths else os.path.normpath(values["path"])
        if check_paths and not os.path.isdir(real):
            raise ConfigError(
                f"{path}: hosts.{name}.path: {values['path']} is not an existing directory"
            )
        if real in native_paths:
            raise ConfigError(
                f"{path}: hosts.{name}.path: same directory as hosts.{native_paths[real]}"
            )
        native_paths[real] = name
        hosts[name] = HostConfig(
            name=name,
            backend=values["backend"],
            path=values["path"],
            layout=values["layout"],
            servers=tuple(values["servers"]),
            op_timeout=float(values["op_timeout"]),
            options=dict(values["options"]),
            allow_privileged=values["allow_privileged"],
        )
    return Config(
        path=path,
        daemon=DaemonConfig(**daemon),
        store_url=store_url,
        hosts=hosts,
        store_node=store["node"],
        lease_floor=parse_size(store["lease_floor"]),
        lease_ttl=float(store["lease_ttl"]),
    )


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("VFUSEFS_CONFIG") or DEFAULT_CONFIG_PATH


def load(explicit: str | None = None, check_paths: bool = True) -> Config:
    path = config_path(explicit)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (use --config PATH or VFUSEFS_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    # tomlkit rejects duplicate tables ([hosts.a] twice) with a ParseError, reported above
    return parse(text, path, check_paths)


def options_json() -> list[dict[str, Any]]:
    """The option reference for scripts (`vfusefs config-doc --json`)."""
    return [
        {
            "key": f"{section}.{o.key}",
            "type": _type_name(o.kind),
            "default": o.default,
            "reload": o.reloadable,
            "doc": o.doc,
        }
        for section, options in (
            ("daemon", DAEMON_OPTIONS),
            ("store", STORE_OPTIONS),
            ("hosts.NAME", HOST_OPTIONS),
        )
        for o in options
    ]


def options_markdown() -> str:
    """The option reference, generated from the declarations above."""
    lines = ["| key | type | default | reload | meaning |", "|---|---|---|---|---|"]
    for section, options in (
        ("daemon", DAEMON_OPTIONS),
        ("store", STORE_OPTIONS),
        ("hosts.NAME", HOST_OPTIONS),
    ):
        for o in options:
            default = "required" if o.default is None else repr(o.default)
            lines.append(
                f"| `{section}.{o.key}` | {_type_name(o.kind)} | `{default}` | "
                f"{'yes' if o.reloadable else 'no'} | {o.doc} |"
            )
    return "\n".join(lines) + "\n"
