"""What only the PostgreSQL backend has: its schema and migrations, the database enforcing one
active run per machine, races of processes and threads against one table, connection loss in
the middle of a transaction, LISTEN/NOTIFY, lock timeouts, fork safety. (The contract shared
with the file store is tested by test_store.py and test_lifecycle.py on both backends.)"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
from backends import Backend, fresh_table
from racing import merge as _merge
from racing import overlaps as _overlaps
from racing import replay as _replay
from racing import threads as _threads

from runstore import (
    CorruptStoreError,
    HistoryTruncatedError,
    InvalidRunError,
    LockTimeoutError,
    PrepareOutcome,
    Run,
    Status,
    StoreIOError,
)
from runstore import postgres as pg_module
from runstore.pgschema import SCHEMA_VERSION, Names
from runstore.pgschema import migrate as migrate_schema
from runstore.postgres import DatabaseConnectionError, PostgresStore

pytestmark = pytest.mark.postgres
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def pg(pg_dsn: str) -> Backend:
    """A fresh table on the session's server."""
    return Backend("postgres", pg_dsn, fresh_table())


@pytest.fixture
def admin(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection for raw SQL."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def opened(pg: Backend) -> Iterator[Callable[..., PostgresStore]]:
    """Open PostgresStores on ``pg``'s table; all are closed when the test ends."""
    stores: list[PostgresStore] = []

    def open_(**options: Any) -> PostgresStore:
        s = pg.open(**options)
        assert isinstance(s, PostgresStore)
        stores.append(s)
        return s

    try:
        yield open_
    finally:
        for s in stores:
            s.close()


def _make(machine: str, h: str = "h") -> Callable[[], Run]:
    return lambda: Run(machine, f"/tests/{h}", h)


# -- schema and migrations ------------------------------------------------------------------


def test_schema_is_created_and_its_version_recorded(
    opened: Callable[..., PostgresStore], pg: Backend, admin: psycopg.Connection[Any]
) -> None:
    """Opening a store on a missing table creates every object and records each version."""
    store = opened()
    assert store.schema_version == SCHEMA_VERSION
    rows = admin.execute(f"SELECT version FROM {pg.table}_schema ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    for suffix in ("", "_changes", "_feed", "_schema", "_seq", "_one_active"):
        found = admin.execute("SELECT to_regclass(%s)", [pg.table + suffix]).fetchone()
        assert found is not None and found[0] is not None, suffix


def test_an_older_schema_is_migrated_on_open_keeping_its_runs(
    opened: Callable[..., PostgresStore], pg: Backend, admin: psycopg.Connection[Any]
) -> None:
    """A version-1 table (no change feed yet) is migrated on open; its runs are kept."""
    assert migrate_schema(admin, pg.table, target=1) == (0, 1)
    admin.execute(f"INSERT INTO {pg.table} (id, machine, test_dir, test_dir_hash, status, "
                  "revision) VALUES ('old-1', 'm1', '/t', 'h', 'running', 3)")
    store = opened()
    assert store.schema_version == SCHEMA_VERSION
    (old,) = store.list()
    assert (old.id, old.status, old.revision) == ("old-1", Status.RUNNING, 3)
    assert store.prepare_atomic("m1", "h", _make("m1"))[1] is PrepareOutcome.REUSE
    store.finish("old-1", Status.COMPLETED)
    assert [(c.seq, c.run.id) for c in store.changes()] == [(1, "old-1")]
    assert migrate_schema(admin, pg.table) == (SCHEMA_VERSION, SCHEMA_VERSION)  # idempotent


def test_a_newer_schema_is_refused(
    opened: Callable[..., PostgresStore], pg: Backend, admin: psycopg.Connection[Any]
) -> None:
    """A table written by a newer runstore is refused, naming both versions, untouched."""
    opened().close()
    admin.execute(f"INSERT INTO {pg.table}_schema (version) VALUES (99)")
    with pytest.raises(CorruptStoreError, match="schema version 99 is newer"):
        opened()


def test_concurrent_first_opens_create_the_schema_once(pg: Backend) -> None:
    """Eight stores opening a missing table at once all succeed and share one schema."""
    errors: list[str] = []
    stores: list[Any] = []
    barrier = threading.Barrier(8)

    def open_one() -> None:
        barrier.wait()
        try:
            stores.append(pg.open())
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors[0]
        run = stores[0].create(Run("m1", "/t", "h"))
        assert all(s.get(run.id) == run for s in stores)
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("table", ["Runs", "runs; drop table x", "1runs", "", "r" * 41])
def test_table_names_must_be_plain_identifiers(pg_dsn: str, table: str) -> None:
    """A table name that is not a short plain identifier is refused before connecting."""
    with pytest.raises(InvalidRunError, match="plain identifier"):
        PostgresStore(pg_dsn, table=table)


def test_stores_on_two_tables_of_one_database_are_independent(
    pg: Backend, opened: Callable[..., PostgresStore]
) -> None:
    """Each table is its own store: runs, active machines and the change feed."""
    a = opened()
    with pg.sibling("other").open() as b:
        ra = a.prepare_atomic("m1", "h", _make("m1"))[0]
        rb, outcome = b.prepare_atomic("m1", "h2", _make("m1", "h2"))
        assert outcome is PrepareOutcome.CREATED
        assert a.list() == [ra] and b.list() == [rb]
        assert [c.run.id for c in a.changes()] == [ra.id]


# -- the database enforces the invariant -----------------------------------------------------


def test_the_index_refuses_a_second_active_run_even_from_raw_sql(
    opened: Callable[..., PostgresStore], pg: Backend, admin: psycopg.Connection[Any]
) -> None:
    """The partial unique index refuses a second pending/running row for a machine whoever
    writes it; terminal rows beside it are fine."""
    run = opened().prepare_atomic("m1", "h", _make("m1"))[0]
    insert = (f"INSERT INTO {pg.table} (id, machine, test_dir, test_dir_hash, status, revision)"
              " VALUES (%s, 'm1', '/t', 'h', %s, 1)")
    admin.execute(insert, ["raw-done", "failed"])
    for status in ("pending", "running"):
        with pytest.raises(psycopg.errors.UniqueViolation, match=f"{pg.table}_one_active"):
            admin.execute(insert, [f"raw-{status}", status])
    with pytest.raises(psycopg.errors.UniqueViolation):
        admin.execute(f"UPDATE {pg.table} SET status = 'running' WHERE id = 'raw-done'")
    assert [r.id for r in opened().list()] == [run.id, "raw-done"]


def test_a_row_of_unknown_status_is_refused_by_the_table(
    opened: Callable[..., PostgresStore], pg: Backend, admin: psycopg.Connection[Any]
) -> None:
    """The table's CHECK constraint keeps statuses runstore cannot read out."""
    opened()
    with pytest.raises(psycopg.errors.CheckViolation):
        admin.execute(f"INSERT INTO {pg.table} (id, machine, test_dir, test_dir_hash, status, "
                      "revision) VALUES ('x', 'm1', '/t', 'h', 'skipped', 1)")


# -- races: processes and threads ------------------------------------------------------------


def _race_worker(backend: Backend, machines: list[str], attempts: int, threads: int,
                 seed: int, out: str, go: Any) -> None:
    """A dispatcher process: ``threads`` threads sharing one PostgresStore (its pool)."""
    try:
        store = backend.open(lock_timeout=60)
        go.wait(30)
        result = _threads(lambda i: store, machines, attempts, threads, seed)
        store.close()
    except Exception:
        result = {"created": [], "counts": {}, "errors": [traceback.format_exc()]}
    Path(out).write_text(json.dumps(result))


def _check_race(result: dict[str, Any], store: PostgresStore) -> dict[str, int]:
    """The file store's race checks, on the database: no overlap of two active runs of one
    machine, no duplicate id, a change feed in commit order that replays without a second
    active run, a skipped revision or an id out of order, and every run completed."""
    assert not result["errors"], "\n".join(result["errors"][:3])
    created = result["created"]
    ids = [c[1] for c in created]
    assert len(ids) == len(set(ids)), "duplicate ids"
    overlapping = _overlaps(created)
    assert not overlapping, f"{len(overlapping)} overlapping active runs: {overlapping[:5]}"
    changes = list(store.changes())
    seqs = [c.seq for c in changes]
    assert seqs == list(range(1, len(seqs) + 1)), "seqs out of commit order or with gaps"
    records = [{"seq": c.seq, "change": c.type.value, "id": c.run.id, "machine": c.run.machine,
                "status": c.run.status.value, "revision": c.run.revision} for c in changes]
    problems = _replay(records)
    assert not problems, problems[:5]
    heartbeats = sum(1 for c in changes if c.type.value == "heartbeat")
    assert len(changes) == 3 * len(ids) + heartbeats
    runs = store.list()
    assert sorted(r.id for r in runs) == sorted(ids)
    assert [r.id for r in runs] == sorted(ids), "insertion order is not id order"
    assert store.active() == []
    assert all(r.status is Status.COMPLETED and r.revision >= 3 for r in runs)
    return {"created": len(ids), "changes": len(changes)}


@pytest.mark.timeout(120)
def test_processes_racing_prepare_never_overlap(
    pg: Backend, opened: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """4 processes x 2 threads racing the dispatcher cycle on 3 machines against one table:
    never two active runs of a machine, no duplicate id, no lost update."""
    store = opened()
    procs, threads, attempts = 4, 2, 60
    machines = ["m0", "m1", "m2"]
    go = FORK.Event()
    outs = [tmp_path / f"worker-{i}.json" for i in range(procs)]
    workers = [FORK.Process(target=_race_worker, args=(pg, machines, attempts, threads, i,
                                                       str(outs[i]), go))
               for i in range(procs)]
    try:
        for w in workers:
            w.start()
        go.set()
        for w in workers:
            w.join(90)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
            w.join()
    assert [w.exitcode for w in workers] == [0] * procs
    result = _merge([json.loads(out.read_text()) for out in outs])
    assert sum(result["counts"].values()) == procs * threads * attempts
    found = _check_race(result, store)
    assert found["created"] > 20 and result["counts"].get("BUSY", 0) > 0


@pytest.mark.timeout(60)
def test_threads_share_one_store_through_its_pool(opened: Callable[..., PostgresStore]) -> None:
    """Eight threads on one store with a pool of three connections keep every invariant."""
    store = opened(pool_size=3)
    result = _threads(lambda i: store, ["m0", "m1"], 40, 8, seed=7)
    _check_race(result, store)


# -- connection loss -------------------------------------------------------------------------


def _kill_at(point: str, admin: psycopg.Connection[Any], table: str,
             wrote: list[bool]) -> Callable[[str, Any], None]:
    """A test hook that terminates the store's own server session once, at ``point``,
    while its transaction is open, and waits until the session is gone. ``wrote`` gets
    whether that transaction had written to ``table`` by then (it holds a RowExclusiveLock)."""

    def hook(at: str, conn: Any) -> None:
        if at == point and not wrote:
            pid = conn.info.backend_pid
            row = admin.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND mode = "
                                "'RowExclusiveLock' AND relation = %s::regclass",
                                [pid, table]).fetchone()
            wrote.append(bool(row and row[0]))
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])

    return hook


