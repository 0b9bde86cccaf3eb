"""The machinery under ``PostgresStore``: connections and their pool, error translation,
transactions, reading rows, and the one-statement writes (``_pgsql``) with their retries.
``PostgresStore`` (``runstore.postgres``) adds the public methods on top."""

from __future__ import annotations

import contextlib
import datetime as _dt
import select
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar

import orjson
import psycopg
import psycopg.errors
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool, PoolTimeout

from . import (
    _fields,
    _forks,
    _ids,
    _interchange,
    _owner,
    _pgimport,
    _pgschema,
    _pgsql,
    _transitions,
)
from ._base import RETAIN_CHANGES
from .errors import (
    CorruptStoreError,
    DatabaseConnectionError,
    DatabaseError,
    InvalidRunError,
    RunNotFoundError,
    RunstoreError,
    TableLockTimeoutError,
)
from .model import ChangeType, Run, Status

T = TypeVar("T")
_Conn = psycopg.Connection[Any]
_Runs = list[Run]
#: how often a call is retried after losing a race (unique index, revision check,
#: deadlock); each retry means another writer made progress, so this is never reached in
#: practice
MAX_ATTEMPTS = 50
_FIELDS = _fields.RUN_FIELDS
#: rows fetched at a time by ``iter_runs`` and ``export``
_FETCH = 2000


class _Pool(ConnectionPool[_Conn]):
    """psycopg's pool, handing out the connection returned last (its own hands out the one
    returned first). A thread that makes one call after another keeps using one connection,
    so one server process serves it, its caches warm; handed out in turn, each client's
    calls went round all ``pool_size`` server processes. With the durable dispatcher cycle
    at 8 and 16 client processes on 2 cores (``benchmarks/bench_pg_clients.py``, both
    orders in one run), the server spent 18-20% less CPU per call and throughput rose
    12-19%. The least recently used connections stay at the front, where the pool closes
    idle ones from (it never does here: ``min_size=max_size``)."""

    def _get_ready_connection(self, timeout: float | None) -> _Conn | None:
        # called with the pool's lock held; it takes the front connection
        self._pool.rotate(1)
        return super()._get_ready_connection(timeout)


#: every store of this process, for the at-fork hook (``_after_fork_in_child``)
_stores: weakref.WeakSet[PostgresBase] = weakref.WeakSet()
#: in a forked child, the pools inherited from the parent: kept referenced and never used,
#: closed or collected (a pool's finaliser signals its worker threads through locks that a
#: parent's thread may have held at the fork, and no worker runs in the child)
_parent_pools: list[object] = []


def _aware_utc(value: Any, _type: Any) -> _dt.datetime:
    if not isinstance(value, _dt.datetime) or value.tzinfo is None:
        raise TypeError(f"expected an aware datetime, got {value!r}")
    return value.astimezone(_dt.UTC)


#: the codec's converter (strict types), taught that rows carry datetimes rather than strings
_ROWS = _fields.make_converter()
_ROWS.register_structure_hook(_dt.datetime, _aware_utc)


class _Retry(Exception):
    """Internal: the transaction lost a race; roll back and run it again."""


_NON_TERMINAL = (Status.PENDING, Status.RUNNING)
_NFIELDS = len(_FIELDS)
_STATUS_AT = _FIELDS.index("status")
_STATUS_OF = {s.value: s for s in Status}
_TIMES_AT = [i for i, f in enumerate(_FIELDS) if f in ("started_at", "ended_at", "heartbeat_at")]



