"""The Store contract (vfusefs.store.Store), run against every store; then the daemon following
the change feed of a store another writer changes.

`store_pair` gives two handles on one store, as two nodes (or a node and an admin tool) would
have: what one writes, the other must read, and see in the change feed.  Every store runs every
test: SQLite on a file, Redis on a real redis-server, and a three-master Redis Cluster.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vfusefs.store import Store, StoreError, TrashRecord, VfolderRecord, open_store, sqlite_path

from conftest import Daemon, RedisServer
from test_access_mount import Container, container  # noqa: F401 (fixture)

Factory = Callable[[], Store]


def sqlite_stores(tmp_path: Path) -> Factory:
    url = f"sqlite://{tmp_path}/state.db"
    return lambda: open_store(url)


STORES = ["redis", "sqlite"]


@pytest.fixture(params=[*STORES, "redis-cluster"])
def store_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    if request.param.startswith("redis"):  # a real redis-server or Cluster, emptied each test
        server = request.getfixturevalue(
            {"redis": "redis_server", "redis-cluster": "redis_cluster"}[request.param]
        )
        server.flush()
        factory = lambda: open_store(server.url)  # noqa: E731
    else:
        factory = sqlite_stores(tmp_path)
    a, b = factory(), factory()
    yield a, b
    a.close()
    b.close()


def record(**kw: object) -> VfolderRecord:
    vfid = str(uuid.uuid4())
    return VfolderRecord(**{"id": vfid, "host": "local", "native_path": f"/srv/{vfid}", **kw})  # type: ignore[arg-type]


def test_vfolders_round_trip_between_handles(store_pair: tuple[Store, Store]) -> None:
    a, b = store_pair
    r1 = record(
        scope=f"user:{uuid.uuid4()}",
        quota_bytes=10,
        quota_inodes=2,
        grants={"*": "ro", "uid:1000": "rwd"},
        created=1.0,
    )
    r2 = record(created=2.0)
    a.put_vfolder(r1)
    a.put_vfolder(r2)
    assert b.vfolders() == [r1, r2]  # oldest first
    assert b.vfolder(r1.id) == r1 and b.vfolder(str(uuid.uuid4())) is None
    assert b.has_vfolder(r2.id) and not b.has_vfolder(str(uuid.uuid4()))
    r1.grants["cgroup:/docker/x"] = "rw"
    b.put_vfolder(r1)
    assert a.vfolder(r1.id) == r1


def test_a_delete_forgets_usage_and_queues_trash_at_once(store_pair: tuple[Store, Store]) -> None:
    a, b = store_pair
    r = record()
    a.put_vfolder(r)
    a.add_usage("n1", [(r.id, 4096, 1)])
    a.delete_vfolder(r.id, TrashRecord(f"/srv/.trash/{r.id}", "local", r.id, 5.0))
    assert b.vfolder(r.id) is None and r.id not in b.usage()
    assert b.trash() == [TrashRecord(f"/srv/.trash/{r.id}", "local", r.id, 5.0)]
    b.delete_vfolder(str(uuid.uuid4()), None)  # nothing there: no error, no trash


def test_usage_is_a_base_plus_one_delta_per_node(store_pair: tuple[Store, Store]) -> None:
    a, b = store_pair
    r = record()
    a.put_vfolder(r)
    a.add_usage("n1", [(r.id, 1000, 2)])
    b.add_usage("n2", [(r.id, 500, 1)])
    a.add_usage("n1", [(r.id, -200, -1)])
    assert a.usage()[r.id] == b.usage()[r.id] == (1300, 2)  # no flush overwrote another's
    b.set_usage(r.id, 8192, 3)  # a recount replaces the base and drops every delta
    assert a.usage()[r.id] == (8192, 3)
    a.add_usage("n1", [(r.id, 4096, 1)])
    assert b.usage()[r.id] == (12288, 4)
    a.add_usage("n1", [])  # nothing to add


def test_the_change_feed_reports_every_writer(store_pair: tuple[Store, Store]) -> None:
    a, b = store_pair
    start = b.last_change()
    r = record()
    a.put_vfolder(r)
    a.put_scope("user:" + str(uuid.uuid4()), 100, 0)
    a.delete_vfolder(r.id, None)
    a.add_usage("n1", [(r.id, 1, 1)])  # usage is not a feed change: it moves every second
    got = b.changes(start)
    assert [(c.kind, c.key) for c in got] == [
        ("vfolder", r.id),
        ("scope", got[1].key),
        ("vfolder", r.id),
    ]
    assert [c.seq for c in got] == sorted(c.seq for c in got) and got[0].seq > start
    assert b.changes(got[-1].seq) == [] and b.last_change() == got[-1].seq
    assert b.changes(got[0].seq) == got[1:]


def test_scopes_round_trip(store_pair: tuple[Store, Store]) -> None:
    a, b = store_pair
    scope = f"project:{uuid.uuid4()}"
    a.put_scope(scope, 1 << 30, 1000)
    assert b.scopes()[scope] == (1 << 30, 1000)
    b.put_scope(scope, 0, 5)
    assert a.scopes()[scope] == (0, 5)


def test_clean_flags_are_per_node(store_pair: tuple[Store, Store]) -> None:
    a, b = store_pair
    assert not a.clean("n1")  # never said: not clean
    a.set_clean("n1", True)
    b.set_clean("n2", False)
    assert b.clean("n1") and not a.clean("n2")
    b.set_clean("n1", False)
    assert not a.clean("n1")


def test_trash_is_claimed_by_one_node_at_a_time(store_pair: tuple[Store, Store]) -> None:
    a, b = store_pair
    r = record()
    a.put_vfolder(r)
    a.delete_vfolder(r.id, TrashRecord("/srv/.trash/x", "local", r.id, 1.0))
    assert a.claim_trash("/srv/.trash/x", "n1", 60)
    assert not b.claim_trash("/srv/.trash/x", "n2", 60)  # n1 holds it
    assert a.claim_trash("/srv/.trash/x", "n1", 0.2)  # the holder may renew
    time.sleep(0.3)
    assert b.claim_trash("/srv/.trash/x", "n2", 60)  # expired: another node takes it over
    assert not a.claim_trash("/nope", "n1", 60)  # nothing queued there
    b.trash_purged("/srv/.trash/x")
    assert a.trash() == []


def test_background_tasks_are_claimed_by_one_node(store_pair: tuple[Store, Store]) -> None:
    a, b = store_pair
    assert a.claim_task("rescan:x", "n1", 60)
    assert not b.claim_task("rescan:x", "n2", 60)  # n1 does it this round
    assert b.claim_task("rescan:y", "n2", 60)  # another task is free
    assert a.claim_task("rescan:x", "n1", 0.2)  # the holder renews
    time.sleep(0.3)
    assert b.claim_task("rescan:x", "n2", 60)  # n1 died (its claim ran out): n2 takes it


def test_a_deleted_vfolder_is_restored_from_its_trash_entry(
    store_pair: tuple[Store, Store],
) -> None:
    a, b = store_pair
    r = record(quota_bytes=7, grants={"uid:1000": "rw"})
    a.put_vfolder(r)
    a.delete_vfolder(r.id, TrashRecord("/srv/.trash/r", "local", r.id, 3.0, record=r))
    (entry,) = b.trash()
    assert entry.record == r  # what is needed to bring it back
    start = b.last_change()
    assert b.restore_vfolder(entry.record, entry.path)
    assert a.vfolder(r.id) == r and a.trash() == []
    assert [(c.kind, c.key) for c in a.changes(start)] == [("vfolder", r.id)]
    assert not a.restore_vfolder(r, "/srv/.trash/r")  # gone from the trash (purged): no
    a.delete_vfolder(r.id, TrashRecord("/srv/.trash/r2", "local", r.id, 4.0))
    assert b.trash()[0].record is None  # deleted without its record: not restorable


def test_a_store_has_one_identity(store_pair: tuple[Store, Store], tmp_path: Path) -> None:
    a, b = store_pair
    assert a.epoch() == b.epoch() == a.epoch() != ""  # made once, the same for every handle
    other = open_store(f"sqlite://{tmp_path}/other/state.db")
    try:
        assert other.epoch() != a.epoch()  # another (or an emptied) store is another one
    finally:
        other.close()


# -- the SQLite store's own --------------------------------------------------------------------
def test_sqlite_urls() -> None:
    assert sqlite_path("sqlite:///var/lib/vfusefs/state.db") == "/var/lib/vfusefs/state.db"
    assert sqlite_path("sqlite:////var/lib/vfusefs/state.db") == "/var/lib/vfusefs/state.db"
    for bad in ("sqlite://state.db", "sqlite:relative.db", "redis://x"):
        with pytest.raises(StoreError):
            sqlite_path(bad)
    with pytest.raises(StoreError, match="use sqlite:///ABS/PATH, redis://"):
        open_store("postgres://x")


def test_an_unusable_sqlite_file_is_one_store_error(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open store"):
        open_store(f"sqlite://{tmp_path}/state.db")


def test_a_schema_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    """A state.db written before per-node usage keeps its vfolders, usage and trash; its global
    clean flag is dropped (the next start recounts once)."""
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE vfolders (id TEXT PRIMARY KEY, host TEXT NOT NULL, native_path TEXT NOT NULL,
            scope TEXT NOT NULL DEFAULT '', quota_bytes INTEGER NOT NULL DEFAULT 0,
            quota_inodes INTEGER NOT NULL DEFAULT 0, grants TEXT NOT NULL DEFAULT '{}',
            created REAL NOT NULL);
        CREATE TABLE trash (path TEXT PRIMARY KEY, host TEXT NOT NULL, vfolder TEXT NOT NULL,
            deleted REAL NOT NULL);
        CREATE TABLE usage (vfolder TEXT PRIMARY KEY, bytes INTEGER NOT NULL,
            inodes INTEGER NOT NULL, scanned REAL);
        CREATE TABLE scopes (scope TEXT PRIMARY KEY, quota_bytes INTEGER NOT NULL DEFAULT 0,
            quota_inodes INTEGER NOT NULL DEFAULT 0);
        INSERT INTO meta VALUES ('schema', '1'), ('clean', '1');
        INSERT INTO vfolders VALUES ('6f1c2a3e-0000-4000-8000-000000000001', 'local', '/srv/a',
            '', 5, 0, '{"*": "rw"}', 1.0);
        INSERT INTO usage VALUES ('6f1c2a3e-0000-4000-8000-000000000001', 4096, 1, NULL);
        INSERT INTO trash VALUES ('/srv/.trash/b', 'local', 'b', 2.0);
    """)
    db.commit()
    db.close()
    s = open_store(f"sqlite://{path}")
    try:
        (rec,) = s.vfolders()
        assert (rec.quota_bytes, rec.grants) == (5, {"*": "rw"})
        assert s.usage() == {rec.id: (4096, 1)}
        assert [t.path for t in s.trash()] == ["/srv/.trash/b"]
        assert s.claim_trash("/srv/.trash/b", "n1", 60)
        assert not s.clean("anything")
        s.add_usage("n1", [(rec.id, 4096, 1)])
        assert s.usage() == {rec.id: (8192, 2)}
    finally:
        s.close()


