"""What only the PostgreSQL backend has: its schema and migrations, the database enforcing one
active run per machine, races of processes and threads against one table, connection loss in
the middle of a transaction, LISTEN/NOTIFY, lock timeouts, fork safety. (The contract shared
with the file store is tested by test_store.py and test_lifecycle.py on both backends.)"""

from __future__ import annotations

import io
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
from faults import stop_all
from racing import merge as _merge, overlaps as _overlaps, replay as _replay, threads as _threads

from runstore import (
    CorruptStoreError,
    HistoryTruncatedError,
    InvalidRunError,
    LockTimeoutError,
    PrepareOutcome,
    Run,
    Status,
    StoreIOError,
    _pgbase as pgbase,
    postgres as pg_module,
)
from runstore._pgschema import SCHEMA_VERSION, Names, upgrade_schema as migrate_schema
from runstore.postgres import DatabaseConnectionError, PostgresStore

pytestmark = pytest.mark.postgres
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def admin(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection for raw SQL."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


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


def test_the_longest_table_name_gets_every_object(pg_dsn: str,
                                                  admin: psycopg.Connection[Any]) -> None:
    """A table name of 40 characters (the most allowed) fits every derived name within
    PostgreSQL's 63 bytes, through every migration."""
    table = fresh_table().ljust(40, "x")
    store = Backend("postgres", pg_dsn, table).open()
    try:
        assert isinstance(store, PostgresStore) and store.schema_version == SCHEMA_VERSION
        run, _ = store.prepare_atomic("m1", "h", _make("m1"))
        store.start(run.id)
        store.finish(run.id, Status.COMPLETED, exit_code=0)
        assert [c.type.value for c in store.changes()] == [
            "run_created", "run_started", "run_finished"]
        found = admin.execute("SELECT count(*) FROM pg_type WHERE typname LIKE %s "
                              "AND typtype = 'd'", [table + "$%"]).fetchone()
        assert found == (4,)
    finally:
        store.close()


def _works(store: Any) -> None:
    run, outcome = store.prepare_atomic("m1", "h", _make("m1"))
    assert outcome is PrepareOutcome.CREATED
    store.start(run.id)
    store.finish(run.id, Status.COMPLETED, exit_code=0)
    assert [r.id for r in store.list()] == [run.id]


def test_stores_named_like_each_others_objects_share_a_schema(
        pg_dsn: str, admin: psycopg.Connection[Any]) -> None:
    """Stores whose table names are another store's table name plus a suffix (the names
    its own objects could take) all open and keep their runs apart, whichever opens
    first."""
    base = fresh_table()
    names = [f"{base}_status_value", base, f"{base}_name", f"{base}_changes_x"]
    stores = [Backend("postgres", pg_dsn, name).open() for name in names]
    try:
        for store in stores:
            _works(store)
    finally:
        for store in stores:
            store.close()


def test_a_store_opens_where_its_check_names_were_taken(
        pg_dsn: str, admin: psycopg.Connection[Any]) -> None:
    """When another table of the schema already has a constraint named as a store's
    checks would be (``<table>_id_check``), PostgreSQL numbers the store's; the upgrade
    to domains still finds and replaces them, and leaves the other table's alone."""
    table = fresh_table()
    other = fresh_table()
    admin.execute(f"CREATE TABLE {other} (id text, CONSTRAINT {table}_id_check "
                  "CHECK (id <> 'x'), CONSTRAINT {t}_status_check CHECK (id <> 'y'))"
                  .replace("{t}", table))
    store = Backend("postgres", pg_dsn, table).open()
    try:
        _works(store)
        checks = admin.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE contype = 'c' "
            "AND conrelid IN (%s::regclass, %s::regclass, %s::regclass)",
            [table, table + "_changes", other]).fetchall()
        assert sorted(checks) == [(other, f"{table}_id_check"), (other, f"{table}_status_check")]
    finally:
        store.close()


def test_a_store_whose_tables_were_dropped_is_created_again(
        pg_dsn: str, admin: psycopg.Connection[Any]) -> None:
    """Dropping a store's tables and sequence (its domains left behind) and opening it
    again creates it afresh."""
    table = fresh_table()
    store = Backend("postgres", pg_dsn, table).open()
    _works(store)
    store.close()
    admin.execute(f"DROP TABLE {table}, {table}_changes, {table}_feed, {table}_schema; "
                  f"DROP SEQUENCE {table}_seq")
    store = Backend("postgres", pg_dsn, table).open()
    try:
        assert store.list() == []
        _works(store)
    finally:
        store.close()


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