class PostgresBase:
    """What every ``PostgresStore`` method stands on; set up by ``PostgresStore.__init__``."""

    dsn: str
    table: str
    durable: bool
    lock_timeout: float
    pool_size: int
    server: str
    _where: str
    _names: _pgschema.Names
    _sql: _pgschema.Statements
    _w: _pgsql.Writes
    _pool: _Pool
    _pool_lock: threading.Lock
    _pid: int
    _closed: bool
    _last_id: str

    def _count_write(self, conn: _Conn) -> None:
        """Called after each write that stored a change, with the connection it used, still
        checked out (``PostgresStore`` numbers the feed now and then)."""

    # -- connections ----------------------------------------------------------------------

    def _connect(self, action: str) -> _Conn:
        try:
            return psycopg.connect(self.dsn, autocommit=True, application_name="runstore")
        except psycopg.Error as exc:
            raise DatabaseConnectionError(self.server, self._doing(action),
                                          _reason(exc)) from None

    def _migrate(self) -> int:
        with self._connect("connecting to") as conn:
            try:
                return _pgschema.upgrade_schema(conn, self.table, self.server)[1]
            except psycopg.errors.LockNotAvailable:
                raise TableLockTimeoutError(self._where, self.lock_timeout) from None
            except psycopg.Error as exc:
                raise self._translate(exc, conn, "creating or migrating the schema of",
                                      False) from None

    def _configure(self, conn: _Conn) -> None:
        """Per-connection settings: UTC, lock_timeout, and synchronous_commit when not
        durable (PostgreSQL's 0 means "wait forever", so 0 s becomes 1 ms). JSON is read
        with orjson, as the file store reads its lines (kept fields are stored as orjson
        wrote them: ``_pgimport.kept_json``; those stored as ``jsonb`` before schema
        version 5 may hold a float such as 1e20 as the digits of an integer, which orjson
        reads back as the float it was, where json would make an integer beyond 64 bits
        that ``export`` cannot write). JIT
        compilation is off: the feed's trim (``_pgfeed``) is estimated costly enough to be
        compiled, which took 130 ms of the 160 ms it ran, with every writer of the table
        waiting behind it; no statement of the store runs long enough to gain from it."""
        set_json_loads(orjson.loads, conn)
        millis = max(1, round(self.lock_timeout * 1000))
        conn.execute(
            "SELECT set_config('TimeZone', 'UTC', false), set_config('lock_timeout', %s, false),"
            " set_config('synchronous_commit', %s, false), set_config('jit', 'off', false)",
            [f"{millis}ms", "on" if self.durable else "off"])

    def _new_pool(self) -> _Pool:
        """``pool_size`` connections, opened at once by the pool's worker thread and kept
        (``min_size=max_size``: no connect on the hot path); checked out without a round
        trip (``_checkout``); waited for at most ``lock_timeout`` (1 s at least). A checkout
        and its return cost about 5.6 us of client CPU (a hand-written pool of the same
        design: 4.8 us), under 1% of a call's."""
        return _Pool(
            self.dsn, min_size=self.pool_size, max_size=self.pool_size, open=True,
            kwargs={"autocommit": True, "application_name": "runstore"},
            configure=self._configure, timeout=max(self.lock_timeout, 1.0),
            name=f"runstore-{self.table}", num_workers=1)

    def _pool_here(self) -> _Pool:
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
        conn = self._checkout(action)
        try:
            yield conn
        finally:
            self._pool.putconn(conn)

    def _checkout(self, action: str) -> _Conn:
        """A pooled connection (give it back with ``self._pool.putconn``). One whose server
        ended it while idle (``_usable``) is closed and given back, so that the pool opens
        another in its place, and the next idle one is taken at once: the pool's own
        ``check=`` would back off a second per dead connection, seconds after a server
        restart ended them all."""
        pool = self._pool_here()
        try:
            while True:
                conn = pool.getconn()
                if _usable(conn):
                    return conn
                conn.close()
                pool.putconn(conn)
        except PoolTimeout:
            raise DatabaseConnectionError(
                self.server, self._doing(action), f"no connection within {pool.timeout:g} s: "
                f"the server is unreachable or all {self.pool_size} pooled connections "
                "stayed busy") from None

    def _hit(self, point: str, conn: _Conn) -> None:
        """Nothing: the points a write passes (``before_commit``: its statement or COMMIT
        is about to be sent; ``before_feed``: an import's runs are written, its changes not
        yet), named for the fault tests, which replace this method to act there."""

    def _doing(self, action: str) -> str:
        """``action`` ("listing runs in", "creating or migrating the schema of") with the
        table it acts on, as a ``DatabaseError`` names it."""
        return f"{action} table {self.table!r}"

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
            return DatabaseConnectionError(self.server, self._doing(action), reason, applied)
        return DatabaseError(self.server, self._doing(action), reason, applied)

    def _transact(self, body: Callable[[_Conn], T], action: str) -> T:
        """Run ``body`` in one transaction and commit; retry when it lost a race."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            with self._connection(action) as conn:
                committing = False
                try:
                    with conn.transaction():
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
        try:  # the columns' types are the fields' (the table's types and checks)
            values = list(row[:_NFIELDS])
            values[_STATUS_AT] = _STATUS_OF[values[_STATUS_AT]]
            for i in _TIMES_AT:
                when = values[i]
                if when is not None and when.tzinfo is not _dt.UTC:
                    values[i] = when.astimezone(_dt.UTC)
            return Run(*values)
        except (KeyError, AttributeError, TypeError, ValueError):
            pass
        try:
            return _ROWS.structure(dict(zip(_FIELDS, row, strict=False)), Run)
        except Exception as exc:  # cattrs raises an ExceptionGroup of per-field errors
            raise CorruptStoreError(self._where, None, f"a stored run is unreadable ({exc})",
                                    "fix or delete the row by hand") from None

    def _runs(self, conn: _Conn, query: str, params: Sequence[Any] = ()) -> _Runs:
        return [self._run(row) for row in conn.execute(query, params)]

    def _get(self, conn: _Conn, run_id: str) -> Run:
        rows = self._execute(conn, self._sql.get, [run_id], "reading a run from", False)
        row = rows[0] if rows else None
        if row is None:
            raise RunNotFoundError(run_id, self._where)
        return self._run(row)

    def _execute(self, conn: _Conn, statement: str, params: Any, action: str,
                 write: bool = True) -> list[Any]:
        """One statement on ``conn`` (autocommit: a write is its own transaction), its rows.
        A connection that breaks during a write leaves its outcome unknown."""
        if write:
            self._hit("before_commit", conn)
        try:
            cursor = getattr(conn, "_runstore_cursor", None)
            if cursor is None:
                cursor = conn._runstore_cursor = conn.cursor()  # type: ignore[attr-defined]
            return cursor.execute(statement, params).fetchall()
        except psycopg.Error as exc:
            if write and exc.sqlstate is None and isinstance(exc, psycopg.DataError):
                # the server wrote it; a value it sent back cannot be read here
                raise CorruptStoreError(self._where, None, f"a stored run is unreadable "
                                        f"({_reason(exc)})", "fix or delete the row by hand"
                                        ) from None
            applied = None if write and (conn.closed or conn.broken) else False
            raise self._translate(exc, conn, action, applied) from None

    def _write(self, conn: _Conn, expected: int, new: Run, now: _dt.datetime, action: str,
               change: ChangeType | None, allowed: Iterable[Status] = _NON_TERMINAL,
               kept: dict[str, Any] | None = None, fast: bool = False) -> bool:
        """Store ``new`` over the version with revision ``expected`` (if its status is one of
        ``allowed``) and its change (``change``, or as ``update()`` names it); False when
        that is no longer the stored version (another writer got there first). ``kept``:
        the stored kept fields, checked with ``new`` as the file store checks a record.
        ``fast`` (the kept fields unread): also False when the kept fields might not fit
        beside ``new`` (the read-decide-write path then checks exactly)."""
        params = _params(new, now, None)
        if kept:
            _fields.checked_fields(new, kept)
        if not fast:
            params["room"] = _fields.MAX_RECORD_BYTES  # (checked here, or not wanted)
        params["expected"] = expected
        params["change"] = None if change is None else change.value
        params["from"] = [s.value for s in allowed]
        done = bool(self._execute(conn, self._w.write, params, action))
        if done:
            self._count_write(conn)
        return done

    def _modify(self, run_id: str, decide: Callable[[Run], tuple[Run, ChangeType] | None],
                action: str) -> Run:
        """The read-decide-write path: ``decide`` returns the new version and its change
        type, or None to return the stored run unchanged. Two round trips; taken when the
        one-statement form of a call did not apply."""
        for _ in range(MAX_ATTEMPTS):
            with self._connection(action) as conn:
                stored, kept = self._get_with_kept(conn, run_id, action)
                decided = decide(stored)
                if decided is None:
                    return stored
                new, change = decided
                if self._write(conn, stored.revision, new, _ids.utcnow(), action, change,
                               [stored.status], kept):
                    return new
        raise RunstoreError(f"{action} {self._where} lost {MAX_ATTEMPTS} races in a row to "
                            "other writers; nothing was applied; try again")

    def _transition(self, statement: str, params: dict[str, Any], action: str) -> Run | None:
        """A one-statement transition (``start``/``finish``/``heartbeat``): the run as
        stored, or None when its rule did not apply (or its record might not fit)."""
        # at most ESCAPED bytes of JSON per character, whatever the character
        added = sum(len(v) for v in params.values() if isinstance(v, str))
        params["room"] = (_fields.MAX_RECORD_BYTES - _pgsql.RECORD_OVERHEAD
                          - _pgsql.ESCAPED * added)
        conn = self._checkout(action)
        try:
            rows = self._execute(conn, statement, params, action)
            if rows:
                self._count_write(conn)
        finally:
            self._pool.putconn(conn)
        return self._run(rows[0]) if rows else None

    def _get_with_kept(self, conn: _Conn, run_id: str, action: str
                       ) -> tuple[Run, dict[str, Any] | None]:
        """The run and its kept fields (``extra``)."""
        rows = self._execute(conn, self._sql.get_with_extra, [run_id], action, False)
        if not rows:
            raise RunNotFoundError(run_id, self._where)
        return self._run(rows[0][:-1]), rows[0][-1]

    def _create(self, conn: _Conn, run: Run, action: str) -> Run | None:
        """Insert ``run`` as a fresh run (new id, revision 1, this process as owner when
        non-terminal); None when the machine already has a non-terminal run."""
        for _ in range(MAX_ATTEMPTS):
            new = _transitions.fresh(run, _ids.new_run_id(self._last_id), _owner.current())
            params = _params(new, _ids.utcnow(), None)
            ((inserted, greatest),) = self._execute(conn, self._w.create, params, action)
            if inserted:
                self._last_id = new.id
                self._count_write(conn)
                return new
            second = _pgsql.ID_SECOND
            if greatest is None or greatest[:second] <= new.id[:second]:
                return None  # the machine is taken (and our id was fine)
            self._last_id = greatest  # a greater id is stored (imported, or a clock ahead)
        raise RunstoreError(f"{action} {self._where}: no new id sorted after the greatest "
                            f"stored id ({self._last_id!r}) in {MAX_ATTEMPTS} tries; nothing "
                            "was created")

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

    def _write_export(self, fp: IO[str] | IO[bytes]) -> int:
        return _interchange.write_export(fp, self._iter_export())

    def _iter_export(self) -> Iterator[tuple[Run, dict[str, Any]]]:
        """Every run with its extra fields, in insertion order, read as it is iterated
        (``_stream``: one query, one snapshot); holds one pooled connection until the
        iteration ends."""
        return self._stream(self._sql.all_with_extra, (), "exporting runs from",
                            lambda row: (self._run(row), row[-1] or {}))

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
                    count = _pgimport.stage(self, conn, records, on_conflict,
                                            RETAIN_CHANGES)
                    self._hit("before_commit", conn)
                    committing = True
                return count
            except psycopg.Error as exc:
                raise self._translate(exc, conn, action,
                                      None if committing else False) from None

    # -- life cycle ---------------------------------------------------------------------

    def _forget_parent_pool(self) -> None:
        """In a forked child: set the parent's pool aside (its connections are the parent's
        sessions, possibly mid-transaction in a thread that does not exist here) and take a
        fresh pool lock; the child's first call opens its own pool (``_pool_here``)."""
        self._pool_lock = threading.Lock()
        _parent_pools.append(self._pool)



@_forks.in_child
def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._forget_parent_pool()



def _usable(conn: _Conn) -> bool:
    """False when ``conn`` is closed or its server ended it, found without a round trip:
    an idle connection has nothing to read unless the server sent an error and closed the
    socket (one ``select`` call)."""
    if conn.closed or conn.broken:
        return False
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    return not readable


def _reason(exc: psycopg.Error) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _params(run: Run, now: _dt.datetime, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The statement parameters storing ``run`` (and ``extra``, on an insert), refused as
    the file store refuses them (``_fields.checked_fields``: ``MAX_RECORD_BYTES``, fields
    that cannot be written as JSON). An update leaves the kept fields in their column, so
    only the run's own fields count for it."""
    fields = _fields.checked_fields(run, extra)
    params: dict[str, Any] = _fields.converter.unstructure(run)
    #: what the stored kept fields may take (``Writes.write``'s fast form)
    params["room"] = (_fields.MAX_RECORD_BYTES - _pgsql.RECORD_OVERHEAD - len(fields)
                      - _pgsql.ESCAPED * len(run.id))
    params["status"] = run.status.value
    params["changed_at"] = now
    params["extra"] = _pgimport.kept_json(extra)
    return params
