"""``PostgresStore``: the run-store contract on PostgreSQL, for dispatchers on several hosts.

Same methods, return values and errors as ``Store`` (both satisfy ``RunStore``); what differs
is documented on the class. How the guarantees are kept:

- **One active run per machine** is enforced by PostgreSQL itself: a partial unique index on
  ``machine`` for pending/running rows refuses a second one whoever writes it. ``prepare_atomic``
  is one transaction: ``SELECT ... FOR UPDATE`` of the machine's non-terminal run, then either
  REUSE/BUSY or an ``INSERT``; when a concurrent creator wins the race, the insert fails on the
  index, the transaction rolls back and is retried, and the retry sees the winner's run.
- **No lost updates**: every write is ``UPDATE ... WHERE id = %s AND revision = %s``; zero rows
  means another writer got there first (``ConflictError`` for ``update()``, a fresh read and
  another try for ``start``/``finish``/``heartbeat``, which take an id, not a copy).
- **The change feed** (``<table>_changes``, ``seq`` from the sequence ``<table>_seq``) is written
  in the same transaction as the change, under a short exclusive lock on the changes table
  taken at the end of the transaction: seqs are handed out in commit order, so a follower that
  has read seq N never later finds a committed change below N. ``watch`` is woken by
  ``LISTEN/NOTIFY`` and reads the feed; it falls back to polling if the listening connection
  fails.
- **Connection loss** mid-operation raises ``DatabaseConnectionError`` naming the server (never
  the password) and whether the change was rolled back (always, unless the connection died
  during COMMIT itself, when the outcome is unknown and the message says so). Connections come
  from a ``psycopg_pool.ConnectionPool`` that checks each one before handing it out, so the next
  call reconnects; threads share one store; a forked child builds its own pool.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar

import orjson
import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import ConnectionPool, PoolTimeout

from . import (
    _forks,
    _validate,
    codec,
    ids,
    interchange,
    owner,
    pgschema,
    reaping,
    retention,
    transitions,
)
from ._base import RETAIN_CHANGES
from ._location import redact as safe_dsn  # the DSN fit for messages and stats()
from .errors import (
    CorruptStoreError,
    DatabaseConnectionError,
    DatabaseError,
    HistoryTruncatedError,
    InvalidRunError,
    MachineBusyError,
    RunNotFoundError,
    RunstoreError,
    TableLockTimeoutError,
)
from .model import BatchSummary, Change, ChangeType, PrepareOutcome, Run, Status, StoreStats

# The backend's errors are defined in runstore.errors (importing runstore must not import
# psycopg); they stay importable from here.
__all__ = [
    "DatabaseConnectionError",
    "DatabaseError",
    "PostgresStore",
    "TableLockTimeoutError",
    "migrate",
    "safe_dsn",
]

T = TypeVar("T")
_Conn = psycopg.Connection[Any]
_Runs = list[Run]  # inside PostgresStore, ``list`` names the method
_Changes = list[tuple[ChangeType, Run]]

#: the changes table is trimmed to the last RETAIN_CHANGES whenever the seq crosses a multiple
#: of this, so it holds between RETAIN_CHANGES and RETAIN_CHANGES + TRIM_EVERY rows
TRIM_EVERY = 1024
#: how often a transaction is retried after losing a race (unique index, revision check,
#: deadlock); each retry means another writer made progress, so this is never reached in
#: practice
MAX_ATTEMPTS = 50
#: the longest ``watch`` sleeps on LISTEN before reading the feed anyway
_WATCH_WAKEUP = 1.0
_FIELDS = codec.RUN_FIELDS
#: rows fetched at a time by ``iter_runs`` and ``export``
_FETCH = 2000


def _columns_sql(names: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, names))


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


#: every ``PostgresStore`` of this process, for the at-fork hook (``_after_fork_in_child``)
_stores: weakref.WeakSet[PostgresStore] = weakref.WeakSet()
#: in a forked child, the pools inherited from the parent: kept referenced and never used,
#: closed or collected (a pool's finaliser signals its worker threads through locks that a
#: parent's thread may have held at the fork, and no worker runs in the child)
_parent_pools: list[object] = []


def _aware_utc(value: Any, _type: Any) -> _dt.datetime:
    if not isinstance(value, _dt.datetime) or value.tzinfo is None:
        raise TypeError(f"expected an aware datetime, got {value!r}")
    return value.astimezone(_dt.UTC)


#: the codec's converter (strict types), taught that rows carry datetimes rather than strings
_ROWS = codec.make_converter()
_ROWS.register_structure_hook(_dt.datetime, _aware_utc)


class _Retry(Exception):
    """Internal: the transaction lost a race; roll back and run it again."""


# -- the store -------------------------------------------------------------------------------


class PostgresStore:
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

    - ``seq`` comes from a PostgreSQL sequence. Changes are numbered in commit order and
      ``changes()``/``watch()`` never skip or repeat one, but the numbers can have *gaps*:
      a transaction that loses its connection after drawing its seq, and a server crash
      (sequences are not rolled back), leave numbers unused. The file store's seqs are
      gap-free. ``last_seq()`` is the latest committed seq.
    - ``compact()`` trims the change feed to the last ``RETAIN_CHANGES`` changes (the file
      store also rewrites its file); the table itself is left to autovacuum. The feed is also
      trimmed automatically every ``TRIM_EVERY`` changes. ``stats()`` reports
      ``size_bytes`` as the bytes of the tables and indexes, ``superseded_lines`` as None
      (autovacuum reclaims superseded rows); ``location`` is the DSN without its password.
    - Insertion order (``list()``) and new ids are assigned under the same lock as seqs, so
      ids still increase in insertion order across hosts, but a new id is based on the
      client's clock like the file store's: hosts should keep their clocks in sync (an id
      after a clock step back is still greater, just not a true time).
    - ``prepare_atomic`` calls ``make()`` inside its transaction but, since the machine had
      no active run, without any lock on the machine: if a concurrent creator for the same
      machine commits first, ``make()``'s run is discarded and the call returns that
      creator's run (REUSE/BUSY), so ``make()`` may have been called for nothing. Calling
      the store from inside ``make()`` uses another pooled connection (with ``pool_size=1``
      it waits for ``lock_timeout`` and fails) instead of timing out on the lock.
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
        self._names = pgschema.Names.of(table)
        if type(pool_size) is not int or pool_size < 1:
            raise InvalidRunError(f"pool_size must be a positive int, got {pool_size!r}")
        self.dsn = dsn
        self.table = table
        self.durable = durable
        self.lock_timeout = timeout
        self.pool_size = pool_size
        self.server = safe_dsn(dsn)
        self._where = f"table {table!r} on {self.server}"
        self._sql = pgschema.Statements(self._names)
        self._closed = False
        self._pid = _forks.pid()
        self._pool_lock = threading.Lock()
        #: test-only: called as hook(point, connection) at "before_feed" (the run rows are
        #: written, the change feed not yet) and "before_commit"
        self._test_hook: Callable[[str, _Conn], None] | None = None
        self.schema_version = self._migrate()
        self._pool = self._new_pool()
        _stores.add(self)

    # -- connections ----------------------------------------------------------------------

    def _connect(self, action: str) -> _Conn:
        try:
            return psycopg.connect(self.dsn, autocommit=True, application_name="runstore")
        except psycopg.Error as exc:
            raise DatabaseConnectionError(self.server, action, _reason(exc)) from None

    def _migrate(self) -> int:
        with self._connect("connecting to") as conn:
            try:
                return pgschema.migrate(conn, self.table, self.server)[1]
            except psycopg.errors.LockNotAvailable:
                raise TableLockTimeoutError(self._where, self.lock_timeout) from None
            except psycopg.Error as exc:
                raise self._translate(exc, conn, "creating or migrating the schema of",
                                      False) from None

    def _configure(self, conn: _Conn) -> None:
        """Per-connection settings: UTC, lock_timeout, and synchronous_commit when not
        durable (PostgreSQL's 0 means "wait forever", so 0 s becomes 1 ms). jsonb is read
        with orjson, as the file store reads its lines: jsonb writes a float such as 1e20
        as the digits of an integer, which json would read back as an integer beyond 64
        bits (that ``export`` cannot write) where orjson reads the float it was."""
        set_json_loads(orjson.loads, conn)
        millis = max(1, round(self.lock_timeout * 1000))
        conn.execute(
            "SELECT set_config('TimeZone', 'UTC', false), set_config('lock_timeout', %s, false),"
            " set_config('synchronous_commit', %s, false)",
            [f"{millis}ms", "on" if self.durable else "off"])

    def _new_pool(self) -> ConnectionPool[_Conn]:
        return ConnectionPool(
            self.dsn, min_size=1, max_size=self.pool_size, open=True,
            kwargs={"autocommit": True, "application_name": "runstore"},
            configure=self._configure, check=ConnectionPool.check_connection,
            timeout=max(self.lock_timeout, 1.0), name=f"runstore-{self.table}", num_workers=1)

    def _pool_here(self) -> ConnectionPool[_Conn]:
        if self._closed:
            raise ValueError(f"the store for {self._where} is closed")
        if self._pid != _forks.pid():
            with self._pool_lock:
                if self._pid != _forks.pid():
                    # forked: the parent's pooled connections are the parent's; leave them
                    # untouched (closing them here would end the parent's sessions)
                    self._pool = self._new_pool()
                    self._pid = _forks.pid()
        return self._pool

    @contextlib.contextmanager
    def _connection(self, action: str) -> Iterator[_Conn]:
        pool = self._pool_here()
        try:
            with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise DatabaseConnectionError(
                self.server, action, f"no connection within {pool.timeout:g} s: the server "
                f"is unreachable or all {self.pool_size} pooled connections stayed busy "
                f"({exc})") from None

    def _hit(self, point: str, conn: _Conn) -> None:
        if self._test_hook is not None:
            with conn.pipeline() as pipeline:
                pipeline.sync()  # what was queued so far has reached the server
            self._test_hook(point, conn)

    def _translate(self, exc: psycopg.Error, conn: _Conn, action: str,
                   applied: bool | None) -> Exception:
        """The runstore error for a psycopg error raised during ``action``."""
        reason = _reason(exc)
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return TableLockTimeoutError(self._where, self.lock_timeout)
        if isinstance(exc, psycopg.DataError | psycopg.errors.IntegrityError):
            return InvalidRunError(f"{self._where} refused the run: {reason}; nothing was "
                                   "stored")
        if conn.closed or conn.broken or isinstance(exc, psycopg.errors.AdminShutdown):
            return DatabaseConnectionError(self.server, action, reason, applied)
        return DatabaseError(self.server, action, reason, applied)

    def _transact(self, body: Callable[[_Conn], T], action: str) -> T:
        """Run ``body`` in one transaction and commit; retry when it lost a race."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            with self._connection(action) as conn:
                committing = False
                try:
                    # pipeline mode: BEGIN travels with the first statement, and statements
                    # whose results nobody reads (COMMIT, the feed's trim) with the next sync
                    with conn.pipeline(), conn.transaction():
                        result = body(conn)
                        self._hit("before_commit", conn)
                        committing = True
                    return result
                except _Retry:
                    pass
                except psycopg.errors.UniqueViolation as exc:
                    # a concurrent creator took the machine first: the retry sees its run
                    if exc.diag.constraint_name != self._names.one_active:
                        raise self._translate(exc, conn, action, False) from None
                except (psycopg.errors.DeadlockDetected,
                        psycopg.errors.SerializationFailure) as exc:
                    if attempt == MAX_ATTEMPTS:
                        raise self._translate(exc, conn, action, False) from None
                except psycopg.Error as exc:
                    raise self._translate(exc, conn, action,
                                          None if committing else False) from None
        raise RunstoreError(f"{action} {self._where} lost {MAX_ATTEMPTS} races in a row to "
                            "other writers; nothing was applied; try again")

    def _read(self, body: Callable[[_Conn], T], action: str) -> T:
        """Run a read-only ``body`` (one statement, or a consistent set of them)."""
        with self._connection(action) as conn:
            try:
                return body(conn)
            except psycopg.Error as exc:
                raise self._translate(exc, conn, action, False) from None

    # -- rows -----------------------------------------------------------------------------

    def _run(self, row: Sequence[Any]) -> Run:
        try:
            return _ROWS.structure(dict(zip(_FIELDS, row, strict=False)), Run)
        except Exception as exc:  # cattrs raises an ExceptionGroup of per-field errors
            raise CorruptStoreError(self._where, None, f"a stored run is unreadable ({exc})",
                                    "fix or delete the row by hand") from None

    def _runs(self, conn: _Conn, query: str, params: Sequence[Any] = ()) -> _Runs:
        return [self._run(row) for row in conn.execute(query, params)]

    def _get(self, conn: _Conn, run_id: str) -> Run:
        row = conn.execute(self._sql.get, [run_id]).fetchone()
        if row is None:
            raise RunNotFoundError(run_id, self._where)
        return self._run(row)

    def _lock_feed(self, conn: _Conn) -> None:
        conn.execute(self._sql.lock_feed)

    def _insert_new(self, conn: _Conn, run: Run, now: _dt.datetime) -> Run:
        """Store a fresh run: a new id after every existing one, revision 1, this process as
        owner when non-terminal. Takes the feed lock first, so ids, insertion order and
        seqs are all handed out in commit order."""
        self._lock_feed(conn)
        if not run.status.is_terminal and conn.execute(
                self._sql.active_of_machine_now, [run.machine]).fetchone() is not None:
            # A run of this machine committed since our SELECT ... FOR UPDATE. Never wait for
            # it while holding the feed lock (its writer may be waiting for that lock, a
            # deadlock): roll back and start again, and that SELECT sees the run.
            raise _Retry
        row = conn.execute(self._sql.max_id).fetchone()
        new = transitions.fresh(run, ids.new_run_id(row[0] if row and row[0] else ""),
                                owner.current())
        conn.execute(self._sql.insert, _params(new, now, None))
        return new

    def _write(self, conn: _Conn, expected: int, new: Run, now: _dt.datetime) -> bool:
        """Store ``new`` over the version with revision ``expected``; False when that is no
        longer the stored version (another writer got there first)."""
        params = _params(new, now, None)
        params["expected"] = expected
        return conn.execute(self._sql.update, params).fetchone() is not None

    def _feed(self, conn: _Conn, changes: _Changes, now: _dt.datetime) -> None:
        """Append ``changes`` to the change feed (in this transaction) and notify watchers."""
        self._hit("before_feed", conn)
        self._lock_feed(conn)  # queued in the transaction's pipeline with every change
        cursors = [conn.execute(self._sql.append,
                                [now, change.value, Jsonb(codec.run_to_json(run))])
                   for change, run in changes]
        seqs = [int(row[0]) for row in (cur.fetchone() for cur in cursors) if row is not None]
        if seqs[0] // TRIM_EVERY != seqs[-1] // TRIM_EVERY or seqs[-1] % TRIM_EVERY == 0:
            self._trim(conn, seqs[-1] - RETAIN_CHANGES)

    def _trim(self, conn: _Conn, through: int) -> None:
        if through > 0:
            conn.execute(self._sql.trim, [through])
            conn.execute(self._sql.set_compacted, [through])

    def _modify(self, run_id: str, decide: Callable[[Run], tuple[Run, ChangeType] | None],
                action: str) -> Run:
        """The read-decide-write path of start/finish/heartbeat/update: ``decide`` returns
        the new version and its change type, or None to return the stored run unchanged."""

        def body(conn: _Conn) -> Run:
            stored = self._get(conn, run_id)
            decided = decide(stored)
            if decided is None:
                return stored
            new, change = decided
            now = _utcnow()
            if not self._write(conn, stored.revision, new, now):
                raise _Retry  # changed since we read it: decide again on the new version
            self._feed(conn, [(change, new)], now)
            return new

        return self._transact(body, action)

    # -- the public contract ------------------------------------------------------------

    def prepare_atomic(
        self, machine: str, test_dir_hash: str, make: Callable[[], Run], *, reap: bool = False
    ) -> tuple[Run, PrepareOutcome]:
        """In one transaction: return the machine's non-terminal run (REUSE when its hash
        matches, else BUSY), or call ``make()`` and store its run as pending (CREATED).
        With ``reap=True`` a non-terminal run whose owner process is provably gone is first
        interrupted (``error_code="owner_gone"``) in the same transaction."""
        _validate.prepare_atomic(machine, test_dir_hash, make, reap)

        def body(conn: _Conn) -> tuple[Run, PrepareOutcome]:
            now = _utcnow()
            changes: _Changes = []
            row = conn.execute(self._sql.active_for_update, [machine]).fetchone()
            active = None if row is None else self._run(row)
            if active is not None and reap:
                dead = reaping.reaped(active, None, now, None)
                if dead is not None:
                    if not self._write(conn, active.revision, dead, now):
                        raise _Retry
                    changes.append((ChangeType.RUN_REAPED, dead))
                    active = None
            if active is not None:
                same = active.test_dir_hash == test_dir_hash
                return active, PrepareOutcome.REUSE if same else PrepareOutcome.BUSY
            made = transitions.check_made(make(), machine, test_dir_hash)
            run = self._insert_new(conn, transitions.validate(transitions.as_pending(made)), now)
            changes.append((ChangeType.RUN_CREATED, run))
            self._feed(conn, changes, now)
            return run, PrepareOutcome.CREATED

        return self._transact(body, "prepare_atomic in")

    def create(self, run: Run) -> Run:
        """Store ``run`` under a new unique id (any id it has is overwritten)."""
        run = transitions.validate(run)

        def body(conn: _Conn) -> Run:
            if not run.status.is_terminal:
                row = conn.execute(self._sql.active_for_update, [run.machine]).fetchone()
                if row is not None:
                    raise MachineBusyError(run.machine, self._run(row).id)
            now = _utcnow()
            new = self._insert_new(conn, run, now)
            self._feed(conn, [(ChangeType.RUN_CREATED, new)], now)
            return new

        return self._transact(body, "creating a run in")

    def get(self, run_id: str) -> Run:
        """The run with this id; ``RunNotFoundError`` if there is none."""
        _validate.run_id(run_id)
        return self._read(lambda conn: self._get(conn, run_id), "reading a run from")

    def update(self, run: Run) -> Run:
        """Replace the stored run with the same id; returns what was stored. Refuses a
        stale copy (``ConflictError``), a forbidden status change (``InvalidTransitionError``)
        and a change of machine or hash (``InvalidRunError``). An unchanged copy of a
        terminal run is an idempotent no-op."""
        run = _validate.updated_run(run)
        return self._modify(run.id, lambda stored: transitions.updated(stored, run),
                            "updating a run in")

    def start(self, run_id: str) -> Run:
        """pending -> running: sets ``started_at`` and makes this process the owner."""
        _validate.run_id(run_id)
        return self._modify(run_id, lambda stored: transitions.started(
            stored, _utcnow(), owner.current()), "starting a run in")

    def finish(
        self,
        run_id: str,
        status: Status | str,
        *,
        exit_code: int | None = None,
        error_code: str = "",
        error_msg: str = "",
    ) -> Run:
        """Move a run to a terminal status and set ``ended_at``. Repeating the run's current
        terminal status returns it unchanged; any other change of a terminal run is refused."""
        _validate.finish(run_id, exit_code, error_code, error_msg)
        target = transitions.terminal_status(run_id, status)
        return self._modify(run_id, lambda stored: transitions.finished(
            stored, target, _utcnow(), exit_code, error_code, error_msg), "finishing a run in")

    def heartbeat(self, run_id: str) -> Run:
        """Refresh ``heartbeat_at`` of a non-terminal run (as cheap as any update)."""
        _validate.run_id(run_id)
        return self._modify(run_id, lambda stored: transitions.beat(stored, _utcnow()),
                            "recording a heartbeat in")

    def list(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> _Runs:
        """Every run matching the filters, in insertion order."""
        query, params = self._list_query(machine, status, batch_id)
        return self._read(lambda conn: self._runs(conn, query, params), "listing runs in")

    def iter_runs(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> Iterator[Run]:
        """The runs ``list()`` returns, in the same order, fetched ``_FETCH`` rows at a time
        through a server-side cursor as the iteration goes (one snapshot of the table, taken
        when the iteration starts). The iteration holds one pooled connection until it ends
        or the iterator is closed."""
        query, params = self._list_query(machine, status, batch_id)
        return self._stream(query, params, "listing runs in", self._run)

    def _list_query(self, machine: str | None,
                    status: Status | str | Iterable[Status | str] | None,
                    batch_id: str | None) -> tuple[str, Sequence[Any]]:
        _validate.list_filters(machine, batch_id)
        wanted = transitions.status_set(status)
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

    def _stream(self, query: str, params: Sequence[Any], action: str,
                make: Callable[[Sequence[Any]], T]) -> Iterator[T]:
        """``make(row)`` for each row of ``query``, read through a server-side cursor in
        one read-only transaction, ``_FETCH`` rows at a time."""
        with self._connection(action) as conn:
            try:
                with conn.transaction(), conn.cursor(name=f"{self.table}_stream") as cur:
                    cur.execute(query, params)
                    while rows := cur.fetchmany(_FETCH):
                        for row in rows:
                            yield make(row)
            except psycopg.Error as exc:
                raise self._translate(exc, conn, action, False) from None

    def active_by_machine(self, machine: str) -> Run | None:
        """The non-terminal run of ``machine``, or None."""
        _validate.text("machine", machine)
        runs = self._read(lambda conn: self._runs(conn, self._sql.active_of, [machine]),
                          "reading the active run from")
        return runs[0] if runs else None

    def active(self) -> _Runs:
        """Every non-terminal run, in insertion order."""
        return self._read(lambda conn: self._runs(conn, self._sql.active),
                          "listing active runs in")

    def find_by_test_dir_hash_and_machine(self, test_dir_hash: str, machine: str) -> _Runs:
        """Every run of ``machine`` with this hash, in insertion order."""
        _validate.find(test_dir_hash, machine)
        query = self._sql.select_where(["machine = %s", "test_dir_hash = %s"])
        return self._read(lambda conn: self._runs(conn, query, [machine, test_dir_hash]),
                          "listing runs in")

    def compact(self) -> None:
        """Trim the change feed to the last ``RETAIN_CHANGES`` changes (PostgreSQL's
        autovacuum reclaims the space of superseded row versions on its own)."""

        def body(conn: _Conn) -> None:
            self._lock_feed(conn)
            row = conn.execute(self._sql.last_seq).fetchone()
            self._trim(conn, (int(row[0]) if row else 0) - RETAIN_CHANGES)

        self._transact(body, "trimming the change feed of")

    # -- owners and reaping -------------------------------------------------------------

    def reap(self, *, stale_after: _dt.timedelta, dry_run: bool = False) -> _Runs:
        """Interrupt every non-terminal run whose owner process on this host is gone
        (``error_code="owner_gone"``) or whose last heartbeat (or change) is older than
        ``stale_after`` (``"heartbeat_stale"``) and whose owner is not a process of this host
        that provably still runs (a step of the wall clock never reaps it); return the
        reaped runs. A run changed by
        its owner while being judged is left alone (its owner is alive)."""
        _validate.reap(stale_after, dry_run)

        def body(conn: _Conn) -> _Runs:
            now = _utcnow()
            judged = []
            for row in conn.execute(self._sql.active_with_changed_at):
                run = self._run(row)
                dead = reaping.reaped(run, row[-1], now, stale_after)
                if dead is not None:
                    judged.append((run.revision, dead))
            if dry_run:
                return [dead for _, dead in judged]
            reaped = [dead for revision, dead in judged
                      if self._write(conn, revision, dead, now)]
            if reaped:
                self._feed(conn, [(ChangeType.RUN_REAPED, r) for r in reaped], now)
            return reaped

        return self._transact(body, "reaping runs in")

    # -- retention ----------------------------------------------------------------------

    def prune(
        self,
        *,
        older_than: _dt.timedelta | None = None,
        keep_last: int | None = None,
        archive: str | os.PathLike[str] | None = None,
        dry_run: bool = False,
    ) -> int:
        """Remove terminal runs that ended more than ``older_than`` ago, or all but the newest
        ``keep_last`` terminal runs (non-terminal runs are never pruned). With ``archive``
        the pruned runs are first appended, durably, to that JSON-lines file (the same format
        as the file store's). Returns the number of runs removed."""
        _validate.prune(older_than, keep_last, archive, dry_run)

        def body(conn: _Conn) -> int:
            self._lock_feed(conn)  # one pruner at a time; terminal runs change no more
            terminal: list[tuple[Run, Any]] = [
                (self._run(row), row[-1]) for row in conn.execute(self._sql.terminal_with_extra)]
            doomed = retention.doomed(terminal, lambda item: item[0], older_than=older_than,
                                      keep_last=keep_last, now=_utcnow())
            if dry_run or not doomed:
                return len(doomed)
            runs = [r for r, _ in doomed]
            if archive is not None:
                interchange.append_archive(os.fspath(archive), runs,
                                           {r.id: x for r, x in doomed if x})
            conn.execute(self._sql.delete, [[r.id for r in runs]])
            self._feed(conn, [(ChangeType.RUN_PRUNED, r) for r in runs], _utcnow())
            return len(runs)

        removed = self._transact(body, "pruning runs in")
        if removed and not dry_run:
            self.compact()
        return removed

    # -- batches ------------------------------------------------------------------------

    def batch_summary(self, batch_id: str) -> BatchSummary:
        """Counts by status and the latest run of each plan entry of a batch."""
        transitions.require_text("batch_id", batch_id)
        return BatchSummary.of(batch_id, self.list(batch_id=batch_id))

    # -- the change feed ----------------------------------------------------------------

    def changes(self, since_seq: int = 0) -> Iterator[Change]:
        """The retained changes after ``since_seq``, in order. ``HistoryTruncatedError`` when
        changes after ``since_seq`` were trimmed away (resynchronise from ``list()``)."""
        transitions.require_seq("since_seq", since_seq)
        rows = self._read(lambda conn: conn.execute(self._sql.changes, [since_seq]).fetchall(),
                          "reading the change feed of")
        compacted = int(rows[0][0]) if rows else 0
        if since_seq < compacted:
            raise HistoryTruncatedError(since_seq, compacted + 1)
        out = []
        for _, seq, when, kind, data in rows:
            if seq is None:
                continue
            try:
                run = codec.run_from_dict(data)
            except codec.BadLine as exc:
                raise CorruptStoreError(self._where, None, f"change {seq} is unreadable "
                                        f"({exc.reason})", "fix or delete the row by hand"
                                        ) from None
            out.append(Change(seq=int(seq), time=when.astimezone(_dt.UTC),
                              type=ChangeType(kind), run=run))
        return iter(out)

    def last_seq(self) -> int:
        """The sequence number of the latest committed change (0 for an empty store)."""
        row = self._read(lambda conn: conn.execute(self._sql.last_seq).fetchone(),
                         "reading the change feed of")
        return int(row[0]) if row else 0

    def watch(
        self,
        since_seq: int | None = None,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.005,
    ) -> Iterator[Change]:
        """Follow changes written by any process on any host, live, until ``timeout``
        seconds have passed (None: forever). ``since_seq=None`` starts from now. Woken by
        LISTEN/NOTIFY on a connection of its own; if that connection cannot be opened or
        fails, it polls the feed every ``poll_interval`` seconds instead. ``inf`` is refused
        as a timeout (None is no limit); the arguments are checked when it is called."""
        _validate.watch(since_seq, timeout, poll_interval)
        return self._watch(since_seq, timeout, poll_interval)

    def _watch(self, since_seq: int | None, timeout: float | None,
               poll_interval: float) -> Iterator[Change]:
        seq = self.last_seq() if since_seq is None else since_seq
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = self._listen()
        try:
            while True:
                for change in self.changes(seq):
                    seq = change.seq
                    yield change
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                if listener is not None:
                    wait = _WATCH_WAKEUP if left is None else min(left, _WATCH_WAKEUP)
                    try:
                        for _ in listener.notifies(timeout=wait, stop_after=1):
                            pass
                    except psycopg.Error:
                        listener.close()
                        listener = None  # poll from now on; a new watch() listens again
                else:
                    time.sleep(poll_interval if left is None else min(poll_interval, left))
        finally:
            if listener is not None:
                listener.close()

    def _listen(self) -> _Conn | None:
        self._pool_here()  # refuse when closed, like every other call
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, application_name="runstore")
        except psycopg.Error:
            return None
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._names.channel)))
        except psycopg.Error:
            conn.close()
            return None
        return conn

    # -- export and import --------------------------------------------------------------

    def export(self, fp: IO[str] | IO[bytes] | str | os.PathLike[str]) -> int:
        """Write every run, in insertion order, as one JSON array (the seed's field names,
        plus the fields this library does not know); returns the number of runs written.
        ``fp`` is a file object, or a path: that file is then written through a temp file
        beside it, synced and renamed over it (replaced whole or not at all)."""
        _validate.export_target(fp, paths=True)
        if isinstance(fp, str | os.PathLike):
            return interchange.export_to_path(os.fspath(fp), self._write_export)
        return self._write_export(fp)

    def _write_export(self, fp: IO[str] | IO[bytes]) -> int:
        return interchange.write_export(fp, self._iter_export())

    def _iter_export(self) -> Iterator[tuple[Run, dict[str, Any]]]:
        """Every run with its extra fields, in insertion order, read as it is iterated
        (``_stream``: one query, one snapshot); holds one pooled connection until the
        iteration ends."""
        return self._stream(self._sql.all_with_extra, (), "exporting runs from",
                            lambda row: (self._run(row), row[-1] or {}))

    def import_runs(self, source: IO[str] | IO[bytes] | Iterable[Run | dict[str, Any]]) -> int:
        """Add runs keeping their ids, from a JSON array document or JSON lines (a file), or
        from an iterable of ``Run``/dicts. All or nothing (one transaction): a duplicate or
        invalid record is refused with ``InvalidRunError`` naming it.

        The input is read as it is imported, in memory that does not grow with it: the
        records are sent with ``COPY`` into a temporary table, then checked and inserted
        by the server; the change feed's lock is taken only for that last step."""
        _validate.import_source(source)
        return self._import_runs(interchange.iter_import(source))

    def _import_runs(self, records: Iterable[tuple[int, Run, dict[str, Any]]],
                     on_conflict: Callable[[Run, Run], None] | None = None) -> int:
        """``import_runs`` of validated (record number, run, extra fields); see
        ``Store._import_runs`` for ``on_conflict``. Never retried: the records are read
        once."""
        action = "importing runs into"
        with self._connection(action) as conn:
            committing = False
            try:
                with conn.transaction():
                    count = self._stage_import(conn, records, on_conflict)
                    self._hit("before_commit", conn)
                    committing = True
                return count
            except psycopg.Error as exc:
                raise self._translate(exc, conn, action,
                                      None if committing else False) from None

    def _stage_import(self, conn: _Conn, records: Iterable[tuple[int, Run, dict[str, Any]]],
                      on_conflict: Callable[[Run, Run], None] | None) -> int:
        """In the caller's transaction: COPY ``records`` into a temporary table, refuse an
        id twice, an existing id (or, with ``on_conflict``, skip identical ones and call it
        for the first that differs) and a second non-terminal run on a machine, then insert
        the rest in record order and write their changes to the feed."""
        names, imp = self._names, sql.Identifier("runstore_import")
        cols = _columns_sql([*_FIELDS, "extra", "run"])
        conn.execute(sql.SQL(
            "CREATE TEMPORARY TABLE {imp} (n bigint NOT NULL, LIKE {runs}, run jsonb NOT NULL)"
            " ON COMMIT DROP").format(imp=imp, runs=names.runs))
        conn.execute(sql.SQL("ALTER TABLE {imp} DROP COLUMN inserted, DROP COLUMN changed_at")
                     .format(imp=imp))
        with conn.cursor().copy(sql.SQL("COPY {imp} (n, {cols}) FROM STDIN")
                                .format(imp=imp, cols=cols)) as copy:
            for n, run, extra in records:
                values = codec.converter.unstructure(run)
                values["status"] = run.status.value
                copy.write_row([n, *(values[f] for f in _FIELDS),
                                Jsonb(extra) if extra else None,
                                Jsonb(codec.run_to_json(run))])
        conn.execute(sql.SQL("CREATE INDEX ON {imp} (id)").format(imp=imp))
        conn.execute(sql.SQL("ANALYZE {imp}").format(imp=imp))
        twice = conn.execute(sql.SQL(
            "SELECT max(n), id FROM {imp} GROUP BY id HAVING count(*) > 1 ORDER BY 1 LIMIT 1")
            .format(imp=imp)).fetchone()
        if twice is not None:
            raise InvalidRunError(f"record {twice[0]}: run {twice[1]!r} appears twice; "
                                  "nothing was imported")
        self._lock_feed(conn)  # no other run is created until we commit
        same = sql.SQL(" AND ").join(
            sql.SQL("i.{f} IS NOT DISTINCT FROM r.{f}").format(f=sql.Identifier(f))
            for f in _FIELDS)
        refused = sql.SQL("TRUE") if on_conflict is None else sql.SQL("NOT ({})").format(same)
        found = conn.execute(sql.SQL(
            "SELECT i.n, i.id FROM {imp} i JOIN {runs} r USING (id) WHERE {refused} "
            "ORDER BY i.n LIMIT 1").format(refused=refused, imp=imp, runs=names.runs)
            ).fetchone()
        if found is not None:
            n, run_id = found
            if on_conflict is not None:
                new = conn.execute(sql.SQL("SELECT {cols} FROM {imp} WHERE id = %s").format(
                    cols=_columns_sql(list(_FIELDS)), imp=imp), [run_id]).fetchone()
                assert new is not None
                on_conflict(self._get(conn, run_id), self._run(new))
            raise InvalidRunError(f"record {n}: run {run_id!r} already exists in "
                                  f"{self._where}; nothing was imported")
        if on_conflict is not None:  # what is left in both is identical: skipped
            conn.execute(sql.SQL("DELETE FROM {imp} i USING {runs} r WHERE i.id = r.id")
                         .format(imp=imp, runs=names.runs))
        active = conn.execute(sql.SQL(
            "SELECT n, id, status, machine FROM {imp} WHERE status IN ('pending', 'running')"
            " ORDER BY n").format(imp=imp)).fetchall()
        busy = dict(conn.execute(self._sql.active_of_machines,
                                 [sorted({row[3] for row in active})]).fetchall())
        for n, run_id, status, machine in active:
            if machine in busy:
                raise InvalidRunError(
                    f"record {n}: run {run_id!r} is {status} on machine {machine!r}, which "
                    f"already has the non-terminal run {busy[machine]!r}; nothing was "
                    "imported")
            busy[machine] = run_id
        now = _utcnow()
        inserted = conn.execute(sql.SQL(
            "INSERT INTO {runs} ({cols}, changed_at, extra) "
            "SELECT {cols}, %s, extra FROM {imp} ORDER BY n")
            .format(runs=names.runs, cols=_columns_sql(list(_FIELDS)), imp=imp), [now])
        count = inserted.rowcount
        if count <= 0:
            return 0
        self._feed_import(conn, imp, count, now)
        return count

    def _feed_import(self, conn: _Conn, imp: sql.Identifier, count: int,
                     now: _dt.datetime) -> None:
        """The ``run_created`` changes of ``count`` imported runs: their seqs are drawn at
        once, and only the last ``RETAIN_CHANGES`` of them are written (a trim would remove
        the others at once, as ``_feed`` does when the seq crosses a ``TRIM_EVERY``)."""
        self._hit("before_feed", conn)
        row = conn.execute("SELECT nextval(%s)", [self._names.seq.as_string()]).fetchone()
        assert row is not None
        first = int(row[0])
        last = first + count - 1
        if count > 1:
            conn.execute("SELECT setval(%s, %s)", [self._names.seq.as_string(), last])
        conn.execute(sql.SQL(
            "INSERT INTO {changes} (seq, time, change, run) "
            "SELECT s, %s, %s, run FROM (SELECT %s - 1 + row_number() OVER (ORDER BY n) AS s,"
            " run FROM {imp}) t WHERE s > %s")
            .format(changes=self._names.changes, imp=imp),
            [now, ChangeType.RUN_CREATED.value, first, last - RETAIN_CHANGES])
        conn.execute("SELECT pg_notify(%s, 'changed')", [self._names.channel])
        if first // TRIM_EVERY != last // TRIM_EVERY or last % TRIM_EVERY == 0:
            self._trim(conn, last - RETAIN_CHANGES)

    # -- statistics ---------------------------------------------------------------------

    def stats(self) -> StoreStats:
        """Counts and sizes for operators (``python -m runstore stats``)."""

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

        return self._transact(body, "reading statistics of")

    # -- life cycle ---------------------------------------------------------------------

    def _forget_parent_pool(self) -> None:
        """In a forked child: set the parent's pool aside (its connections are the parent's
        sessions, possibly mid-transaction in a thread that does not exist here) and take a
        fresh pool lock; the child's first call opens its own pool (``_pool_here``)."""
        self._pool_lock = threading.Lock()
        _parent_pools.append(self._pool)

    def close(self) -> None:
        """Close the pooled connections (a forked child leaves its parent's alone)."""
        if self._closed:
            return
        self._closed = True
        if self._pid == _forks.pid():
            self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.server!r}, table={self.table!r}, durable={self.durable})"


def migrate(dsn: str, table: str = "runs") -> tuple[int, int]:
    """Create or migrate the schema of ``table`` without opening a store; returns the
    schema version before and after (``runstore migrate`` and deployment scripts)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return pgschema.migrate(conn, table, safe_dsn(dsn))


@_forks.in_child
def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._forget_parent_pool()



def _reason(exc: psycopg.Error) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _params(run: Run, now: _dt.datetime, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The statement parameters storing ``run`` (and ``extra``, on an insert), refused as
    the file store refuses them (``codec.checked_fields``: ``MAX_RECORD_BYTES``, fields
    that cannot be written as JSON). An update leaves the kept fields in their column, so
    only the run's own fields count for it."""
    codec.checked_fields(run, extra)
    params: dict[str, Any] = codec.converter.unstructure(run)
    params["status"] = run.status.value
    params["changed_at"] = now
    params["extra"] = Jsonb(extra) if extra else None
    return params