# -- the daemon follows the feed ---------------------------------------------------------------
def wait_for(cond: Callable[[], bool], seconds: float = 3.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < seconds, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.mount
@pytest.mark.parametrize("kind", STORES)
def test_another_writers_changes_reach_the_mount(
    request: pytest.FixtureRequest, world_dir: Path, container: Container, kind: str
) -> None:
    """Grants, limits and vfolders changed in the store by another writer (a second handle on
    the daemon's store: SQLite's file, or Redis as another node would) reach callers within
    one second, through the same path as a change made through this daemon's API."""
    url = None
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        server.flush()
        url = server.url
    daemon = Daemon(world_dir, store_url=url).start()
    try:
        changes_reach_the_mount(daemon, container)
    finally:
        assert daemon.stop() == 0


def changes_reach_the_mount(daemon: Daemon, container: Container) -> None:
    who = f"cgroup:{container.cgroup}"
    vf = daemon.vfolder(grants=[{"principal": who, "mode": "rw"}])
    assert container.sh(vf, "echo a > f").returncode == 0
    other = open_store(daemon.store_url)
    try:
        rec = other.vfolder(vf.name)
        assert rec is not None
        rec.grants[who] = "ro"
        rec.quota_inodes = 7
        other.put_vfolder(rec)
        took = wait_for(lambda: container.sh(vf, "echo b > g").returncode != 0)
        assert container.sh(vf, "cat f").stdout == "a\n"  # still readable: ro
        assert daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").json()["quota_inodes"] == 7
        # a vfolder created by another writer, its directory made by it, appears
        new = record(
            native_path=str(Path(daemon.hosts["local"]["path"]) / str(uuid.uuid4())),
            grants={who: "rwd"},
        )
        new.id = Path(new.native_path).name
        Path(new.native_path).mkdir()
        other.put_vfolder(new)
        wait_for(lambda: container.sh(daemon.mnt / "local" / new.id, "echo c > h").returncode == 0)
        # one whose directory this node cannot see is not served, and blocks nothing after it
        unseen = record(native_path=str(Path(daemon.hosts["local"]["path"]) / "not-here"))
        other.put_vfolder(unseen)
        wait_for(lambda: "is not there on this node" in daemon.log())
        # and one it deletes disappears
        other.delete_vfolder(vf.name, None)
        wait_for(lambda: not (daemon.mnt / "local" / vf.name).exists())
        assert daemon.api("GET", f"/v1/hosts/local/vfolders/{vf.name}").status_code == 404
    finally:
        other.close()
    print(f"grant change reached the container in {took:.2f} s")
    assert took < 1.5


@pytest.mark.mount
def test_a_redis_outage_and_an_emptied_redis(world_dir: Path) -> None:
    """Redis goes away: the daemon says so (status, STATUS line, one log line), reads and
    metadata keep working.  It comes back empty (it lost its data): the daemon writes back what
    it serves, and follows the feed again."""
    redis = RedisServer(world_dir / "redis-own")
    daemon = Daemon(world_dir, store_url=redis.url).start()
    try:
        vf = daemon.vfolder(quota_bytes=1 << 30)
        (vf / "f").write_text("kept\n")
        assert daemon.api("GET", "/v1/status").json()["store"]["connected"] is True
        redis.stop()
        wait_for(lambda: daemon.api("GET", "/v1/status").json()["store"]["connected"] is False)
        assert "store redis: disconnected" in daemon.cli("status").stdout
        assert (vf / "f").read_text() == "kept\n" and os.listdir(vf) == ["f"]  # still served
        redis = RedisServer(world_dir / "redis-own")  # the same socket, nothing in it
        wait_for(lambda: daemon.api("GET", "/v1/status").json()["store"]["connected"] is True)
        other = open_store(redis.url)
        try:
            wait_for(lambda: other.vfolder(vf.name) is not None)
            rec = other.vfolder(vf.name)
            assert rec is not None and rec.quota_bytes == 1 << 30
            assert other.usage()[vf.name][1] == 1  # its usage came back too
            rec.quota_inodes = 5  # and the feed is followed again: another writer's change lands
            other.put_vfolder(rec)
            path = f"/v1/hosts/local/vfolders/{vf.name}"
            wait_for(lambda: daemon.api("GET", path).json()["quota_inodes"] == 5)
        finally:
            other.close()
        log = daemon.log()
        assert log.count("store unreachable") == 1 and "store reachable again" in log
        assert "wrote back 1 vfolder(s)" in log
        assert "Traceback" not in log
    finally:
        daemon.stop(check=False)
        redis.stop()