def _v3_change(admin: psycopg.Connection[Any], table: str, run: dict[str, Any],
               change: str) -> None:
    """Write a run's change as a version-3 writer did: the run as JSON in ``run``."""
    admin.execute(f"INSERT INTO {table}_changes (xid, ord, time, change, run) "
                  "VALUES (pg_current_xact_id(), 0, now(), %s, %s)",
                  [change, psycopg.types.json.Jsonb(run)])


def test_changes_written_as_json_before_version_4_are_read_after_the_upgrade(
    opened: Callable[..., PostgresStore], pg: Backend, admin: psycopg.Connection[Any]
) -> None:
    """A version-3 feed keeps each change's run as JSON; after the upgrade to run columns
    those changes read as before, in order with the ones written since, and a follower that
    had read the first resumes after it."""
    assert migrate_schema(admin, pg.table, target=3) == (0, 3)
    base = {"machine": "m1", "test_dir": "/t", "test_dir_hash": "h", "id": "old-1",
            "status": "pending", "revision": 1, "exit_code": None, "started_at": None,
            "ended_at": None, "heartbeat_at": None}
    for field in ("artifacts_path", "logs_path", "error_code", "error_msg", "batch_id",
                  "plan_entry", "owner_host", "owner_start"):
        base[field] = ""
    base["owner_pid"] = None
    admin.execute(f"INSERT INTO {pg.table} (id, machine, test_dir, test_dir_hash, status, "
                  "revision, started_at) VALUES ('old-1', 'm1', '/t', 'h', 'running', 2, "
                  "'2026-01-02T03:04:05.000006Z')")
    _v3_change(admin, pg.table, base, "run_created")
    _v3_change(admin, pg.table, {**base, "status": "running", "revision": 2,
                                 "started_at": "2026-01-02T03:04:05.000006+00:00"},
               "run_started")
    store = opened()
    assert store.schema_version == SCHEMA_VERSION
    first = list(store.changes())
    assert [(c.seq, c.type.value, c.run.status, c.run.revision) for c in first] == [
        (1, "run_created", Status.PENDING, 1), (2, "run_started", Status.RUNNING, 2)]
    assert first[1].run.started_at is not None and first[1].run.started_at.microsecond == 6
    store.finish("old-1", Status.COMPLETED, exit_code=0)
    new = store.create(Run("m2", "/t", "h"))
    after = list(store.changes(2))
    assert [(c.seq, c.type.value, c.run.id) for c in after] == [
        (3, "run_finished", "old-1"), (4, "run_created", new.id)]
    assert after[0].run == store.get("old-1")
    assert after[1].run == store.get(new.id)
    row = admin.execute(f"SELECT run IS NULL, machine FROM {pg.table}_changes "
                        "WHERE seq = 4").fetchone()
    assert row == (True, "m2")  # written as columns, no JSON


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
    machine, no duplicate id, a gap-free change feed that replays without a second active
    run or a skipped revision, and every run completed."""
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
    # ids are made by each client (documented): two creates running at once may be in the
    # feed in the other order than their ids, so only that check of the replay is left out
    problems = [p for p in _replay(records) if "sorts before" not in p]
    assert not problems, problems[:5]
    heartbeats = sum(1 for c in changes if c.type.value == "heartbeat")
    assert len(changes) == 3 * len(ids) + heartbeats
    runs = store.list()
    assert sorted(r.id for r in runs) == sorted(ids)
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
        stop_all(workers)
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
             wrote: list[bool], locked: bool = False) -> Callable[[str, Any], None]:
    """A test hook that terminates the store's own server session once, at ``point``,
    and waits until the session is gone. ``wrote`` gets whether its transaction had written
    to ``table`` by then (it holds a RowExclusiveLock). With ``locked``, the session is
    terminated from another thread once its next statement waits for a lock."""

    def hook(at: str, conn: Any) -> None:
        if at != point or wrote:
            return
        pid = conn.info.backend_pid
        row = admin.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND mode = "
                            "'RowExclusiveLock' AND relation = %s::regclass",
                            [pid, table]).fetchone()
        wrote.append(bool(row and row[0]))
        if not locked:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])
            return

        def kill_when_waiting() -> None:
            with psycopg.connect(admin.info.dsn, autocommit=True) as killer:
                for _ in range(1000):
                    found = killer.execute("SELECT wait_event_type FROM pg_stat_activity "
                                           "WHERE pid = %s", [pid]).fetchone()
                    if found and found[0] == "Lock":
                        break
                    time.sleep(0.01)
                killer.execute("SELECT pg_terminate_backend(%s, 10000)", [pid])

        threading.Thread(target=kill_when_waiting, daemon=True).start()

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
    else:
        assert "may or may not have been applied" in text
    assert isinstance(err, StoreIOError) and isinstance(err, ConnectionError)
    assert str(pickle.loads(pickle.dumps(err))) == text


def test_connection_killed_before_prepare_atomic_writes(
    secret_store: PostgresStore, admin: psycopg.Connection[Any]
) -> None:
    """Killed just before the statement that creates the run is sent (each write is one
    autocommit statement, its own COMMIT): a clear error saying the outcome is unknown; no
    run and no change stored; the next call reconnects and succeeds."""
    store, wrote = secret_store, []
    store._hit = _kill_at("before_commit", admin, store.table, wrote)
    with pytest.raises(DatabaseConnectionError) as info:
        store.prepare_atomic("m1", "h", _make("m1"))
    assert wrote == [False]
    _check_clear(info.value, applied=None)
    del store._hit  # back to the class's
    assert store.list() == [] and store.last_seq() == 0
    run, outcome = store.prepare_atomic("m1", "h", _make("m1"))
    assert outcome is PrepareOutcome.CREATED
    assert [c.run.id for c in store.changes()] == [run.id]


@pytest.mark.parametrize("call", ["start", "update", "create"])
def test_connection_killed_during_a_write_applies_nothing(
    secret_store: PostgresStore, admin: psycopg.Connection[Any], pg: Backend, call: str
) -> None:
    """Killed while its write statement waits for a row lock (the run row and its change
    are one statement): the error says the outcome is unknown, and indeed neither the run
    nor the feed changed; the same call then succeeds."""
    store, wrote = secret_store, []
    run = store.prepare_atomic("m1", "h", _make("m1"))[0]
    edited = attrs.evolve(run, logs_path="/logs/m1")
    with psycopg.connect(pg.location) as holder:
        if call == "create":  # an uncommitted pending run of m2: the insert waits for it
            holder.execute(f"INSERT INTO {pg.table} (id, machine, test_dir, test_dir_hash, "
                           "status, revision) VALUES ('held', 'm2', '/t', 'h', 'pending', 1)")
        else:
            holder.execute(f"SELECT 1 FROM {pg.table} WHERE id = %s FOR UPDATE", [run.id])
        store._hit = _kill_at("before_commit", admin, store.table, wrote, locked=True)
        with pytest.raises(DatabaseConnectionError) as info:
            if call == "start":
                store.start(run.id)
            elif call == "update":
                store.update(edited)
            else:
                store.create(Run("m2", "/t", "h"))
        holder.rollback()
    _check_clear(info.value, applied=None)
    del store._hit  # back to the class's
    assert store.list() == [run] and store.last_seq() == 1
    if call == "start":
        assert store.start(run.id).revision == run.revision + 1
    elif call == "update":
        assert store.update(edited).logs_path == "/logs/m1"
    else:
        assert store.create(Run("m2", "/t", "h")).machine == "m2"
    assert [c.seq for c in store.changes()] == [1, 2]


def test_connection_killed_inside_an_import_applies_nothing(
    secret_store: PostgresStore, admin: psycopg.Connection[Any]
) -> None:
    """Killed inside the import's transaction, its runs written and its changes not yet:
    rolled back (the error says so), nothing imported; the next import works."""
    store, wrote = secret_store, []
    runs = [Run(f"m{i}", "/t", "h", id=f"imp-{i}", status=Status.COMPLETED) for i in range(3)]
    store._hit = _kill_at("before_feed", admin, store.table, wrote)
    with pytest.raises(DatabaseConnectionError) as info:
        store.import_runs(runs)
    assert wrote == [True], "the run rows were not written when the connection was killed"
    _check_clear(info.value, applied=False)
    del store._hit  # back to the class's
    assert store.list() == [] and store.last_seq() == 0
    assert store.import_runs(runs) == 3
    assert [c.run.id for c in store.changes()] == ["imp-0", "imp-1", "imp-2"]


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
    with pytest.raises(DatabaseConnectionError,
                       match=r"connecting to table 'runs' on PostgreSQL") as info:
        PostgresStore(f"host={tmp_path} port=5432 user=postgres dbname=postgres "
                      "password=hunter2")
    assert str(tmp_path) in str(info.value) and "hunter2" not in str(info.value)


# -- locks, durability, fork -----------------------------------------------------------------


def test_a_held_lock_times_out_after_lock_timeout(
    opened: Callable[..., PostgresStore], pg: Backend, pg_dsn: str
) -> None:
    """A session holding a run's row lock makes a writer of that run fail after lock_timeout
    with LockTimeoutError naming the table; so does an uncommitted active run of a machine
    for a creator of that machine; nothing is stored, readers and other writers never wait,
    and the writers work once the locks are released."""
    store = opened(lock_timeout=0.3)
    run = store.create(Run("m1", "/t", "h"))
    with psycopg.connect(pg_dsn) as holder:
        holder.execute(f"SELECT 1 FROM {pg.table} WHERE id = %s FOR UPDATE", [run.id])
        holder.execute(f"INSERT INTO {pg.table} (id, machine, test_dir, test_dir_hash, "
                       "status, revision) VALUES ('held', 'm2', '/t', 'h', 'pending', 1)")
        for write in (lambda: store.start(run.id), lambda: store.create(Run("m2", "/t", "h"))):
            started = time.monotonic()
            with pytest.raises(LockTimeoutError, match=f"{pg.table}.*0.3 s") as info:
                write()
            assert 0.25 < time.monotonic() - started < 5
            assert isinstance(info.value, TimeoutError)
        assert store.list() == [run]  # reading never waits for the lock
        assert store.create(Run("m3", "/t", "h")).machine == "m3"  # nor do other writers
        holder.rollback()
    assert store.start(run.id).revision == 2
    assert store.create(Run("m2", "/t", "h")).revision == 1


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


def test_watch_sees_another_stores_change_promptly_while_idle(
    opened: Callable[..., PostgresStore]
) -> None:
    """A change committed by another store reaches a watch() that has been idle for a while
    (backed off to its longest wait) within that wait and a read."""
    watcher, writer = opened(), opened()
    since = watcher.last_seq()
    written: list[float] = []

    def write_later() -> None:
        time.sleep(1.0)
        written.append(time.monotonic())
        writer.create(Run("m1", "/t", "h"))

    thread = threading.Thread(target=write_later)
    thread.start()
    try:
        change = next(watcher.watch(since, timeout=20))
        delivered = time.monotonic()
    finally:
        thread.join()
    assert change.run.machine == "m1" and change.seq == since + 1
    assert delivered - written[0] < pg_module._WATCH_WAKEUP + 0.5


def test_watch_backs_off_while_nothing_happens(
    opened: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle watch() reads the feed a few times a second, not every poll_interval."""
    store = opened()
    reads: list[int] = []
    real = PostgresStore.changes
    monkeypatch.setattr(PostgresStore, "changes",
                        lambda self, since=0: (reads.append(since), real(self, since))[1])
    assert list(store.watch(0, timeout=1.0, poll_interval=0.005)) == []
    assert 3 <= len(reads) <= 1 / pg_module._WATCH_WAKEUP + 10, len(reads)


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


