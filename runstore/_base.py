"""``StoreBase``: the run-store contract, written once for both backends.

Every public method of a store is defined here, with its documentation, the checks of its
arguments (``_validate``: the rules both backends share, so a bad argument gets the same
``InvalidRunError`` from either) and the rules that do not depend on where runs are kept
(the status transitions, batch summaries, export and import formats, the context manager).
A backend (``FileStore`` on a journal file, ``PostgresStore`` on a table) implements the
hooks, the methods whose names start with an underscore below, each called with arguments
already checked. What a backend does differently is documented on its class.
"""

from __future__ import annotations

import abc
import datetime as _dt
import os
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Self

from . import _ids, _interchange, _outputs, _owner, _transitions, _validate
from .model import BatchSummary, Change, PrepareOutcome, Run, Status, StoreStats

#: how many of the latest changes a store keeps when it compacts (or trims) its change
#: feed, so a follower that lags by fewer changes than this follows across a compaction
#: without a ``HistoryTruncatedError``
RETAIN_CHANGES = 4096

_Runs = list[Run]  # inside the class, ``list`` names the method
_Wanted = frozenset[Status] | None
#: a step of one run: from the stored run, its next version and the change (None: unchanged)
_StepOf = Callable[[Run], "_transitions.Step | None"]


class StoreBase(abc.ABC):
    """A store of run records, safe across threads and processes (``RunStore``).

    Every method checks its arguments before it takes a lock, and refuses a bad one with
    ``InvalidRunError`` naming it, leaving the store untouched: no NUL character or lone
    surrogate in any text, integers within the signed 64-bit range, datetimes that convert
    to UTC, durations that reach back no further than the year 1.
    """

    durable: bool
    lock_timeout: float

    # -- preparing and creating runs -----------------------------------------------------

    def prepare_atomic(
        self, machine: str, test_dir_hash: str, make: Callable[[], Run], *, reap: bool = False
    ) -> tuple[Run, PrepareOutcome]:
        """In one critical section: return the machine's non-terminal run (REUSE when its
        hash matches, else BUSY), or call ``make()`` and store its run as pending (CREATED).
        With ``reap=True`` a non-terminal run whose owner process is provably gone is first
        interrupted (``error_code="owner_gone"``) in the same critical section.

        ``make()`` is called only on the create path; the run it returns must be for this
        machine and hash (``InvalidRunError`` otherwise). Two callers never both hold a
        non-terminal run of one machine."""
        _validate.prepare_atomic(machine, test_dir_hash, make, reap)
        return self._prepare(machine, test_dir_hash, make, reap)

    def create(self, run: Run) -> Run:
        """Store ``run`` under a new unique id (any id it has is overwritten), as revision 1;
        a non-terminal run is refused with ``MachineBusyError`` when its machine already
        has one."""
        return self._create_run(_transitions.validate(run))

    # -- changing runs ------------------------------------------------------------------

    def update(self, run: Run) -> Run:
        """Replace the stored run with the same id; returns what was stored.

        Refuses a stale copy (``ConflictError``), a forbidden status change
        (``InvalidTransitionError``) and a change of machine or hash (``InvalidRunError``).
        An unchanged copy of a terminal run is an idempotent no-op.
        """
        return self._update(_validate.updated_run(run))

    def start(self, run_id: str) -> Run:
        """pending -> running: sets ``started_at`` and makes this process the owner."""
        _validate.run_id(run_id)
        return self._start(run_id)

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
        terminal status returns it unchanged; any other change of a terminal run is refused
        (``InvalidTransitionError``)."""
        _validate.finish(run_id, exit_code, error_code, error_msg)
        target = _transitions.terminal_status(run_id, status)
        return self._finish(run_id, target, exit_code, error_code, error_msg)

    def heartbeat(self, run_id: str) -> Run:
        """Refresh ``heartbeat_at`` of a non-terminal run (as cheap as any update)."""
        _validate.run_id(run_id)
        return self._beat(run_id)

    # -- reading runs -------------------------------------------------------------------

    def get(self, run_id: str) -> Run:
        """The run with this id; ``RunNotFoundError`` if there is none."""
        _validate.run_id(run_id)
        return self._get_run(run_id)

    def list(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> _Runs:
        """Every run (the latest version of each) matching the filters, in insertion order.
        ``status`` is one status or several."""
        _validate.list_filters(machine, batch_id)
        return self._list_runs(machine, _transitions.status_set(status), batch_id)

    def iter_runs(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> Iterator[Run]:
        """The runs ``list()`` returns with the same filters, in the same order, read as the
        iteration goes: memory stays bounded however many runs the store holds. The runs
        are those of one snapshot, taken when the iteration starts (changes made meanwhile
        are not seen), and the iteration holds what it reads from (a file descriptor, a
        pooled connection) until it ends or the iterator is closed."""
        _validate.list_filters(machine, batch_id)
        return self._iter_runs(machine, _transitions.status_set(status), batch_id)

    def active_by_machine(self, machine: str) -> Run | None:
        """The non-terminal run of ``machine``, or None."""
        _validate.text("machine", machine)
        return self._active_of(machine)

    def active(self) -> _Runs:
        """Every non-terminal run, in insertion order."""
        return self._active_runs()

    def find_by_test_dir_hash_and_machine(self, test_dir_hash: str, machine: str) -> _Runs:
        """Every run of ``machine`` with this hash, in insertion order. (The arguments are in
        the opposite order to ``prepare_atomic``'s, as in the contract this follows.)"""
        _validate.find(test_dir_hash, machine)
        return self._find_runs(machine, test_dir_hash)

    def batch_summary(self, batch_id: str) -> BatchSummary:
        """Counts by status and the latest run of each plan entry of a batch."""
        _validate.text("batch_id", batch_id)
        return BatchSummary.of(batch_id, self.list(batch_id=batch_id))

    # -- upkeep ---------------------------------------------------------------------------

    def reap(self, *, stale_after: _dt.timedelta, dry_run: bool = False) -> _Runs:
        """Interrupt every non-terminal run whose owner process on this host is gone
        (``error_code="owner_gone"``) or whose last heartbeat (or change) is older than
        ``stale_after`` (``"heartbeat_stale"``) and whose owner is not a process of this host
        that provably still runs (a step of the wall clock never reaps it); return the
        reaped runs (with ``dry_run``, the runs it would reap, changing nothing)."""
        _validate.reap(stale_after, dry_run)
        return self._reap(stale_after, dry_run)

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
        the pruned runs are first appended, durably, to that JSON-lines file. Returns the
        number of runs removed (with ``dry_run``, that would be removed).

        An ``archive`` that is one of the store's own files (by device and inode: through
        a symlink or a hard link too), its directory or a name inside it is refused with
        ``OutputTargetError`` before anything is opened or pruned; so is a directory, a
        socket, a block device, a FIFO or a character device (the archive must keep the
        runs). A symlink is followed (the link stays: ``_outputs``)."""
        _validate.prune(older_than, keep_last, archive, dry_run)
        if archive is not None:
            self._check_output(os.fspath(archive), "archive")
            _outputs.check(os.fspath(archive), archive=True)
        return self._prune(older_than, keep_last, archive, dry_run)

    def compact(self) -> None:
        """Reclaim the space of superseded versions and keep the last ``RETAIN_CHANGES``
        changes of the feed."""
        self._compact_now()

    # -- the change feed ----------------------------------------------------------------

    def changes(self, since_seq: int = 0) -> Iterator[Change]:
        """The retained changes after ``since_seq``, in order. ``HistoryTruncatedError`` when
        changes after ``since_seq`` were compacted away (resynchronise from ``list()``)."""
        _validate.seq("since_seq", since_seq)
        return self._changes_after(since_seq)

    def last_seq(self) -> int:
        """The sequence number of the latest stored change (0 for an empty store)."""
        return self._last_seq()

    def watch(
        self,
        since_seq: int | None = None,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.005,
    ) -> Iterator[Change]:
        """Follow changes written by any process, live, until ``timeout`` seconds have
        passed (None: forever; ``inf`` is refused). ``since_seq=None`` starts from now;
        ``poll_interval`` is how often it looks for new changes when it has no other way to
        be woken. The arguments are checked when it is called, before the first change."""
        _validate.watch(since_seq, timeout, poll_interval)
        return self._watch(since_seq, timeout, poll_interval)

    # -- export and import --------------------------------------------------------------

    def export(self, fp: IO[str] | IO[bytes] | str | os.PathLike[str]) -> int:
        """Write every run, in insertion order, as one JSON array (the contract's field
        names, plus the fields this library does not know that an import kept); returns the
        number of runs written. The runs are read and written as they go: memory does not
        grow with the store.

        ``fp`` is a file object, or a path: a regular file (or none yet) is then written
        through a temp file beside it, synced and renamed over it (replaced whole or not
        at all); a symlink is followed (the link stays), and a FIFO or a character device
        is written into as it is (``_outputs``). A path that is one of the store's own
        files (by device and inode: through a symlink or a hard link too), its directory
        or a name inside it, a directory, a socket or a block device is refused with
        ``OutputTargetError`` before anything is opened; so is a file object open on one
        of the store's files, before anything is written to it."""
        _validate.export_target(fp, paths=True)
        if isinstance(fp, str | os.PathLike):
            path = os.fspath(fp)
            self._check_output(path, "export")
            return _interchange.export_to_path(path, self._write_export)
        try:
            fd: int | None = fp.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: in memory
            fd = None
        if fd is not None:
            self._check_output(fd, "export", name=getattr(fp, "name", None))
        return self._write_export(fp)

    def import_runs(self, source: IO[str] | IO[bytes] | Iterable[Run | dict[str, Any]]) -> int:
        """Add runs keeping their ids, from a JSON array document or JSON lines (a file), or
        from an iterable of ``Run``/dicts; returns how many. All or nothing: a duplicate or
        invalid record is refused with ``InvalidRunError`` naming it, and then nothing is
        imported. The input is read as it is imported, in memory that does not grow with
        it."""
        _validate.import_source(source)
        return self._import_runs(_interchange.iter_import(source))

    # -- statistics and life cycle ------------------------------------------------------

    def stats(self) -> StoreStats:
        """Counts and sizes for operators (``python -m runstore stats``)."""
        return self._stats()

    def close(self) -> None:
        """Make what this process wrote durable and release what the store holds; closing
        twice does nothing. A store is also a context manager that closes it."""
        self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hooks a backend implements (arguments already checked) ---------------------

    @abc.abstractmethod
    def _prepare(self, machine: str, test_dir_hash: str, make: Callable[[], Run],
                 reap: bool) -> tuple[Run, PrepareOutcome]: ...

    @abc.abstractmethod
    def _create_run(self, run: Run) -> Run:
        """Store the validated ``run`` (``transitions.fresh`` gives its first version)."""

    @abc.abstractmethod
    def _step(self, run_id: str, step_of: _StepOf, action: str) -> Run:
        """Store the run's next version by ``step_of(stored)`` (None: unchanged, nothing
        written) in one critical section; ``action`` names the call in error messages.
        ``_update``, ``_start``, ``_finish`` and ``_beat`` go through it unless a backend
        has a shorter way."""

    def _update(self, run: Run) -> Run:
        return self._step(run.id, lambda stored: _transitions.updated(stored, run),
                          "updating a run in")

    def _start(self, run_id: str) -> Run:
        return self._step(run_id, lambda stored: _transitions.started(
            stored, _ids.utcnow(), _owner.current()), "starting a run in")

    def _finish(self, run_id: str, target: Status, exit_code: int | None, error_code: str,
                error_msg: str) -> Run:
        return self._step(run_id, lambda stored: _transitions.finished(
            stored, target, _ids.utcnow(), exit_code, error_code, error_msg),
            "finishing a run in")

    def _beat(self, run_id: str) -> Run:
        return self._step(run_id, lambda stored: _transitions.beat(stored, _ids.utcnow()),
                          "recording a heartbeat in")

    @abc.abstractmethod
    def _get_run(self, run_id: str) -> Run: ...

    @abc.abstractmethod
    def _list_runs(self, machine: str | None, wanted: _Wanted, batch_id: str | None) -> _Runs: ...

    @abc.abstractmethod
    def _iter_runs(self, machine: str | None, wanted: _Wanted,
              batch_id: str | None) -> Iterator[Run]: ...

    @abc.abstractmethod
    def _active_of(self, machine: str) -> Run | None: ...

    @abc.abstractmethod
    def _active_runs(self) -> _Runs: ...

    def _find_runs(self, machine: str, test_dir_hash: str) -> _Runs:
        return [r for r in self._list_runs(machine, None, None) if r.test_dir_hash == test_dir_hash]

    @abc.abstractmethod
    def _reap(self, stale_after: _dt.timedelta, dry_run: bool) -> _Runs: ...

    @abc.abstractmethod
    def _prune(self, older_than: _dt.timedelta | None, keep_last: int | None,
               archive: str | os.PathLike[str] | None, dry_run: bool) -> int: ...

    @abc.abstractmethod
    def _compact_now(self) -> None: ...

    @abc.abstractmethod
    def _changes_after(self, since_seq: int) -> Iterator[Change]: ...

    @abc.abstractmethod
    def _last_seq(self) -> int: ...

    @abc.abstractmethod
    def _watch(self, since_seq: int | None, timeout: float | None,
               poll_interval: float) -> Iterator[Change]: ...

    @abc.abstractmethod
    def _check_output(self, target: str | int, what: str, name: object = None) -> None:
        """Refuse (``OutputTargetError``) to write ``target`` (a path or a descriptor) when
        it is one of the store's own files (``what`` names the output in the message)."""

    @abc.abstractmethod
    def _write_export(self, fp: IO[str] | IO[bytes]) -> int: ...

    @abc.abstractmethod
    def _import_runs(self, records: Iterable[tuple[int, Run, dict[str, Any]]],
                     on_conflict: Callable[[Run, Run], None] | None = None) -> int:
        """Import validated (record number, run, extra fields). With ``on_conflict`` a run
        already stored with identical content is skipped, and ``on_conflict(stored, new)``
        is called for one stored with other content: it must raise (copying between stores
        uses it). Without it, an id already stored is refused."""

    @abc.abstractmethod
    def _stats(self) -> StoreStats: ...

    @abc.abstractmethod
    def _release(self) -> None: ...
