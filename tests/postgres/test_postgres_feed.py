"""The PostgreSQL change feed without a table lock (``runstore._pgfeed``): a follower sees
every committed change exactly once, in one stable order, while many writers commit at once;
the transaction-id horizon is what keeps that order when a numbering is lost; large fields
never hang a write; a server crash loses nothing acknowledged."""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
from backends import Backend, fresh_table, pg_server
from faults import stop_all

from runstore import (
    ConflictError,
    InvalidRunError,
    InvalidTransitionError,
    LockTimeoutError,
    PrepareOutcome,
    Run,
    Status,
    _pgfeed,
    _pgsql,
    postgres as pg_module,
)
from runstore.postgres import DatabaseConnectionError, DatabaseError, PostgresStore

pytestmark = pytest.mark.postgres
FORK = multiprocessing.get_context("fork")
#: the horizon replaced by one that lets every visible change be numbered at once
NO_HORIZON = "pg_snapshot_xmax(pg_current_snapshot())"


def _writer(backend: Backend, k: int, cycles: int, out: str, go: Any) -> None:
    """Dispatcher cycles on machines of its own; writes every version it was answered."""
    versions: list[tuple[str, int]] = []
    error = None
    try:
        store = backend.open(durable=False)
        go.wait(30)
        for i in range(cycles):
            m = f"w{k}-m{i % 3}"
            run, outcome = store.prepare_atomic(m, "h", lambda m=m: Run(m, "/t", "h"))
            assert outcome is PrepareOutcome.CREATED
            started = store.start(run.id)
            done = store.finish(run.id, Status.COMPLETED, exit_code=0)
            versions += [(run.id, run.revision), (started.id, started.revision),
                         (done.id, done.revision)]
        store.close()
    except Exception:
        error = traceback.format_exc()
    Path(out).write_text(json.dumps({"versions": versions, "error": error}))


def _follow_while(store: PostgresStore, writers: list[Any]) -> list[tuple[int, str, int]]:
    """Read the feed from the start, as a follower does, until the writers are done and
    nothing more comes."""
    seen: list[tuple[int, str, int]] = []
    seq = 0
    while True:
        alive = any(w.is_alive() for w in writers)
        batch = list(store.changes(seq))
        for c in batch:
            seen.append((c.seq, c.run.id, c.run.revision))
            seq = c.seq
        if not alive and not batch:
            return seen
        time.sleep(0.002)


@pytest.mark.timeout(180)
def _started(target: Callable[..., None], pg: Backend, processes: int, each: int,
             out: Path) -> tuple[list[Any], list[Path], Any]:
    """``processes`` forked ``target(pg, k, each, <out>k.json, go)``, started: they wait for
    ``go`` to be set, then write their report to their file."""
    go = FORK.Event()
    outs = [out.with_name(f"{out.name}{k}.json") for k in range(processes)]
    procs = [FORK.Process(target=target, args=(pg, k, each, str(outs[k]), go))
             for k in range(processes)]
    for proc in procs:
        proc.start()
    return procs, outs, go


def test_a_follower_sees_every_committed_change_once_while_8_writers_run(
    pg: Backend, opened: Callable[..., PostgresStore], tmp_path: Path
) -> None:
    """8 writer processes commit at once while a follower reads changes() as they come: it
    sees every version a writer was answered with exactly once, with gap-free seqs, each
    run's versions in revision order, and in the very order a later reader finds."""
    follower = opened()
    writers, outs, go = _started(_writer, pg, 8, 40, tmp_path / "w")
    try:
        go.set()
        seen = _follow_while(follower, writers)
    finally:
        for w in writers:
            w.join(60)
        stop_all(writers)
    reports = [json.loads(o.read_text()) for o in outs]
    assert [r["error"] for r in reports] == [None] * 8, [r["error"] for r in reports]
    written = sorted(tuple(v) for r in reports for v in r["versions"])
    assert len(written) == 8 * 40 * 3
    assert sorted((run_id, rev) for _, run_id, rev in seen) == written, "skipped or repeated"
    assert [s for s, _, _ in seen] == list(range(1, len(seen) + 1))
    last: dict[str, int] = {}
    for _, run_id, rev in seen:
        assert rev > last.get(run_id, 0), f"{run_id}: revision {rev} after {last[run_id]}"
        last[run_id] = rev
    assert [(c.seq, c.run.id, c.run.revision) for c in opened().changes()] == seen
    print(f"feed: {len(seen)} changes of 8 writers seen once each, in one order")