def test_a_store_called_from_make_with_one_connection_fails_after_lock_timeout(
    opened: Callable[..., PostgresStore]
) -> None:
    """With pool_size=1, calling the store from inside make() waits for the one pooled
    connection for lock_timeout, then fails clearly; the store works afterwards."""
    store = opened(pool_size=1, lock_timeout=0.3)

    def make() -> Run:
        store.list()
        return Run("m1", "/t", "h")

    started = time.monotonic()
    with pytest.raises(DatabaseConnectionError, match="all 1 pooled connections stayed busy"):
        store.prepare_atomic("m1", "h", make)
    assert 0.25 < time.monotonic() - started < 5
    assert store.prepare_atomic("m1", "h", _make("m1"))[1] is PrepareOutcome.CREATED


def _sessions(admin: psycopg.Connection[Any]) -> set[int]:
    rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = "
                         "'runstore' AND pid <> pg_backend_pid()").fetchall()
    return {r[0] for r in rows}


def _pool_full(store: PostgresStore, admin: psycopg.Connection[Any]) -> set[int]:
    """The store's sessions once its pool has opened all ``pool_size`` of them."""
    deadline = time.monotonic() + 10
    while len(sessions := _sessions(admin)) < store.pool_size:
        assert time.monotonic() < deadline, sessions
        time.sleep(0.02)
    return sessions


