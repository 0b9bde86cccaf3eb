"""The records runstore keeps: ``Run``, ``Status``, ``PrepareOutcome``, ``Change``. No I/O here."""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Callable
from typing import Any

import attrs


class Status(enum.StrEnum):
    """The lifecycle state of a run: pending -> running -> one of four terminal states."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    TIMEOUT = "timeout"

    @property
    def is_terminal(self) -> bool:
        """True for the final states: completed, failed, interrupted, timeout."""
        return self not in _NON_TERMINAL

    def __str__(self) -> str:
        return self.value


_NON_TERMINAL = frozenset({Status.PENDING, Status.RUNNING})


class PrepareOutcome(enum.Enum):
    """What ``prepare_atomic`` did."""

    #: a fresh pending run was created (the returned run is new)
    CREATED = "created"
    #: the machine already had a non-terminal run for the same hash (returned as is)
    REUSE = "reuse"
    #: the machine has a non-terminal run for a different hash (the occupying run is returned)
    BUSY = "busy"


class ChangeType(enum.StrEnum):
    """The kind of a stored change, as written in the journal's ``change`` field."""

    RUN_CREATED = "run_created"
    RUN_STARTED = "run_started"
    RUN_FINISHED = "run_finished"
    RUN_UPDATED = "run_updated"
    RUN_REAPED = "run_reaped"
    RUN_PRUNED = "run_pruned"
    HEARTBEAT = "heartbeat"

    def __str__(self) -> str:
        return self.value


@attrs.frozen
class Run:
    """One test dispatch. Timestamps are timezone-aware UTC; unset pointers are ``None``.

    ``revision`` counts the stored versions of the run (1 after create); ``update()`` refuses a
    copy whose revision is not the stored one. The ``owner_*`` fields name the process that
    created or started a non-terminal run, so that ``reap()`` can tell when it is gone.
    """

    machine: str
    test_dir: str
    test_dir_hash: str
    id: str = ""
    status: Status = Status.PENDING
    exit_code: int | None = None
    started_at: _dt.datetime | None = None
    ended_at: _dt.datetime | None = None
    artifacts_path: str = ""
    logs_path: str = ""
    error_code: str = ""
    error_msg: str = ""
    batch_id: str = ""
    plan_entry: str = ""
    revision: int = 0
    owner_host: str = ""
    owner_pid: int | None = None
    owner_start: str = ""
    heartbeat_at: _dt.datetime | None = None

    @property
    def is_terminal(self) -> bool:
        """True when the run is in a final state."""
        return self.status.is_terminal


def _make_replace_run() -> Callable[..., Run]:
    """Build ``replace_run(run, **changes)``: ``attrs.evolve`` for ``Run``, in a third of its
    time. Each write makes a run's next version, some of them inside the store's lock, and
    ``evolve`` there cost ~9 us of a ~60 us write: it collects every field
    into keyword arguments for ``__init__``, whose frozen-class setattr looks each name up
    again. This sets the slots directly, as the generated ``__init__`` does (``Run`` has no
    validators or converters to bypass). Generated once, like attrs' own methods; a field
    that ``Run`` does not have is a ``TypeError``, as with ``evolve``."""
    names = [field.name for field in attrs.fields(Run)]
    scope: dict[str, Any] = {"_new": object.__new__, "_Run": Run, "_unset": object()}
    scope.update({f"_set_{name}": getattr(Run, name).__set__ for name in names})
    source = "def replace_run(run, *, {}):\n    new = _new(_Run)\n{}    return new\n".format(
        ", ".join(f"{name}=_unset" for name in names),
        "".join(f"    _set_{name}(new, run.{name} if {name} is _unset else {name})\n"
                for name in names))
    exec(source, scope)  # made from Run's own field names, nothing else
    replace: Callable[..., Run] = scope["replace_run"]
    return replace


#: ``attrs.evolve(run, **changes)`` for a ``Run``, faster (see ``_make_replace_run``)
replace_run = _make_replace_run()


@attrs.frozen
class Change:
    """One stored change: its store-wide sequence number, time, kind and the run after it."""

    seq: int
    time: _dt.datetime
    type: ChangeType
    run: Run


@attrs.frozen
class BatchSummary:
    """A batch at a glance: ``entries`` maps each plan entry to its latest run."""

    batch_id: str
    counts: dict[Status, int]
    entries: dict[str, Run]
    runs: int

    @classmethod
    def of(cls, batch_id: str, runs: list[Run]) -> BatchSummary:
        """The summary of a batch's ``runs``, given in insertion order (so the last run of a
        plan entry is its latest)."""
        entries: dict[str, Run] = {}
        for run in runs:
            entries[run.plan_entry] = run
        counts = {status: 0 for status in Status}
        for run in entries.values():
            counts[run.status] += 1
        return cls(batch_id=batch_id, counts=counts, entries=entries, runs=len(runs))

    @property
    def done(self) -> bool:
        """True when the batch has runs and the latest run of every plan entry is terminal."""
        return bool(self.entries) and all(r.status.is_terminal for r in self.entries.values())


@attrs.frozen
class StoreStats:
    """What ``stats()`` reports; every field means the same on both backends, except the
    ones marked as the file store's (None or 0 on PostgreSQL)."""

    #: where the store is: the journal's path, or the server and table (never a password)
    location: str
    #: the bytes the store takes on disk: the journal file, or the runs table, the change
    #: feed and their indexes
    size_bytes: int
    runs: int
    runs_by_status: dict[str, int]
    runs_by_machine: dict[str, int]
    #: the changes ``changes()`` can still return (the others were compacted away)
    retained_changes: int
    last_seq: int
    oldest_seq: int
    durable: bool
    #: the file store's: record lines that are no run's latest version (what a compaction
    #: removes); None on PostgreSQL, where autovacuum reclaims superseded rows
    superseded_lines: int | None = None
    #: the file store's: a torn tail found past the valid lines (a write a crash cut short),
    #: left in place for the next write to cut: its offset and length in bytes (None, 0:
    #: there is none)
    torn_tail_offset: int | None = None
    torn_tail_bytes: int = 0

    @property
    def path(self) -> str:
        """``location``, by its earlier name."""
        return self.location

    @property
    def file_size(self) -> int:
        """``size_bytes``, by its earlier name."""
        return self.size_bytes

    @property
    def live_lines(self) -> int:
        """``runs``, by its earlier name (each run has one latest version)."""
        return self.runs