# -- the horizon ---------------------------------------------------------------------------


def _older_open_change(store: PostgresStore, conn: psycopg.Connection[Any]) -> None:
    """In ``conn``'s open transaction, create a run with the store's own statement: its
    change is stamped with a transaction id older than any later write's."""
    from runstore import _owner as owner, _transitions as transitions
    from runstore._pgbase import _params

    run = transitions.fresh(Run("old", "/t", "h"), "00000000T000000.000000Z-old",
                            owner.current())
    conn.execute(store._w.create, _params(run, run.started_at or _now(), None))


def _now() -> Any:
    import datetime as _dt

    return _dt.datetime.now(_dt.UTC)


def _lose_numbering(admin: psycopg.Connection[Any], table: str) -> None:
    """What a server crash does to a numbering whose commit was not flushed yet (made by
    a ``durable=False`` store, which commits without waiting for the disk): its positions
    are gone."""
    admin.execute(f"UPDATE {table}_changes SET seq = NULL WHERE xid IS NOT NULL")


def _follow_through_a_lost_numbering(store: PostgresStore, pg: Backend) -> list[str]:
    """A transaction with an older id is open while a newer change commits; a follower
    reads; the numbering is lost (as in a crash); the older transaction commits; the
    follower reads on from where it was. Returns the run ids it saw, in order."""
    seen: list[str] = []
    with psycopg.connect(pg.location) as older, \
            psycopg.connect(pg.location, autocommit=True) as admin:
        older.execute("SET TimeZone = 'UTC'")
        _older_open_change(store, older)
        store.create(Run("new", "/t", "h"))
        changes = list(store.changes(0))
        seen += [c.run.machine for c in changes]
        seq = changes[-1].seq if changes else 0
        _lose_numbering(admin, pg.table)
        older.commit()
        seen += [c.run.machine for c in store.changes(seq)]
    return seen


def test_the_horizon_keeps_a_follower_whole_through_a_lost_numbering(
    opened: Callable[..., PostgresStore], pg: Backend
) -> None:
    """While an older transaction is open, the newer change is not numbered; so a numbering
    lost in a crash is redone the same way, and the follower sees both changes once, in
    transaction-id order."""
    assert _follow_through_a_lost_numbering(opened(durable=False), pg) == ["old", "new"]


