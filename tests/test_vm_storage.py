"""Storage this machine's kernel cannot mount, in a QEMU VM (tests/vm.py): XFS with project
quota.  The VM boots Debian's kernel, runs the host's own root filesystem read-only (so the
same python, venv and vfusefs), makes an XFS filesystem on its disk, mounts it with prjquota,
and runs pytest there on the XFS tests: tests/guest_xfs.py and the xfs variant of the backend
contract (which skips on the host).  One boot runs them all.  The guest's CPU is emulated
(TCG: this machine's KVM cannot boot a guest), about 20 times slower than the host, so fsx
and the long workloads are not run there; guest_xfs.py has a workload of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vm import Vm

pytestmark = pytest.mark.mount
REPO = Path(__file__).parent.parent

GUEST = """set -e
mkfs.xfs -q -f /dev/vda
mkdir -p /mnt/xfs
mount -o prjquota /dev/vda /mnt/xfs
chmod 755 /mnt/xfs
cd {repo}
export VFUSEFS_XFS_MNT=/mnt/xfs VFUSEFS_TEST_START_TIMEOUT=180 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
{python} -m pytest -v -p no:cacheprovider -p no:hypothesispytest -k xfs -rs \\
    tests/guest_xfs.py tests/test_backends.py
"""


def test_xfs_project_quota_in_a_vm(tmp_path: Path) -> None:
    why = Vm.available()
    if why is not None:
        pytest.skip(f"no test VM: {why}")
    vm = Vm.prepare(REPO / ".cache" / "vm")
    venv = Path(sys.executable).parent.parent  # the checkout and its venv may be under /tmp
    rc, log = vm.run(
        GUEST.format(repo=REPO, python=sys.executable), tmp_path, timeout=1200, keep=(REPO, venv)
    )
    print(log)
    assert rc == 0, log[-6000:]
    # every XFS test ran in the guest, none skipped there (the xfs_fs fixture would skip them
    # if the guest had no XFS mount)
    assert "guest_xfs.py::test_limits_are_project_quotas" in log and "PASSED" in log
    assert "test_capabilities_match_the_methods[xfs] PASSED" in log, log[-3000:]
    assert "SKIPPED" not in log and "skipped" not in log, log[-3000:]