@pytest.fixture
def secret_store(pg: Backend) -> Iterator[PostgresStore]:
    """A store whose DSN carries a password (trust auth ignores it): never in a message."""
    store = PostgresStore(pg.location + " password=hunter2", table=pg.table)
    try:
        yield store
    finally:
        store.close()


def _check_clear(err: DatabaseConnectionError, applied: bool | None) -> None:
    text = str(err)
    assert "hunter2" not in text and "hunter2" not in repr(err.args)
    assert "dbname=postgres" in text and "the next call reconnects" in text
    assert err.applied is applied
    if applied is False:
        assert "rolled back: nothing of this call was applied" in text
    assert isinstance(err, StoreIOError) and isinstance(err, ConnectionError)
    assert str(pickle.loads(pickle.dumps(err))) == text


def test_connection_killed_inside_prepare_atomic_applies_nothing(
    secret_store: PostgresStore, admin: psycopg.Connection[Any]
) -> None:
    """Killed after the run row was inserted, before the change feed and COMMIT: a clear
    error, no run and no change stored, and the next call reconnects and succeeds."""
    store, wrote = secret_store, []
    store._test_hook = _kill_at("before_feed", admin, store.table, wrote)
    with pytest.raises(DatabaseConnectionError) as info:
        store.prepare_atomic("m1", "h", _make("m1"))
    assert wrote == [True], "the run row was not written when the connection was killed"
    _check_clear(info.value, applied=False)
    store._test_hook = None
    assert store.list() == [] and store.last_seq() == 0
    run, outcome = store.prepare_atomic("m1", "h", _make("m1"))
    assert outcome is PrepareOutcome.CREATED
    assert [c.run.id for c in store.changes()] == [run.id]


