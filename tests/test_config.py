"""Configuration: every bad file stops start-up with one line naming file, key and problem."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vfusefs import backends, config

from conftest import VFUSEFS


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_full_example(tmp_path: Path) -> None:
    (tmp_path / "n").mkdir()
    cfg = config.load(str(write(tmp_path, f'[hosts.local]\npath = "{tmp_path}/n"\n')))
    assert cfg.daemon.mountpoint == "/mnt/vfroot" and cfg.daemon.admin_uids == (0,)
    assert cfg.store_url == "sqlite:///var/lib/vfusefs/state.db"
    assert cfg.hosts["local"].backend == "vfs" and cfg.hosts["local"].layout == "flat"
    assert cfg.hosts["local"].op_timeout == 30.0


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ('[daemon]\nmountpiont = "/x"\n', "daemon.mountpiont", "unknown key"),
        ('[daemon]\nadmin_uids = "0"\n', "daemon.admin_uids", "must be a list"),
        ("[daemon]\nadmin_uids = [true]\n", "daemon.admin_uids", "every element"),
        ('[daemon]\nmountpoint = "relative"\n', "daemon.mountpoint", "absolute path"),
        ('[daemon]\nlog_format = "xml"\n', "daemon.log_format", "must be one of"),
        ('[daemon]\nmetrics_listen = "nope"\n', "daemon.metrics_listen", "HOST:PORT"),
        ('[hosts.a]\nlayout = "flat"\n', "hosts.a.path", "missing"),
        ('[hosts.a]\npath = "/nonexistent/dir"\n', "hosts.a.path", "not an existing directory"),
        ('[hosts.a]\npath = "@N@"\n[hosts.b]\npath = "@N@"\n', "hosts.b.path", "same directory"),
        ('[hosts.a]\npath = "@N@"\n[hosts.a]\npath = "@N@"\n', "not valid TOML", ""),
        ('[hosts.a]\npath = "@N@"\nop_timeout = "5"\n', "hosts.a.op_timeout", "must be a number"),
        ('[hosts.a]\npath = "@N@"\nlayout = "deep"\n', "hosts.a.layout", "must be one of"),
        ('[hosts."bad/name"]\npath = "@N@"\n', "hosts.bad/name", "host name"),
        ('[store]\nurl = "mysql://x"\n', "store.url", "sqlite"),
        ("[extra]\nx = 1\n", "extra", "unknown section"),
        ("this is not toml", "not valid TOML", ""),
    ],
)
def test_bad_config_one_line(tmp_path: Path, text: str, key: str, problem: str) -> None:
    (tmp_path / "n").mkdir()
    path = write(tmp_path, text.replace("@N@", str(tmp_path / "n")))
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(path))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(path)) and key in msg and problem in msg
    # the daemon refuses to start the same way: exit 2, one line, no traceback
    r = subprocess.run([VFUSEFS, "serve", "--config", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and key in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_file_and_unknown_backend(tmp_path: Path) -> None:
    r = subprocess.run(
        [VFUSEFS, "serve", "--config", str(tmp_path / "none.toml")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "file not found" in r.stderr and r.stderr.count("\n") == 1
    (tmp_path / "n").mkdir()
    p = write(
        tmp_path,
        f'[daemon]\nmountpoint = "{tmp_path}/m"\nstate_dir = "{tmp_path}/s"\n'
        f'control_socket = "{tmp_path}/s/c.sock"\nmetrics_listen = ""\n'
        f'[hosts.a]\npath = "{tmp_path}/n"\nbackend = "netapp9000"\n',
    )
    for cmd in ("serve", "check-config"):  # both must agree
        r = subprocess.run([VFUSEFS, cmd, "--config", str(p)], capture_output=True, text=True)
        assert r.returncode == 2 and "hosts.a.backend" in r.stderr and "netapp9000" in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    p = write(
        tmp_path, p.read_text().replace('backend = "netapp9000"', "options = { turbo = true }")
    )
    for cmd in ("serve", "check-config"):
        r = subprocess.run([VFUSEFS, cmd, "--config", str(p)], capture_output=True, text=True)
        assert (
            r.returncode == 2 and "hosts.a.options.turbo" in r.stderr and r.stderr.count("\n") == 1
        )
    p = write(tmp_path, p.read_text().replace("options = { turbo = true }", ""))
    r = subprocess.run(
        [VFUSEFS, "check-config", "--config", str(p)], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.endswith(": ok (1 host(s))\n"), r.stderr


def test_check_config_and_reference() -> None:
    out = subprocess.run([VFUSEFS, "config-doc"], capture_output=True, text=True, check=True).stdout
    for opt in config.DAEMON_OPTIONS + config.HOST_OPTIONS:
        assert f".{opt.key}`" in out


def test_docs_config_md_is_current() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    assert config.options_markdown() in doc, (
        "docs/config.md is stale: regenerate with vfusefs config-doc"
    )
    assert backends.options_markdown() in doc, (
        "docs/config.md is stale: regenerate with vfusefs config-doc"
    )


def test_the_cli_loads_neither_pyfuse3_nor_the_libfuse_shim() -> None:
    """Only `serve` needs them; every other command is plain Python (and starts faster)."""
    script = (
        "import sys, vfusefs.cli\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('pyfuse3' in sys.modules, '_fuseshim' in maps, 'libfuse3' in maps)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_the_man_page_covers_every_command() -> None:
    page = subprocess.run([VFUSEFS, "man"], capture_output=True, text=True, check=True).stdout
    for command in (
        "serve",
        "status",
        "vfolder create",
        "vfolder restore",
        "vfolder trash",
        "vfolder rm",
        "grant",
        "revoke",
        "scope",
        "doctor",
        "check-config",
    ):
        assert f"\\fBvfusefs {command}\\fR" in page, command
    assert "--yes" in page and "EXIT STATUS" in page
    if shutil.which("groff"):
        r = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True, text=True
        )
        assert r.returncode == 0 and r.stderr == "", r.stderr  # no roff warnings
