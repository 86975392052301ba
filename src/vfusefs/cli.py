"""The `vfusefs` command: the daemon (`serve`) and a client of its control API for everything else.

Every command prints a table for people or `--json` for scripts, and on any error prints one
line starting with `vfusefs:` to stderr and exits non-zero (2 for usage errors, 1 otherwise).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import quote

import click
import httpx
from rich.console import Console
from rich.table import Table

from vfusefs import __version__
from vfusefs import config as config_mod

console = Console(width=None if sys.stdout.isatty() else 250)


class CliError(click.ClickException):
    def show(self, file: Any = None) -> None:
        click.echo(f"vfusefs: {self.message}", err=True)


class CliUsageError(CliError):
    exit_code = 2  # a bad argument, flag or value


def die(message: str, usage: bool = False) -> NoReturn:
    raise (CliUsageError if usage else CliError)(message)


# what to do about an API error, said in CLI terms (the API's own hint names API parameters)
HINTS = {
    "in_use": "add --force to delete anyway",
    "native_exists": "add --adopt to serve what it holds",
    "not_in_trash": "see `vfusefs vfolder trash HOST`",
}


class Client:
    """The control API over the daemon's unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=socket_path), base_url="http://vfusefs", timeout=60.0
        )

    def call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        try:
            r = self.http.request(method, "/v1" + path, json=body, params=params)
        except (httpx.ConnectError, OSError) as exc:
            if "Permission denied" in str(exc) or isinstance(exc, PermissionError):
                die(f"permission denied on {self.socket_path} (the control socket is root only)")
            die(f"cannot reach the daemon at {self.socket_path} (is `vfusefs serve` running?)")
        except httpx.HTTPError as exc:
            die(f"control API request failed: {exc}")
        try:
            data = r.json()
        except ValueError:
            die(f"daemon answered {r.status_code} without JSON")
        if r.status_code >= 400:
            msg = data.get("message") if isinstance(data, dict) else None
            code = data.get("error") if isinstance(data, dict) else None
            msg = msg or f"daemon answered {r.status_code}"
            if code in HINTS:
                msg = f"{msg.partition('; ')[0]}; {HINTS[code]}"
            die(msg, usage=r.status_code == 400)
        return data


def _client(ctx: click.Context) -> Client:
    obj = ctx.find_root().obj or {}
    if obj.get("socket"):
        return Client(obj["socket"])
    path = config_mod.config_path(obj.get("config"))
    try:
        cfg = config_mod.load(obj.get("config"), check_paths=False)
        return Client(cfg.daemon.control_socket)
    except config_mod.ConfigError as exc:
        if obj.get("config") or "file not found" not in str(exc):
            die(str(exc))
        del path
        return Client("/run/vfusefs/control.sock")


def vf_path(host: str, vfid: str, *rest: str) -> str:
    """The control API path of a vfolder (and of something under it), each part URL-quoted."""
    return "/".join(
        [
            "/hosts",
            quote(host, safe=""),
            "vfolders",
            quote(vfid, safe=""),
            *(quote(p, safe="") for p in rest),
        ]
    )


Column = tuple[str, str, str]  # key, title, kind ("": as is, "size", "limit", "count_limit")


