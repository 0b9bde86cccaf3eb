"""The whole exception tree of runstore.

::

    RunstoreError
     +-- RunNotFoundError        (also LookupError)    a run id the store does not hold
     +-- InvalidTransitionError  (also ValueError)     a status change the state machine forbids
     +-- InvalidRunError         (also ValueError)     an argument or record that is not a valid run
     +-- ConflictError                                 the caller's copy of a run is stale
     |    +-- MachineBusyError                         a second non-terminal run for a machine
     +-- LockTimeoutError        (also TimeoutError)   the store's lock was not acquired in time
     |    +-- TableLockTimeoutError                    a PostgreSQL lock was not granted in time
     +-- CorruptStoreError       (also ValueError)     the journal file is damaged or unreadable
     +-- StoreNotFoundError      (also FileNotFoundError) no store at a path that must hold one
     +-- UnsafeStoreError        (also PermissionError) the state directory or a file is unsafe
     |    +-- ReadOnlyStoreError                       a write to a store this process may only read
     +-- OutputTargetError       (also ValueError)     an output would overwrite the store itself,
     |                                                 or is a directory, socket or block device
     +-- HistoryTruncatedError   (also LookupError)    changes asked for were compacted away
     +-- StoreIOError            (also OSError)        reading, writing or syncing failed (``kind``)
          +-- DatabaseError                            PostgreSQL failed an operation (server error)
               +-- DatabaseConnectionError             (also ConnectionError) connection lost

Every error keeps the data that explains it as attributes, and ``str()`` is a sentence a person
can act on. All are picklable, so they cross process boundaries (multiprocessing, tests).
"""

from __future__ import annotations

import enum
import errno as _errno


class RunstoreError(Exception):
    """Base class of every error runstore raises on purpose."""


class RunNotFoundError(RunstoreError, LookupError):
    """The store holds no run with this id."""

    def __init__(self, run_id: str, path: str = "") -> None:
        self.run_id = run_id
        self.path = path
        where = f" in {path}" if path else ""
        super().__init__(
            f"run {run_id!r} not found{where}; list the runs with `python -m runstore list`"
        )

    def __reduce__(self) -> tuple[type[RunNotFoundError], tuple[str, str]]:
        return (type(self), (self.run_id, self.path))


class InvalidTransitionError(RunstoreError, ValueError):
    """A status change that the run state machine does not allow."""

    def __init__(self, run_id: str, from_status: str, to_status: str, reason: str = "") -> None:
        self.run_id = run_id
        self.from_status = from_status
        self.to_status = to_status
        self.reason = reason
        msg = f"run {run_id!r} cannot go from {from_status!r} to {to_status!r}"
        super().__init__(f"{msg}: {reason}" if reason else msg)

    def __reduce__(self) -> tuple[type[InvalidTransitionError], tuple[str, str, str, str]]:
        return (type(self), (self.run_id, self.from_status, self.to_status, self.reason))


class InvalidRunError(RunstoreError, ValueError):
    """An argument or a record that is not a valid run (empty machine, naive datetime, ...)."""


class ConflictError(RunstoreError):
    """The caller updated a stale copy of a run: another writer changed it in between."""

    def __init__(self, run_id: str, expected: int, actual: int) -> None:
        self.run_id = run_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"run {run_id!r} was changed by another writer (your copy has revision {expected}, "
            f"the store has revision {actual}); get() the run again and reapply your change"
        )

    def __reduce__(self) -> tuple[type[ConflictError], tuple[str, int, int]]:
        return (type(self), (self.run_id, self.expected, self.actual))


class MachineBusyError(ConflictError):
    """Storing a non-terminal run for a machine that already has one (one active run each)."""

    def __init__(self, machine: str, occupant_id: str) -> None:
        self.machine = machine
        self.occupant_id = occupant_id
        RunstoreError.__init__(
            self,
            f"machine {machine!r} already has the non-terminal run {occupant_id!r}; finish it "
            "or use prepare_atomic(), which reports BUSY instead of failing",
        )
        self.run_id, self.expected, self.actual = occupant_id, 0, 0

    def __reduce__(self) -> tuple[type[MachineBusyError], tuple[str, str]]:  # type: ignore[override]  # different constructor
        return (type(self), (self.machine, self.occupant_id))


class LockTimeoutError(RunstoreError, TimeoutError):
    """The cross-process lock of a store was not acquired within the timeout."""

    def __init__(self, lock_path: str, timeout: float) -> None:
        self.lock_path = lock_path
        self.timeout = timeout
        super().__init__(
            f"could not lock {lock_path} within {timeout:g} s: another process holds it; "
            f"find it with `fuser {lock_path}` or raise lock_timeout"
        )

    def __reduce__(self) -> tuple[type[LockTimeoutError], tuple[str, float]]:
        return (type(self), (self.lock_path, self.timeout))