def test_pooled_connections_are_reused_and_a_dead_one_replaced(
    opened: Callable[..., PostgresStore], admin: psycopg.Connection[Any]
) -> None:
    """The pool keeps its pool_size sessions across calls; once one is ended while idle,
    the call that takes it finds it out at checkout (no error), and the pool opens another
    in its place."""
    store = opened(pool_size=3)
    store.create(Run("m1", "/t", "h"))
    before = _pool_full(store, admin)
    for _ in range(20):
        store.list()
    assert _sessions(admin) == before and len(before) == 3
    with store._connection("testing") as conn:
        killed = conn.info.backend_pid  # the one the next call takes
    admin.execute("SELECT pg_terminate_backend(%s, 10000)", [killed])
    assert len(store.list()) == 1
    after = _pool_full(store, admin)
    assert killed not in after and len(after & before) == 2


def _sessions_that_ran(admin: psycopg.Connection[Any], text: str) -> int:
    """How many of the store's sessions ran, last, a statement containing ``text``."""
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                        "'runstore' AND strpos(query, %s) > 0", [text]).fetchone()
    assert row is not None
    return int(row[0])


def _one_thread_calls(store: PostgresStore, admin: psycopg.Connection[Any]) -> int:
    """The number of pooled sessions that 20 calls of one thread, one after another, used."""
    _pool_full(store, admin)
    run = store.create(Run("m1", "/t", "h"))
    for _ in range(20):
        store.get(run.id)
    return _sessions_that_ran(admin, "WHERE id = $1")