def test_connection_killed_before_commit_is_all_or_nothing(
    secret_store: PostgresStore, admin: psycopg.Connection[Any]
) -> None:
    """Killed with everything written but not committed: the error says the outcome is
    unknown; the run and its change are both there or both absent; the next call works."""
    store, wrote = secret_store, []
    store._test_hook = _kill_at("before_commit", admin, store.table, wrote)
    with pytest.raises(DatabaseConnectionError) as info:
        store.prepare_atomic("m1", "h", _make("m1"))
    assert wrote == [True]
    _check_clear(info.value, applied=None)
    assert "may or may not have been applied" in str(info.value)
    store._test_hook = None
    runs, changes = store.list(), list(store.changes())
    assert [r.id for r in runs] == [c.run.id for c in changes]
    assert store.prepare_atomic("m1", "h", _make("m1"))[1] is (
        PrepareOutcome.REUSE if runs else PrepareOutcome.CREATED)


def test_connection_killed_inside_update_applies_nothing(
    secret_store: PostgresStore, admin: psycopg.Connection[Any]
) -> None:
    """Killed after the UPDATE, before the change feed and COMMIT: the stored run keeps its
    revision, the same copy updates cleanly on the next call."""
    store, wrote = secret_store, []
    run = store.prepare_atomic("m1", "h", _make("m1"))[0]
    store._test_hook = _kill_at("before_feed", admin, store.table, wrote)
    with pytest.raises(DatabaseConnectionError) as info:
        store.start(run.id)
    assert wrote == [True], "the UPDATE had not run when the connection was killed"
    _check_clear(info.value, applied=False)
    store._test_hook = None
    assert store.get(run.id) == run and store.last_seq() == 1
    started = store.start(run.id)
    assert started.revision == run.revision + 1 and started.status is Status.RUNNING
    assert [c.seq for c in store.changes()] == [1, 2]