def emit(data: Any, as_json: bool, columns: list[Column] | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    rows = data if isinstance(data, list) else [data]
    if columns is None:
        columns = [(k, k, "") for k in (rows[0] if rows else {})]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for _, title, _ in columns:
        table.add_column(title.upper())
    for row in rows:
        table.add_row(*[_cell(row.get(key), kind) for key, _, kind in columns])
    console.print(table)


def human(n: int) -> str:
    """Bytes as `ls -h` and `df -h` print them: 512, 4.0K, 393M, 1.5G."""
    value, unit = float(n), ""
    for unit in ("", "K", "M", "G", "T", "P", "E"):
        if abs(value) < 1024 or unit == "E":
            break
        value /= 1024
    if not unit:
        return str(n)
    return f"{value:.1f}{unit}" if abs(value) < 10 else f"{value:.0f}{unit}"


def _cell(value: Any, kind: str = "") -> str:
    if value is None or kind in ("limit", "count_limit") and value == 0:
        return "-"  # unset, or unlimited
    if kind in ("size", "limit") and isinstance(value, int):
        return human(value)
    if isinstance(value, list):
        return (
            ",".join(
                f"{g['principal']}={g['mode']}" if isinstance(g, dict) else str(g) for g in value
            )
            or "-"
        )
    if isinstance(value, float):
        return f"{value:.0f}"
    return str(value)


VFOLDER_COLUMNS: list[Column] = [
    ("host", "host", ""),
    ("id", "id", ""),
    ("scope", "scope", ""),
    ("quota_bytes", "quota", "limit"),
    ("usage_bytes", "used", "size"),
    ("grants", "grants", ""),
    ("path", "path", ""),
]
QUOTA_COLUMNS: list[Column] = [
    ("host", "host", ""),
    ("id", "id", ""),
    ("quota_bytes", "quota bytes", "limit"),
    ("usage_bytes", "used bytes", "size"),
    ("quota_inodes", "quota inodes", "count_limit"),
    ("usage_inodes", "used inodes", ""),
]


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--json on a command; `vfusefs --json COMMAND` means the same."""

    @functools.wraps(fn)
    def command(*args: Any, as_json: bool, **kw: Any) -> Any:
        root = click.get_current_context().find_root().obj or {}
        return fn(*args, as_json=as_json or bool(root.get("json")), **kw)

    return click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="config file (default $VFUSEFS_CONFIG or /etc/vfusefs/vfusefs.toml)",
)
@click.option(
    "--socket", "socket_path", metavar="PATH", help="control socket (default from config)"
)
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts (every command)")
@click.version_option(__version__, prog_name="vfusefs")
@click.pass_context
def cli(
    ctx: click.Context, config_path: str | None, socket_path: str | None, as_json: bool
) -> None:
    """vfusefs: virtual folders over shared storage, with per-caller access and quota.

    Shell completion: eval "$(_VFUSEFS_COMPLETE=bash_source vfusefs)" (zsh_source, fish_source).
    """
    ctx.obj = {"config": config_path, "socket": socket_path, "json": as_json}


@cli.command()
@click.option("--config", "config_path", metavar="PATH", help="config file")
@click.pass_context
def serve(ctx: click.Context, config_path: str | None) -> None:
    """Mount the tree and serve in the foreground until SIGTERM/SIGINT."""
    from vfusefs.runtime import fuseshim

    fuseshim.load()  # before pyfuse3 is imported: statfs learns its inode (shim/fuseshim.c)
    from vfusefs.service.daemon import serve as run_daemon

    sys.exit(run_daemon(config_path or ctx.find_root().obj.get("config")))


@cli.command("check-config")
@click.option("--config", "config_path", metavar="PATH", help="config file")
@json_option
@click.pass_context
def check_config(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Validate the configuration file and exit (0 if good, 2 if not)."""
    try:
        cfg = config_mod.load(config_path or ctx.find_root().obj.get("config"))
        from vfusefs.backends import load_backend

        for hc in cfg.hosts.values():  # what serve checks: the backend exists, its options fit
            load_backend(hc)
        d = cfg.daemon  # ... and the file API's key
        if d.files_listen and not d.files_secret_file:
            raise config_mod.ConfigError(
                f"{cfg.path}: daemon.files_listen is set but daemon.files_secret_file is not"
            )
        if d.files_secret_file:
            from vfusefs.service.tokens import BadKey, read_key

            try:
                read_key(d.files_secret_file)
            except BadKey as exc:
                raise config_mod.ConfigError(f"{cfg.path}: {exc}") from None
    except config_mod.ConfigError as exc:
        click.echo(f"vfusefs: {exc}", err=True)
        sys.exit(2)
    if as_json:
        return emit({"config": cfg.path, "ok": True, "hosts": sorted(cfg.hosts)}, True)
    click.echo(f"{cfg.path}: ok ({len(cfg.hosts)} host(s))")


@cli.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The daemon's state: mountpoint, hosts and their health."""
    data = _client(ctx).call("GET", "/status")
    if as_json:
        return emit(data, True)
    click.echo(
        f"vfusefs {data['version']}  mounted at {data['mountpoint']}  ({data['vfolders']} vfolders)"
    )
    store = data.get("store") or {}
    if store:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(store["since"]))
        state = "connected" if store["connected"] else "disconnected"
        click.echo(f"store {store['kind']}: {state} since {since} (node {store['node']})")
    if data.get("files_listen"):
        click.echo(f"file API (files over HTTP) on {data['files_listen']}")
    emit([{"host": h, "health": s} for h, s in data["hosts"].items()], False)
    if store.get("nodes") is not None:
        click.echo("")
        emit(
            [
                {
                    "node": n["node"] + (" (this node)" if n["node"] == store["node"] else ""),
                    "state": "alive" if n["alive"] else "gone",
                    "seen": f"{n['seen_ago']:.0f}s ago",
                    "mountpoint": n["mountpoint"] or "-",
                    "leases": len(n["leases"]),
                    "leased": human(sum(max(0, v["bytes"]) for v in n["leases"].values())),
                }
                for n in store["nodes"]
            ],
            False,
        )
    elif "nodes" in store:
        click.echo("nodes sharing the store: unknown (the store did not answer)")