def test_one_thread_keeps_to_one_pooled_connection(
    opened: Callable[..., PostgresStore], admin: psycopg.Connection[Any]
) -> None:
    """Calls made one after another take the connection returned last, so one server
    process serves a single-threaded dispatcher (with warm caches) instead of all of the
    pool's in turn."""
    assert _one_thread_calls(opened(pool_size=3), admin) == 1


def test_a_first_in_first_out_pool_rotates_one_thread_over_all_connections(
    opened: Callable[..., PostgresStore], admin: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: with psycopg's own order (the connection returned first), the same
    calls go round all of the pool's sessions, which the test above tells apart."""
    base = pgbase._Pool.__mro__[1]
    monkeypatch.setattr(pgbase._Pool, "_get_ready_connection", base._get_ready_connection)
    assert _one_thread_calls(opened(pool_size=3), admin) == 3


def test_without_the_checkout_check_a_dead_session_fails_the_call(
    opened: Callable[..., PostgresStore], admin: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: with the socket check at checkout disabled, the call that takes the
    ended session fails, which is what the check spares callers."""
    store = opened(pool_size=1)
    store.create(Run("m1", "/t", "h"))
    (killed,) = _pool_full(store, admin)
    monkeypatch.setattr(pgbase, "_usable", lambda conn: True)
    admin.execute("SELECT pg_terminate_backend(%s, 10000)", [killed])
    with pytest.raises(DatabaseConnectionError):
        store.list()


def test_kept_fields_stored_before_version_5_are_read_after_the_upgrade(
    opened: Callable[..., PostgresStore], pg: Backend, admin: psycopg.Connection[Any]
) -> None:
    """Kept fields stored as ``jsonb`` (schema version 4) read the same after the upgrade
    to ``json`` (in the form jsonb gave them); those stored since keep the form written."""
    assert migrate_schema(admin, pg.table, target=4) == (0, 4)
    admin.execute(f"INSERT INTO {pg.table} (id, machine, test_dir, test_dir_hash, status, "
                  "revision, extra) VALUES ('old-1', 'm1', '/t', 'h', 'completed', 1, "
                  "'{\"xb\": 1, \"xa\": 1e20, \"xs\": \"s\"}'::jsonb)")
    store = opened()
    assert store.schema_version == SCHEMA_VERSION
    store.import_runs([{"id": "new-1", "machine": "m2", "test_dir": "/t",
                        "test_dir_hash": "h", "status": "completed", "xb": 1, "xf": 1e16}])
    out = io.StringIO()
    store.export(out)
    kept = {r["id"]: [(k, v) for k, v in r.items() if k.startswith("x")]
            for r in json.loads(out.getvalue())}
    assert kept["old-1"] == [("xa", 1e20), ("xb", 1), ("xs", "s")]  # as jsonb had them
    assert kept["new-1"] == [("xb", 1), ("xf", 1e16)]
    assert isinstance(kept["new-1"][1][1], float)
    row = admin.execute(f"SELECT pg_typeof(extra)::text FROM {pg.table} LIMIT 1").fetchone()
    assert row == ("json",)


#: raw writes each column's check refuses: (column, SQL value)
_REFUSED = [("id", "''"), ("machine", "''"), ("test_dir_hash", "''"), ("status", "'bogus'"),
            ("revision", "0")]


@pytest.mark.parametrize("start", [0, 5], ids=["created", "from-version-5"])
def test_columns_refuse_what_their_checks_forbid_whoever_writes(
    opened: Callable[..., PostgresStore], pg: Backend, admin: psycopg.Connection[Any],
    start: int
) -> None:
    """A new table, and one upgraded from version 5 (table checks) to domains with its runs,
    refuse a raw SQL write of an empty id, machine or hash, an unknown status, a revision
    below 1 or an unknown change type; the runs kept read as before and ids keep their
    byte order (``COLLATE "C"``)."""
    if start:
        assert migrate_schema(admin, pg.table, target=start) == (0, start)
        admin.execute(f"INSERT INTO {pg.table} (id, machine, test_dir, test_dir_hash, "
                      "status, revision) VALUES ('old-a', 'm1', '/t', 'h', 'completed', 2), "
                      "('old-B', 'm2', '/t', 'h', 'running', 1)")
    store = opened()
    assert store.schema_version == SCHEMA_VERSION == 6
    if start:
        assert [(r.id, r.status, r.revision) for r in store.list()] == [
            ("old-a", Status.COMPLETED, 2), ("old-B", Status.RUNNING, 1)]
        assert store.prepare_atomic("m2", "h", _make("m2"))[1] is PrepareOutcome.REUSE
        assert store.prepare_atomic("m2", "h2", _make("m2", "h2"))[1] is PrepareOutcome.BUSY
    good = {"id": "'new-1'", "machine": "'m9'", "test_dir": "'/t'", "test_dir_hash": "'h'",
            "status": "'pending'", "revision": "1"}
    for column, value in _REFUSED:
        row = {**good, column: value}
        with pytest.raises(psycopg.errors.CheckViolation):
            admin.execute(f"INSERT INTO {pg.table} ({', '.join(row)}) "
                          f"VALUES ({', '.join(row.values())})")
    admin.execute(f"INSERT INTO {pg.table} ({', '.join(good)}) "
                  f"VALUES ({', '.join(good.values())})")
    assert store.get("new-1").machine == "m9"
    for column, value in _REFUSED:
        with pytest.raises(psycopg.errors.CheckViolation):
            admin.execute(f"UPDATE {pg.table} SET {column} = {value} WHERE id = 'new-1'")
    with pytest.raises(psycopg.errors.CheckViolation):
        admin.execute(f"INSERT INTO {pg.table}_changes (xid, time, change) "
                      "VALUES (pg_current_xact_id(), now(), 'run_lost')")
    assert store.get("new-1").machine == "m9"
    ordered = admin.execute(f"SELECT id FROM {pg.table} WHERE id IN ('old-a', 'new-1', 'B') "
                            "ORDER BY id").fetchall()
    collation = admin.execute(
        "SELECT c.collname FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation "
        "WHERE a.attrelid = %s::regclass AND a.attname = 'id'", [pg.table]).fetchone()
    assert collation == ("C",)
    assert ordered == sorted(ordered, key=lambda r: r[0].encode())
