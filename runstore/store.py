"""``FileStore`` (also ``Store``): the run-store contract on a JSON-lines journal file.

The contract and its documentation are ``StoreBase``'s; this class answers its hooks. It is
built in layers, each a module of one idea: opening and catching up with the journal
(``_fileopen``), compaction (``_filecompact``), the read-modify-write path and what a read
may show (``_filewrite``), pruning (``_fileprune``) and importing (``_fileimport``); the
in-memory view is a ``View`` (``_view``), the file itself a ``Journal``, the lock a
``StoreLock``. What is left here: the constructor, the reads (from the view, or streamed
from the file as it was at the call), the change feed, export, statistics and closing.
"""

from __future__ import annotations

import array
import datetime as _dt
import functools
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from . import (
    _codec,
    _fields,
    _forks,
    _ids,
    _interchange,
    _reaping,
    _runscan,
    _targets,
    _transitions,
    _validate,
)
from ._base import RETAIN_CHANGES, StoreBase
from ._fileimport import _Importing
from ._fileopen import Changes, Decision
from ._fsio import DEFAULT as DEFAULT_FS, FileSystem
from ._journal import Journal
from ._lock import StoreLock
from .errors import (
    CorruptStoreError,
    HistoryTruncatedError,
    MachineBusyError,
    ReadOnlyStoreError,
)
from .model import Change, ChangeType, PrepareOutcome, Run, Status, StoreStats

__all__ = ["RETAIN_CHANGES", "FileStore", "Store"]

_Runs = list[Run]  # inside the class, ``list`` names the method
#: how ``_stream_records`` reads the journal: ``runscan.records``, ``exported`` or ``listed``
_Reader = Callable[[Journal, int, _runscan.Snapshot], Iterator[tuple[int, Any]]]

#: every open ``Store`` of this process, for the at-fork hook (``_forget_parent_calls``)
_stores: weakref.WeakSet[FileStore] = weakref.WeakSet()


