"""runstore: the state of test/job runs for dispatcher processes, in one crash-safe JSON-lines
file shared safely by many processes and threads, or in PostgreSQL when dispatchers run on
several hosts (``runstore.open(url_or_path)`` picks the backend).

``MAX_RECORD_BYTES`` (1 MiB) is the most a run may take as stored: its id and other fields
as JSON, the fields this library does not know that ``import_runs`` kept included. A write
that would store a larger run (``create``, ``prepare_atomic``, ``update``, ``finish``,
``import_runs``, ...) raises ``InvalidRunError`` naming the run, its size and its largest
field, and stores nothing, on every backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._fields import MAX_RECORD_BYTES
from ._opener import open_store as open  # runstore.open(url_or_path)
from .errors import (
    ConflictError,
    CorruptStoreError,
    DatabaseConnectionError,
    DatabaseError,
    HistoryTruncatedError,
    InvalidRunError,
    InvalidTransitionError,
    IOKind,
    LockTimeoutError,
    MachineBusyError,
    OutputTargetError,
    ReadOnlyStoreError,
    RunNotFoundError,
    RunstoreError,
    StoreIOError,
    StoreNotFoundError,
    TableLockTimeoutError,
    UnsafeStoreError,
)
from .model import BatchSummary, Change, ChangeType, PrepareOutcome, Run, Status, StoreStats
from .protocol import RunStore
from .store import FileStore, Store
from .verify import CheckReport, check

if TYPE_CHECKING:
    from .postgres import PostgresStore


def __getattr__(name: str) -> Any:
    # PostgresStore needs psycopg (the optional extra runstore[postgres]): import on first use
    if name == "PostgresStore":
        from .postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module 'runstore' has no attribute {name!r}")


__all__ = [
    "BatchSummary",
    "Change",
    "ChangeType",
    "CheckReport",
    "ConflictError",
    "FileStore",
    "CorruptStoreError",
    "DatabaseConnectionError",
    "DatabaseError",
    "HistoryTruncatedError",
    "InvalidRunError",
    "InvalidTransitionError",
    "IOKind",
    "LockTimeoutError",
    "MAX_RECORD_BYTES",
    "MachineBusyError",
    "OutputTargetError",
    "PostgresStore",
    "PrepareOutcome",
    "ReadOnlyStoreError",
    "Run",
    "RunNotFoundError",
    "RunStore",
    "RunstoreError",
    "Status",
    "Store",
    "StoreIOError",
    "StoreNotFoundError",
    "StoreStats",
    "TableLockTimeoutError",
    "UnsafeStoreError",
    "check",
    "open",
]