def test_without_the_horizon_a_lost_numbering_skips_and_repeats(
    opened: Callable[..., PostgresStore], pg: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: numbering every visible change at once gives the newer change seq 1
    before the older commits; once that numbering is lost, the older change takes seq 1, and
    the follower, already past 1, skips it and sees the newer one twice."""
    monkeypatch.setattr(_pgfeed, "HORIZON", NO_HORIZON)
    assert _follow_through_a_lost_numbering(opened(durable=False), pg) == ["new", "new"]


def test_an_open_writing_transaction_holds_the_feed_back_not_the_writers(
    opened: Callable[..., PostgresStore], pg: Backend
) -> None:
    """While a transaction with an older id is open, writers go on (no lock waited for) and
    the feed shows nothing after it; once it commits, both changes, older first."""
    store = opened(lock_timeout=1.0)
    with psycopg.connect(pg.location) as older:
        older.execute("SET TimeZone = 'UTC'")
        _older_open_change(store, older)
        started = time.monotonic()
        for i in range(20):
            store.create(Run(f"m{i}", "/t", "h"))
        assert time.monotonic() - started < 5
        assert list(store.changes(0)) == [] and store.last_seq() == 0
        older.commit()
    machines = [c.run.machine for c in store.changes(0)]
    assert machines == ["old"] + [f"m{i}" for i in range(20)]


def _writes_while_a_numbering_runs(store: PostgresStore, pg: Backend) -> list[str]:
    """40 creates (five of a writer's periodic numberings) while another session holds the
    numbering lock; then the machines the feed shows."""
    with psycopg.connect(pg.location, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext(%s))",
                      [f"runstore.feed.{pg.table}"])
        for i in range(40):
            store.create(Run(f"m{i}", "/t", "h"))
    return [c.run.machine for c in store.changes(0)]


def test_a_writer_never_waits_for_another_numbering(
    opened: Callable[..., PostgresStore], pg: Backend, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A writer's periodic numbering is skipped while another one runs (which numbers the
    same rows): it neither waits for the lock nor fails; the feed stays whole."""
    caplog.set_level(logging.WARNING, logger="runstore")
    monkeypatch.setattr(pg_module, "TRIM_EVERY", 8)
    store = opened(lock_timeout=0.5)
    assert _writes_while_a_numbering_runs(store, pg) == [f"m{i}" for i in range(40)]
    assert "numbering the change feed" not in caplog.text


def _follower_timing_out(store: PostgresStore, pg: Backend) -> None:
    """A follower's ``changes()`` while another session holds the numbering lock (it times
    out), then again once it is free."""
    store.create(Run("m", "/t", "h"))
    with psycopg.connect(pg.location, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext(%s))",
                      [f"runstore.feed.{pg.table}"])
        with pytest.raises(LockTimeoutError):
            list(store.changes(0))
    assert [c.run.machine for c in store.changes(0)] == ["m"]


def test_a_follower_that_times_out_numbering_leaves_its_connection_idle(
    opened: Callable[..., PostgresStore], pg: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """The numbering script opens its transaction itself: when its lock wait times out,
    the transaction is ended before the connection goes back to the pool (which would
    otherwise find it failed, roll it back and warn), and the next call works."""
    caplog.set_level(logging.WARNING)
    _follower_timing_out(opened(pool_size=1, lock_timeout=0.5), pg)
    assert "rolling back returned connection" not in caplog.text


def test_broken_a_numbering_that_leaves_its_transaction_open_is_rolled_back_by_the_pool(
    opened: Callable[..., PostgresStore], pg: Backend, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: without ending the failed transaction, the pool finds it and
    warns."""
    caplog.set_level(logging.WARNING)

    def number_leaving_it_open(self: PostgresStore, conn: Any, action: str, every: int,
                               wait: bool = True) -> None:
        try:
            conn.execute(_pgfeed.sequencer_sql(self._names, pg_module.RETAIN_CHANGES,
                                               every).encode())
        except psycopg.Error as exc:
            raise self._translate(exc, conn, action, False) from None

    monkeypatch.setattr(PostgresStore, "_number", number_leaving_it_open)
    _follower_timing_out(opened(pool_size=1, lock_timeout=0.5), pg)
    assert "rolling back returned connection" in caplog.text


def _cycles_numbering_as_they_go(store: PostgresStore) -> list[str]:
    """Dispatcher cycles and updates, each kind of write crossing the numbering count
    several times; then the change types the feed shows."""
    for i in range(6):
        run, _ = store.prepare_atomic(f"m{i}", "h", lambda i=i: Run(f"m{i}", "/t", "h"))
        run = store.start(run.id)
        store.update(attrs.evolve(run, logs_path=f"/logs/{i}"))
        store.heartbeat(run.id)
        store.finish(run.id, Status.COMPLETED, exit_code=0)
    return [c.type.value for c in store.changes(0)]


def test_a_store_with_one_connection_numbers_the_feed_as_it_writes(
    opened: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's periodic numbering runs on the connection its write used, so a store
    with one pooled connection never waits for a second one, whichever write it follows."""
    monkeypatch.setattr(pg_module, "TRIM_EVERY", 3)
    store = opened(pool_size=1, lock_timeout=0.5)
    kinds = _cycles_numbering_as_they_go(store)
    assert kinds == ["run_created", "run_started", "run_updated", "heartbeat",
                     "run_finished"] * 6


def test_broken_a_numbering_on_a_second_connection_fails_a_one_connection_store(
    opened: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken variant: numbering on a connection of its own, while the write's connection
    is still checked out, waits for the pool and fails the call."""
    monkeypatch.setattr(pg_module, "TRIM_EVERY", 3)
    monkeypatch.setattr(PostgresStore, "_number",
                        lambda self, conn, action, every, wait=True:
                        self._sequence(action, every))
    store = opened(pool_size=1, lock_timeout=0.5)
    with pytest.raises(DatabaseConnectionError, match="pooled connections stayed busy"):
        _cycles_numbering_as_they_go(store)


def test_a_failed_numbering_after_a_write_leaves_the_write_standing(
    opened: Callable[..., PostgresStore], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A writer's numbering is housekeeping: when it fails, the write's call still returns
    what it stored, a warning says so, and the next follower numbers the changes."""
    caplog.set_level(logging.WARNING, logger="runstore")
    monkeypatch.setattr(pg_module, "TRIM_EVERY", 2)
    store = opened()
    real = PostgresStore._number

    def failing(self: PostgresStore, conn: Any, action: str, every: int,
                wait: bool = True) -> None:
        if not wait:
            raise DatabaseError(self.server, action, "the numbering failed (injected)", False)
        real(self, conn, action, every, wait)

    monkeypatch.setattr(PostgresStore, "_number", failing)
    made = [store.create(Run(f"m{i}", "/t", "h")) for i in range(5)]
    assert [store.get(r.id) for r in made] == made
    assert "numbering the change feed of" in caplog.text and "was stored" in caplog.text
    assert [c.run.id for c in store.changes(0)] == [r.id for r in made]


def test_broken_a_writer_waiting_for_the_numbering_lock_times_out(
    opened: Callable[..., PostgresStore], pg: Backend, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """Broken variant: a writer whose periodic numbering waits for the lock waits out its
    lock_timeout (then gives up, logging it)."""
    caplog.set_level(logging.WARNING, logger="runstore")
    monkeypatch.setattr(pg_module, "TRIM_EVERY", 8)
    real = PostgresStore._number
    monkeypatch.setattr(PostgresStore, "_number",
                        lambda self, conn, action, every, wait=True:
                        real(self, conn, action, every, True))
    store = opened(lock_timeout=0.5)
    _writes_while_a_numbering_runs(store, pg)
    assert "numbering the change feed" in caplog.text and "lock" in caplog.text


# -- large fields ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mib", [2, 16])
def test_a_large_field_is_refused_at_once_and_blocks_nobody(
    opened: Callable[..., PostgresStore], mib: int
) -> None:
    """A field of 2 or 16 MiB: create, prepare_atomic, update and finish refuse it with
    InvalidRunError within seconds (no write hangs), store nothing, and other writers of
    the table are not held up."""
    store, other = opened(lock_timeout=5.0), opened(lock_timeout=5.0)
    huge = "x" * (mib << 20)
    run = store.start(store.create(Run("m1", "/t", "h")).id)
    import attrs

    for call in (lambda: store.create(Run("m2", huge, "h")),
                 lambda: store.prepare_atomic("m3", "h", lambda: Run("m3", "/t", "h",
                                                                     logs_path=huge)),
                 lambda: store.update(attrs.evolve(run, logs_path=huge)),
                 lambda: store.finish(run.id, Status.FAILED, error_msg=huge)):
        started = time.monotonic()
        with pytest.raises(InvalidRunError, match="bytes"):
            call()
        assert time.monotonic() - started < 10
        assert other.create(Run("free", "/t", "h")).machine == "free"
        other.finish(other.active_by_machine("free").id, Status.FAILED)  # type: ignore[union-attr]
    assert store.get(run.id) == run
    assert {r.machine for r in store.list()} == {"m1", "free"}


def test_a_field_just_under_the_limit_round_trips(opened: Callable[..., PostgresStore]) -> None:
    """A field of 1 MiB less a few KiB is stored, read back and in the feed, whole."""
    from runstore._fields import MAX_RECORD_BYTES

    store = opened()
    big = "y" * (MAX_RECORD_BYTES - 8192)
    run = store.create(Run("m1", big, "h"))
    done = store.finish(run.id, Status.FAILED, error_msg="e" * 1000)
    assert store.get(run.id) == done and done.test_dir == big
    assert [c.run for c in store.changes()] == [run, done]


# -- a server crash ------------------------------------------------------------------------


def _crash_writer(dsn: str, table: str, out: str, go: Any, stop: Any) -> None:
    """Creates and finishes runs until told to stop, through the crash (a call that fails
    is not acknowledged; the next one reconnects); appends every acknowledged (id, status)
    to ``out`` as soon as the call returned."""
    with open(out, "a") as log:
        try:
            store = PostgresStore(dsn, table=table, lock_timeout=5)
            go.wait(30)
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    run = store.create(Run(f"{os.getpid()}-{i}", "/t", "h"))
                    log.write(json.dumps([run.id, "pending"]) + "\n")
                    log.flush()
                    done = store.finish(run.id, Status.FAILED)
                    log.write(json.dumps([done.id, "failed"]) + "\n")
                    log.flush()
                except (DatabaseConnectionError, psycopg.Error, OSError):
                    time.sleep(0.05)
        except Exception:
            log.write(json.dumps(["ERROR", traceback.format_exc()]) + "\n")
            log.flush()
            os._exit(1)
    os._exit(0)


@pytest.mark.timeout(240)
def test_a_server_crash_mid_run_loses_nothing_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 writers against a server stopped like ``pg_ctl stop -m immediate`` (SIGQUIT to the
    postmaster: no checkpoint, no flush) mid-run, then restarted: every acknowledged run is
    there in at least its acknowledged status, and the feed has a change for each."""
    import runstore.postgres as pg_module

    monkeypatch.setattr(pg_module, "RETAIN_CHANGES", 10**9)  # keep the whole feed
    server = pg_server()
    table = fresh_table()
    with server.throwaway_postgres() as dsn:
        PostgresStore(dsn, table=table).close()
        go, stop = FORK.Event(), FORK.Event()
        outs = [tmp_path / f"w{k}.log" for k in range(4)]
        writers = [FORK.Process(target=_crash_writer, args=(dsn, table, str(o), go, stop))
                   for o in outs]
        for w in writers:
            w.start()
        try:
            go.set()
            time.sleep(1.5)
            server.crash_and_restart(dsn)
            time.sleep(1.0)
            stop.set()
            for w in writers:
                w.join(60)
        finally:
            stop_all(writers)
        assert [w.exitcode for w in writers] == [0] * 4
        acked: dict[str, str] = {}
        for o in outs:
            for line in o.read_text().splitlines():
                run_id, status = json.loads(line)
                assert run_id != "ERROR", status
                if acked.get(run_id) != "failed":
                    acked[run_id] = status
        assert len(acked) > 10
        with PostgresStore(dsn, table=table) as store:
            stored = {r.id: r.status.value for r in store.list()}
            in_feed = {c.run.id for c in store.changes()}
    lost = [i for i, status in acked.items()
            if i not in stored or (status == "failed" and stored[i] != "failed")]
    assert lost == [], f"{len(lost)} acknowledged changes lost: {lost[:5]}"
    assert set(acked) <= in_feed
    print(f"crash: {len(acked)} acknowledged runs, all there after recovery")


# -- one run's changes in commit order ---------------------------------------------------------


def _xid_of_a_waiting_finish(store: PostgresStore, pg: Backend) -> object:
    """Another session holds a run as a writer does (its advisory lock and its row) while
    the store's ``finish`` of it waits: the transaction id the waiting statement holds
    (None: none yet)."""
    run = store.create(Run("m1", "/t", "h"))
    store.start(run.id)
    done: list[object] = []
    with psycopg.connect(pg.location, autocommit=True) as holder, \
            psycopg.connect(pg.location, autocommit=True) as watcher:
        with holder.transaction():
            holder.execute(f"SELECT {_pgsql.run_lock(store._names, '%s')}".encode(), [run.id])
            holder.execute(f"SELECT 1 FROM {pg.table} WHERE id = %s FOR UPDATE".encode(),
                           [run.id])
            waiter = threading.Thread(
                target=lambda: done.append(store.finish(run.id, Status.FAILED)))
            waiter.start()
            deadline = time.monotonic() + 10
            while True:
                row = watcher.execute(
                    "SELECT backend_xid::text FROM pg_stat_activity WHERE application_name ="
                    " 'runstore' AND wait_event_type = 'Lock'").fetchone()
                if row is not None:
                    break
                assert time.monotonic() < deadline, "the finish never waited"
                time.sleep(0.01)
        waiter.join(10)
    assert done and store.get(run.id).status is Status.FAILED
    return row[0]


def test_a_writer_waiting_for_a_run_holds_no_transaction_id_yet(
    opened: Callable[..., PostgresStore], pg: Backend
) -> None:
    """A statement that changes a run takes the run's lock before its first write, which
    is when PostgreSQL gives it its transaction id: so the run's next change gets an id
    greater than the previous one's, and the feed (in transaction-id order) has the run's
    changes in commit order."""
    assert _xid_of_a_waiting_finish(opened(), pg) is None


def test_broken_without_the_run_lock_a_waiting_writer_already_holds_its_id(
    opened: Callable[..., PostgresStore], pg: Backend
) -> None:
    """Broken variant: without the run's lock the statement waits for the row holding a
    transaction id taken before the holder committed, and a writer that took a greater id
    and got the row first puts the run's changes out of order."""
    store = opened()
    for name in ("start", "finish", "beat", "write"):
        statement = getattr(store._w, name)
        unlocked = re.sub(r"^WITH l AS \(SELECT pg_advisory_xact_lock\([^;]*?\)\), ", "WITH ",
                          statement).replace(" FROM l WHERE ", " WHERE ").replace(
                          "FROM l, (", "FROM (")
        assert unlocked != statement and "pg_advisory" not in unlocked, name
        setattr(store._w, name, unlocked)
    assert _xid_of_a_waiting_finish(store, pg) is not None


def _racer(backend: Backend, k: int, runs: int, out: str, go: Any) -> None:
    """One process: creates runs, then four threads race update, finish, start and update
    on each; writes its run ids to ``out``."""
    try:
        store = backend.open()
        go.wait(30)
        ids = []
        for i in range(runs):
            run_id = store.create(Run(f"r{k}-{i}", "/t", "h")).id
            ids.append(run_id)
            calls = [functools.partial(_update, store, run_id, logs_path="x"),
                     functools.partial(store.finish, run_id, Status.FAILED),
                     functools.partial(store.start, run_id),
                     functools.partial(_update, store, run_id, batch_id="b")]
            threads = [threading.Thread(target=_quietly, args=(call,)) for call in calls]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        store.close()
        Path(out).write_text(json.dumps(ids))
    except BaseException:
        Path(out).write_text(json.dumps({"error": traceback.format_exc()}))
        raise


def _update(store: PostgresStore, run_id: str, **fields: str) -> None:
    store.update(attrs.evolve(store.get(run_id), **fields))


def _quietly(call: Callable[[], object]) -> None:
    """A racing call; losing the race (a conflict, a refused transition) is expected."""
    try:
        call()
    except (ConflictError, InvalidTransitionError):
        pass


@pytest.mark.timeout(180)
def test_a_follower_sees_each_run_s_changes_in_revision_order_while_writers_race(
    pg: Backend, tmp_path: Path
) -> None:
    """Four processes race four threads on each of their runs; the feed holds each run's
    changes in revision order, and a follower that replays it ends with every run as
    stored."""
    procs, outs, go = _started(_racer, pg, 4, 60, tmp_path / "racer-")
    go.set()
    try:
        for p in procs:
            p.join(150)
    finally:
        stop_all(procs)
    results = [json.loads(o.read_text()) for o in outs]
    assert all(isinstance(r, list) for r in results), results
    with pg.open() as store:
        last: dict[str, Run] = {}
        disorder = []
        for change in store.changes(0):
            before = last.get(change.run.id)
            if before is not None and change.run.revision <= before.revision:
                disorder.append((change.seq, change.run.id, before.revision,
                                 change.run.revision))
            last[change.run.id] = change.run
        assert disorder == []
        stored = {run.id: run for run in store.list()}
        assert {i: r.status for i, r in last.items()} == {i: r.status for i, r in stored.items()}