class CorruptStoreError(RunstoreError, ValueError):
    """The journal file is damaged where it was known to be durable, or is not a runstore file."""

    def __init__(self, path: str, offset: int | None, problem: str, remedy: str = "") -> None:
        self.path = path
        self.offset = offset
        self.problem = problem
        self.remedy = remedy or (
            "the file was left untouched; run `python -m runstore check` for a report, "
            "then restore it from a backup"
        )
        where = f"{path} at byte {offset}" if offset is not None else path
        super().__init__(f"{where}: {problem}; {self.remedy}")

    def __reduce__(self) -> tuple[type[CorruptStoreError], tuple[str, int | None, str, str]]:
        return (type(self), (self.path, self.offset, self.problem, self.remedy))


class StoreNotFoundError(RunstoreError, FileNotFoundError):
    """No store at ``path``, where a call that never creates one needs one (``check``);
    ``reason`` says what is missing."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(_errno.ENOENT, f"no store at {path} ({reason})", path)

    def __str__(self) -> str:
        return (f"no store at {self.path} ({self.reason}); pass the state directory of an "
                "existing store")

    def __reduce__(self) -> tuple[type[StoreNotFoundError], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


class UnsafeStoreError(RunstoreError, PermissionError):
    """The state directory or one of its files is unsafe to use (owner, mode, symlink, type)."""

    def __init__(self, path: str, problem: str, remedy: str) -> None:
        self.path = path
        self.problem = problem
        self.remedy = remedy
        super().__init__(_errno.EPERM, f"{path}: {problem}; {remedy}")
        self.filename = path

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {self.remedy}"

    def __reduce__(self) -> tuple[type[UnsafeStoreError], tuple[str, str, str]]:
        return (type(self), (self.path, self.problem, self.remedy))


class ReadOnlyStoreError(UnsafeStoreError):
    """A write to a store this process can only read: its journal or lock file cannot be
    opened for writing (a read-only copy, snapshot or mount, or files of another user).
    Reads of such a store work; ``path`` names the file that cannot be written."""


class HistoryTruncatedError(RunstoreError, LookupError):
    """Changes before the oldest retained sequence number were compacted away (like HTTP 410)."""

    def __init__(self, since_seq: int, oldest_seq: int) -> None:
        self.since_seq = since_seq
        self.oldest_seq = oldest_seq
        super().__init__(
            f"changes after seq {since_seq} are no longer retained (the oldest retained change "
            f"is seq {oldest_seq}); resynchronise from list() and follow from seq {oldest_seq - 1}"
        )

    def __reduce__(self) -> tuple[type[HistoryTruncatedError], tuple[int, int]]:
        return (type(self), (self.since_seq, self.oldest_seq))


class IOKind(enum.Enum):
    """What a ``StoreIOError`` was doing, and so what its failure means for the store
    (``StoreIOError.kind``)."""

    #: reading the journal: nothing was changed
    READ = "read"
    #: opening the journal (or another descriptor of it): nothing was changed
    OPEN = "open"
    #: appending a change: not acknowledged, and it may or may not be in the file
    WRITE = "write"
    #: syncing appended lines: they are in the file but not known to be durable
    SYNC = "sync"
    #: syncing changes of other processes before a read shows them: nothing was shown
    SYNC_READ = "sync_read"
    #: cutting off a torn tail: nothing acknowledged was affected
    RECOVER = "recover"
    #: writing, syncing or renaming a rewritten journal: the journal is as it was
    REWRITE = "rewrite"
    #: syncing the directory after a rewritten journal was renamed into place
    SYNC_DIR = "sync_dir"
    #: appending pruned runs to ``prune()``'s archive: nothing was pruned
    ARCHIVE = "archive"
    #: writing ``export()``'s file: nothing was written (a file already there is as it was)
    EXPORT = "export"


#: what each kind of failure means, after "ACTION PATH failed (REASON); "
_OUTCOMES = {
    IOKind.READ: "nothing was changed; retry, and check the disk (dmesg) if it fails again",
    IOKind.OPEN: "nothing was changed; check the disk (dmesg), free space and the limit on "
                 "open files, then retry",
    IOKind.WRITE: "the change was not acknowledged and may or may not be in the file: get() "
                  "the run to see which",
    IOKind.SYNC: "the change was written but is not known to be durable, so it was not "
                 "acknowledged: this store's reads leave it out, and its next write rewrites "
                 "the file first, keeping the change only if another process wrote after it",
    IOKind.SYNC_READ: "nothing was shown: the latest changes are not known to be durable; "
                      "the next call on this store rewrites the file first (keeping every "
                      "change in it) and answers from it; check the disk (dmesg)",
    IOKind.RECOVER: "nothing acknowledged was affected (the torn tail holds only unsynced "
                    "writes); retry once the disk is healthy",
    IOKind.REWRITE: "the call was not acknowledged and changed nothing: the journal is as "
                    "it was; free space or fix the directory's permissions, then retry",
    IOKind.SYNC_DIR: "the rewritten journal is in place, but a power loss may bring back the "
                     "one before it; run `compact` once the disk is healthy",
    IOKind.ARCHIVE: "nothing was pruned (a partial write to the archive is cut off); fix "
                    "the archive's path or free space, then retry",
    IOKind.EXPORT: "nothing was written (a file already at that path is as it was); name a "
                   "file in an existing directory you can write, or free space, then retry",
}


class StoreIOError(RunstoreError, OSError):
    """Reading, writing or syncing the journal failed; ``kind`` (an ``IOKind``) says what
    was being done and so what it means: a failed read or open changed nothing, a failed
    append or sync was not acknowledged, a failed rewrite left the journal as it was.
    ``action`` is the same in words (kept for compatibility); ``outcome``, when given,
    replaces the sentence ``kind`` implies (``Store.prune`` says how many runs were
    pruned)."""

    def __init__(self, path: str, action: str, cause: OSError, kind: IOKind = IOKind.WRITE,
                 outcome: str = "") -> None:
        self.path = path
        self.action = action
        self.cause = cause
        self.kind = kind
        self.outcome = outcome or _OUTCOMES[kind]
        code = cause.errno if cause.errno is not None else _errno.EIO
        super().__init__(code, f"{action} {path} failed: {cause.strerror or cause}")
        self.filename = path

    def __str__(self) -> str:
        reason = self.cause.strerror or str(self.cause)
        return f"{self.action} {self.path} failed ({reason}); {self.outcome}"

    def __reduce__(self) -> tuple[type[StoreIOError], tuple[str, str, OSError, IOKind, str]]:
        return (type(self), (self.path, self.action, self.cause, self.kind, self.outcome))


class TableLockTimeoutError(LockTimeoutError):
    """A PostgreSQL lock (a run's row, the change feed) was not granted within lock_timeout."""

    def __init__(self, lock_path: str, timeout: float) -> None:
        super().__init__(lock_path, timeout)
        RunstoreError.__init__(
            self, f"could not lock {lock_path} within {timeout:g} s: another session holds "
            "the lock; find it in pg_locks / pg_stat_activity, or raise lock_timeout")


class DatabaseError(StoreIOError):
    """PostgreSQL failed an operation (disk full, server error); it was rolled back unless
    ``applied`` is None (the outcome of a COMMIT that failed is unknown)."""

    def __init__(self, server: str, action: str, reason: str, applied: bool | None = False,
                 code: int = _errno.EIO) -> None:
        self.server = server
        self.reason = reason
        self.applied = applied
        super().__init__(server, action, OSError(code, reason))

    def __str__(self) -> str:
        if self.applied is None:
            outcome = ("the failure hit the COMMIT, so the change may or may not have been "
                       "applied: get() the run to see which")
        else:
            outcome = "the transaction was rolled back: nothing of this call was applied"
        action = self.action.removesuffix(" in")  # "listing runs in" names a file elsewhere
        return f"{action} on PostgreSQL {self.server} failed ({self.reason}); {outcome}"

    def __reduce__(  # type: ignore[override]  # different constructor
        self,
    ) -> tuple[type[DatabaseError], tuple[str, str, str, bool | None, int]]:
        code = self.cause.errno if self.cause.errno is not None else _errno.EIO
        return (type(self), (self.server, self.action, self.reason, self.applied, code))


class DatabaseConnectionError(DatabaseError, ConnectionError):
    """The connection to PostgreSQL failed or was lost; the next call reconnects."""

    def __init__(self, server: str, action: str, reason: str,
                 applied: bool | None = False) -> None:
        super().__init__(server, action, reason, applied, _errno.ECONNRESET)

    def __str__(self) -> str:
        return (f"{super().__str__()}; the next call reconnects (check that the server is up "
                "if this repeats)")

    def __reduce__(  # type: ignore[override]  # its errno is fixed: no code argument
        self,
    ) -> tuple[type[DatabaseConnectionError], tuple[str, str, str, bool | None]]:
        return (type(self), (self.server, self.action, self.reason, self.applied))


class OutputTargetError(RunstoreError, ValueError):
    """A file to write (an export, a prune archive, a migration's target store) is one of the
    store's own files (the journal, the lock file, a temp file: the same device and inode,
    through a symlink or a hard link too), the state directory itself, or lies inside it;
    or (``store`` is then empty) it is a directory, a socket or a block device (for an
    archive, anything but a regular file), or its name holds a NUL character. Raised
    before the target is opened: nothing was written and the store is untouched."""

    def __init__(self, target: str, store: str, problem: str, remedy: str = "") -> None:
        self.target = target
        self.store = store
        self.problem = problem
        if store:
            self.remedy = remedy or f"write it to a file outside {store}"
            super().__init__(f"{target}: {problem}, so writing there would damage the store "
                             f"at {store}; nothing was written: {self.remedy}")
        else:
            self.remedy = remedy or "name a regular file, a FIFO or a character device"
            super().__init__(f"{target}: {problem}; nothing was written: {self.remedy}")

    def __reduce__(self) -> tuple[type[OutputTargetError], tuple[str, str, str, str]]:
        return (type(self), (self.target, self.store, self.problem, self.remedy))
