"""The implementations the benchmarks compare, behind one small interface (``Impl``).

Each one keeps the same records (every field of ``runstore.Run``) and gives the dispatcher the
same contract: ``prepare_atomic`` atomically returns the machine's non-terminal run (REUSE when
the hash matches, else BUSY) or stores a new pending one (CREATED); ``start``, ``get`` (a
``runstore.Run``) and ``finish`` act on one run. ``durable`` means an acknowledged change
survives a power loss.

* ``runstore``   this library (JSON-lines journal, flock, group commit)
* ``sqlite``     stdlib sqlite3: WAL, a partial unique index on machine for non-terminal runs,
                 ``BEGIN IMMEDIATE`` for prepare; ``synchronous=FULL`` durable, ``OFF`` not
* ``wholefile``  the naive design: one JSON document, flock, read it all, change it, write it
                 all to a temp file, fsync (durable only), rename
* ``postgres``   PostgreSQL (see ``pg_server``), the same table and partial unique index,
                 ``INSERT .. ON CONFLICT DO NOTHING``; ``synchronous_commit`` on / off
                 (it calls ``make()`` before it knows the machine is free)
* ``postgres-lock`` the same table, ``prepare_atomic`` under an advisory lock on the machine,
                 calling ``make()`` only when it creates, as the contract requires
* ``runstore-pg`` this library's PostgreSQL backend, ``runstore.PostgresStore`` (the same
                 contract as ``runstore``: change feed, revisions, owner fields), on the same
                 server as ``postgres``; ``durable=True`` / ``False``

A location is a directory path for the file stores and a libpq DSN for PostgreSQL.
"""

from __future__ import annotations

import abc
import datetime as _dt
import fcntl
import json
import os
import secrets
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import attrs

import runstore
from runstore import PrepareOutcome, Run, Status

RUN_FIELDS: tuple[str, ...] = tuple(a.name for a in attrs.fields(Run))
_TIME_FIELDS = frozenset({"started_at", "ended_at", "heartbeat_at"})
_ACTIVE = (Status.PENDING.value, Status.RUNNING.value)
_HISTORY_START = _dt.datetime(2025, 1, 1, tzinfo=_dt.UTC)
_UTC = _dt.UTC

Make = Callable[[], Run]