@cli.command()
@json_option
@click.pass_context
def hosts(ctx: click.Context, as_json: bool) -> None:
    """List the configured storage hosts."""
    emit(
        _client(ctx).call("GET", "/hosts"),
        as_json,
        [
            ("name", "host", ""),
            ("backend", "backend", ""),
            ("layout", "layout", ""),
            ("health", "health", ""),
            ("vfolders", "vfolders", ""),
            ("fs_type", "fs", ""),
            ("path", "native path", ""),
        ],
    )


@cli.group()
def vfolder() -> None:
    """Create, list, inspect and delete vfolders."""


def _grants(values: tuple[str, ...]) -> list[dict[str, str]]:
    out = []
    for v in values:
        principal, sep, mode = v.rpartition("=")
        if not sep or not principal:
            die(f"bad --grant {v!r}: use PRINCIPAL=MODE, e.g. uid:1000=rw", usage=True)
        out.append({"principal": principal, "mode": mode})
    return out


@vfolder.command("create")
@click.argument("host")
@click.option("--id", "vfid", help="UUID to use (default: a new random one)")
@click.option("--scope", help="quota scope, user:<uuid> or project:<uuid>")
@click.option(
    "--grant",
    "grants",
    multiple=True,
    metavar="PRINCIPAL=MODE",
    help="grant at creation, repeatable (uid:1000=rw, cgroup:/docker/x=rwd, '*=ro')",
)
@click.option("--adopt", is_flag=True, help="use an existing native directory")
@click.option("--owner", metavar="UID:GID", help="owner of the vfolder's root (default 0:0)")
@click.option("--mode", metavar="OCTAL", help="permissions of the vfolder's root (default 0755)")
@json_option
@click.pass_context
def vfolder_create(
    ctx: click.Context,
    host: str,
    vfid: str | None,
    scope: str | None,
    grants: tuple[str, ...],
    adopt: bool,
    owner: str | None,
    mode: str | None,
    as_json: bool,
) -> None:
    """Create a vfolder on HOST."""
    body: dict[str, Any] = {"grants": _grants(grants)}
    if owner is not None:
        body["owner"] = owner
    if mode is not None:
        body["mode"] = mode
    if vfid:
        body["id"] = vfid
    if scope:
        body["scope"] = scope
    if adopt:
        body["adopt"] = True
    emit(
        _client(ctx).call("POST", f"/hosts/{quote(host, safe='')}/vfolders", body),
        as_json,
        VFOLDER_COLUMNS,
    )


@vfolder.command("ls")
@click.argument("host", required=False)
@json_option
@click.pass_context
def vfolder_ls(ctx: click.Context, host: str | None, as_json: bool) -> None:
    """List vfolders (of HOST, or of every host)."""
    client = _client(ctx)
    names = [host] if host else [h["name"] for h in client.call("GET", "/hosts")]
    rows = [
        vf for name in names for vf in client.call("GET", f"/hosts/{quote(name, safe='')}/vfolders")
    ]
    emit(rows, as_json, VFOLDER_COLUMNS)


