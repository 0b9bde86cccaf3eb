"""``PostgresStore``: the run-store contract on PostgreSQL, for dispatchers on several hosts.

Same methods, return values and errors as ``Store`` (both satisfy ``RunStore``); what differs
is documented on the class. How the guarantees are kept:

- **One statement per write** (``_pgsql``): the run row and its change-feed row are written by
  one autocommit statement, which is its own transaction: one round trip, no table lock.
- **One active run per machine** is enforced by PostgreSQL itself: a partial unique index on
  ``machine`` for pending/running rows refuses a second one whoever writes it.
  ``prepare_atomic`` reads the machine's non-terminal run (REUSE/BUSY), else calls ``make()``
  and inserts with ``ON CONFLICT DO NOTHING`` on that index; when a concurrent creator won,
  it reads again and answers with the winner's run. Two round trips when it creates.
- **No lost updates**: ``start``/``finish``/``heartbeat`` carry the transition rule in the
  ``UPDATE``'s ``WHERE`` (the row lock orders concurrent writers); ``update`` and every
  read-decide-write carry ``revision = <expected>``. Zero rows: the run is read and the rule
  decides (``ConflictError``, ``InvalidTransitionError``, an idempotent no-op, or another
  try when another writer got there first).
- **The change feed** is numbered by its followers below a transaction-id horizon: see
  ``_pgfeed`` for the design and why no committed change is skipped or repeated. ``watch``
  polls it, backing off while nothing happens.
- **Connection loss** mid-operation raises ``DatabaseConnectionError`` naming the server (never
  the password) and whether the change was applied: not at all when the server refused it or
  the connection broke inside a transaction that never reached COMMIT; unknown when the
  connection broke during a write statement (each is its own COMMIT) or a COMMIT. Connections
  come from a ``psycopg_pool.ConnectionPool`` of ``pool_size`` connections, the one returned
  last first (``_pgbase._Pool``); one whose server ended it while idle is found at checkout
  without a round trip (its socket has something to read) and replaced, so the next call
  reconnects; threads share one store; a forked child builds its own pool.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.pq import TransactionStatus

from . import (
    _fields,
    _forks,
    _ids,
    _interchange,
    _owner,
    _pgfeed,
    _pgschema,
    _pgsql,
    _reaping,
    _retention,
    _transitions,
    _validate,
)
from ._base import RETAIN_CHANGES, StoreBase
from ._location import redact as safe_dsn  # the DSN fit for messages and stats()
from ._log import log_warning
from ._pgbase import (
    _NON_TERMINAL,
    MAX_ATTEMPTS,
    PostgresBase,
    _stores,
)
from .errors import (
    CorruptStoreError,
    DatabaseConnectionError,
    DatabaseError,
    HistoryTruncatedError,
    InvalidRunError,
    LockTimeoutError,
    MachineBusyError,
    RunstoreError,
    StoreIOError,
    TableLockTimeoutError,
)
from .model import (
    Change,
    ChangeType,
    PrepareOutcome,
    Run,
    Status,
    StoreStats,
    replace_run,
)

# The backend's errors are defined in runstore.errors (importing runstore must not import
# psycopg); they stay importable from here.
__all__ = [
    "DatabaseConnectionError",
    "DatabaseError",
    "PostgresStore",
    "TableLockTimeoutError",
    "migrate",
    "upgrade_schema",
    "safe_dsn",
]

T = TypeVar("T")
_Conn = psycopg.Connection[Any]
_Runs = list[Run]  # inside PostgresStore, ``list`` names the method

#: the feed is trimmed to the last RETAIN_CHANGES positions when it has grown this far past
#: them, so it holds between RETAIN_CHANGES and RETAIN_CHANGES + TRIM_EVERY numbered rows;
#: every store also numbers (and trims) the feed once per this many of its own writes, so the
#: feed stays bounded when nobody follows it
TRIM_EVERY = 1024
#: the longest ``watch`` waits between two reads of the feed while nothing happens
_WATCH_WAKEUP = 0.2
_FIELDS = _fields.RUN_FIELDS
#: rows fetched at a time by ``iter_runs`` and ``export``
_FETCH = 2000


# -- the store -------------------------------------------------------------------------------


class PostgresStore(PostgresBase, StoreBase):
    """Run records in the PostgreSQL table ``table`` (created or migrated on first use);
    safe across threads, processes and hosts. ``dsn`` is a libpq connection string or
    ``postgresql://`` URL.

    ``durable=False`` sets ``synchronous_commit = off`` (a server crash may lose the latest
    acknowledged changes, never corrupt older ones). ``lock_timeout`` bounds every wait for a
    lock, like the file store's (``LockTimeoutError``, naming the table), and for a pooled
    connection: a finite number of seconds up to about 24.8 days (PostgreSQL's longest
    ``lock_timeout``); ``inf`` and ``nan`` are refused. Arguments are checked by the same
    rules as ``Store``'s (``runstore._validate``), before any transaction, with the same
    ``InvalidRunError`` and message. ``pool_size`` is the most connections the store's
    threads use at once. The schema is created or migrated when the store is opened
    (``pgschema``; ``migrate()`` does it alone); a schema written by a newer runstore is
    refused (``CorruptStoreError``).

    Where it differs from ``Store``:

    - Writers never serialise on a lock of the change feed: a change's ``seq`` is assigned
      by the readers of the feed (``_pgfeed``), gap-free and increasing like the file
      store's, in transaction-id order (commit order per run). A follower sees a change once
      every transaction in the cluster that was writing when it committed has ended: an
      open writing transaction (a long ``import_runs``, another program's) holds the feed
      back, never the writers. ``last_seq()`` is the latest numbered change.
    - ``compact()`` trims the change feed to the last ``RETAIN_CHANGES`` changes (the file
      store also rewrites its file); the table itself is left to autovacuum. The feed is also
      trimmed automatically every ``TRIM_EVERY`` changes. ``stats()`` reports
      ``size_bytes`` as the bytes of the tables and indexes, ``superseded_lines`` as None
      (autovacuum reclaims superseded rows); ``location`` is the DSN without its password.
    - A new id is made by the client, from its clock like the file store's (after the
      greatest id this store made). The insert is refused, and the id made again after the
      greatest stored one, when its second is earlier than that id's (ids imported from
      later, a clock behind), so a new id sorts after every id stored before the call except
      ids of the same second; creates running at once are stored (``list()``'s insertion
      order, the feed's order) in whatever order they commit, not always in id order. Hosts
      should keep their clocks in sync.
    - ``prepare_atomic`` reads the machine's run, then calls ``make()`` without any lock on
      the machine: if a concurrent creator for the same machine commits first, ``make()``'s
      run is discarded and the call returns that creator's run (REUSE/BUSY), so ``make()``
      may have been called for nothing. Calling the store from inside ``make()`` uses
      another pooled connection (with ``pool_size=1`` it waits for ``lock_timeout`` and
      fails). With ``reap=True``, the dead run is interrupted by one statement and the new
      run created by another.
    - Timestamps (``started_at``, ``heartbeat_at``, change times) come from each client's
      clock, as in the file store; reaping by heartbeat compares them with the reaper's
      clock. ``owner_gone`` reaping only judges runs owned by a process on the reaper's host.
    - A lost connection raises ``DatabaseConnectionError`` (an ``OSError`` and a
      ``StoreIOError``): the call's change was rolled back, except when the connection died
      during COMMIT (the error then says the outcome is unknown).
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "runs",
        durable: bool = True,
        lock_timeout: float = 30.0,
        pool_size: int = 4,
    ) -> None:
        timeout = _validate.options(durable, lock_timeout)
        if not isinstance(dsn, str) or not dsn or "\x00" in dsn:  # never echo it: a password
            raise InvalidRunError("dsn must be a non-empty libpq connection string or "
                                  "postgresql:// URL without NUL characters")
        self._names = _pgschema.Names.of(table)
        if type(pool_size) is not int or pool_size < 1:
            raise InvalidRunError(f"pool_size must be a positive int, got {pool_size!r}")
        self.dsn = dsn
        self.table = table
        self.durable = durable
        self.lock_timeout = timeout
        self.pool_size = pool_size
        self.server = safe_dsn(dsn)
        self._where = f"table {table!r} on {self.server}"
        self._sql = _pgschema.Statements(self._names)
        self._w = _pgsql.Writes(self._names)
        self._read_feed = _pgfeed.read_sql(self._names, _pgsql.run_columns("c"))
        self._last_seq_sql = _pgfeed.last_seq_sql(self._names)
        #: the greatest id this store made or saw refused: new ids sort after it
        self._last_id = ""
        #: writes since this store last numbered the feed (``_count_write``)
        self._writes = 0
        self._closed = False
        self._pid = _forks.pid()
        self._pool_lock = threading.Lock()
        self.schema_version = self._migrate()
        self._pool = self._new_pool()
        _stores.add(self)

    def _count_write(self, conn: _Conn) -> None:
        """Number (and trim) the feed once per ``TRIM_EVERY`` writes of this store, so it
        stays bounded when nobody follows it: on ``conn``, the connection the write used
        (still checked out, idle), so that a store with one pooled connection never waits
        for a second. Housekeeping: when it fails, the write it follows stands, and the
        next numbering (any follower's) does the work."""
        self._writes += 1
        if self._writes < TRIM_EVERY:
            return
        self._writes = 0
        try:
            self._number(conn, "numbering the change feed of", TRIM_EVERY, wait=False)
        except (StoreIOError, LockTimeoutError) as exc:
            log_warning("runstore: numbering the change feed of %s failed (%s); the change "
                        "was stored; a later numbering does it", self._where, exc)

    def _sequence(self, action: str, trim_every: int | None = None) -> None:
        """Number the changes below the horizon, and trim (``_pgfeed``): one round trip."""
        with self._connection(action) as conn:
            self._number(conn, action, TRIM_EVERY if trim_every is None else trim_every)

    def _number(self, conn: _Conn, action: str, trim_every: int, wait: bool = True) -> None:
        """``_sequence`` on ``conn``. ``wait=False``: only when no other numbering is
        running (then four round trips; a writer's housekeeping, which the running numbering
        does as well)."""
        try:
            if wait:
                try:
                    conn.execute(_pgfeed.sequencer_sql(self._names, RETAIN_CHANGES,
                                                       trim_every).encode())
                except psycopg.Error:
                    # the script's BEGIN left its transaction open when a statement failed:
                    # end it here, so the connection goes back to the pool idle
                    if (not conn.broken
                            and conn.info.transaction_status == TransactionStatus.INERROR):
                        with contextlib.suppress(psycopg.Error):
                            conn.rollback()
                    raise
                return
            with conn.transaction():
                row = conn.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))",
                                   [_pgfeed.lock_key(self._names)]).fetchone()
                if row is not None and row[0]:
                    conn.execute(_pgfeed.numbering_sql(self._names, RETAIN_CHANGES,
                                                       trim_every).encode())
        except psycopg.Error as exc:
            raise self._translate(exc, conn, action, False) from None

    # -- the contract's hooks (``StoreBase``) -------------------------------------------

    def _prepare(self, machine: str, test_dir_hash: str, make: Callable[[], Run],
                 reap: bool) -> tuple[Run, PrepareOutcome]:
        """One read of the machine's non-terminal run, then, on the create path, ``make()``
        and an insert that the partial unique index lets through only while the machine
        is free; a concurrent creator that won is read again (REUSE/BUSY)."""
        action = "prepare_atomic in"
        pending: Run | None = None
        for _ in range(MAX_ATTEMPTS):
            with self._connection(action) as conn:
                rows = self._execute(conn, self._sql.active_of, [machine], action, False)
                active = self._run(rows[0]) if rows else None
                if active is not None and reap:
                    now = _ids.utcnow()
                    dead = _reaping.reaped(active, None, now, None)
                    if dead is not None:
                        if not self._write(conn, active.revision, dead, now, action,
                                           ChangeType.RUN_REAPED, [active.status]):
                            continue  # changed meanwhile: judge it again
                        active = None
                if active is not None:
                    same = active.test_dir_hash == test_dir_hash
                    return active, PrepareOutcome.REUSE if same else PrepareOutcome.BUSY
                if pending is None:
                    made = _transitions.check_made(make(), machine, test_dir_hash)
                    pending = _transitions.validate(_transitions.as_pending(made))
                run = self._create(conn, pending, action)
                if run is not None:
                    return run, PrepareOutcome.CREATED
                # a concurrent creator took the machine: the next read sees its run
        raise RunstoreError(f"{action} {self._where} lost {MAX_ATTEMPTS} races in a row to "
                            "other writers; nothing was applied; try again")

    def _create_run(self, run: Run) -> Run:
        action = "creating a run in"
        with self._connection(action) as conn:
            for _ in range(MAX_ATTEMPTS):
                new = self._create(conn, run, action)
                if new is not None:
                    return new
                rows = self._execute(conn, self._sql.active_of, [run.machine], action, False)
                if rows:
                    raise MachineBusyError(run.machine, self._run(rows[0]).id)
        raise RunstoreError(f"{action} {self._where} lost {MAX_ATTEMPTS} races in a row to "
                            "other writers; nothing was applied; try again")

    def _get_run(self, run_id: str) -> Run:
        conn = self._checkout("reading a run from")
        try:
            return self._get(conn, run_id)
        finally:
            self._pool.putconn(conn)

    def _step(self, run_id: str, step_of: Callable[[Run], _transitions.Step | None],
              action: str) -> Run:
        return self._modify(run_id, step_of, action)

    def _update(self, run: Run) -> Run:
        """One statement with the revision check and the statuses it may come from in its
        ``WHERE``; when it matches no row, the read-decide-write path says why."""
        action = "updating a run in"
        new = replace_run(run, revision=_transitions.next_revision(run))
        allowed = [s for s in _NON_TERMINAL if run.status in _transitions.ALLOWED[s]]
        with self._connection(action) as conn:
            if allowed and self._write(conn, run.revision, new, _ids.utcnow(), action, None,
                                       allowed, fast=True):
                return new
        return super()._update(run)

    def _start(self, run_id: str) -> Run:
        host, pid, since = _owner.current()
        done = self._transition(self._w.start, {"id": run_id, "now": _ids.utcnow(),
                                                "host": host, "pid": pid, "since": since},
                                "starting a run in")
        return done if done is not None else super()._start(run_id)

    def _finish(self, run_id: str, target: Status, exit_code: int | None, error_code: str,
                error_msg: str) -> Run:
        allowed = [s.value for s in _NON_TERMINAL if target in _transitions.ALLOWED[s]]
        done = self._transition(self._w.finish, {
            "id": run_id, "now": _ids.utcnow(), "status": target.value, "from": allowed,
            "exit_code": exit_code, "error_code": error_code, "error_msg": error_msg},
            "finishing a run in")
        return done if done is not None else super()._finish(
            run_id, target, exit_code, error_code, error_msg)

    def _beat(self, run_id: str) -> Run:
        done = self._transition(self._w.beat, {"id": run_id, "now": _ids.utcnow()},
                                "recording a heartbeat in")
        return done if done is not None else super()._beat(run_id)

    def _list_runs(self, machine: str | None, wanted: frozenset[Status] | None,
                   batch_id: str | None) -> _Runs:
        query, params = self._list_query(machine, wanted, batch_id)
        return self._read(lambda conn: self._runs(conn, query, params), "listing runs in")

    def _iter_runs(self, machine: str | None, wanted: frozenset[Status] | None,
                   batch_id: str | None) -> Iterator[Run]:
        """Fetched ``_FETCH`` rows at a time through a server-side cursor, in one read-only
        transaction (one snapshot of the table); the iteration holds one pooled
        connection."""
        query, params = self._list_query(machine, wanted, batch_id)
        return self._stream(query, params, "listing runs in", self._run)

    def _list_query(self, machine: str | None, wanted: frozenset[Status] | None,
                    batch_id: str | None) -> tuple[str, Sequence[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if machine is not None:
            where.append("machine = %s")
            params.append(machine)
        if wanted is not None:
            where.append("status = ANY(%s)")
            params.append([s.value for s in wanted])
        if batch_id is not None:
            where.append("batch_id = %s")
            params.append(batch_id)
        return self._sql.select_where(where), params

    def _active_of(self, machine: str) -> Run | None:
        runs = self._read(lambda conn: self._runs(conn, self._sql.active_of, [machine]),
                          "reading the active run from")
        return runs[0] if runs else None

    def _active_runs(self) -> _Runs:
        return self._read(lambda conn: self._runs(conn, self._sql.active),
                          "listing active runs in")

    def _find_runs(self, machine: str, test_dir_hash: str) -> _Runs:
        query = self._sql.select_where(["machine = %s", "test_dir_hash = %s"])
        return self._read(lambda conn: self._runs(conn, query, [machine, test_dir_hash]),
                          "listing runs in")

    def _compact_now(self) -> None:
        """Number the feed and trim it to the last ``RETAIN_CHANGES`` changes (PostgreSQL's
        autovacuum reclaims the space of superseded row versions on its own)."""
        self._sequence("trimming the change feed of", trim_every=1)

    def _reap(self, stale_after: _dt.timedelta, dry_run: bool) -> _Runs:
        """One statement per reaped run, each with its revision check: a run changed by its
        owner while being judged is left alone (its owner is alive)."""
        action = "reaping runs in"
        with self._connection(action) as conn:
            now = _ids.utcnow()
            judged = []
            for row in self._execute(conn, self._sql.active_with_changed_at, (), action, False):
                run = self._run(row)
                dead = _reaping.reaped(run, row[-1], now, stale_after)
                if dead is not None:
                    judged.append((run, dead))
            if dry_run:
                return [dead for _, dead in judged]
            return [dead for run, dead in judged
                    if self._write(conn, run.revision, dead, now, action,
                                   ChangeType.RUN_REAPED, [run.status])]

    def _prune(self, older_than: _dt.timedelta | None, keep_last: int | None,
               archive: str | os.PathLike[str] | None, dry_run: bool) -> int:
        """One pruner at a time (an advisory lock of its own: writers do not wait for it);
        the runs and their changes are deleted and written in one statement, after the
        archive is synced."""

        def body(conn: _Conn) -> int:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                         [f"runstore.prune.{self.table}"])
            terminal: list[tuple[Run, Any]] = [
                (self._run(row), row[-1]) for row in conn.execute(self._sql.terminal_with_extra)]
            doomed = _retention.doomed(terminal, lambda item: item[0], older_than=older_than,
                                      keep_last=keep_last, now=_ids.utcnow())
            if dry_run or not doomed:
                return len(doomed)
            runs = [r for r, _ in doomed]
            if archive is not None:
                _interchange.append_archive(os.fspath(archive), runs,
                                           {r.id: x for r, x in doomed if x})
            # the runs and their changes in one statement (its transaction id is taken after
            # its snapshot, as every write's: ``_pgfeed``)
            conn.execute(self._w.prune, {"ids": [r.id for r in runs],
                                         "changed_at": _ids.utcnow()})
            return len(runs)

        removed = self._transact(body, "pruning runs in")
        if removed and not dry_run:
            self.compact()
        return removed

    def _changes_after(self, since_seq: int) -> Iterator[Change]:
        """Numbers what is below the horizon first (``_pgfeed``), then reads the feed."""
        self._sequence("numbering the change feed of")
        rows = self._read(lambda conn: conn.execute(self._read_feed, [since_seq]).fetchall(),
                          "reading the change feed of")
        compacted = int(rows[0][0]) if rows else 0
        if since_seq < compacted:
            raise HistoryTruncatedError(since_seq, compacted + 1)
        out = []
        for _, seq, when, kind, data, *columns in rows:
            if seq is None:
                continue
            try:
                # the run's columns; as JSON in a change written before schema version 4
                run = self._run(columns) if data is None else _fields.run_from_dict(data)
            except (_fields.BadLine, CorruptStoreError) as exc:
                reason = exc.reason if isinstance(exc, _fields.BadLine) else exc.problem
                raise CorruptStoreError(self._where, None, f"change {seq} is unreadable "
                                        f"({reason})", "fix or delete the row by hand"
                                        ) from None
            out.append(Change(seq=int(seq), time=when.astimezone(_dt.UTC),
                              type=ChangeType(kind), run=run))
        return iter(out)

    def _last_seq(self) -> int:
        self._sequence("numbering the change feed of")
        row = self._read(lambda conn: conn.execute(self._last_seq_sql).fetchone(),
                         "reading the change feed of")
        return int(row[0]) if row else 0

    def _watch(self, since_seq: int | None, timeout: float | None,
               poll_interval: float) -> Iterator[Change]:
        """Reads the feed every ``poll_interval`` seconds while changes come, backing off
        (doubling the wait) to one read per ``_WATCH_WAKEUP`` seconds while none do: no
        ``pg_notify`` from writers, which would serialise their commits."""
        seq = self.last_seq() if since_seq is None else since_seq
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = poll_interval
        while True:
            found = False
            for change in self.changes(seq):
                seq = change.seq
                found = True
                yield change
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            wait = poll_interval if found else min(max(wait * 2, poll_interval),
                                                   max(_WATCH_WAKEUP, poll_interval))
            time.sleep(wait if left is None else min(wait, left))

    def _check_output(self, target: str | int, what: str, name: object = None) -> None:
        """Nothing to refuse: the store has no files of its own."""

    def _stats(self) -> StoreStats:
        def body(conn: _Conn) -> StoreStats:
            by_status: dict[str, int] = {s.value: 0 for s in Status}
            by_machine: dict[str, int] = {}
            total = 0
            for status, machine, count in conn.execute(self._sql.counts):
                by_status[status] += count
                by_machine[machine] = by_machine.get(machine, 0) + count
                total += count
            row = conn.execute(self._sql.sizes).fetchone()
            assert row is not None
            size, retained, last, compacted = (int(v) for v in row)
            return StoreStats(
                location=self.server, size_bytes=size, runs=total, runs_by_status=by_status,
                runs_by_machine=by_machine, retained_changes=retained, last_seq=last,
                oldest_seq=compacted + 1, durable=self.durable)

        self._sequence("numbering the change feed of")
        return self._transact(body, "reading statistics of")

    def _release(self) -> None:
        """Close the pooled connections (a forked child leaves its parent's alone)."""
        if self._closed:
            return
        self._closed = True
        if self._pid == _forks.pid():
            self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.server!r}, table={self.table!r}, durable={self.durable})"


def upgrade_schema(dsn: str, table: str = "runs") -> tuple[int, int]:
    """Create the schema of ``table`` or upgrade it to this version's, without opening a
    store; returns the schema version before and after (deployment scripts; opening a
    store does it too). Copying runs between stores is ``runstore.migrate.copy_runs``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return _pgschema.upgrade_schema(conn, table, safe_dsn(dsn))


#: the earlier name of ``upgrade_schema``
migrate = upgrade_schema



