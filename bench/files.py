#!/usr/bin/env python3
"""Files over HTTP: a 1 GiB upload (tus, sent by curl) and download (curl) through the daemon's
file API, against curl downloading the same file from Python's `http.server` and against a
native `cp`, all on the same storage in the same run; then 1,000 uploads of 64 KiB each
(creation-with-upload, one request each, from one httpx client) per second, against writing
the same files natively.  It prints seconds, MB/s, ratios, and the daemon's CPU seconds and
RSS (before, after) for each.

    sudo .venv/bin/python bench/files.py [--size-mib 1024] [--small 1000] [--repeat 3]

Runs under /var/tmp (a real disk, not tmpfs).  Medians of --repeat runs; caches are dropped
before every download, so each reads from the disk.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from many_nodes import Node  # noqa: E402

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class FilesNode(Node):
    def __init__(self, base: Path, native: Path) -> None:
        super().__init__(base, native, f"sqlite://{base}/state/state.db", "bench")
        key = base / "files.key"
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
        self.port = free_port()
        text = self.cfg.read_text().replace(
            "[store]",
            f'files_listen = "127.0.0.1:{self.port}"\nfiles_secret_file = "{key}"\n[store]',
        )
        self.cfg.write_text(text)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def timed(fn: Callable[[], object], pid: int) -> tuple[float, float]:
    """Seconds fn takes, and the daemon's CPU seconds meanwhile."""
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds(pid) - c0


def curl(*args: str) -> None:
    subprocess.run(["curl", "-sS", "-f", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("needs curl")
    base = Path("/var/tmp/vfusefs-bench-files")
    shutil.rmtree(base, ignore_errors=True)
    native = base / "native"
    native.mkdir(parents=True)
    src = base / "src.bin"
    with open(src, "wb") as f:
        for _ in range(args.size_mib // 16 or 1):
            f.write(os.urandom(16 * MiB))
    size = src.stat().st_size
    node = FilesNode(base / "daemon", native)
    node.start()
    static = None
    try:
        vf = node.api(
            "POST", "/v1/hosts/local/vfolders", {"grants": [{"principal": "*", "mode": "rwd"}]}
        )
        vfid, nat = vf["id"], Path(vf["native_path"])
        token = node.api(
            "POST", f"/v1/hosts/local/vfolders/{vfid}/tokens", {"mode": "rwd", "ttl": "1d"}
        )["token"]
        auth = f"Authorization: Bearer {token}"
        api = f"http://127.0.0.1:{node.port}"
        sport = free_port()
        static = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(sport)],
            cwd=nat,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)

        def meta(path: str) -> str:
            pairs = (("host", "local"), ("vfolder", vfid), ("path", path))
            return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs)

        def upload(path: str) -> None:
            r = httpx.post(
                f"{api}/v1/uploads",
                headers={
                    "authorization": f"Bearer {token}",
                    "tus-resumable": "1.0.0",
                    "upload-length": str(size),
                    "upload-metadata": meta(path),
                },
            )
            r.raise_for_status()
            loc = r.headers["location"]
            curl(
                "-X", "PATCH", "-T", str(src), "-H", auth, "-H", "Tus-Resumable: 1.0.0",
                "-H", "Upload-Offset: 0", "-H", "Content-Type: application/offset+octet-stream",
                api + loc,
            )  # fmt: skip

        out = base / "out.bin"
        rows: dict[str, list[tuple[float, float]]] = {}
        rss: dict[str, list[float]] = {}
        for i in range(args.repeat):
            for f in nat.glob("*.bin"):
                f.unlink()
            os.sync()
            r0 = node.rss_mib()
            rows.setdefault("upload: vfusefs tus (curl -T)", []).append(
                timed(lambda i=i: upload(f"up{i}.bin"), node.pid)
            )
            os.sync()
            rss.setdefault("upload", []).append(node.rss_mib() - r0)
            rows.setdefault("upload: native cp", []).append(
                timed(lambda i=i: (shutil.copyfile(src, nat / f"cp{i}.bin"), os.sync()), node.pid)
            )
            drop_caches()
            r0 = node.rss_mib()
            rows.setdefault("download: vfusefs (curl)", []).append(
                timed(
                    lambda i=i: curl(
                        "-H", auth, "-o", str(out), f"{api}/v1/files/local/{vfid}/up{i}.bin"
                    ),
                    node.pid,
                )
            )
            rss.setdefault("download", []).append(node.rss_mib() - r0)
            drop_caches()
            rows.setdefault("download: http.server (curl)", []).append(
                timed(
                    lambda i=i: curl("-o", str(out), f"http://127.0.0.1:{sport}/up{i}.bin"),
                    node.pid,
                )
            )
            if subprocess.run(["cmp", str(src), str(out)]).returncode != 0:
                raise SystemExit("downloaded bytes differ")
        small = os.urandom(64 * 1024)

        def many_uploads() -> None:
            with httpx.Client(base_url=api, timeout=60) as c:
                for j in range(args.small):
                    r = c.post(
                        "/v1/uploads",
                        content=small,
                        headers={
                            "authorization": f"Bearer {token}",
                            "tus-resumable": "1.0.0",
                            "upload-length": str(len(small)),
                            "upload-metadata": meta(f"small/{j}"),
                            "content-type": "application/offset+octet-stream",
                        },
                    )
                    r.raise_for_status()

        def many_native() -> None:
            d = nat / "small-native"
            d.mkdir(exist_ok=True)
            for j in range(args.small):
                (d / str(j)).write_bytes(small)

        t_small, c_small = timed(many_uploads, node.pid)
        t_native, _ = timed(many_native, node.pid)
        got = len(os.listdir(nat / "small"))
        if got != args.small:
            raise SystemExit(f"{got} of {args.small} small uploads landed")
    finally:
        if static is not None:
            static.terminate()
        node.stop()

    print(f"\n{size / MiB:.0f} MiB file, median of {args.repeat}; CPU is the daemon's")
    print(f"{'':34} {'seconds':>8} {'MB/s':>8} {'daemon CPU s':>13}")
    medians = {}
    for label, vals in rows.items():
        t = statistics.median(v[0] for v in vals)
        c = statistics.median(v[1] for v in vals)
        medians[label] = t
        print(f"{label:34} {t:8.2f} {size / t / 1e6:8.0f} {c:13.2f}")
    up = medians["upload: vfusefs tus (curl -T)"] / medians["upload: native cp"]
    down = medians["download: vfusefs (curl)"] / medians["download: http.server (curl)"]
    print(f"\nupload   vfusefs / native cp      {up:5.2f}x the time")
    print(f"download vfusefs / http.server   {down:5.2f}x the time")
    print(
        f"daemon RSS growth, MiB: upload {max(rss['upload']):.1f}, "
        f"download {max(rss['download']):.1f} (worst of {args.repeat})"
    )
    print(
        f"\n{args.small} uploads of 64 KiB: {args.small / t_small:.0f}/s "
        f"({c_small / args.small * 1e3:.2f} ms daemon CPU each); "
        f"native writes of the same: {args.small / t_native:.0f}/s"
    )
    print(json.dumps({"upload_ratio": up, "download_ratio": down}))


if __name__ == "__main__":
    main()