@vfolder.command("info")
@click.argument("host")
@click.argument("vfid")
@json_option
@click.pass_context
def vfolder_info(ctx: click.Context, host: str, vfid: str, as_json: bool) -> None:
    """Show one vfolder."""
    data = _client(ctx).call("GET", vf_path(host, vfid))
    if as_json:
        return emit(data, True)
    kinds = {"quota_bytes": "limit", "usage_bytes": "size", "quota_inodes": "count_limit"}
    for key in (
        "id",
        "host",
        "path",
        "native_path",
        "scope",
        "quota_bytes",
        "quota_inodes",
        "usage_bytes",
        "usage_inodes",
        "grants",
        "open_handles",
    ):
        value, kind = data.get(key), kinds.get(key, "")
        shown = _cell(value, kind)
        if kind in ("size", "limit") and isinstance(value, int) and value >= 1024:
            shown += f" ({value} bytes)"
        click.echo(f"{key:14} {shown}")


@vfolder.command("rm")
@click.argument("host")
@click.argument("vfid")
@click.option("--force", is_flag=True, help="delete even if files are open in it")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@json_option
@click.pass_context
def vfolder_rm(
    ctx: click.Context, host: str, vfid: str, force: bool, yes: bool, as_json: bool
) -> None:
    """Delete a vfolder: its data goes to the host's trash, where `vfolder restore` can bring it
    back until trash_retention (default 24 h) has passed; then it is purged.  Asks first on a
    terminal unless --yes."""
    client = _client(ctx)
    if not yes and sys.stdin.isatty():
        info = client.call("GET", vf_path(host, vfid))
        click.confirm(
            f"delete vfolder {info['id']} on {host} ({human(info['usage_bytes'] or 0)}, "
            f"{info['usage_inodes']} inodes)?",
            abort=True,
            err=True,
        )
    data = client.call("DELETE", vf_path(host, vfid), params={"force": "1"} if force else None)
    if as_json:
        return emit(data, True)
    click.echo(
        f"deleted {data['deleted']} (in the trash: vfusefs vfolder restore {host} "
        f"{data['deleted']})"
        if data.get("trash")
        else f"deleted {data['deleted']}"
    )


@vfolder.command("restore")
@click.argument("host")
@click.argument("vfid")
@json_option
@click.pass_context
def vfolder_restore(ctx: click.Context, host: str, vfid: str, as_json: bool) -> None:
    """Bring a deleted vfolder back from HOST's trash, with its grants and limits."""
    data = _client(ctx).call("POST", vf_path(host, vfid, "restore"), {})
    emit(data, as_json, VFOLDER_COLUMNS)


@vfolder.command("trash")
@click.argument("host")
@json_option
@click.pass_context
def vfolder_trash(ctx: click.Context, host: str, as_json: bool) -> None:
    """List deleted vfolders in HOST's trash and when each is purged."""
    rows = _client(ctx).call("GET", f"/hosts/{quote(host, safe='')}/trash")
    if as_json:
        return emit(rows, True)
    for row in rows:
        for key in ("deleted", "purge_after"):
            row[key] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row[key]))
    emit(
        rows,
        False,
        [
            ("id", "id", ""),
            ("scope", "scope", ""),
            ("deleted", "deleted", ""),
            ("purge_after", "purged after", ""),
            ("restorable", "restorable", ""),
        ],
    )