def test_connection_killed_inside_a_plain_update_applies_nothing(
    secret_store: PostgresStore, admin: psycopg.Connection[Any]
) -> None:
    """The same through ``update()`` itself: the new field is not stored, the revision is
    unchanged, and the same stale-free copy is accepted on the next call."""
    store, wrote = secret_store, []
    run = store.prepare_atomic("m1", "h", _make("m1"))[0]
    edited = attrs.evolve(run, logs_path="/logs/m1")
    store._test_hook = _kill_at("before_feed", admin, store.table, wrote)
    with pytest.raises(DatabaseConnectionError) as info:
        store.update(edited)
    assert wrote == [True], "the UPDATE had not run when the connection was killed"
    _check_clear(info.value, applied=False)
    store._test_hook = None
    assert store.get(run.id) == run and store.last_seq() == 1
    stored = store.update(edited)
    assert stored.logs_path == "/logs/m1" and stored.revision == run.revision + 1


def test_all_pooled_connections_killed_then_next_call_reconnects(
    opened: Callable[..., PostgresStore], admin: psycopg.Connection[Any]
) -> None:
    """When every session of the store is terminated while idle (a server restart looks
    like this), the next call gets a fresh connection instead of an error."""
    store = opened()
    run = store.prepare_atomic("m1", "h", _make("m1"))[0]
    admin.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                  "WHERE application_name = 'runstore' AND pid <> pg_backend_pid()")
    assert store.start(run.id).status is Status.RUNNING


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    """Opening a store on a server that is not there names it and says nothing changed."""
    with pytest.raises(DatabaseConnectionError, match="connecting to on PostgreSQL") as info:
        PostgresStore(f"host={tmp_path} port=5432 user=postgres dbname=postgres "
                      "password=hunter2")
    assert str(tmp_path) in str(info.value) and "hunter2" not in str(info.value)


# -- locks, durability, fork -----------------------------------------------------------------