class FileStore(_Importing, StoreBase):
    """Run records in one journal file under ``state_dir``; safe across threads and processes
    (the contract and its documentation: ``StoreBase``).

    ``durable=False`` skips ``fdatasync`` (a power loss may then lose the latest changes, never
    corrupt older ones). ``lock_timeout`` bounds every wait for the lock
    (``LockTimeoutError``): a finite number of seconds from 0 to ``_validate.MAX_SECONDS``
    (about 24.8 days, as on PostgreSQL); ``inf`` and ``nan`` are refused.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        durable: bool = True,
        lock_timeout: float = 30.0,
        _fs: FileSystem | None = None,
    ) -> None:
        self.lock_timeout = _validate.options(durable, lock_timeout)
        self.state_dir = _validate.path("state_dir", state_dir)
        self.durable = durable
        self._journal = Journal(self.state_dir, _fs or DEFAULT_FS)
        self._lock = StoreLock(self._journal.open_lock_file, self._journal.lock_path,
                               self._journal.stat_lock_file, self._journal.open_directory)
        self._lock_error = None
        self._pid = _forks.pid()
        self._closed = False
        self._unmarked_writes = False
        self._resync = False
        self._intact = None
        self._appended = None
        self._made = {}
        self._reading = False
        self._reset_view()
        _stores.add(self)
        try:
            self._open()  # now: fail fast on a bad store
        except BaseException:
            self._lock.close()
            self._journal.close()
            raise

    def _open(self) -> None:
        """Check the lock file (when there is one: the first write creates it) and read
        the journal, as a read does (without the flock, changing nothing: a torn tail is
        left for the first write to cut); a missing journal is created under the lock."""
        try:
            if self._journal.lock_file_exists():
                self._lock.open_file()
        except ReadOnlyStoreError as exc:
            self._lock_error = exc
        if self._journal.exists():
            self._read(lambda: None)
        elif self._lock_error is not None:
            raise self._read_only_error()
        else:
            self._transact(lambda: (None, []), shows=False)

    def _prepare(self, machine: str, test_dir_hash: str, make: Callable[[], Run],
                 reap: bool) -> tuple[Run, PrepareOutcome]:
        def decide() -> Decision[tuple[Run, PrepareOutcome]]:
            reaped: Changes = []
            if reap:
                now = _ids.utcnow()
                for run_id in list(self._view.machines.get(machine, ())):
                    dead = _reaping.reaped(self._view.active[run_id], None, now, None)
                    if dead is not None:
                        reaped.append((ChangeType.RUN_REAPED, dead))
            if reaped:
                return self._create_after(reaped, machine, test_dir_hash, make)
            peers = self._view.machines.get(machine)
            if peers:
                active = self._view.active[peers[0]]
                same = active.test_dir_hash == test_dir_hash
                return (active, PrepareOutcome.REUSE if same else PrepareOutcome.BUSY), []
            return self._create_after([], machine, test_dir_hash, make)

        return self._transact(decide, about=machine)

    def _create_after(
        self, before: Changes, machine: str, test_dir_hash: str,
        make: Callable[[], Run],
    ) -> Decision[tuple[Run, PrepareOutcome]]:
        made = _transitions.check_made(make(), machine, test_dir_hash)
        run = self._new(_transitions.validate(_transitions.as_pending(made)))
        return (run, PrepareOutcome.CREATED), [*before, (ChangeType.RUN_CREATED, run)]

    def _create_run(self, run: Run) -> Run:
        def decide() -> Decision[Run]:
            if not run.status.is_terminal and run.machine in self._view.machines:
                occupant = self._view.active[self._view.machines[run.machine][0]]
                raise MachineBusyError(run.machine, occupant.id)
            new = self._new(run)
            return new, [(ChangeType.RUN_CREATED, new)]

        return self._transact(decide, about=run.machine)

    def _get_run(self, run_id: str) -> Run:
        return self._read(lambda: self._lookup(run_id), run_id)

    def _list_runs(self, machine: str | None, wanted: frozenset[Status] | None,
                   batch_id: str | None) -> _Runs:
        def answer() -> _Runs:
            return [
                run for run in self._all_runs()
                if (machine is None or run.machine == machine)
                and (wanted is None or run.status in wanted)
                and (batch_id is None or run.batch_id == batch_id)
            ]

        return self._read(answer)

    def _iter_runs(self, machine: str | None, wanted: frozenset[Status] | None,
                   batch_id: str | None) -> Iterator[Run]:
        """Read from the file as it was at the call (a descriptor of it is kept until the
        iteration ends or the iterator is dropped), about a megabyte at a time; memory
        holds besides only the offsets of the versions written since the last compaction.
        A damaged line raises ``CorruptStoreError`` when the iteration reaches it, and a
        compacted base that fails its header's checksum when the base has been read (each
        line is checked against its own checksum before it is yielded)."""
        return self._runs(machine=machine, status=wanted, batch_id=batch_id)

    def _runs(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Run]:
        """``iter_runs``; with ``limit``, only the last ``limit`` of them, read from the end
        of the file (``runscan.last_records``: the CLI's ``list --limit``)."""
        return (self._run_of(data, offset) for offset, data in self._selected(
            _record_filter(machine, status, batch_id), limit))

    def _iter_json(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """``_fields.run_to_json`` of each run ``_runs`` yields with the same arguments,
        read the same way, made straight from each record's fields
        (``_fields.exported_dict``) unless they are not as this library writes them (the
        CLI's ``list --json`` and ``--jsonl``)."""
        keep = _record_filter(machine, status, batch_id)
        for offset, data in self._selected(keep, limit):
            fields = _fields.exported_dict(data, extras=False)
            yield (fields if fields is not None
                   else _fields.run_to_json(self._run_of(data, offset)))

    def _selected(self, keep: Callable[[dict[str, Any]], bool],
                  limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, record) of the runs ``keep`` takes (``_stream_records``), or of the
        last ``limit`` of them."""
        if limit is None:
            return (item for item in self._stream_records() if keep(item[1]))
        records = self._stream_records()
        try:
            last = _runscan.last_records(records.journal, records.fd, records.snap, limit,
                                        keep)
        finally:
            records.close()
        return iter(last)

    def _stream_records(self, read: _Reader | None = None) -> _HeldRecords:
        """(offset, record) of every run's latest version, insertion order, read as the
        iteration goes from the file as it is now (``runscan.records``); ``read`` may be
        ``runscan.exported`` or ``runscan.listed``, which give what the base's sound lines
        hold in the form ``export`` or ``list`` wants, instead of their records."""

        def snapshot() -> tuple[int, _runscan.Snapshot]:
            header, cur = self._view.header, self._view.cur
            assert header is not None and cur is not None
            if self._view.lazy:
                point = self._view.opened_at
                snap = _runscan.Snapshot(
                    header, cur.end, dict(self._view.index), set(self._view.tail_pruned),
                    None if point is None else (point[0], point[1].next_seq))
            else:
                snap = _runscan.Snapshot(header, cur.end, {}, set(),
                                        offsets=array.array("q", self._view.index.values()))
            return self._journal.hold(), snap

        fd, snap = self._read(snapshot)
        return _HeldRecords(self._journal, fd, snap, read or _runscan.records)

    def _active_of(self, machine: str) -> Run | None:
        def answer() -> Run | None:
            peers = self._view.machines.get(machine)
            return self._view.active[peers[0]] if peers else None

        return self._read(answer, machine)

    def _active_runs(self) -> _Runs:
        return self._read(lambda: self._view.active.values())  # the view's, after any reload

    def _compact_now(self) -> None:

        def decide() -> Decision[None]:
            self._compact()
            return None, []

        self._transact(decide)

    def _reap(self, stale_after: _dt.timedelta, dry_run: bool) -> _Runs:

        def decide() -> Decision[_Runs]:
            now = _ids.utcnow()
            reaped = [r for r in (_reaping.reaped(run, self._view.changed_at.get(run.id), now,
                                                 stale_after)
                                  for run in self._view.active.values()) if r is not None]
            if dry_run:
                return reaped, []
            return reaped, [(ChangeType.RUN_REAPED, r) for r in reaped]

        return self._transact(decide)

    def _changes_after(self, since_seq: int) -> Iterator[Change]:
        """Read as the iteration goes, about a megabyte at a time, from the file as it was
        at the call (a descriptor of it is kept until the iteration ends)."""

        def decide() -> Decision[tuple[int, int, int, bool] | None]:
            cur = self._view.cur
            assert cur is not None
            if since_seq < cur.compacted_through:
                raise HistoryTruncatedError(since_seq, cur.compacted_through + 1)
            if since_seq >= cur.next_seq - 1:
                return None, []
            # from change since_seq + 1 when it is among the last ones the view knows the
            # offsets of (a watcher's usual case: not the whole retained history each poll)
            j, start = self._journal, cur.latest_end
            k = since_seq + 1 - (cur.next_seq - len(self._view.recent))
            if k >= 0:
                head = b'{"seq":%d,' % (since_seq + 1)
                if j.reader()(self._view.recent[k], len(head)) == head:
                    start = self._view.recent[k]
            return (j.hold(), start, cur.end, cur.legacy), []

        held = self._read(lambda: decide()[0])
        if held is None:
            return iter(())
        return _HeldChanges(self._journal, *held, since_seq)

    def _last_seq(self) -> int:
        return self._read(lambda: self._view.cur.next_seq - 1 if self._view.cur else 0)

    def _watch(self, since_seq: int | None, timeout: float | None,
               poll_interval: float) -> Iterator[Change]:
        """Polls the file's size and identity, and reads the new lines when they moved, all
        without the lock: it keeps following while a writer is stopped holding it."""
        seq = self.last_seq() if since_seq is None else since_seq
        deadline = None if timeout is None else time.monotonic() + timeout
        journal = self._journal
        last_seen: tuple[int, int, int] | None = None
        while True:
            try:
                st = os.lstat(journal.path)
                seen: tuple[int, int, int] | None = (st.st_dev, st.st_ino, st.st_size)
            except FileNotFoundError:
                seen = None
            if seen != last_seen:
                last_seen = seen
                for change in self.changes(seq):
                    seq = change.seq
                    yield change
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(poll_interval)

    def _write_export(self, fp: IO[str] | IO[bytes]) -> int:
        return _interchange.write_export_items(fp, self._export_items())

    def _export_items(self) -> Iterator[bytes]:
        """Every run as ``export`` writes it (``interchange.export_item``), read as
        ``_iter_export`` reads them; a record is made a ``Run`` only when its fields are not
        as this library writes them."""
        for offset, data in self._stream_records(_runscan.exported):
            if isinstance(data, bytes):  # proven sound and made from the line's bytes
                yield data
            else:
                yield _interchange.export_item(data, functools.partial(self._run_of, data,
                                                                      offset))

    def _iter_export(self) -> Iterator[tuple[Run, dict[str, Any]]]:
        """Every run with its extra fields, as ``export`` writes them, read as it is
        iterated from the file as it was at the call (``iter_runs``'s reading)."""
        for offset, data in self._stream_records():
            yield self._run_of(data, offset), _fields.extra_fields(data)

    def _check_output(self, target: str | int, what: str, name: object = None) -> None:
        """Refuse (``OutputTargetError``) to write ``target`` (a path or a descriptor) when
        it is one of this store's files or inside its state directory, judged against the
        directory this store has open (``_targets``)."""
        if self._closed:
            raise ValueError(f"the store at {self.state_dir} is closed")
        remedy = f"write the {what} to a file outside {self.state_dir}"
        dir_fd = self._journal.dir_fd
        if isinstance(target, int):
            label = name if isinstance(name, str) else f"descriptor {target}"
            _targets.check_output_fd(target, self.state_dir, name=label, dir_fd=dir_fd,
                                     remedy=remedy)
        else:
            _targets.check_output(target, self.state_dir, dir_fd=dir_fd, remedy=remedy)

    def _stats(self) -> StoreStats:

        def answer() -> StoreStats:
            by_status: dict[str, int] = {s.value: 0 for s in Status}
            by_machine: dict[str, int] = {}
            for run in self._all_runs():
                by_status[run.status.value] += 1
                by_machine[run.machine] = by_machine.get(run.machine, 0) + 1
            cur = self._view.cur
            assert cur is not None
            live = len(self._view.index)
            torn = self._torn
            return StoreStats(
                location=self._journal.path, size_bytes=cur.end, runs=live,
                runs_by_status=by_status, runs_by_machine=by_machine,
                retained_changes=cur.next_seq - 1 - cur.compacted_through,
                superseded_lines=self._view.lines - live, last_seq=cur.next_seq - 1,
                oldest_seq=cur.compacted_through + 1, durable=self.durable,
                torn_tail_offset=None if torn is None else torn[0].offset,
                torn_tail_bytes=0 if torn is None else torn[1] - torn[0].offset)

        return self._read(answer)

    def _release(self) -> None:
        """Sync what this process wrote, mark it durable in the file, release descriptors."""
        if self._closed:
            return
        try:
            if self._unmarked_writes and self._pid == _forks.pid():
                self._transact(self._mark_clean, shows=False)
        finally:
            self._closed = True
            self._lock.close()
            self._journal.close()

    def __repr__(self) -> str:
        return f"Store({self.state_dir!r}, durable={self.durable})"


#: the name the file store has always had
Store = FileStore


def _record_filter(machine: str | None, status: Status | str | Iterable[Status | str] | None,
                   batch_id: str | None) -> Callable[[dict[str, Any]], bool]:
    """Whether a stored record matches ``iter_runs``'s filters (checked here, before any
    lock is taken)."""
    _validate.list_filters(machine, batch_id)
    statuses = _transitions.status_set(status)
    wanted = None if statuses is None else {s.value for s in statuses}

    def keep(data: dict[str, Any]) -> bool:
        return ((machine is None or data.get("machine") == machine)
                and (wanted is None or data["status"] in wanted)
                and (batch_id is None or data.get("batch_id", "") == batch_id))

    return keep


class _HeldRecords:
    """``runscan.records`` of the journal held open as ``fd``; ``fd`` is closed when the
    iteration ends or fails, or when the iterator is dropped unfinished."""

    def __init__(self, journal: Journal, fd: int, snap: _runscan.Snapshot,
                 read: _Reader) -> None:
        self.journal, self.fd, self.snap = journal, fd, snap
        self._close = weakref.finalize(self, journal.close_held, fd)
        self._records: Iterator[tuple[int, Any]] = read(journal, fd, snap)

    def close(self) -> None:
        """Close the descriptor now (the iteration, if it goes on, fails)."""
        self._close()

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        try:  # (a generator passes the items on at less cost than ``__next__``)
            yield from self._records
        finally:
            self._close()

    def __next__(self) -> tuple[int, dict[str, Any]]:
        try:
            return next(self._records)
        except BaseException:  # StopIteration included: done with the descriptor
            self._close()
            raise


class _HeldChanges:
    """The changes in bytes ``start:end`` of the journal held open as ``fd``, read as they
    are iterated, a megabyte at a time; ``fd`` is closed when the iteration ends or fails,
    or when the iterator is dropped unfinished."""

    def __init__(self, journal: Journal, fd: int, start: int, end: int, legacy: bool,
                 since_seq: int) -> None:
        self._close = weakref.finalize(self, journal.close_held, fd)
        self._changes = _changes_read(journal, fd, start, end, legacy, since_seq)

    def __iter__(self) -> Iterator[Change]:
        return self

    def __next__(self) -> Change:
        try:
            return next(self._changes)
        except BaseException:  # StopIteration included: done with the descriptor
            self._close()
            raise


@_forks.in_child
def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._forget_parent_calls()


def _changes_read(journal: Journal, fd: int, start: int, end: int, legacy: bool,
                  since_seq: int) -> Iterator[Change]:
    pos = start
    for at, chunk in journal.read_lines(start, end, fd):
        yield from _changes_in(chunk, since_seq, journal.path, legacy)
        pos = at + len(chunk)
    if pos < end:
        raise CorruptStoreError(journal.path, pos, "the file was cut short while its "
                                "retained changes were being read")


def _changes_in(buf: bytes, since_seq: int, path: str,
                legacy: bool = False) -> Iterator[Change]:
    pos = 0
    while pos < len(buf):
        nl = buf.index(b"\n", pos)
        line = buf[pos:nl]
        pos = nl + 1
        try:
            data = _codec.decode_line(line)
            if _codec.is_mark(line, data, legacy) or data["seq"] <= since_seq:
                continue
            run = _fields.run_from_dict(data)
            when = _fields.change_time(data["time"])
        except (_fields.BadLine, KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(path, None,
                                    f"a retained change is unreadable ({exc})") from None
        yield Change(seq=data["seq"], time=when, type=ChangeType(data["change"]), run=run)
