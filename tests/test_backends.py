"""The Backend contract (vfusefs.backends.Backend), run against every backend that can run here.

Each entry of BACKENDS makes a host config for one backend on storage this machine has; the
tests hold every backend to the same promises: layouts, create/adopt/undo, delete into the
trash and purge, declared options, and capabilities that match the methods (a backend that
says it has no native quota refuses set_native_quota with NotSupported, one that says it has
one must not).  vfs runs on a plain directory, btrfs on a real btrfs loop mount with quotas,
cephfs on a real single-node Ceph cluster's CephFS (ceph-fuse), xfs on XFS with project
quota inside the test VM (tests/test_vm_storage.py); later backends add their entry here.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vfusefs.backends import (
    Backend,
    BackendError,
    NotSupported,
    installed,
    load_backend,
    options_markdown,
)
from vfusefs.config import ConfigError, HostConfig
from vfusefs.native import mounts


def host_config(path: Path, backend: str = "vfs", **kw: Any) -> HostConfig:
    fields = {
        "name": "h",
        "backend": backend,
        "path": str(path),
        "layout": "flat",
        "servers": (),
        "op_timeout": 30.0,
        "allow_privileged": False,
        "options": {},
        **kw,
    }
    return HostConfig(**fields)


BACKENDS: dict[str, Callable[[Path], HostConfig]] = {
    "vfs": lambda tmp: host_config(tmp),
    "btrfs": lambda tmp: host_config(tmp, "btrfs"),
    "cephfs": lambda tmp: host_config(tmp, "cephfs"),
    "xfs": lambda tmp: host_config(tmp, "xfs"),
}
# backends whose path must be on their filesystem: its fixture (xfs: only in the test VM)
ON_STORAGE = {"btrfs": "btrfs_fs", "cephfs": "ceph_fs", "xfs": "xfs_fs"}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    path = tmp_path
    if request.param in ON_STORAGE:  # a fresh directory on the real filesystem (a loop mount)
        fs = request.getfixturevalue(ON_STORAGE[request.param])
        path = fs.dir(f"host-{uuid.uuid4().hex[:8]}")
    return load_backend(BACKENDS[request.param](path))


def test_every_installed_backend_is_tested() -> None:
    assert set(installed()) <= set(BACKENDS)


def test_layouts(backend: Backend) -> None:
    vfid = uuid.UUID("6f1c2a3e-0000-4000-8000-00000000d3e0")
    scope = "user:0b8e2f46-7b1c-4a55-9c3e-2d1f0a9b8c7d"
    root = backend.host.path
    assert backend.native_path(vfid, "") == f"{root}/{vfid}"
    deep = load_backend(dataclasses.replace(backend.host, layout="backendai"))
    assert (
        deep.native_path(vfid, scope)
        == f"{root}/0b8e2f467b1c4a559c3e2d1f0a9b8c7d/6f/1c/2a3e00004000800000000000d3e0"
    )
    with pytest.raises(BackendError, match="needs a quota scope"):
        deep.native_path(vfid, "")


def test_create_adopt_and_undo(backend: Backend) -> None:
    path = backend.native_path(uuid.uuid4(), "")
    assert backend.create_vfolder(path) is True and os.path.isdir(path)
    with pytest.raises(BackendError, match="already exists"):
        backend.create_vfolder(path)
    assert backend.create_vfolder(path, adopt=True) is False  # adopted: not made here
    backend.remove_new_vfolder(path)
    assert not os.path.exists(path)
    backend.remove_new_vfolder(path)  # already gone: quiet
    Path(path).write_text("a file, not a directory")
    with pytest.raises(BackendError, match="not a directory"):
        backend.create_vfolder(path, adopt=True)


def test_delete_goes_to_the_trash_then_purge(backend: Backend) -> None:
    vfid = uuid.uuid4()
    path = backend.native_path(vfid, "")
    backend.create_vfolder(path)
    Path(path, "data").write_bytes(b"x" * 10000)
    moved = backend.delete_vfolder(path, str(vfid))
    assert moved and not os.path.exists(path) and Path(moved, "data").read_bytes() == b"x" * 10000
    assert backend.find_in_trash(str(vfid)) == moved
    assert backend.find_in_trash(str(uuid.uuid4())) is None
    backend.purge(moved)
    assert not os.path.exists(moved) and backend.find_in_trash(str(vfid)) is None
    assert backend.delete_vfolder(path, str(vfid)) == ""  # nothing there: nothing moved


def test_capabilities_match_the_methods(backend: Backend) -> None:
    caps = backend.capabilities
    path = backend.native_path(uuid.uuid4(), "")
    backend.create_vfolder(path)
    calls = {
        "native_quota": lambda: backend.set_native_quota(path, 1 << 30, 1000),
        "fast_usage": lambda: backend.native_usage(path),
        "clone": lambda: backend.clone(path, path + ".clone"),
        "snapshots": lambda: backend.snapshot(path, "s1"),
    }
    for cap, call in calls.items():
        if getattr(caps, cap):
            call()  # must work
        else:
            with pytest.raises(NotSupported):
                call()
    desc = backend.describe()
    assert (
        desc["backend"] == backend.name
        and desc["capabilities"]["native_quota"] == caps.native_quota
    )


def test_options_are_declared_once(backend: Backend, tmp_path: Path) -> None:
    hc = BACKENDS[backend.name](tmp_path)
    bad = host_config(Path(hc.path), backend.name, options={**hc.options, "turbo": True})
    with pytest.raises(ConfigError, match=r"hosts\.h\.options\.turbo: unknown option"):
        load_backend(bad)
    for opt in type(backend).options:
        assert opt.doc and opt.kind in (str, int, float, bool, list)
        if opt.default is not None:
            assert backend.config[opt.key] == hc.options.get(opt.key, opt.default)
    assert f"| `{backend.name}` |" in options_markdown()


def test_probe_and_health_targets(backend: Backend, tmp_path: Path) -> None:
    assert backend.probe() == "ok"
    gone = type(backend)(host_config(tmp_path / "missing", backend.name))
    assert gone.probe() == "down"
    given = type(backend)(host_config(tmp_path, backend.name, servers=("10.0.0.5",)))
    assert given.health_targets() == ["10.0.0.5"]
    assert backend.health_targets() == []  # local storage here: no server to watch


def test_unknown_backend_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'nfsx'"):
        load_backend(host_config(tmp_path, "nfsx"))


@pytest.mark.parametrize(
    "source, server",
    [
        ("10.0.0.5:/export", "10.0.0.5"),
        ("nas.example:/vol/a", "nas.example"),
        ("[fd00::5]:/x", "fd00::5"),
        ("fd00::5:/x", "fd00::5"),
        ("mon1:6789,mon2:6789:/volumes", "mon1"),
        ("10.0.0.1@tcp:/lustre", "10.0.0.1"),
        ("/dev/sda1", ""),
        ("tmpfs", ""),
        ("admin@fsid.cephfs=/", ""),
    ],
)
def test_the_server_of_a_mount_source(source: str, server: str) -> None:
    assert mounts.source_server(source) == server


def test_the_mount_table_names_sources() -> None:
    m = mounts.mount_of("/proc/self")
    assert m is not None and m.fstype == "proc" and m.source == "proc"


def test_inventory_finds_vfolders_by_layout(backend: Backend) -> None:
    flat = backend.native_path(uuid.uuid4(), "")
    backend.create_vfolder(flat)
    Path(backend.host.path, "not-a-vfolder").mkdir()
    found, unfinished = backend.inventory()
    assert found == [flat] and unfinished == []
    deep = load_backend(dataclasses.replace(backend.host, layout="backendai"))
    path = deep.native_path(uuid.uuid4(), "project:0b8e2f46-7b1c-4a55-9c3e-2d1f0a9b8c7d")
    deep.create_vfolder(path)
    assert deep.inventory()[0] == [path]  # the flat one is not where this layout looks


def test_xfs_backend_off_xfs_is_one_clear_line(tmp_path: Path) -> None:
    """The xfs backend on a host path that is not XFS: a create fails saying so, and leaves
    no directory behind (its real work is tested on XFS in the VM: tests/guest_xfs.py)."""
    backend = load_backend(host_config(tmp_path, "xfs"))
    path = backend.native_path(uuid.uuid4(), "")
    with pytest.raises(BackendError, match="not XFS|not on XFS"):
        backend.create_vfolder(path)
    assert not os.path.exists(path)
