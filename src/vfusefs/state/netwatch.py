"""The storage network, watched over netlink: is there a way to each host's `servers`?

A server is reachable when the kernel has a route to it (the default route counts) over a link
that is up, and the neighbour it goes through (the gateway, or the server itself on a local
network) is not marked FAILED.  A host with none of its servers reachable is `down`, with some
of them `degraded` (state/health.py combines this with its storage probe: the worse wins).

pyroute2's blocking API is bound to the thread that made its socket and its async API is
asyncio-only, so one thread of its own owns an IPRoute bound to the link, route and neighbour
multicast groups: on every event (and every RECHECK seconds, for names that resolve to new
addresses), it works the reachability out again and hands what changed to the event loop.
It sends nothing on the network: it only reads the kernel's tables.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)

log = logging.getLogger(__name__)

RECHECK = 5.0  # seconds between looks with no event
SETTLE = 0.05  # seconds to let a burst of events end before looking
IFF_UP = 0x1
NUD_FAILED = 0x20


class NetState(NamedTuple):
    state: str  # ok, degraded, down
    why: str  # which servers cannot be reached, and why


def judge(servers: list[str], unreachable: dict[str, str]) -> NetState:
    """A host's network state from which of its servers cannot be reached (and why)."""
    if not servers or not unreachable:
        return NetState("ok", "")
    why = "; ".join(f"{s}: {r}" for s, r in sorted(unreachable.items()))
    if len(unreachable) == len(servers):
        return NetState("down", f"no storage server is reachable ({why})")
    return NetState("degraded", f"{len(unreachable)} of {len(servers)} servers unreachable ({why})")


class NetWatch:
    def __init__(
        self, token: trio.lowlevel.TrioToken, deliver: Callable[[dict[str, NetState]], None]
    ) -> None:
        self.token = token
        self.deliver = deliver  # called on the event loop with the hosts whose state changed
        self._targets: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._last: dict[str, NetState] = {}
        self._thread: threading.Thread | None = None

    def set_targets(self, targets: dict[str, list[str]]) -> None:
        """host -> its servers (host names or addresses); hosts with none are not watched."""
        with self._lock:
            self._targets = {h: list(s) for h, s in targets.items() if s}
        self._kick.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="vfusefs-netwatch")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            ipr = IPRoute()
            ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_NEIGH)
        except (OSError, NetlinkError) as exc:
            log.warning("cannot watch the storage network over netlink: %s", exc)
            return
        try:
            while not self._stop.is_set():
                self._look(ipr)
                self._wait(ipr)
        finally:
            ipr.close()

    def _wait(self, ipr: Any) -> None:
        """Until a netlink event, a kick or RECHECK seconds; events are drained."""
        waited = 0.0
        while not self._stop.is_set() and waited < RECHECK:
            if self._kick.is_set():
                self._kick.clear()
                return
            ready, _, _ = select.select([ipr.fileno()], [], [], 0.5)
            waited += 0.5
            if ready:
                self._stop.wait(SETTLE)  # a link going down brings routes and neighbours too
                while select.select([ipr.fileno()], [], [], 0)[0]:
                    ipr.get()
                return

    def _look(self, ipr: Any) -> None:
        with self._lock:
            targets = dict(self._targets)
        states = {
            host: judge(servers, self._unreachable(ipr, servers))
            for host, servers in targets.items()
        }
        changed = {h: s for h, s in states.items() if self._last.get(h) != s}
        self._last = states
        if changed:
            try:
                trio.from_thread.run_sync(self.deliver, changed, trio_token=self.token)
            except trio.RunFinishedError:
                self._stop.set()

    def _unreachable(self, ipr: Any, servers: list[str]) -> dict[str, str]:
        out = {}
        for server in servers:
            why = self._why_unreachable(ipr, server)
            if why:
                out[server] = why
        return out

    @staticmethod
    def _why_unreachable(ipr: Any, server: str) -> str:
        """'' if the kernel has a way to server, else why not."""
        try:
            addr = socket.getaddrinfo(server, None, proto=socket.IPPROTO_TCP)[0][4][0]
        except OSError as exc:
            return f"cannot resolve ({exc.strerror or exc})"
        try:
            route = ipr.route("get", dst=addr)[0]
        except NetlinkError as exc:
            return f"no route ({exc.args[1] if len(exc.args) > 1 else exc})"
        oif = route.get_attr("RTA_OIF")
        links = ipr.get_links(oif) if oif else []
        if not links:
            return "no link for its route"
        link = links[0]
        name = link.get_attr("IFLA_IFNAME")
        operstate = link.get_attr("IFLA_OPERSTATE")
        if not link["flags"] & IFF_UP or operstate not in ("UP", "UNKNOWN"):
            return f"link {name} is {operstate or 'down'}"
        hop = route.get_attr("RTA_GATEWAY") or addr
        for neigh in ipr.get_neighbours(dst=hop, ifindex=oif):
            if neigh["state"] & NUD_FAILED:
                return f"neighbour {hop} on {name} failed"
        return ""
