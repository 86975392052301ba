"""Quota leases in a shared store (SharedStore: Redis), on a real redis-server: how much a
node is granted, how a flush turns lease into usage, expiry, giving back, node names; then many
simulated nodes (in-process ledgers, as the daemon's LeaseKeeper drives them) writing into one
limit, which must end within the documented bound of N x lease_floor over.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from vfusefs.store import SharedStore, VfolderRecord, open_store

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from many_nodes import simulate  # noqa: E402

MiB = 1 << 20
TTL = 30.0
FLOOR = (MiB, 1)


@pytest.fixture(params=["redis_server", "redis_cluster"])
def stores(request: pytest.FixtureRequest) -> Iterator[list[SharedStore]]:
    server = request.getfixturevalue(request.param)  # one redis-server, or a 3-master Cluster
    server.flush()
    handles = [cast(SharedStore, open_store(server.url)) for _ in range(3)]
    yield handles
    for s in handles:
        s.close()


def vfolder(store: SharedStore, **kw: Any) -> str:
    vfid = str(uuid.uuid4())
    store.put_vfolder(VfolderRecord(id=vfid, host="local", native_path=f"/srv/{vfid}", **kw))
    store.set_usage(vfid, 0, 0)
    return vfid


def test_grants_come_from_what_nobody_holds(stores: list[SharedStore]) -> None:
    a, b, _ = stores
    for node in ("a", "b"):
        a.heartbeat(node, node, {}, TTL)  # two live nodes
    vfid = vfolder(a, quota_bytes=64 * MiB, quota_inodes=100)
    acct = f"vf:{vfid}"
    g1 = a.acquire("a", acct, (4096, 1), TTL, FLOOR)
    assert g1 is not None
    assert g1.bytes == 16 * MiB  # the unit: room / (2 x live nodes)
    assert g1.inodes == 25 and g1.limit_bytes == 64 * MiB and g1.others_bytes == 0
    g2 = b.acquire("b", acct, (40 * MiB, 0), TTL, FLOOR)  # more than a unit: what it asks for
    assert g2 is not None and g2.bytes == 40 * MiB and g2.others_bytes == 16 * MiB
    g3 = b.acquire("b", acct, (20 * MiB, 0), TTL, FLOOR)  # only 8 MiB nobody holds
    assert g3 is not None and g3.bytes == 8 * MiB and g3.held_bytes == 48 * MiB
    g4 = a.acquire("a", acct, (1, 0), TTL, FLOOR)
    assert g4 is not None and g4.bytes == 0  # nothing left to grant: never past the limit
    # b gives back what it does not spend; a may then have it
    b.release("b", acct, 10 * MiB, 0, False)
    g5 = a.acquire("a", acct, (MiB, 0), TTL, FLOOR, have=(16 * MiB, 0))
    assert g5 is not None and g5.bytes == MiB  # what it asks: it has more than a unit left
    # having spent all it held (not flushed yet: the store still counts it as a's), a is topped
    # up to the unit again: (64 - 38 held by b) / (2 x 2 nodes) = 6.5 MiB
    g = a.acquire("a", acct, (MiB, 0), TTL, FLOOR, have=(0, 0))
    assert g is not None and g.bytes == 6 * MiB + MiB // 2
    b.release("b", acct, 0, 0, True)
    a.release("a", acct, 0, 0, True)
    # a fresh lease counts what the node grew the account by and has not flushed (17 MiB)
    g = a.acquire("a", acct, (0, 0), TTL, FLOOR, fresh=(17 * MiB, 0))
    assert g is not None and g.bytes == 16 * MiB and g.held_bytes == 33 * MiB
    g = b.acquire("b", acct, (48 * MiB, 0), TTL, FLOOR)
    assert g is not None and g.bytes == 31 * MiB  # the rest (64 - 33), and no more
    assert a.acquire("a", f"vf:{uuid.uuid4()}", (1, 0), TTL, FLOOR) is None  # no such vfolder


def test_a_flush_turns_lease_into_usage_at_once(stores: list[SharedStore]) -> None:
    a, b, _ = stores
    scope = f"user:{uuid.uuid4()}"
    a.put_scope(scope, 10 * MiB, 0)
    vfid = vfolder(a, scope=scope)
    g = a.acquire("a", f"scope:{scope}", (3 * MiB, 0), TTL, FLOOR)
    assert g is not None and g.bytes == 5 * MiB  # one node alive (a): half the room
    a.add_usage("a", [(vfid, 2 * MiB, 1)])  # a spent 2 MiB of it and flushed
    g = b.acquire("b", f"scope:{scope}", (0, 0), TTL, FLOOR)
    assert g is not None
    assert (g.usage_bytes, g.others_bytes) == (2 * MiB, 3 * MiB)  # usage + leases unchanged
    assert g.bytes == (10 - 2 - 3) * MiB // 4  # the unit: room / (2 x two live nodes)
    assert a.vfolder_usage(vfid) == (2 * MiB, 1)
    # a recount moves the scope by the difference; a delete takes the vfolder out of it
    a.set_usage(vfid, 3 * MiB, 2)
    g = b.acquire("b", f"scope:{scope}", (0, 0), TTL, FLOOR)
    assert g is not None and g.usage_bytes == 3 * MiB
    a.delete_vfolder(vfid, None)
    g = b.acquire("b", f"scope:{scope}", (0, 0), TTL, FLOOR)
    assert g is not None and g.usage_bytes == 0


def test_expired_leases_are_not_counted_and_a_fresh_lease_counts_pending(
    stores: list[SharedStore],
) -> None:
    a, b, _ = stores
    vfid = vfolder(a, quota_bytes=10 * MiB)
    acct = f"vf:{vfid}"
    g = a.acquire("a", acct, (8 * MiB, 0), 0.2, FLOOR)  # a lease that lasts 0.2 s
    assert g is not None and g.bytes == 8 * MiB
    g = b.acquire("b", acct, (8 * MiB, 0), TTL, FLOOR)
    assert g is not None and g.bytes == 2 * MiB
    time.sleep(0.3)  # a did not renew: what it held is nobody's
    b.release("b", acct, 0, 0, True)
    g = b.acquire("b", acct, (8 * MiB, 0), TTL, FLOOR, fresh=(MiB, 0))  # 1 MiB grown unflushed
    assert g is not None and g.bytes == 8 * MiB and g.held_bytes == 9 * MiB
    g = b.acquire("b", acct, (2 * MiB, 0), TTL, FLOOR)
    assert g is not None and g.bytes == MiB  # 10 - 9 held


def test_node_names_are_taken_by_one_live_daemon(stores: list[SharedStore]) -> None:
    a, b, _ = stores
    assert a.heartbeat("n1", "run-1", {"mountpoint": "/mnt/a"}, TTL) == ""
    assert a.heartbeat("n1", "run-1", {"mountpoint": "/mnt/a"}, TTL) == ""  # its own again
    taken = b.heartbeat("n1", "run-2", {"mountpoint": "/mnt/b"}, TTL)
    assert '"/mnt/a"' in taken  # another live daemon has it: refused, and named
    assert b.heartbeat("n2", "run-3", {"mountpoint": "/mnt/b"}, TTL) == ""
    vfid = vfolder(a, quota_bytes=10 * MiB)
    a.acquire("n1", f"vf:{vfid}", (MiB, 0), TTL, FLOOR)
    nodes = {n.name: n for n in b.nodes()}
    assert set(nodes) == {"n1", "n2"} and nodes["n1"].info["mountpoint"] == "/mnt/a"
    assert nodes["n1"].leases[f"vf:{vfid}"][0] == 2 * MiB + MiB // 2
    assert nodes["n1"].seen_ago < 5 and nodes["n2"].leases == {}
    a.leave("n1")  # a clean stop: its leases go back, and so does its name
    assert [n.name for n in b.nodes()] == ["n2"]
    assert b.heartbeat("n1", "run-2", {}, TTL) == ""
    g = b.acquire("n2", f"vf:{vfid}", (0, 0), TTL, FLOOR)
    assert g is not None and g.others_bytes == 0


@pytest.mark.parametrize("nodes", [10, 100])
def test_many_simulated_nodes_end_within_the_bound(stores: list[SharedStore], nodes: int) -> None:
    """N simulated nodes (bench/many_nodes.py: in-process ledgers driven as the daemon's
    LeaseKeeper drives them) write random chunks into one 1 GiB limit until each is refused:
    the total ends at most N x lease_floor over (here not over at all: grants never exceed the
    room), and the limit is filled to within the last chunk of each node."""
    limit = 1 << 30
    got = simulate(stores[0], nodes, limit)
    print(f"{nodes} nodes: {got['total'] / MiB:.1f} MiB of 1024, {got['requests']} requests")
    assert got["total"] <= limit + nodes * FLOOR[0]
    assert got["total"] >= limit - nodes * 4 * MiB


def test_usage_changes_are_read_since_the_last_look(stores: list[SharedStore]) -> None:
    """A node takes in the others' usage by what changed (O(changes), not O(vfolders))."""
    a, b, _ = stores
    one, two, three = (vfolder(a) for _ in range(3))
    seq, rows = b.usage_since(0)
    assert rows == {one: (0, 0), two: (0, 0), three: (0, 0)}
    a.add_usage("a", [(two, 4096, 1)], batch=1)
    a.add_usage("a", [(two, 4096, 1)], batch=1)  # the same batch again (a retry): added once
    seq2, rows = b.usage_since(seq)
    assert rows == {two: (4096, 1)} and seq2 > seq
    a.set_usage(three, 8192, 2)  # a recount
    a.delete_vfolder(two, None)
    seq3, rows = b.usage_since(seq2)
    assert rows == {three: (8192, 2)}
    assert b.usage_since(seq3) == (seq3, {})
