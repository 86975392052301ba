"""Data integrity in the spirit of fsx: random pwrite/truncate/read/mmap on one file.

Every operation is applied to the file through the mount and to an in-memory model; each read
(by pread and through a shared mapping) must equal the model, and so must the native file at
the end.  Seeded, so a failure prints the seed to replay with FSX_SEED.
"""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from conftest import Daemon

pytestmark = pytest.mark.mount

MAX_LEN = 256 * 1024


def test_fsx(any_daemon: Daemon) -> None:
    daemon = any_daemon
    seed = int(os.environ.get("FSX_SEED", random.randrange(2**32)))
    ops = int(os.environ.get("FSX_OPS", 30000))
    rng = random.Random(seed)
    vf = daemon.vfolder()
    native = Path(daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["native_path"])
    model = bytearray()
    fd = os.open(vf / "fsx.bin", os.O_RDWR | os.O_CREAT, 0o644)
    counts: dict[str, int] = {}
    try:
        for step in range(ops):
            kind = rng.choices(
                ["write", "read", "truncate", "mapread", "mapwrite", "fsync"], [40, 30, 10, 8, 8, 1]
            )[0]
            counts[kind] = counts.get(kind, 0) + 1
            where = f"seed={seed} step={step} op={kind}"
            if kind == "write":
                off = rng.randrange(MAX_LEN)
                n = rng.randrange(1, 64 * 1024 if rng.random() < 0.1 else 4096)
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n, where
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + n] = data
            elif kind == "read":
                off = rng.randrange(MAX_LEN + 1024)
                n = rng.randrange(1, 32 * 1024)
                assert os.pread(fd, n, off) == bytes(model[off : off + n]), where
            elif kind == "truncate":
                size = rng.randrange(MAX_LEN)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
            elif kind in ("mapread", "mapwrite") and len(model) > 0:
                assert os.fstat(fd).st_size == len(model), where
                with mmap.mmap(fd, len(model), mmap.MAP_SHARED) as m:
                    off = rng.randrange(len(model))
                    n = rng.randrange(1, min(8192, len(model) - off) + 1)
                    if kind == "mapread":
                        assert m[off : off + n] == bytes(model[off : off + n]), where
                    else:
                        data = rng.randbytes(n)
                        m[off : off + n] = data
                        model[off : off + n] = data
                        m.flush()
            elif kind == "fsync":
                os.fsync(fd)
            if step % 1000 == 0:
                assert os.fstat(fd).st_size == len(model), where
    finally:
        os.close(fd)
    assert (vf / "fsx.bin").read_bytes() == bytes(model), f"seed={seed}"
    assert (native / "fsx.bin").read_bytes() == bytes(model), f"seed={seed}"
    assert counts.get("write", 0) > ops // 3
