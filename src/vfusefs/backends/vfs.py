"""The built-in `vfs` backend: vfolders are plain directories under the host's native path.

It has no native quota, so vfusefs's own accounting is the only enforcement; everything it needs
is in the `Backend` base class.
"""

from typing import ClassVar

from vfusefs.backends import Backend


class VfsBackend(Backend):
    name = "vfs"
    known_options: ClassVar[dict[str, type]] = {}
