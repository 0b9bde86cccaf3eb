"""runstore: the state of test/job runs for dispatcher processes, in one crash-safe JSON-lines
file shared safely by many processes and threads."""

from __future__ import annotations

from .errors import (
    ConflictError,
    CorruptStoreError,
    HistoryTruncatedError,
    InvalidRunError,
    InvalidTransitionError,
    LockTimeoutError,
    MachineBusyError,
    RunNotFoundError,
    RunstoreError,
    StoreIOError,
    UnsafeStoreError,
)
from .model import Change, ChangeType, PrepareOutcome, Run, Status
from .store import Store

__all__ = [
    "Change",
    "ChangeType",
    "ConflictError",
    "CorruptStoreError",
    "HistoryTruncatedError",
    "InvalidRunError",
    "InvalidTransitionError",
    "LockTimeoutError",
    "MachineBusyError",
    "PrepareOutcome",
    "Run",
    "RunNotFoundError",
    "RunstoreError",
    "Status",
    "Store",
    "StoreIOError",
    "UnsafeStoreError",
]
