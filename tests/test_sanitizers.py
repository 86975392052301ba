"""The C pieces (src/vfusefs/runtime/shim/: fuseshim.c, hop.c) built with AddressSanitizer and
UndefinedBehaviorSanitizer, and exercised by the tests that drive them.

The two extensions are compiled with -fsanitize=address,undefined into a copy of the package;
the tests below then run with that copy first on PYTHONPATH and the sanitizer runtimes
preloaded (Python itself is not built with ASan), so every daemon they start uses the
sanitized shims too.  Any report aborts the process, and so fails the run:
- hop.c: the worker hand-off (test_workers.py, test_fuseloop.py);
- fuseshim.c: statfs of a vfolder through `df` and the write-back flag of shared mappings,
  through real mounts (test_quota.py, test_attacks.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import have

pytestmark = pytest.mark.mount

ROOT = Path(__file__).resolve().parent.parent
SHIMS = {"_fuseshim": ("fuseshim.c", ["-ldl", "-lfuse3"]), "_hop": ("hop.c", [])}
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def runtime(name: str) -> str:
    path = subprocess.run(
        ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else ""


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A copy of the package with sanitized shims, and the environment to run it in."""
    if not have("gcc") or not runtime("libasan.so") or not runtime("libubsan.so"):
        pytest.skip("gcc with the ASan/UBSan runtimes is needed")
    overlay = tmp_path_factory.mktemp("asan")
    pkg = overlay / "vfusefs"
    shutil.copytree(
        ROOT / "src" / "vfusefs", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    fuse = subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for module, (source, libs) in SHIMS.items():
        cmd = [
            "gcc",
            "-shared",
            "-fPIC",
            "-O1",
            "-g",
            *SANITIZE,
            f"-I{sysconfig.get_paths()['include']}",
            *fuse.stdout.split(),
            str(ROOT / "src" / "vfusefs" / "runtime" / "shim" / source),
            "-o",
            str(pkg / "runtime" / f"{module}{suffix}"),
            *libs,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    env = {
        **os.environ,
        "PYTHONPATH": str(overlay),
        "LD_PRELOAD": f"{runtime('libasan.so')}:{runtime('libubsan.so')}",
        # Python's own allocations are not ours to judge: leaks off; anything else aborts
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }
    return env


def test_the_sanitized_shims_are_the_ones_loaded(sanitized: dict[str, str]) -> None:
    # serve loads the libfuse shim (ctypes), as here, and hop.c as an extension module
    script = (
        "from vfusefs.runtime import fuseshim\nfuseshim.load()\nimport vfusefs.runtime._hop, pyfuse3\n"
        "maps = open('/proc/self/maps').read().split()\n"
        "print(*sorted({m for m in maps if '_fuseshim' in m or '_hop' in m}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=sanitized, capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(out) == 2 and all(p.startswith(sanitized["PYTHONPATH"]) for p in out), out
    for path in out:
        ldd = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        assert "libasan" in ldd and "libubsan" in ldd, ldd


@pytest.mark.parametrize(
    "tests",
    [
        ["tests/test_workers.py", "tests/test_fuseloop.py"],
        [
            "tests/test_quota.py",
            "tests/test_attacks.py",
            # statfs through df (the shim's inode), the shim's write-back flag; not the tests
            # that time the daemon (an ASan build is several times slower)
            "-k",
            "test_df_and_getfattr or shared_mapping",
        ],
    ],
    ids=["hop", "fuseshim"],
)
def test_shim_tests_pass_under_asan_and_ubsan(sanitized: dict[str, str], tests: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=sanitized,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = r.stdout[-4000:] + r.stderr[-4000:]
    assert r.returncode == 0, report
    assert "AddressSanitizer" not in report and "runtime error:" not in report, report
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