def test_a_held_lock_times_out_after_lock_timeout(
    opened: Callable[..., PostgresStore], pg: Backend, pg_dsn: str
) -> None:
    """A session holding the change feed's lock makes writers fail after lock_timeout with
    LockTimeoutError naming the table; nothing is stored; they work once it is released."""
    store = opened(lock_timeout=0.3)
    with psycopg.connect(pg_dsn) as holder:
        holder.execute(f"LOCK TABLE {pg.table}_changes IN EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(LockTimeoutError, match=f"{pg.table}.*0.3 s") as info:
            store.create(Run("m1", "/t", "h"))
        assert 0.25 < time.monotonic() - started < 5
        assert isinstance(info.value, TimeoutError)
        assert store.list() == []  # reading never waits for the lock
        holder.rollback()
    assert store.create(Run("m1", "/t", "h")).revision == 1


@pytest.mark.parametrize("durable", [True, False])
def test_durable_false_turns_synchronous_commit_off(
    opened: Callable[..., PostgresStore], durable: bool
) -> None:
    """durable=False is synchronous_commit=off on the store's sessions; the default is on."""
    store = opened(durable=durable)
    with store._connection("test") as conn:
        row = conn.execute("SHOW synchronous_commit").fetchone()
    assert row is not None and row[0] == ("on" if durable else "off")


def _child_creates(store: PostgresStore, out: str) -> None:
    try:
        run = store.create(Run("child", "/t", "h"))
        Path(out).write_text(run.id)
    finally:
        store.close()


def test_forked_child_uses_its_own_connections(
    opened: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """A child forked after the parent used the store writes through its own pool, and the
    parent's connections keep working (the child neither uses nor closes them)."""
    store = opened()
    parent_run = store.create(Run("parent", "/t", "h"))
    out = tmp_path / "child"
    child = FORK.Process(target=_child_creates, args=(store, str(out)))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert store.get(out.read_text()).machine == "child"
    assert store.finish(parent_run.id, Status.FAILED).status is Status.FAILED


# -- the change feed -------------------------------------------------------------------------


def test_watch_is_woken_by_notify_from_another_store(
    opened: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch,
    admin: psycopg.Connection[Any]
) -> None:
    """A change committed by another store reaches a waiting watch() at once (LISTEN/NOTIFY,
    not the periodic re-read, which is made 30 s here)."""
    monkeypatch.setattr(pg_module, "_WATCH_WAKEUP", 30.0)
    watcher, writer = opened(), opened()
    since = watcher.last_seq()
    written: list[float] = []

    def write_when_listening() -> None:
        for _ in range(500):  # wait until the watcher's session is LISTENing
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                "'LISTEN%%' AND state = 'idle'").fetchone()
            if row and row[0]:
                break
            time.sleep(0.01)
        written.append(time.monotonic())
        writer.create(Run("m1", "/t", "h"))

    thread = threading.Thread(target=write_when_listening)
    thread.start()
    try:
        change = next(watcher.watch(since, timeout=20))
        delivered = time.monotonic()
    finally:
        thread.join()
    assert change.run.machine == "m1" and change.seq == since + 1
    assert delivered - written[0] < 2.0, f"delivered after {delivered - written[0]:.2f} s"


def test_watch_polls_when_it_cannot_listen(
    opened: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a listening connection watch() falls back to polling and still delivers."""
    store = opened()
    monkeypatch.setattr(PostgresStore, "_listen", lambda self: None)
    run = store.create(Run("m1", "/t", "h"))
    got = [c.run.id for c in store.watch(0, timeout=0.2, poll_interval=0.01)]
    assert got == [run.id]


def test_feed_is_trimmed_automatically_and_says_so(
    opened: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The changes table keeps RETAIN_CHANGES..RETAIN_CHANGES + TRIM_EVERY changes; older
    history raises HistoryTruncatedError with the oldest retained seq."""
    monkeypatch.setattr(pg_module, "RETAIN_CHANGES", 10)
    monkeypatch.setattr(pg_module, "TRIM_EVERY", 8)
    store = opened(durable=False)
    run = store.create(Run("m1", "/t", "h"))
    for _ in range(40):
        store.heartbeat(run.id)
    stats = store.stats()
    assert stats.last_seq == 41
    retained = stats.retained_changes
    assert stats.superseded_lines is None
    assert 10 <= retained <= 18 and stats.oldest_seq == 41 - retained + 1
    with pytest.raises(HistoryTruncatedError) as info:
        store.changes(0)
    assert info.value.oldest_seq == stats.oldest_seq
    assert [c.seq for c in store.changes(stats.oldest_seq - 1)] == list(
        range(stats.oldest_seq, 42))
    assert stats.path == store.server and "dbname=postgres" in stats.path


def test_names_are_derived_from_the_table() -> None:
    """Every object's name starts with the table's, so stores share a database safely."""
    n = Names.of("jobs")
    assert (n.one_active, n.channel) == ("jobs_one_active", "jobs_changes")
