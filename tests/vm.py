"""A small QEMU VM for what this machine's kernel cannot do (XFS project quota, an NFS server):
Debian's own kernel, booted with TCG (this host's KVM cannot boot a guest), running the host's
root filesystem shared read-only over 9p, so the guest runs the host's python, venv, xfsprogs
and vfusefs as they are.  A second, writable 9p share (`out`) carries the script in and the
results back; a sparse file is the guest's disk (/dev/vda).

    vm = Vm.prepare(cache_dir)          # the kernel (apt-get download, dpkg -x) and initramfs
    rc, log = vm.run(script, workdir)   # boot, run `sh script` chrooted into the host root

Nothing is installed on the host: the kernel package is unpacked into the cache directory.
In the guest: /tmp, /run and /mnt are tmpfs (host directories under /tmp named in `keep`
show through, read-only), /tmp/out is the writable share, /dev/vda the disk,
and the modules for virtio, 9p, XFS, FUSE and NFS (client and server) are loaded.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

MODULES = ["virtio_pci", "virtio_blk", "xfs", "9pnet_virtio", "9p", "fuse", "nfsd", "nfsv3"]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do insmod "$m" 2>/dev/null; done
mkdir -p /r
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /r
mount -t proc proc /r/proc
mount -t sysfs sys /r/sys
mount -t devtmpfs dev /r/dev
mkdir -p /hosttmp
mount --bind /r/tmp /hosttmp
mount -t tmpfs tmp /r/tmp
mount -t tmpfs run /r/run
mount -t tmpfs mnt /r/mnt
mkdir -p /r/tmp/out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /r/tmp/out
for p in $(cat /r/tmp/out/keep 2>/dev/null); do
    mkdir -p "/r/tmp/$p" && mount --bind "/hosttmp/$p" "/r/tmp/$p"
done
hostname vm
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
chroot /r /bin/sh -c 'cd /tmp/out && sh /tmp/out/script.sh' > /r/tmp/out/console.log 2>&1
echo $? > /r/tmp/out/rc
sync
umount /r/tmp/out
poweroff -n -f
"""


class Vm:
    def __init__(self, kernel: Path, initrd: Path) -> None:
        self.kernel = kernel
        self.initrd = initrd

    @classmethod
    def available(cls) -> str | None:
        """Why a VM cannot run here (None: it can)."""
        for tool in ("qemu-system-x86_64", "busybox", "depmod", "modprobe", "cpio", "apt-get"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None

    @classmethod
    def prepare(cls, cache: Path) -> Vm:
        """The kernel and an initramfs with busybox, the modules and /init (made once)."""
        cache.mkdir(parents=True, exist_ok=True)
        kdir = cache / "kernel"
        if not glob.glob(str(kdir / "boot" / "vmlinuz-*")):
            _unpack_kernel(cache, kdir)
        kernel = Path(glob.glob(str(kdir / "boot" / "vmlinuz-*"))[0])
        version = kernel.name.removeprefix("vmlinuz-")
        initrd = cache / f"initrd-{version}.cpio"
        if not initrd.exists():
            _make_initrd(kdir, version, initrd)
        return cls(kernel, initrd)

    def run(
        self,
        script: str,
        workdir: Path,
        disk_mib: int = 1024,
        timeout: float = 600,
        keep: tuple[Path, ...] = (),
    ) -> tuple[int, str]:
        """Boot, run script (sh) in the guest, power off; its exit code and output.  The
        guest's /tmp is its own (a tmpfs): host directories under /tmp it needs (a checkout
        there, say) are named in keep, and shown there read-only."""
        out = workdir / "out"
        out.mkdir(parents=True, exist_ok=True)
        for name in ("rc", "console.log"):
            (out / name).unlink(missing_ok=True)
        (out / "script.sh").write_text(script)
        under_tmp = [
            p.resolve().relative_to("/tmp") for p in keep if p.resolve().is_relative_to("/tmp")
        ]
        (out / "keep").write_text("".join(f"{p}\n" for p in under_tmp))
        disk = workdir / "disk.img"
        disk.unlink(missing_ok=True)
        with open(disk, "wb") as f:
            f.truncate(disk_mib << 20)
        cmd = [
            "qemu-system-x86_64",
            "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1536",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", f"file:{workdir}/serial.log",
            "-kernel", str(self.kernel), "-initrd", str(self.initrd),
            "-append", "console=ttyS0 panic=-1 quiet",
            "-fsdev", "local,id=fsr,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=fsr,mount_tag=hostroot",
            "-fsdev", f"local,id=fso,path={out},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=fso,mount_tag=out",
            "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            subprocess.run(cmd, timeout=timeout, capture_output=True, check=False)
        except subprocess.TimeoutExpired:
            return 124, _read(out / "console.log") + f"\n[VM timed out after {timeout:.0f} s]"
        log = _read(out / "console.log")
        rc_text = _read(out / "rc").strip()
        took = time.monotonic() - started
        if not rc_text:
            serial = _read(workdir / "serial.log")[-3000:]
            return 125, f"{log}\n[VM ended without a result after {took:.0f} s]\n{serial}"
        return int(rc_text), log + f"\n[VM run: {took:.1f} s]"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _unpack_kernel(cache: Path, kdir: Path) -> None:
    """Debian's current kernel package, downloaded and unpacked (not installed)."""
    depends = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=True
    ).stdout
    pkg = next(
        line.split(":", 1)[1].strip()
        for line in depends.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    )
    debs = cache / "deb"
    debs.mkdir(exist_ok=True)
    got = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
    if got.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, check=True)
    tmp = cache / "kernel.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg", "-x", glob.glob(str(debs / f"{pkg}_*.deb"))[0], str(tmp)], check=True)
    shutil.rmtree(debs, ignore_errors=True)
    shutil.rmtree(kdir, ignore_errors=True)
    tmp.rename(kdir)


def _make_initrd(kdir: Path, version: str, initrd: Path) -> None:
    subprocess.run(["depmod", "-b", str(kdir), version], check=True)
    root = initrd.with_suffix(".root")
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "proc", "sys", "dev", "mods"):
        (root / d).mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "", root / "bin" / "busybox")
    order: list[str] = []
    for module in MODULES:
        deps = subprocess.run(
            ["modprobe", "-d", str(kdir), "-S", version, "--show-depends", module],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        for line in deps.splitlines():
            fields = line.split()
            if fields[:1] == ["insmod"] and fields[1] not in order:
                order.append(fields[1])
    listed = []
    for path in order:
        name = os.path.basename(path)
        shutil.copy(path, root / "mods" / name)
        listed.append(f"/mods/{name}")
    (root / "modules.list").write_text("\n".join(listed) + "\n")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    files = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, check=True
    ).stdout  # fmt: skip
    tmp = initrd.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=f, check=True
        )
    tmp.rename(initrd)
    shutil.rmtree(root, ignore_errors=True)
