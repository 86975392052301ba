"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per state change.

`NOTIFY_SOCKET` names a unix datagram socket (a leading "@" means the abstract namespace).  The
daemon sends READY=1 once the mount answers, STATUS= lines as things change, WATCHDOG=1 from a
task on the event loop (so a wedged loop stops pinging and systemd restarts it), RELOADING=1 and
READY=1 around a SIGHUP reload, and STOPPING=1 when it starts shutting down.  Sends never block:
the socket is non-blocking, and a datagram systemd cannot take right now is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.address: str | bytes | None = None
        self.sock: socket.socket | None = None
        path = os.environ.pop("NOTIFY_SOCKET", "")  # children (umount) must not inherit it
        if path:
            self.address = "\0" + path[1:] if path.startswith("@") else path
            self.sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        self.watchdog_seconds = self._watchdog()

    @staticmethod
    def _watchdog() -> float:
        """The interval systemd expects pings within (WatchdogSec=), or 0 when not asked."""
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        if not usec or pid and pid != str(os.getpid()):
            return 0.0
        try:
            return max(0.0, int(usec) / 1e6)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number: watchdog pings disabled", usec)
            return 0.0

    @property
    def active(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str) -> None:
        if self.sock is None or self.address is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except BlockingIOError:
            pass  # systemd is busy; the next state change or ping says it again
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address, exc.strerror)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send(
            "RELOADING=1",
            f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
            "STATUS=reloading the configuration",
        )

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