def join_or_kill(procs: list[Any], timeout: float = 30.0) -> None:
    """Wait for each worker process, killing one that is still alive after ``timeout``."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_UTC)


def new_run_id() -> str:
    """A unique, roughly time-ordered id for the implementations that do not make their own."""
    return f"{time.time_ns():x}-{secrets.token_hex(6)}"


def history_run(i: int) -> Run:
    """The ``i``-th preloaded run: terminal, with every field a finished run has filled
    (about 500 bytes as a JSON line, like a real dispatcher's history)."""
    started = _HISTORY_START + _dt.timedelta(seconds=60 * i)
    failed = i % 7 == 0
    return Run(
        machine=f"host-{i % 500:04d}",
        test_dir=f"/srv/ci/suites/suite-{i % 97:02d}/case-{i:07d}",
        test_dir_hash=f"{(i * 0x9E3779B97F4A7C15) % (1 << 64):016x}",
        status=Status.FAILED if failed else Status.COMPLETED,
        exit_code=1 if failed else 0,
        started_at=started,
        ended_at=started + _dt.timedelta(seconds=30 + i % 50),
        artifacts_path=f"/srv/ci/artifacts/{i // 1000:04d}/{i:07d}",
        logs_path=f"/srv/ci/logs/{i // 1000:04d}/{i:07d}.log",
        error_code="E_TEST" if failed else "",
        error_msg="assertion failed in case" if failed else "",
        batch_id=f"batch-{i // 100:05d}",
        plan_entry=f"plan/{i % 13}",
    )


def _checked(made: Run, machine: str, test_dir_hash: str) -> Run:
    if not isinstance(made, Run) or made.machine != machine or made.test_dir_hash != test_dir_hash:
        raise runstore.InvalidRunError(f"make() returned {made!r} for {machine}/{test_dir_hash}")
    return made


class Impl(abc.ABC):
    """One store implementation, opened by one process at one location."""

    name: ClassVar[str]
    #: True when the store lives in files (copied with ``shutil``); else a database
    file_based: ClassVar[bool] = True

    @abc.abstractmethod
    def __init__(self, where: str, durable: bool) -> None:
        """Open the store at ``where`` (it exists: see ``preload``)."""

    # -- building stores (not measured per operation) -------------------------------------

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this implementation cannot run here, or None when it can."""
        return None

    @classmethod
    def locate(cls, base: str, tag: str) -> str:
        """The location named ``tag`` under ``base`` (a directory, or a server DSN)."""
        return os.path.join(base, tag)

    @classmethod
    @abc.abstractmethod
    def preload(cls, where: str, n: int) -> None:
        """Create a new store at ``where`` holding ``n`` terminal runs (``history_run``)."""

    @classmethod
    def clone(cls, src: str, dst: str) -> None:
        """Copy a preloaded store, then flush it to disk so that no measured sync pays for it."""
        shutil.copytree(src, dst)
        os.sync()

    @classmethod
    def discard(cls, where: str) -> None:
        shutil.rmtree(where, ignore_errors=True)

    # -- the contract (one call = one measured operation) ---------------------------------

    @abc.abstractmethod
    def prepare_atomic(self, machine: str, test_dir_hash: str,
                       make: Make) -> tuple[str, PrepareOutcome]:
        """The machine's non-terminal run id and REUSE/BUSY, or a new pending run and CREATED."""

    @abc.abstractmethod
    def start(self, run_id: str) -> None:
        """pending -> running."""

    @abc.abstractmethod
    def get(self, run_id: str) -> Run:
        """The stored run."""

    @abc.abstractmethod
    def finish(self, run_id: str) -> None:
        """-> completed with exit code 0."""

    @abc.abstractmethod
    def runs(self) -> Iterator[Run]:
        """Every stored run (for verification after the measurement)."""

    @abc.abstractmethod
    def close(self) -> None: ...


# -- runstore -----------------------------------------------------------------------------


class RunstoreImpl(Impl):
    name = "runstore"

    def __init__(self, where: str, durable: bool) -> None:
        self._store: runstore.RunStore = runstore.Store(where, durable=durable)

    @classmethod
    def preload(cls, where: str, n: int) -> None:
        # The public API, not durable, then one compaction (which syncs the rewritten file).
        with runstore.Store(where, durable=False) as store:
            for i in range(n):
                store.create(history_run(i))
            store.compact()

    def prepare_atomic(self, machine: str, test_dir_hash: str,
                       make: Make) -> tuple[str, PrepareOutcome]:
        run, outcome = self._store.prepare_atomic(machine, test_dir_hash, make)
        return run.id, outcome

    def start(self, run_id: str) -> None:
        self._store.start(run_id)

    def get(self, run_id: str) -> Run:
        return self._store.get(run_id)

    def finish(self, run_id: str) -> None:
        self._store.finish(run_id, Status.COMPLETED, exit_code=0)

    def runs(self) -> Iterator[Run]:
        return iter(self._store.list())

    def close(self) -> None:
        self._store.close()


# -- SQL helpers shared by SQLite and PostgreSQL ------------------------------------------

_COLUMNS = ", ".join(RUN_FIELDS)


def _owner() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def _new_row(made: Run, run_id: str, owner: tuple[str, int],
             encode_time: Callable[[_dt.datetime | None], Any]) -> tuple[Any, ...]:
    run = attrs.evolve(made, id=run_id, status=Status.PENDING, revision=1,
                       owner_host=owner[0], owner_pid=owner[1])
    return tuple(encode_time(v) if k in _TIME_FIELDS else getattr(v, "value", v)
                 for k, v in ((k, getattr(run, k)) for k in RUN_FIELDS))


def _history_row(i: int, run_id: str,
                 encode_time: Callable[[_dt.datetime | None], Any]) -> tuple[Any, ...]:
    run = attrs.evolve(history_run(i), id=run_id, revision=1)
    return tuple(encode_time(v) if k in _TIME_FIELDS else getattr(v, "value", v)
                 for k, v in ((k, getattr(run, k)) for k in RUN_FIELDS))


def _run_from_row(row: tuple[Any, ...],
                  decode_time: Callable[[Any], _dt.datetime | None]) -> Run:
    fields = dict(zip(RUN_FIELDS, row, strict=True))
    fields["status"] = Status(fields["status"])
    for key in _TIME_FIELDS:
        fields[key] = decode_time(fields[key])
    return Run(**fields)


def _iso(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _from_iso(value: str | None) -> _dt.datetime | None:
    return None if value is None else _dt.datetime.fromisoformat(value)


def _same(value: _dt.datetime | None) -> _dt.datetime | None:
    return value


# -- SQLite -------------------------------------------------------------------------------

SQLITE_SCHEMA = f"""
CREATE TABLE runs (
    id TEXT PRIMARY KEY, machine TEXT NOT NULL, test_dir TEXT NOT NULL,
    test_dir_hash TEXT NOT NULL, status TEXT NOT NULL, exit_code INTEGER,
    started_at TEXT, ended_at TEXT, artifacts_path TEXT NOT NULL, logs_path TEXT NOT NULL,
    error_code TEXT NOT NULL, error_msg TEXT NOT NULL, batch_id TEXT NOT NULL,
    plan_entry TEXT NOT NULL, revision INTEGER NOT NULL, owner_host TEXT NOT NULL,
    owner_pid INTEGER, owner_start TEXT NOT NULL, heartbeat_at TEXT
);
CREATE UNIQUE INDEX runs_one_active ON runs (machine) WHERE status IN {_ACTIVE!r};
"""
SQLITE_FILE = "runs.sqlite3"
SQLITE_SELECT_ACTIVE = (f"SELECT id, test_dir_hash FROM runs "
                        f"WHERE machine = ? AND status IN {_ACTIVE!r}")
SQLITE_INSERT = f"INSERT INTO runs ({_COLUMNS}) VALUES ({', '.join('?' * len(RUN_FIELDS))})"
SQLITE_START = ("UPDATE runs SET status = 'running', started_at = ?, owner_host = ?, "
                "owner_pid = ?, revision = revision + 1 WHERE id = ? AND status = 'pending'")
SQLITE_FINISH = (f"UPDATE runs SET status = 'completed', ended_at = ?, exit_code = 0, "
                 f"error_code = '', error_msg = '', revision = revision + 1 "
                 f"WHERE id = ? AND status IN {_ACTIVE!r}")
SQLITE_GET = f"SELECT {_COLUMNS} FROM runs WHERE id = ?"


def sqlite_connect(where: str, durable: bool) -> sqlite3.Connection:
    """A connection as a careful user opens one: autocommit (we issue BEGIN IMMEDIATE
    ourselves), WAL, a 30 s busy timeout, and FULL or OFF synchronous."""
    db = sqlite3.connect(os.path.join(where, SQLITE_FILE), isolation_level=None, timeout=30.0)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'OFF'}")
    return db


class SqliteImpl(Impl):
    name = "sqlite"

    def __init__(self, where: str, durable: bool) -> None:
        self._db = sqlite_connect(where, durable)
        self._owner = _owner()

    @classmethod
    def preload(cls, where: str, n: int) -> None:
        os.makedirs(where)
        db = sqlite_connect(where, durable=False)
        db.executescript(SQLITE_SCHEMA)
        db.execute("BEGIN")
        db.executemany(SQLITE_INSERT, (_history_row(i, f"h{i:09d}", _iso) for i in range(n)))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()

    def prepare_atomic(self, machine: str, test_dir_hash: str,
                       make: Make) -> tuple[str, PrepareOutcome]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(SQLITE_SELECT_ACTIVE, (machine,)).fetchone()
            if row is not None:
                db.execute("COMMIT")
                same = row[1] == test_dir_hash
                return row[0], PrepareOutcome.REUSE if same else PrepareOutcome.BUSY
            run_id = new_run_id()
            made = _checked(make(), machine, test_dir_hash)
            db.execute(SQLITE_INSERT, _new_row(made, run_id, self._owner, _iso))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return run_id, PrepareOutcome.CREATED

    def start(self, run_id: str) -> None:
        cur = self._db.execute(SQLITE_START, (_utcnow().isoformat(), *self._owner, run_id))
        if cur.rowcount != 1:
            raise runstore.InvalidTransitionError(run_id, "?", "running", "not pending")

    def get(self, run_id: str) -> Run:
        row = self._db.execute(SQLITE_GET, (run_id,)).fetchone()
        if row is None:
            raise runstore.RunNotFoundError(run_id)
        return _run_from_row(row, _from_iso)

    def finish(self, run_id: str) -> None:
        cur = self._db.execute(SQLITE_FINISH, (_utcnow().isoformat(), run_id))
        if cur.rowcount != 1:
            raise runstore.InvalidTransitionError(run_id, "?", "completed", "not active")

    def runs(self) -> Iterator[Run]:
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM runs"):
            yield _run_from_row(row, _from_iso)

    def close(self) -> None:
        self._db.close()


# -- the whole-file JSON store (the naive design) ----------------------------------------

WHOLEFILE_DATA = "runs.json"
WHOLEFILE_LOCK = "runs.lock"


def _record(run: Run) -> dict[str, Any]:
    return {k: (_iso(v) if k in _TIME_FIELDS else getattr(v, "value", v))
            for k, v in ((k, getattr(run, k)) for k in RUN_FIELDS)}


class WholeFileImpl(Impl):
    """Every operation: flock, read and parse the whole file, change it, write it all to a
    temp file, fsync it (durable only), rename it over the original, unlock. Reads take a
    shared lock and skip the write. Stdlib ``json``, as a small Python tool would."""

    name = "wholefile"

    def __init__(self, where: str, durable: bool) -> None:
        self._dir = where
        self._durable = durable
        self._path = os.path.join(where, WHOLEFILE_DATA)
        self._lock_fd = os.open(os.path.join(where, WHOLEFILE_LOCK), os.O_RDWR | os.O_CREAT,
                                0o600)
        self._owner = _owner()

    @classmethod
    def preload(cls, where: str, n: int) -> None:
        os.makedirs(where)
        runs = [_record(attrs.evolve(history_run(i), id=f"h{i:09d}", revision=1))
                for i in range(n)]
        with open(os.path.join(where, WHOLEFILE_DATA), "w", encoding="utf-8") as f:
            json.dump({"runs": runs}, f)

    def _read(self) -> list[dict[str, Any]]:
        with open(self._path, encoding="utf-8") as f:
            runs: list[dict[str, Any]] = json.load(f)["runs"]
        return runs

    def _write(self, runs: list[dict[str, Any]]) -> None:
        tmp = f"{self._path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"runs": runs}, f)
            f.flush()
            if self._durable:
                os.fsync(f.fileno())
        os.replace(tmp, self._path)

    def _locked(self, shared: bool = False) -> _Flock:
        return _Flock(self._lock_fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)

    @staticmethod
    def _find(runs: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
        for rec in runs:
            if rec["id"] == run_id:
                return rec
        raise runstore.RunNotFoundError(run_id)

    def prepare_atomic(self, machine: str, test_dir_hash: str,
                       make: Make) -> tuple[str, PrepareOutcome]:
        with self._locked():
            runs = self._read()
            for rec in runs:
                if rec["machine"] == machine and rec["status"] in _ACTIVE:
                    same = rec["test_dir_hash"] == test_dir_hash
                    return rec["id"], PrepareOutcome.REUSE if same else PrepareOutcome.BUSY
            made = _checked(make(), machine, test_dir_hash)
            run = attrs.evolve(made, id=new_run_id(), status=Status.PENDING, revision=1,
                               owner_host=self._owner[0], owner_pid=self._owner[1])
            runs.append(_record(run))
            self._write(runs)
            return run.id, PrepareOutcome.CREATED

    def _change(self, run_id: str, allowed: tuple[str, ...], **fields: Any) -> None:
        with self._locked():
            runs = self._read()
            rec = self._find(runs, run_id)
            if rec["status"] not in allowed:
                raise runstore.InvalidTransitionError(run_id, rec["status"], "?", "not allowed")
            rec.update(fields, revision=rec["revision"] + 1)
            self._write(runs)

    def start(self, run_id: str) -> None:
        self._change(run_id, (Status.PENDING.value,), status=Status.RUNNING.value,
                     started_at=_utcnow().isoformat(), owner_host=self._owner[0],
                     owner_pid=self._owner[1])

    def get(self, run_id: str) -> Run:
        with self._locked(shared=True):
            rec = self._find(self._read(), run_id)
        return _run_from_row(tuple(rec[k] for k in RUN_FIELDS), _from_iso)

    def finish(self, run_id: str) -> None:
        self._change(run_id, _ACTIVE, status=Status.COMPLETED.value,
                     ended_at=_utcnow().isoformat(), exit_code=0, error_code="", error_msg="")

    def runs(self) -> Iterator[Run]:
        with self._locked(shared=True):
            runs = self._read()
        for rec in runs:
            yield _run_from_row(tuple(rec[k] for k in RUN_FIELDS), _from_iso)

    def close(self) -> None:
        os.close(self._lock_fd)


class _Flock:
    def __init__(self, fd: int, how: int) -> None:
        self._fd, self._how = fd, how

    def __enter__(self) -> None:
        fcntl.flock(self._fd, self._how)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


# -- PostgreSQL ---------------------------------------------------------------------------

PG_SCHEMA = """
CREATE TABLE runs (
    id text PRIMARY KEY, machine text NOT NULL, test_dir text NOT NULL,
    test_dir_hash text NOT NULL, status text NOT NULL, exit_code integer,
    started_at timestamptz, ended_at timestamptz, artifacts_path text NOT NULL,
    logs_path text NOT NULL, error_code text NOT NULL, error_msg text NOT NULL,
    batch_id text NOT NULL, plan_entry text NOT NULL, revision integer NOT NULL,
    owner_host text NOT NULL, owner_pid integer, owner_start text NOT NULL,
    heartbeat_at timestamptz
)
"""
PG_INDEX = (f"CREATE UNIQUE INDEX runs_one_active ON runs (machine) "
            f"WHERE status IN {_ACTIVE!r}")
PG_INSERT = (f"INSERT INTO runs ({_COLUMNS}) VALUES ({', '.join(['%s'] * len(RUN_FIELDS))}) "
             f"ON CONFLICT (machine) WHERE status IN {_ACTIVE!r} DO NOTHING RETURNING id")
PG_INSERT_PLAIN = (f"INSERT INTO runs ({_COLUMNS}) "
                   f"VALUES ({', '.join(['%s'] * len(RUN_FIELDS))})")
PG_LOCK = "SELECT pg_advisory_xact_lock(hashtext(%s))"
PG_SELECT_ACTIVE = (f"SELECT id, test_dir_hash FROM runs "
                    f"WHERE machine = %s AND status IN {_ACTIVE!r}")
PG_START = ("UPDATE runs SET status = 'running', started_at = %s, owner_host = %s, "
            "owner_pid = %s, revision = revision + 1 WHERE id = %s AND status = 'pending'")
PG_FINISH = (f"UPDATE runs SET status = 'completed', ended_at = %s, exit_code = 0, "
             f"error_code = '', error_msg = '', revision = revision + 1 "
             f"WHERE id = %s AND status IN {_ACTIVE!r}")
PG_GET = f"SELECT {_COLUMNS} FROM runs WHERE id = %s"
# psycopg's type hints want literal strings or bytes for queries: these are our own constants
_PG_INSERT, _PG_INSERT_PLAIN, _PG_LOCK, _PG_SELECT_ACTIVE, _PG_START, _PG_FINISH, _PG_GET = (
    q.encode() for q in (PG_INSERT, PG_INSERT_PLAIN, PG_LOCK, PG_SELECT_ACTIVE, PG_START,
                         PG_FINISH, PG_GET))


def _pg_admin_dsn(where: str) -> tuple[str, str]:
    """(DSN of the server's ``postgres`` database, the database name ``where`` names)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    dbname = str(conninfo_to_dict(where)["dbname"])
    return make_conninfo(where, dbname="postgres"), dbname


class PostgresImpl(Impl):
    """``prepare_atomic`` is one autocommit ``INSERT .. ON CONFLICT DO NOTHING`` against the
    partial unique index (one round trip when it creates, the common case); when it conflicts,
    a ``SELECT`` returns the occupant, and the pair is retried if the occupant finished in
    between. (So ``make()`` is called before we know whether the machine is free.)"""

    name = "postgres"
    file_based = False

    def __init__(self, where: str, durable: bool) -> None:
        import psycopg

        self._db = psycopg.connect(where, autocommit=True)
        self._db.execute(f"SET synchronous_commit = {'on' if durable else 'off'}")
        self._owner = _owner()

    @classmethod
    def unavailable(cls) -> str | None:
        from . import pg_server

        try:
            import psycopg  # noqa: F401  (only checking that the driver is installed)
        except ImportError:
            return "psycopg is not installed"
        return None if pg_server.available() else "PostgreSQL server binaries not installed"

    @classmethod
    def locate(cls, base: str, tag: str) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(base, dbname=tag.replace("-", "_").lower())

    @classmethod
    def _admin(cls, where: str, *statements: str) -> None:
        import psycopg

        admin, _ = _pg_admin_dsn(where)
        with psycopg.connect(admin, autocommit=True) as db:
            for statement in statements:
                db.execute(statement.encode())

    @classmethod
    def preload(cls, where: str, n: int) -> None:
        import psycopg

        _, dbname = _pg_admin_dsn(where)
        cls._admin(where, f'CREATE DATABASE "{dbname}"')
        with psycopg.connect(where, autocommit=True) as db:
            db.execute(PG_SCHEMA.encode())
            with db.cursor().copy(f"COPY runs ({_COLUMNS}) FROM STDIN".encode()) as copy:
                for i in range(n):
                    copy.write_row(_history_row(i, f"h{i:09d}", _same))
            db.execute(PG_INDEX.encode())
            db.execute(b"VACUUM ANALYZE runs")

    @classmethod
    def clone(cls, src: str, dst: str) -> None:
        _, source = _pg_admin_dsn(src)
        _, target = _pg_admin_dsn(dst)
        cls._admin(dst, f'CREATE DATABASE "{target}" TEMPLATE "{source}" STRATEGY FILE_COPY',
                   "CHECKPOINT")

    @classmethod
    def discard(cls, where: str) -> None:
        _, dbname = _pg_admin_dsn(where)
        cls._admin(where, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def prepare_atomic(self, machine: str, test_dir_hash: str,
                       make: Make) -> tuple[str, PrepareOutcome]:
        db = self._db
        made = _checked(make(), machine, test_dir_hash)
        while True:
            run_id = new_run_id()
            created = db.execute(_PG_INSERT, _new_row(made, run_id, self._owner, _same))
            if created.fetchone() is not None:
                return run_id, PrepareOutcome.CREATED
            row = db.execute(_PG_SELECT_ACTIVE, (machine,)).fetchone()
            if row is not None:
                same = row[1] == test_dir_hash
                return row[0], PrepareOutcome.REUSE if same else PrepareOutcome.BUSY
            # the occupant finished between the two statements: try again

    def start(self, run_id: str) -> None:
        cur = self._db.execute(_PG_START, (_utcnow(), *self._owner, run_id))
        if cur.rowcount != 1:
            raise runstore.InvalidTransitionError(run_id, "?", "running", "not pending")

    def get(self, run_id: str) -> Run:
        row = self._db.execute(_PG_GET, (run_id,)).fetchone()
        if row is None:
            raise runstore.RunNotFoundError(run_id)
        return _run_from_row(row, _same)

    def finish(self, run_id: str) -> None:
        cur = self._db.execute(_PG_FINISH, (_utcnow(), run_id))
        if cur.rowcount != 1:
            raise runstore.InvalidTransitionError(run_id, "?", "completed", "not active")

    def runs(self) -> Iterator[Run]:
        with self._db.cursor(name="verify") as cur:
            self._db.autocommit = False
            try:
                cur.execute(f"SELECT {_COLUMNS} FROM runs".encode())
                for row in cur:
                    yield _run_from_row(row, _same)
            finally:
                self._db.rollback()
                self._db.autocommit = True

    def close(self) -> None:
        self._db.close()


class PostgresLockImpl(PostgresImpl):
    """``prepare_atomic`` as hand-written SQL that calls ``make()`` only once the machine is
    seen free (as the contract requires): in one transaction, an advisory lock on the
    machine, a ``SELECT`` of its active run and, when there is none, ``make()`` and a plain
    ``INSERT`` (the partial unique index stays as the safety net). Five round trips when it
    creates (BEGIN, lock, SELECT, INSERT, COMMIT), four otherwise; the other calls are
    ``postgres``'s one statement each. Same table, same server."""

    name = "postgres-lock"

    def prepare_atomic(self, machine: str, test_dir_hash: str,
                       make: Make) -> tuple[str, PrepareOutcome]:
        db = self._db
        with db.transaction():
            db.execute(_PG_LOCK, (machine,))
            row = db.execute(_PG_SELECT_ACTIVE, (machine,)).fetchone()
            if row is not None:
                same = row[1] == test_dir_hash
                return row[0], PrepareOutcome.REUSE if same else PrepareOutcome.BUSY
            made = _checked(make(), machine, test_dir_hash)
            run_id = new_run_id()
            db.execute(_PG_INSERT_PLAIN, _new_row(made, run_id, self._owner, _same))
            return run_id, PrepareOutcome.CREATED


# -- runstore on PostgreSQL ---------------------------------------------------------------


class RunstorePgImpl(RunstoreImpl):
    """The dispatcher cycle through ``runstore.PostgresStore``: the same calls as
    ``RunstoreImpl`` (inherited: both backends keep one contract), one database per store
    (like ``postgres``), the default table."""

    name = "runstore-pg"
    file_based = False

    def __init__(self, where: str, durable: bool) -> None:
        from runstore.postgres import PostgresStore

        self._store = PostgresStore(where, durable=durable)

    @classmethod
    def unavailable(cls) -> str | None:
        reason = PostgresImpl.unavailable()
        if reason:
            return reason
        try:
            import runstore.postgres  # noqa: F401  (only checking that the backend exists)
        except ImportError as exc:
            return f"runstore's PostgreSQL backend cannot be imported ({exc})"
        return None

    # a store is a database on the benchmark's server, built and copied like `postgres`'s
    @classmethod
    def locate(cls, base: str, tag: str) -> str:
        return PostgresImpl.locate(base, tag)

    @classmethod
    def clone(cls, src: str, dst: str) -> None:
        PostgresImpl.clone(src, dst)

    @classmethod
    def discard(cls, where: str) -> None:
        PostgresImpl.discard(where)

    @classmethod
    def preload(cls, where: str, n: int) -> None:
        # One import_runs (a bulk load, like the other impls' COPY / executemany) of the same
        # history with runstore-style ids; the store's schema is made by its first opening.
        from runstore.postgres import PostgresStore

        _, dbname = _pg_admin_dsn(where)
        PostgresImpl._admin(where, f'CREATE DATABASE "{dbname}"')
        with PostgresStore(where, durable=False) as store:
            chunk = 10_000
            for start in range(0, n, chunk):
                store.import_runs(attrs.evolve(history_run(i), id=f"h{i:09d}", revision=1)
                                  for i in range(start, min(n, start + chunk)))
        import psycopg

        with psycopg.connect(where, autocommit=True) as db:
            db.execute(b"VACUUM ANALYZE")


IMPLS: dict[str, type[Impl]] = {
    impl.name: impl
    for impl in (RunstoreImpl, SqliteImpl, WholeFileImpl, PostgresImpl, PostgresLockImpl,
                 RunstorePgImpl)
}


def open_impl(name: str, where: str, durable: bool) -> Impl:
    """Open implementation ``name`` at ``where``."""
    return IMPLS[name](where, durable)