@vfolder.command("clone")
@click.argument("host")
@click.argument("vfid")
@click.option("--id", "new_id", help="UUID of the new vfolder (default: a new random one)")
@click.option("--scope", help="its quota scope (default: the source's)")
@click.option("--bytes", "qbytes", metavar="SIZE", help="its byte limit (default: the source's)")
@click.option("--inodes", "qinodes", metavar="N", help="its inode limit (default: the source's)")
@click.option(
    "--grant", "grants", multiple=True, metavar="PRINCIPAL=MODE", help="its grants, repeatable "
    "(default: the source's)",
)  # fmt: skip
@click.option("--snapshot", metavar="NAME", help="clone this snapshot of the source")
@click.option("--no-wait", is_flag=True, help="start it and print the task id")
@json_option
@click.pass_context
def vfolder_clone(
    ctx: click.Context,
    host: str,
    vfid: str,
    new_id: str | None,
    scope: str | None,
    qbytes: str | None,
    qinodes: str | None,
    grants: tuple[str, ...],
    snapshot: str | None,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Clone a vfolder: a snapshot where the storage has them (btrfs: O(1)), else a copy that
    keeps modes, owners, times, xattrs, links and holes.  The new vfolder appears only once the
    clone is complete; a clone that fails leaves nothing behind."""
    body: dict[str, Any] = {}
    for key, value in (
        ("id", new_id),
        ("scope", scope),
        ("quota_bytes", qbytes),
        ("quota_inodes", qinodes),
        ("snapshot", snapshot),
    ):
        if value is not None:
            body[key] = value
    if grants:
        body["grants"] = _grants(grants)
    client = _client(ctx)
    task = client.call("POST", vf_path(host, vfid, "clone"), body)
    if no_wait:
        return emit(task, True) if as_json else click.echo(task["id"])
    task = wait_task(client, task, show=not as_json)
    if task["state"] == "failed":
        die(f"clone failed (nothing was left of it): {task['error']}")
    emit(task["vfolder"], as_json, VFOLDER_COLUMNS)


@vfolder.command("snapshot")
@click.argument("host")
@click.argument("vfid")
@click.argument("name", required=False)
@click.option("--rm", "remove", is_flag=True, help="delete snapshot NAME")
@json_option
@click.pass_context
def vfolder_snapshot(
    ctx: click.Context, host: str, vfid: str, name: str | None, remove: bool, as_json: bool
) -> None:
    """List a vfolder's snapshots, take snapshot NAME, or delete it (--rm); where the backend
    has snapshots (btrfs)."""
    client = _client(ctx)
    if name is None:
        if remove:
            die("name the snapshot to delete", usage=True)
        return emit(client.call("GET", vf_path(host, vfid, "snapshots")), as_json)
    if remove:
        return emit(client.call("DELETE", vf_path(host, vfid, "snapshots", name)), as_json)
    emit(client.call("POST", vf_path(host, vfid, "snapshots"), {"name": name}), as_json)


@vfolder.command("token")
@click.argument("host")
@click.argument("vfid")
@click.option(
    "--mode",
    type=click.Choice(["ro", "rw", "rwd"]),
    default="ro",
    show_default=True,
    help="what the token allows",
)
@click.option("--path", metavar="P", help="only this path inside the vfolder (and below it)")
@click.option("--ttl", default="1h", show_default=True, help="lifetime: seconds, 30m, 12h, 7d")
@json_option
@click.pass_context
def vfolder_token(
    ctx: click.Context, host: str, vfid: str, mode: str, path: str | None, ttl: str, as_json: bool
) -> None:
    """Print a token for the file API (files over HTTP) on a vfolder: send it as
    `Authorization: Bearer <token>`.  Needs daemon.files_secret_file."""
    body: dict[str, Any] = {"mode": mode, "ttl": ttl}
    if path:
        body["path"] = path
    made = _client(ctx).call("POST", vf_path(host, vfid, "tokens"), body)
    if as_json:
        return emit(made, True)
    click.echo(made["token"])


@vfolder.command("rescan")
@click.argument("host")
@click.argument("vfid")
@click.option("--no-wait", is_flag=True, help="start it and print the task id")
@json_option
@click.pass_context
def vfolder_rescan(ctx: click.Context, host: str, vfid: str, no_wait: bool, as_json: bool) -> None:
    """Recount a vfolder's usage from its native tree (corrects changes made behind vfusefs)."""
    client = _client(ctx)
    task = client.call("POST", vf_path(host, vfid, "rescan"), {})
    if not no_wait:
        task = wait_task(client, task, show=not as_json)
    if as_json:
        return emit(task, True)
    if task["state"] == "failed":
        die(f"rescan failed: {task['error']}")
    click.echo(
        f"{task['state']}: {task['done_files']} inodes, {task['done_bytes']} bytes"
        if not no_wait
        else task["id"]
    )


def wait_task(client: Client, task: dict[str, Any], show: bool) -> dict[str, Any]:
    """Poll a background task until it ends, with a progress line for people."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),  # a bar once the total is known (a clone's copy), a pulse before
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show,
        transient=True,
    ) as progress:
        bar = progress.add_task(f"{task['kind']} {task['vfolder']}", total=None)
        while task["state"] == "running":
            time.sleep(0.2)
            task = client.call("GET", f"/tasks/{quote(task['id'], safe='')}")
            vf = task["vfolder"]
            done, total = task["done_bytes"], task.get("total_bytes")
            progress.update(
                bar,
                description=f"{task['kind']} {vf['id'] if isinstance(vf, dict) else vf}: "
                f"{task['done_files']} files, {human(done)}"
                + (f" of {human(total)}" if total else ""),
                completed=done,
                total=total or None,
            )
    return task


@vfolder.command("quota")
@click.argument("host")
@click.argument("vfid")
@click.option("--bytes", "qbytes", metavar="SIZE", help="byte limit: 10G, 512M, 0 for none")
@click.option("--inodes", "qinodes", metavar="N", help="inode limit, 0 for none")
@json_option
@click.pass_context
def vfolder_quota(
    ctx: click.Context, host: str, vfid: str, qbytes: str | None, qinodes: str | None, as_json: bool
) -> None:
    """Show a vfolder's limits and usage, or set them."""
    data = show_or_set_limits(_client(ctx), vf_path(host, vfid), "PATCH", qbytes, qinodes)
    emit(data, as_json, QUOTA_COLUMNS)


def show_or_set_limits(
    client: Client, path: str, method: str, qbytes: str | None, qinodes: str | None
) -> Any:
    """GET path, or send the limits given (the daemon parses sizes like 10G)."""
    if qbytes is None and qinodes is None:
        return client.call("GET", path)
    body = {k: v for k, v in (("quota_bytes", qbytes), ("quota_inodes", qinodes)) if v is not None}
    return client.call(method, path, body)


@cli.command()
@click.argument("host")
@click.argument("vfid")
@click.argument("principal")
@click.argument("mode")
@json_option
@click.pass_context
def grant(
    ctx: click.Context, host: str, vfid: str, principal: str, mode: str, as_json: bool
) -> None:
    """Grant PRINCIPAL (cgroup:/path, uid:N, gid:N or '*') MODE (ro, rw, rwd) on a vfolder."""
    data = _client(ctx).call("PUT", vf_path(host, vfid, "grants", principal), {"mode": mode})
    emit(data, as_json, VFOLDER_COLUMNS)


@cli.command()
@click.argument("host")
@click.argument("vfid")
@click.argument("principal")
@json_option
@click.pass_context
def revoke(ctx: click.Context, host: str, vfid: str, principal: str, as_json: bool) -> None:
    """Remove PRINCIPAL's grant on a vfolder."""
    data = _client(ctx).call("DELETE", vf_path(host, vfid, "grants", principal))
    emit(data, as_json, VFOLDER_COLUMNS)


@cli.command()
@click.argument("scope_id", metavar="SCOPE")
@click.option("--bytes", "qbytes", metavar="SIZE", help="byte limit over all its vfolders")
@click.option("--inodes", "qinodes", metavar="N", help="inode limit over all its vfolders")
@json_option
@click.pass_context
def scope(
    ctx: click.Context, scope_id: str, qbytes: str | None, qinodes: str | None, as_json: bool
) -> None:
    """Show a quota scope's (user:<uuid> or project:<uuid>) limits and usage, or set them."""
    data = show_or_set_limits(
        _client(ctx), f"/scopes/{quote(scope_id, safe='')}", "PUT", qbytes, qinodes
    )
    emit(
        data, as_json, [("scope", "scope", "")] + QUOTA_COLUMNS[2:] + [("vfolders", "vfolders", "")]
    )


@cli.command()
@click.option("--config", "config_path", metavar="PATH", help="config file")
@json_option
@click.pass_context
def doctor(ctx: click.Context, config_path: str | None, as_json: bool) -> None:
    """Check this node for what the daemon needs and print what to fix (exit 1 if anything fails)."""
    from vfusefs.service.doctor import run_checks

    checks = run_checks(config_path or ctx.find_root().obj.get("config"))
    failed = sum(c.level == "fail" for c in checks)
    if as_json:
        click.echo(json.dumps([c.describe() for c in checks], indent=2))
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        for c in checks:
            click.echo(f"[{marks[c.level]}] {c.name}: {c.detail}")
            if c.fix:
                click.echo(f"       fix: {c.fix}")
        warned = sum(c.level == "warn" for c in checks)
        click.echo(f"{len(checks)} checks: {failed} failed, {warned} warning(s)")
    sys.exit(1 if failed else 0)


@cli.command("config-doc")
@json_option
def config_doc(as_json: bool) -> None:
    """Print the configuration reference (every option, its default and meaning; then every
    installed backend's capabilities and options)."""
    from vfusefs import backends

    if as_json:
        return emit(config_mod.options_json(), True)
    click.echo(config_mod.options_markdown(), nl=False)
    click.echo()
    click.echo(backends.options_markdown(), nl=False)


@cli.command("man", hidden=True)
@click.pass_context
def man_page(ctx: click.Context) -> None:
    """Print the manual page, generated from these commands (vfusefs man | man -l -)."""
    click.echo(manpage(ctx.find_root().command), nl=False)


def _roff(text: str) -> str:
    """Plain text as roff: backslashes and leading dots or quotes escaped."""
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def manpage(root: click.Command) -> str:
    """vfusefs(1) from the click commands: every command with its usage, help and options."""
    out = [
        f'.TH VFUSEFS 1 "" "vfusefs {__version__}" "User Commands"',
        ".SH NAME",
        "vfusefs \\- virtual folders over shared storage, with per-caller access and quota",
        ".SH SYNOPSIS",
        ".B vfusefs",
        "[\\fB\\-\\-config\\fR \\fIPATH\\fR] [\\fB\\-\\-socket\\fR \\fIPATH\\fR] "
        "[\\fB\\-\\-json\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        _roff(
            "vfusefs serve mounts every configured storage host's vfolders under one FUSE "
            "mount and enforces each caller's access mode and quota on every operation; the "
            "other commands are clients of its control API (the unix socket named in the "
            "configuration, root only)."
        ),
        ".SH COMMANDS",
    ]

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(click.Context(cmd)):
                sub = cmd.get_command(click.Context(cmd), name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name])
            return
        ctx = click.Context(cmd, info_name=" ".join(path))
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        out.extend([".TP", f"\\fBvfusefs {' '.join(path)}\\fR {_roff(usage)}"])
        out.append(_roff(inspect.cleandoc(cmd.help or "")))
        for param in cmd.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and record[0] not in ("-h, --help", "--help"):
                out.extend([".RS", ".TP", f"\\fB{_roff(record[0])}\\fR", _roff(record[1]), ".RE"])

    walk(root, [])
    out += [
        ".SH EXIT STATUS",
        "0 on success; 2 for a usage error (a bad argument, flag or value); 1 for anything "
        "else that failed. Errors are one line on standard error, starting with vfusefs:.",
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBVFUSEFS_CONFIG\\fR",
        "The configuration file when \\fB\\-\\-config\\fR is not given.",
        ".SH FILES",
        ".TP",
        "\\fI/etc/vfusefs/vfusefs.toml\\fR",
        "The default configuration (see docs/config.md, or vfusefs config-doc).",
        ".TP",
        "\\fI/run/vfusefs/control.sock\\fR",
        "The control API (default control_socket).",
        ".SH SEE ALSO",
        "\\fBmount.fuse3\\fR(8), \\fBsystemctl\\fR(1), \\fBgetfattr\\fR(1)",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("vfusefs: aborted", err=True)
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as exc:  # `vfusefs`, `vfusefs vfolder`: usage
        assert exc.ctx is not None
        click.echo(exc.ctx.get_help(), err=True)
        sys.exit(2)
    except click.UsageError as exc:
        click.echo(f"vfusefs: {exc.format_message()} (see --help)", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
