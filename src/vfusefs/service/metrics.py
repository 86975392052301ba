"""Prometheus metrics (SPEC §7), gathered at scrape time from counters the daemon keeps anyway.

The request path only bumps plain dicts and ints on the event loop (`OpStat`, `Host.bytes_*`,
`Operations.denied`); nothing here runs per request.  A scrape walks those under the same trio
thread, so it needs no locks.  Label sets are bounded: hosts come from the config, ops from the
FUSE operation names, results from errno names, denial reasons from `DENIAL_REASONS`; the
per-vfolder gauges (one series per vfolder) can be switched off with `daemon.metrics_vfolders`.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from vfusefs.fuse.ops import Operations
    from vfusefs.service.files import FileService
    from vfusefs.state.registry import Registry

# upper bounds of the op latency buckets, seconds (a request answered from memory takes
# ~30 us from a client on a small VM)
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# errno -> reason label of vfusefs_denied_total
DENIAL_REASONS = {
    errno.EACCES: "no_access",
    errno.EROFS: "read_only",
    errno.EPERM: "no_delete",
    errno.EDQUOT: "quota",
}
READ_ONLY_TREE = "read_only_tree"  # writes to the virtual root and host directories
PRIVILEGED = "privileged"  # device nodes, set-ID bits, file capabilities from containers
FOREIGN_LINK = "foreign_link"  # a file with hard links outside its vfolder


class OpStat:
    """Count, total seconds and latency histogram of one (host, op, errno)."""

    __slots__ = ("count", "seconds", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)  # not cumulative; the last is +Inf

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1


def result_label(code: int) -> str:
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))


class VfusefsCollector(Collector):
    def __init__(self, ops: Operations, registry: Registry, service: Any = None) -> None:
        self.ops = ops
        self.registry = registry
        self.service = service  # the daemon (loop lag, watchdog), when there is one

    def collect(self) -> Iterator[Any]:
        ops_total = CounterMetricFamily(
            "vfusefs_ops", "FUSE operations served", labels=["host", "op", "result"]
        )
        seconds = HistogramMetricFamily(
            "vfusefs_op_seconds", "time to serve a FUSE operation", labels=["host", "op"]
        )
        merged: dict[tuple[str, str], OpStat] = {}
        for (host_name, op, code), st in sorted(self.ops.stats.items()):
            ops_total.add_metric([host_name, op, result_label(code)], st.count)
            m = merged.setdefault((host_name, op), OpStat())
            m.count += st.count
            m.seconds += st.seconds
            m.buckets = [a + b for a, b in zip(m.buckets, st.buckets, strict=True)]
        for (host_name, op), m in merged.items():
            cumulative, running = [], 0
            for bound, n in zip((*map(str, BUCKETS), "+Inf"), m.buckets, strict=True):
                running += n
                cumulative.append((bound, running))
            seconds.add_metric([host_name, op], cumulative, m.seconds)
        yield ops_total
        yield seconds

        read = CounterMetricFamily(
            "vfusefs_bytes_read", "bytes read through the mount", labels=["host"]
        )
        written = CounterMetricFamily(
            "vfusefs_bytes_written", "bytes written through the mount", labels=["host"]
        )
        up = GaugeMetricFamily(
            "vfusefs_host_up", "1 while the host's storage answers", labels=["host"]
        )
        vfolders = GaugeMetricFamily(
            "vfusefs_host_vfolders", "vfolders served per host", labels=["host"]
        )
        health = GaugeMetricFamily(
            "vfusefs_host_health",
            "1 for the host's health state (ok, degraded, down), 0 for the others",
            labels=["host", "state"],
        )
        stuck = GaugeMetricFamily(
            "vfusefs_host_stuck_threads",
            "threads holding a call whose request gave up (a hung host holds them)",
            labels=["host"],
        )
        for name, host in sorted(self.registry.hosts.items()):
            read.add_metric([name], host.bytes_read)
            written.add_metric([name], host.bytes_written)
            up.add_metric([name], 0 if host.health == "down" else 1)
            vfolders.add_metric([name], len(host.vfolders))
            for state in ("ok", "degraded", "down"):
                health.add_metric([name, state], int(host.health == state))
            stuck.add_metric([name], host.workers.stuck if host.health == "down" else 0)
        yield from (read, written, up, vfolders, health, stuck)

        denied = CounterMetricFamily(
            "vfusefs_denied", "requests refused by access mode or quota", labels=["host", "reason"]
        )
        for (host_name, reason), n in sorted(self.ops.denied.items()):
            denied.add_metric([host_name, reason], n)
        yield denied

        handles = GaugeMetricFamily("vfusefs_open_handles", "open file and directory handles")
        handles.add_metric([], len(self.ops.handles))
        yield handles
        inodes = GaugeMetricFamily("vfusefs_inodes_cached", "inodes the kernel holds references to")
        inodes.add_metric([], len(self.registry.table))
        yield inodes

        if self.service is not None:
            lag = GaugeMetricFamily(
                "vfusefs_loop_lag_max_seconds",
                "how late the event loop woke for a timer, the worst of the last minute",
            )
            lag.add_metric([], self.service.loop_lag_max)
            watchdog = GaugeMetricFamily(
                "vfusefs_watchdog_seconds", "systemd's WatchdogSec for the daemon (0: none)"
            )
            watchdog.add_metric([], self.service.notifier.watchdog_seconds)
            yield from (lag, watchdog)
            if self.service.files is not None:
                yield from files_metrics(self.service.files)
        scope_usage = GaugeMetricFamily(
            "vfusefs_scope_usage_bytes", "bytes a quota scope's vfolders use", labels=["scope"]
        )
        scope_quota = GaugeMetricFamily(
            "vfusefs_scope_quota_bytes", "a quota scope's byte limit", labels=["scope"]
        )
        for key, acc in sorted(self.registry.ledger.accounts.items()):
            if key.startswith("scope:") and acc.limit_bytes:  # limited scopes only
                scope_usage.add_metric([key[6:]], acc.used_bytes)
                scope_quota.add_metric([key[6:]], acc.limit_bytes)
        yield from (scope_usage, scope_quota)
        store = GaugeMetricFamily(
            "vfusefs_store_up", "1 while the store answers", labels=["kind", "node"]
        )
        store.add_metric(
            [self.registry.store.kind, self.registry.node], int(self.registry.store_connected)
        )
        yield store
        keeper = self.registry.leases  # many nodes: quota leases (0 on a single-node store)
        requests = CounterMetricFamily(
            "vfusefs_lease_requests", "quota lease requests this node made to the store"
        )
        requests.add_metric([], keeper.requests if keeper else 0)
        refused = CounterMetricFamily(
            "vfusefs_lease_refused", "lease requests that found no room (then EDQUOT)"
        )
        refused.add_metric([], keeper.refused if keeper else 0)
        held = GaugeMetricFamily("vfusefs_leases_held", "quota leases this node holds")
        held.add_metric([], len(keeper.until) if keeper else 0)
        yield from (requests, refused, held)

        if not self.registry.config.daemon.metrics_vfolders:  # read live: SIGHUP may change it
            return
        usage = GaugeMetricFamily(
            "vfusefs_vfolder_usage_bytes", "bytes a vfolder uses", labels=["host", "vfolder"]
        )
        quota = GaugeMetricFamily(
            "vfusefs_vfolder_quota_bytes",
            "a vfolder's byte limit (0: none)",
            labels=["host", "vfolder"],
        )
        for vf in self.registry.vfolders.values():
            acc = self.registry.ledger.account(vf.quota_keys[0])
            usage.add_metric([vf.host.name, vf.id], acc.used_bytes)
            quota.add_metric([vf.host.name, vf.id], acc.limit_bytes)
        yield usage
        yield quota


def files_metrics(files: FileService) -> Iterator[Any]:
    """The file API's counters (files over HTTP)."""
    requests = CounterMetricFamily(
        "vfusefs_files_requests",
        "file API requests by operation and HTTP status",
        labels=["op", "code"],
    )
    for (op, code), n in sorted(files.requests.items()):
        requests.add_metric([op, str(code)], n)
    moved = CounterMetricFamily(
        "vfusefs_files_bytes",
        "file bytes the file API sent (out) and wrote (in)",
        labels=["direction"],
    )
    moved.add_metric(["out"], files.bytes_out)
    moved.add_metric(["in"], files.bytes_in)
    sessions = GaugeMetricFamily(
        "vfusefs_uploads",
        "unfinished uploads: receiving bytes now, or waiting for more",
        labels=["state"],
    )
    receiving = sum(1 for up in files.uploads.values() if up.lock.locked())
    sessions.add_metric(["receiving"], receiving)
    sessions.add_metric(["waiting"], len(files.uploads) - receiving)
    ended = CounterMetricFamily(
        "vfusefs_uploads_ended",
        "uploads that ended: completed, terminated, expired, failed",
        labels=["outcome"],
    )
    for outcome in ("completed", "terminated", "expired", "failed"):
        ended.add_metric([outcome], files.outcomes.get(outcome, 0))
    yield from (requests, moved, sessions, ended)


def build_app(ops: Operations, registry: Registry, service: Any = None) -> Any:
    """The ASGI app serving /metrics (hypercorn runs it on the event loop, like the control API)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(VfusefsCollector(ops, registry, service))
    ProcessCollector(registry=reg)  # RSS, open fds, CPU of the daemon
    return WithLifespan(make_asgi_app(registry=reg))


class WithLifespan:
    """prometheus-client's app does not answer ASGI lifespan events; hypercorn then logs a
    warning at every start.  Answer them here."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)  # type: ignore[no-any-return]
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
