"""Build step for the two C pieces: the libfuse shim (src/vfusefs/runtime/shim/fuseshim.c) and the
trio-to-worker hand-off (src/vfusefs/runtime/shim/hop.c).

Everything else is declared in setup.cfg.
"""

import subprocess

from setuptools import Extension, setup


def fuse3_cflags() -> list[str]:
    try:
        return subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True,
                              check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/fuse3"]


setup(ext_modules=[Extension("vfusefs.runtime._fuseshim", ["src/vfusefs/runtime/shim/fuseshim.c"],
                             extra_compile_args=fuse3_cflags(), libraries=["dl", "fuse3"]),
                   Extension("vfusefs.runtime._hop", ["src/vfusefs/runtime/shim/hop.c"], extra_compile_args=["-O2"])])
