"""``Store``: the run-store contract on a JSON-lines journal, with one read-modify-write path.

Every public method that may write runs ``_transact(decide)`` (the reads run ``_read``,
which catches up without the flock and never changes the file): take the lock (mutex, then
flock), bring the
in-memory view up to date with what other processes appended (or reload when the file was
replaced), let ``decide`` look at the view and return its result plus the new run versions to
store, append those as one write, release the flock, take the new lines into the view (it is
this process's own: the mutex guards it), and release the mutex. Methods that change one run
prepare its next version before the flock and keep it if the run did not change meanwhile
(``_write_step``). In durable mode the
``fdatasync`` happens after the flock is released and before the call returns (group commit:
one sync can cover the writes of several processes), so the view of another process may hold a
change a moment before it is durable; that process makes it durable before any answer from it
leaves the call (``_make_visible``), so what a call shows, like what it acknowledges, survives
a power loss. After a failed sync
this ``Store`` reads from what was synced before it (``_answer_intact``), and its next write
first rewrites the file, leaving the unsynced lines out when nothing was written after them.

The view keeps what queries need and no more: the offset of every run's latest version, the
non-terminal runs themselves (by id and by machine), and counters. Terminal runs are read back
from the file on demand, so the cost of an operation does not grow with the history.
"""

from __future__ import annotations

import array
import collections
import contextlib
import datetime as _dt
import functools
import itertools
import os
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

import attrs

from . import (
    _targets,
    _validate,
    codec,
    compaction,
    failpoints,
    gather,
    ids,
    interchange,
    owner,
    reaping,
    retention,
    runscan,
    transitions,
)
from .active import ActiveRuns
from .errors import (
    CorruptStoreError,
    HistoryTruncatedError,
    InvalidRunError,
    IOKind,
    LockTimeoutError,
    MachineBusyError,
    ReadOnlyStoreError,
    RunNotFoundError,
    RunstoreError,
    StoreIOError,
)
from .fsio import DEFAULT as DEFAULT_FS
from .fsio import FileSystem
from .journal import (
    COMPACTING_NAME,
    DATA_NAME,
    Cursor,
    Damage,
    Header,
    Journal,
    Vouch,
    cursor_after_header,
    cut_error,
    judge,
    log_warning,
    missing_error,
    parse_header,
    read_vouch,
    scan,
    write_vouch,
)
from .lock import StoreLock
from .model import BatchSummary, Change, ChangeType, PrepareOutcome, Run, Status, StoreStats

T = TypeVar("T")
_Changes = list[tuple[ChangeType, Run]]
_Decision = tuple[T, _Changes]
_Runs = list[Run]  # aliases: inside Store, ``list`` names the method
_Ids = list[str]


@attrs.define
class _Pruned:
    """The runs a prune removes, as its compaction needs them: their ids, and the last
    ``RETAIN_CHANGES`` of them (offset and record) in the order pruned, whose
    ``run_pruned`` lines the retained history keeps (earlier ones fall out of it)."""

    ids: set[str] = attrs.field(factory=set)
    count: int = 0
    last: collections.deque[tuple[int, dict[str, Any]]] = attrs.field(
        factory=lambda: collections.deque(maxlen=RETAIN_CHANGES))

    def add(self, run_id: str, offset: int, data: dict[str, Any]) -> None:
        self.ids.add(run_id)
        self.count += 1
        self.last.append((offset, data))

#: automatic compaction runs when the lines that are not a run's latest version exceed
#: RETAIN_CHANGES + max(COMPACT_MIN_SUPERSEDED, live runs): the file stays within twice its
#: live size plus about 5,000 lines
COMPACT_MIN_SUPERSEDED = 1024
#: how many of the latest changes a compaction keeps, so a watcher that lags by fewer
#: changes than this follows across a compaction without a HistoryTruncatedError
RETAIN_CHANGES = 4096
#: a checkpoint line goes before the first record written after this many records since
#: the last one (or the base): opening reads from the last checkpoint, not the whole tail
CHECKPOINT_EVERY = 1024
_ACTIVE = frozenset({Status.PENDING.value, Status.RUNNING.value})
_CREATED = ChangeType.RUN_CREATED.value
_PRUNED = ChangeType.RUN_PRUNED.value
#: lines a process waits for before it tries again to compact when another one was at it
_COMPACT_RETRY_LINES = 256
#: the most bytes appended since the view was brought up to date that a read looks through
#: for the run it is about before answering without the flock (``Store._current_for``)
_UNREAD_LIMIT = 64 * 1024
#: how long a read waits for the flock before it catches up without it (``Store._read``)
_READ_LOCK_WAIT = 0.25
#: how much of a damaged line is read again to see whether it was only being written
_READ_AGAIN = 2 * 1024 * 1024
#: the most records, and bytes of run fields, an import appends in one write; a larger
#: one is staged through a temp file renamed over the journal (``Store._stage_import``),
#: so that no append is ever too long to be cut as a torn write (``TORN_TAIL_LIMIT``)
SMALL_IMPORT = 4096
SMALL_IMPORT_BYTES = 16 * 1024 * 1024
#: how much of a staged import is written at a time
_STAGE_CHUNK = 1 << 20
#: the failures after which the file is rewritten before the next write (``Store._resync``)
_RESYNC_KINDS = frozenset({IOKind.SYNC, IOKind.RECOVER, IOKind.SYNC_DIR})


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _refuse_busy(n: int, run: Run, busy: dict[str, str]) -> None:
    """Refuse record ``n`` of an import when ``run`` is non-terminal on a machine that
    ``busy`` (machine -> its non-terminal run id) lists; else list it there."""
    if run.status.is_terminal:
        return
    if run.machine in busy:
        raise InvalidRunError(
            f"record {n}: run {run.id!r} is {run.status.value} on machine {run.machine!r}, "
            f"which already has the non-terminal run {busy[run.machine]!r}; nothing was "
            "imported")
    busy[run.machine] = run.id


#: every open ``Store`` of this process, for the at-fork hook (``_forget_parent_calls``)
_stores: weakref.WeakSet[Store] = weakref.WeakSet()


class Store:
    """Run records in one journal file under ``state_dir``; safe across threads and processes.

    ``durable=False`` skips ``fdatasync`` (a power loss may then lose the latest changes, never
    corrupt older ones). ``lock_timeout`` bounds every wait for the lock
    (``LockTimeoutError``): a finite number of seconds from 0 to ``_validate.MAX_SECONDS``
    (about 24.8 days, as on PostgreSQL); ``inf`` and ``nan`` are refused.

    Every method checks its arguments before it takes a lock, by the rules both backends
    share (``runstore._validate``), and refuses a bad one with ``InvalidRunError``, leaving
    the store untouched: no NUL character or lone surrogate in any text, integers within
    the signed 64-bit range, datetimes that convert to UTC, durations that reach back no
    further than the year 1.
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
                               self._journal.stat_lock_file)
        #: set when the lock file cannot be opened for writing (a read-only copy or mount):
        #: this store then only reads, without the lock, and every write raises this
        self._lock_error: ReadOnlyStoreError | None = None
        self._pid = os.getpid()
        self._closed = False
        self._unmarked_writes = False
        self._resync = False  # set when a sync failed: rewrite the file before going on
        #: after a failed sync of appended lines, until the rewrite: the journal open then
        #: (device, inode), how many of its bytes were known synced (reads answer from
        #: those bytes alone: ``_answer_intact``) and where the lines this process failed
        #: to sync begin and end (-1, -1 when not known)
        self._intact: tuple[int, int, int, int, int] | None = None
        #: what ``_append`` wrote and the view has yet to take in (``_index_appended``)
        self._appended: tuple[_Changes, list[bytes], int, _dt.datetime] | None = None
        #: run id -> (its next version, that line's run fields), made by ``_write_step``
        #: before the flock was taken and kept by its decision; ``_append`` takes it out and
        #: uses it for that very version only
        self._made: dict[str, tuple[Run, bytes]] = {}
        self._reading = False  # catching up for a read, without the flock
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

    def _read_only_error(self) -> ReadOnlyStoreError:
        """Why this store cannot be written: its lock file or its journal cannot be opened
        for writing."""
        exc, j = self._lock_error, self._journal
        if exc is not None:
            return ReadOnlyStoreError(exc.path, exc.problem, exc.remedy)
        return j.read_only_error(j.path, "journal file")

    # -- the view -----------------------------------------------------------------------

    def _reset_view(self) -> None:
        self._header: Header | None = None
        self._cur: Cursor | None = None
        self._index: dict[str, int] = {}  # id -> offset of its latest version (insertion order)
        self._active = ActiveRuns(self._journal.path)  # the non-terminal runs
        self._machines: dict[str, _Ids] = {}  # machine -> its non-terminal run ids
        self._extras: dict[str, dict[str, Any]] = {}  # fields we do not know, per run id
        self._max_id = ""
        self._lines = 0  # record lines in the file
        self._recent: collections.deque[int] = collections.deque(maxlen=RETAIN_CHANGES)
        self._changed_at: dict[str, _dt.datetime] = {}  # non-terminal id -> its last change
        #: non-terminal id -> the offset of its latest version, in insertion order (what a
        #: checkpoint line lists)
        self._active_at: dict[str, int] = {}
        self._synced = 0  # bytes of the current file this process knows to be synced
        self._stale = True
        # Opened from a compaction's summary, the base is not indexed until a query needs
        # it (``_ensure_index``): ``_index`` then holds only the runs written after the base,
        # and the live count is kept from the summary and the changes since.
        self._lazy = False
        self._base_count = 0  # runs in the part not indexed yet
        self._tail_created = 0  # runs created after it
        self._tail_pruned: set[str] = set()  # runs pruned after it
        #: with ``_lazy``, when opening began at a checkpoint: its offset and what it says
        #: (the lines between the base and it are indexed with the base)
        self._opened_at: tuple[int, codec.Checkpoint] | None = None
        self._compact_retry_at = 0  # lines: until then automatic compaction is not tried
        #: records other processes appended, read and checked under the flock but taken
        #: into the view only after it is released (``_catch_up`` with ``about``), in file
        #: order; always empty when the mutex is free
        self._held: list[tuple[int, dict[str, Any]]] = []
        #: a torn tail the last catch-up found past the valid lines, and where the file
        #: ended: left in place by reads, cut by the next write (``_before_writing``)
        self._torn: tuple[Damage, int] | None = None
        self._temps_checked = False  # stale temp files looked for since the last load

    def _index_version(self, offset: int, run_id: str, active: Run | dict[str, Any] | None,
                       changed_at: _dt.datetime | None, change: str) -> None:
        """Record that the latest version of ``run_id`` is at ``offset``; ``active`` is the
        run (or its record, structured when first read) when it is non-terminal, else None;
        a ``run_pruned`` change drops the run."""
        self._lines += 1
        pruned = change == _PRUNED
        if self._lazy:
            if change == _CREATED:  # a new id (create and import refuse existing ones)
                self._tail_created += 1
            elif pruned:
                self._tail_pruned.add(run_id)
        if run_id > self._max_id:
            self._max_id = run_id
        if pruned:
            self._index.pop(run_id, None)
            self._extras.pop(run_id, None)
        else:
            self._index[run_id] = offset
        before = self._active.machine(run_id)
        if active is not None:
            self._active_at[run_id] = offset
            if isinstance(active, Run):
                self._active.put(run_id, active)
                machine = active.machine
            else:
                self._active.put_unread(run_id, offset, active)
                machine = active["machine"]
            if changed_at is not None:
                self._changed_at[run_id] = changed_at
            if before is None:
                self._machines.setdefault(machine, []).append(run_id)
        elif before is not None:
            self._active.discard(run_id)
            del self._active_at[run_id]
            self._changed_at.pop(run_id, None)
            peers = self._machines[before]
            peers.remove(run_id)
            if not peers:
                del self._machines[before]

    def _ingest_record(self, offset: int, data: dict[str, Any], defer: bool = False) -> None:
        """Take one record into the view; with ``defer`` a non-terminal run is structured
        only when first read (catching up with other processes' writes)."""
        run_id = data["id"]
        if self._cur is None or offset >= self._cur.latest_end:
            self._recent.append(offset)
        active: Run | dict[str, Any] | None = None
        changed_at = None
        if data["status"] in _ACTIVE:
            try:
                changed_at = _dt.datetime.fromisoformat(data["time"])
            except (TypeError, ValueError):
                changed_at = None
            if defer and type(data.get("machine")) is str:
                active = data
            else:
                try:
                    active = codec.run_from_dict(data)
                except codec.BadLine as exc:
                    raise CorruptStoreError(self._journal.path, offset,
                                            f"run {run_id!r} has a malformed field: "
                                            f"{exc.reason}") from None
        extra = codec.extra_fields(data)
        if extra:
            self._extras[run_id] = extra
        else:
            self._extras.pop(run_id, None)
        self._index_version(offset, run_id, active, changed_at, data["change"])

    def _live(self) -> int:
        """How many runs the store holds."""
        if self._lazy:
            return self._base_count + self._tail_created - len(self._tail_pruned)
        return len(self._index)

    def _ensure_index(self) -> None:
        """Index the part opening did not read (id -> offset), when a query needs every run
        or one that is neither non-terminal nor written since: the base opened from its
        summary (its bytes checked against the summary's CRC-32), then, when opening began
        at a checkpoint, the lines between the base and it (parsed and checked line by
        line, and against what the checkpoint says)."""
        if not self._lazy:
            return
        self._take_held()  # they follow the part indexed here
        header, j = self._header, self._journal
        assert header is not None
        recent: list[int] = []  # the offsets of the changes before the checkpoint
        if header.summary is not None:
            base = self._index_base(header)
            if self._opened_at is not None:
                recent = self._history_at(header)
            cur = Cursor(end=header.base_end,
                         next_seq=header.compacted_through + 1 + len(recent),
                         durable=header.base_end, latest_end=header.latest_end,
                         base_end=header.base_end, compacted_through=header.compacted_through,
                         legacy=header.version < codec.KINDS_BY_FIRST_KEY)
        else:
            base, cur = {}, cursor_after_header(header, header.start)
        if self._opened_at is not None:  # opened at a checkpoint: the lines before it
            at, point = self._opened_at
            for chunk_at, chunk in j.read_lines(cur.end, at):
                result = scan(chunk, chunk_at, cur)
                if result.damage is not None:
                    raise CorruptStoreError(j.path, result.damage.offset,
                                            f"{result.damage.reason} (before the checkpoint "
                                            f"at byte {at}, where this process opened)")
                for offset, data in result.records:
                    if offset >= header.latest_end:
                        recent.append(offset)
                    if data["change"] == _PRUNED:
                        base.pop(data["id"], None)
                    else:
                        base[data["id"]] = offset
            if (cur.end, cur.next_seq, len(base)) != (at, point.next_seq, point.runs):
                raise CorruptStoreError(j.path, at, "a checkpoint does not match the lines "
                                        f"before it ({len(base)} runs, next seq "
                                        f"{cur.next_seq})")
            self._recent = collections.deque([*recent, *self._recent], maxlen=RETAIN_CHANGES)
        for run_id, offset in self._index.items():  # keeps earlier positions, appends new ids
            base[run_id] = offset
        for run_id in self._tail_pruned:
            base.pop(run_id, None)
        self._index = base
        self._lazy = False
        self._opened_at = None
        self._tail_pruned = set()

    def _index_base(self, header: Header) -> dict[str, int]:
        """The base's id -> offset, from the ids at the start of its lines; its bytes are
        checked against the summary's CRC-32 and run count."""
        summary, j = header.summary, self._journal
        assert summary is not None
        base: dict[str, int] = {}
        crc = 0
        for chunk_at, chunk in j.read_lines(header.start, header.latest_end):
            crc = zlib.crc32(chunk, crc)
            part = {m.group(1).decode(): chunk_at + m.start()
                    for m in codec.RECORD_ID.finditer(b"\n" + chunk)}
            if len(part) != chunk.count(b"\n"):  # an id with escapes: parse these lines
                part, pos = {}, 0
                while pos < len(chunk):
                    nl = chunk.index(b"\n", pos)
                    part[self._decode_at(chunk_at + pos, chunk[pos:nl])["id"]] = chunk_at + pos
                    pos = nl + 1
            base.update(part)
        crc, size = j.checksum(header.latest_end, header.base_end, crc)
        if crc != summary.crc or size != header.base_end - header.latest_end:
            self._refuse_damaged_base(header)
        if len(base) != summary.lines:
            raise CorruptStoreError(j.path, header.start,
                                    f"the compacted base holds {len(base)} runs where its "
                                    f"header says {summary.lines}")
        return base

    def _history_at(self, header: Header) -> list[int]:
        """The offsets of the retained history's lines (the base's complete lines after its
        latest versions: a torn one is found by the base's checksum)."""
        history: list[int] = []
        for chunk_at, chunk in self._journal.read_lines(header.latest_end, header.base_end):
            lines = chunk.split(b"\n")[:chunk.count(b"\n")]
            history.extend(itertools.accumulate((len(line) + 1 for line in lines[:-1]),
                                                initial=chunk_at) if lines else ())
        return history

    def _forget_parent_calls(self) -> None:
        """In a forked child: drop what the parent's other threads were in the middle of
        when it forked (records held for after the flock, lines appended but not taken into
        the view, versions made before the flock). Only the forking thread goes on in the
        child, so those calls never finish there; the view they may have left half-updated
        is rebuilt from the file by the child's next call, which also reopens the journal
        (``_catch_up``). The lock drops the parent's flock and mutex by its own hook."""
        self._held = []
        self._appended = None
        self._made = {}
        self._stale = True
        self._unmarked_writes = False  # the parent's to mark clean, not the child's

    # -- catching up with the file ------------------------------------------------------

    def _catch_up_reading(self) -> None:
        """``_catch_up`` without the flock, for a read: it takes in the complete lines
        written so far, never changes the file, and opens a journal it cannot write for
        reading (``_load``)."""
        self._reading = True
        try:
            self._catch_up()
        finally:
            self._reading = False

    def _catch_up(self, about: str | None = None) -> None:
        """Bring the view up to date with the file (under the flock, or for a read without
        it: ``_catch_up_reading``). With ``about`` (the
        one run id or machine the coming decision depends on), other processes' records
        that are not about it are checked now but held (``_hold``) and taken into the view
        after the flock is released: the lock changes hands on nearly every write when
        processes share a store, and taking in the other one's line was a third of the
        time it was held."""
        assert not self._held
        j = self._journal
        self._torn = None  # found again below while it is there
        if self._pid != owner.pid():  # forked: the parent's view and descriptors are not ours
            self._pid = owner.pid()
            j.after_fork()
            self._stale = True
        if j.fd is None:
            self._load()
            return
        # one stat of the path tells all: the journal is still the file open (and grew when
        # other processes appended), or it was replaced (a compaction elsewhere renames its
        # new file over ours; anything else is refused), or it is gone (refused: a store is
        # never reset to empty without being asked)
        st = j.stat_path()
        if st is None:
            raise j.gone_error()
        if (st.st_dev, st.st_ino) != j.identity:
            j.check_replacement()
            self._load()
            return
        cur = self._cur
        if self._stale or cur is None or st.st_size < cur.end:
            self._load()
        elif st.st_size > cur.end:
            self._ingest_from(cur.end, st.st_size, defer=True, about=about)

    def _load(self) -> None:
        """(Re)build the view from the file, creating the journal when missing (under the
        flock; a read opens it, for reading when it cannot be written). A base
        with a summary in the header is checksummed, not parsed: only its non-terminal runs
        are read; the rest is indexed when first needed (``_ensure_index``)."""
        self._reset_view()
        j = self._journal
        if self._reading:
            header = j.open(read_only_ok=True)
        else:
            header = j.open() if j.exists() else self._create()
        self._header = header
        start = header.start
        self._cur = cursor_after_header(header, start)
        vouch = self._vouch_for(header)
        self._cur.vouched = vouch.length if vouch is not None else 0
        if self._load_checkpoint(header):
            start = self._cur.end
        elif header.summary is not None and self._load_summarised_base(header):
            start = header.base_end
        self._ingest_from(start)  # damage before the vouched length is refused there
        if vouch is not None and self._cur.end < vouch.length:
            self._stale = True
            raise cut_error(j.path, self._cur.end, vouch)
        self._synced = self._cur.durable
        self._stale = False

    def _create(self) -> Header:
        """Create the journal of a new store, after making sure there was none: a lock file
        that records synced bytes of a journal (``journal.Vouch``) proves one existed, and
        a store is never reset to empty without being asked. The new journal is recorded
        there at once, so that from now on its loss is noticed too."""
        fd = self._lock.descriptor()
        vouch = read_vouch(fd) if fd is not None else None
        if vouch is not None:
            raise missing_error(self._journal.path, vouch)
        header = self._journal.create()
        self._vouch(header.crc, header.start, 0, "creation")
        return header

    def _vouch_for(self, header: Header) -> Vouch | None:
        """What the lock file says was synced of the journal just opened (None: nothing,
        or it speaks of another file): no part of it is cut as a torn write, and a journal
        found shorter is refused (``_load``). One ``pread`` of the lock file, when the
        view is (re)built."""
        fd = self._lock.descriptor()
        vouch = read_vouch(fd) if fd is not None else self._journal.peek_vouch()
        return vouch if vouch is not None and vouch.applies_to(header) else None

    def _vouch(self, header_crc: int, length: int, seq: int, by: str, *,
               sync: bool = True) -> None:
        """Record in the lock file that the first ``length`` bytes of the journal whose
        header has CRC ``header_crc`` are synced (see ``journal.Vouch``): at a clean close,
        a checkpoint and a compaction only, never per operation."""
        fd = self._lock.descriptor()
        if fd is None:
            return
        write_vouch(fd, Vouch(self._journal.store_id, header_crc, length, seq, by), sync=sync)

    def _load_checkpoint(self, header: Header, end: int | None = None) -> bool:
        """Open at the last checkpoint line after the base: take the view it describes
        (reading only its non-terminal runs); the lines before it are indexed, and parsed,
        when first needed. What a power loss may have torn must be seen, and recovered, at
        opening: a checkpoint written in an earlier boot of the machine is taken only when
        the lines before it that were not yet synced are sound (``Journal.lines_follow``).
        ``end``: look only before it (default: the end of the file). False (no such
        checkpoint): open as before."""
        j, cur = self._journal, self._cur
        assert j.fd is not None and cur is not None
        tail = header.base_end if header.summary is not None else header.start
        found = j.last_checkpoint(tail, os.fstat(j.fd).st_size if end is None else end)
        if found is None:
            return False
        at, end, point = found
        if point.next_seq < cur.next_seq:
            return False
        if ((not point.boot or point.boot != owner.boot_id())
                and not j.lines_follow(max(tail, point.durable), at, point.next_seq)):
            return False
        try:
            if not self._take_active(point.active):
                return False
        except CorruptStoreError:
            return False  # opened line by line, which says what is wrong
        self._recent.clear()  # the offsets of the changes before it are found when indexing
        self._lines = point.lines
        self._max_id = max(self._max_id, point.max_id)
        self._base_count = point.runs
        self._lazy = True
        self._opened_at = at, point
        cur.end, cur.next_seq, cur.checkpoint_seq = end, point.next_seq, point.next_seq
        cur.durable = max(cur.durable, point.durable)
        return True

    def _take_active(self, offsets: Iterable[int]) -> bool:
        """Take in the non-terminal runs whose latest versions a summary or a checkpoint
        lists (the rest of what it describes is indexed when first needed, and these runs'
        offsets found again then); False, taking in nothing, when one of the lines is not
        a non-terminal run's."""
        j = self._journal
        records = []
        for offset in offsets:
            data = self._decode_at(offset, j.read_line(offset))
            if data["status"] not in _ACTIVE:
                return False
            records.append((offset, data))
        for offset, data in records:
            self._ingest_record(offset, data)
        self._index.clear()
        return True

    def _load_summarised_base(self, header: Header) -> bool:
        """Take the base from the header's summary: read only its non-terminal runs and
        the offsets of its retained history; the rest is indexed, and its CRC-32 checked,
        when first needed. False (read it line by line instead) when the file is shorter
        than the base or the summary's runs are not non-terminal records."""
        summary, cur, j = header.summary, self._cur, self._journal
        assert summary is not None and cur is not None and j.fd is not None
        if os.fstat(j.fd).st_size < header.base_end:
            return False
        history = self._history_at(header)
        if not self._take_active(header.start + rel for rel in summary.active):
            return False
        self._lazy = True
        self._base_count = summary.lines
        self._lines = summary.lines + len(history)
        self._recent.extend(history)
        self._max_id = max(self._max_id, summary.max_id)
        cur.end = header.base_end
        cur.next_seq = header.compacted_through + 1 + len(history)
        return True

    def _refuse_damaged_base(self, header: Header) -> None:
        """The base fails its CRC-32: raise ``CorruptStoreError`` at its first bad line."""
        for chunk_at, chunk in self._journal.read_lines(header.start, header.base_end):
            pos = 0
            while pos < len(chunk):
                nl = chunk.find(b"\n", pos)
                end = len(chunk) if nl < 0 else nl
                self._decode_at(chunk_at + pos, chunk[pos:end])  # raises at a damaged line
                pos = end + 1
        raise CorruptStoreError(self._journal.path, header.start,
                                "the compacted base does not match the checksum in its "
                                "header (lines were removed, reordered or edited)")

    def _decode_at(self, offset: int, line: bytes) -> dict[str, Any]:
        try:
            data = codec.decode_line(line)
            codec.check_record(data)
        except codec.BadLine as exc:
            raise CorruptStoreError(self._journal.path, offset,
                                    f"a stored run is unreadable: {exc.reason}") from None
        return data

    def _ingest_from(self, start: int, end: int | None = None, defer: bool = False,
                     about: str | None = None) -> None:
        """Take the file from ``start`` to its end into the view, about a megabyte at a
        time, so that a long history is never held in memory at once. With ``about``,
        records that are not about it are held instead (``_hold``)."""
        j = self._journal
        assert j.fd is not None
        if end is None:
            end = os.fstat(j.fd).st_size
        cur = self._cur
        assert cur is not None
        for chunk_at, chunk in j.read_lines(start, end):
            result = scan(chunk, chunk_at, cur)
            if about is not None and result.damage is None and self._hold(result.records,
                                                                          about):
                continue
            try:
                self._take_held()  # the records before these first
                for offset, data in result.records:
                    self._ingest_record(offset, data, defer)
            except BaseException:
                self._stale = True
                raise
            if result.damage is not None:  # judged against everything after it
                if self._recover(result.damage):
                    self._ingest_from(result.damage.offset, None, defer, about)
                return

    def _hold(self, records: list[tuple[int, dict[str, Any]]], about: str) -> bool:
        """Hold ``records`` when none of them is about ``about`` (its id or machine) and
        each can be taken in without structuring it (so taking them in later cannot
        fail); the greatest id among them counts at once (new ids sort after it)."""
        top = self._max_id
        for _offset, data in records:
            run_id, machine = data["id"], data.get("machine")
            if run_id == about or machine == about or type(machine) is not str:
                return False
            if run_id > top:
                top = run_id
        self._max_id = top
        self._held += records
        return True

    def _take_held(self) -> None:
        """Take the held records into the view (before this process's own lines, which
        follow them in the file); on failure the view is reloaded next time."""
        if not self._held:
            return
        held, self._held = self._held, []
        try:
            for offset, data in held:
                self._ingest_record(offset, data, defer=True)
        except BaseException:
            self._stale = True
            raise

    def _recover(self, damage: Damage) -> bool:
        """A damaged line: when it can only be a torn, unsynced write, the view ends before
        it and it is remembered (``_torn``) for the next write to cut (a read never changes
        the file, and a write in progress looks the same to a read without the flock);
        raise, leaving the file untouched, when it lies in data known to be durable. The
        rest of the file is judged as it is read, a megabyte at a time. True when the line
        is whole now (read again): to be read on from it."""
        cur, j = self._cur, self._journal
        assert cur is not None and j.fd is not None
        self._stale = True  # whatever happens next, do not trust this view without a reload
        end = os.fstat(j.fd).st_size
        again = scan(j.pread(j.fd, min(end - damage.offset, _READ_AGAIN), damage.offset),
                     damage.offset, attrs.evolve(cur))
        if again.records or (again.damage is not None and again.damage.offset > damage.offset):
            # whole now: a write that was in progress when the line was first read (a read
            # without the flock may see one)
            self._stale = False
            return True
        verdict = judge(j.reader(), end, cur, damage)
        if verdict is not None:
            raise CorruptStoreError(j.path, damage.offset,
                                    f"line {j.line_number(damage.offset)}: {verdict}")
        self._torn = damage, end
        self._stale = False
        return False

    def _before_writing(self) -> None:
        """Under the flock, before this process changes the file: refuse on a store it can
        only read (``ReadOnlyStoreError``), cut the torn tail the catch-up found (only a
        write cuts one) and remove the temp files a crashed compaction left."""
        j = self._journal
        if self._lock_error is not None or j.read_only:
            raise self._read_only_error()
        torn, self._torn = self._torn, None
        if torn is not None:
            j.truncate(torn[0].offset, torn[0].reason)
        if not self._temps_checked:
            self._temps_checked = True
            j.remove_stale_temps()

    # -- the one read-modify-write path -------------------------------------------------

    def _transact(self, decide: Callable[[], _Decision[T]],
                  early: Callable[[], None] | None = None, about: str | None = None,
                  shows: bool = True, wait: float | None = None) -> T:
        """Run ``decide`` under the lock on an up-to-date view and store what it returns.
        ``early`` runs before, with only the mutex held (see ``_write_step``). ``about``:
        the one run id or machine ``decide`` looks at, when it looks at no other run and
        creates no run on another machine (see ``_catch_up``); None when it may look at
        any. ``shows``: the result may show what the view holds, so in durable mode the
        view is made durable before it is returned (``_make_visible``); False for calls
        that return nothing of it (opening, closing). ``wait``: how long to wait for the
        lock (default ``lock_timeout``)."""
        if self._closed:
            raise ValueError(f"the store at {self.state_dir} is closed")
        if self._lock_error is not None:
            return self._transact_unlocked(decide)
        lock = self._lock
        try:
            lock.acquire(self.lock_timeout if wait is None else wait, early)
        except ReadOnlyStoreError as exc:  # no lock file, and it cannot be created here
            self._lock_error = exc
            return self._transact_unlocked(decide)
        wrote_to = -1
        try:
            self._catch_up(about)
            if self._resync:
                # a sync failed earlier: Linux may have marked those pages clean without
                # writing them ("fsyncgate"), so a later sync would not cover them and a
                # later acknowledged line could sit behind a hole after a power loss.
                # Rewrite the whole file (temp, fsync, rename, fsync dir) before going on.
                self._take_held()
                self._leave_out_unsynced()
                self._compact()
                self._resync = False
                self._intact = None
            result, changes = decide()
            if changes:
                wrote_to = self._append(changes)
        except BaseException as exc:
            if isinstance(exc, StoreIOError) and exc.kind in _RESYNC_KINDS:
                if exc.kind is IOKind.SYNC:  # syncing what it had written (close)
                    self._keep_intact()
                self._resync = True
            if self._appended is not None:  # written but not in the view: reload next time
                self._appended = None
                self._stale = True
            with contextlib.suppress(Exception):  # on failure it leaves the view stale
                self._take_held()
            self._made.clear()
            lock.release()
            raise
        lock.release_file()
        try:
            # the lines are in the file; the view is this process's own, so it is brought up
            # to date with the mutex alone while other processes go on
            appended = self._appended
            self._index_appended()
            if wrote_to >= 0 and self.durable and self._synced < wrote_to:
                try:
                    self._journal.sync()
                except StoreIOError:
                    # after a failed sync, trust only what was synced before
                    self._keep_intact(appended[2] if appended else -1, wrote_to)
                    self._resync = True
                    raise
                if wrote_to > self._synced:
                    self._synced = wrote_to
            elif wrote_to < 0 and shows and self.durable:
                self._make_visible()
            if wrote_to >= 0 and self._compaction_due():
                try:
                    self._compact_beside()
                except StoreIOError as exc:  # housekeeping: the change itself is stored
                    self._compact_retry_at = self._lines + _COMPACT_RETRY_LINES
                    log_warning("runstore: automatic compaction of %s failed (%s); the "
                                "change was stored; trying again after %d more lines",
                                self._journal.path, exc, _COMPACT_RETRY_LINES)
        finally:
            lock.release_mutex()
        return result

    def _transact_unlocked(self, decide: Callable[[], _Decision[T]]) -> T:
        """``_transact`` on a store whose lock file cannot be opened for writing (a
        read-only copy or mount): ``decide`` looks at a view caught up without the flock,
        and a decision to write raises ``ReadOnlyStoreError``, writing nothing."""
        lock = self._lock
        lock.acquire_mutex(self.lock_timeout)
        try:
            self._catch_up_reading()
            result, changes = decide()
            if changes:
                raise self._read_only_error()
            return result
        finally:
            self._made.clear()
            lock.release_mutex()

    def _append(self, changes: _Changes) -> int:
        """Append one line per change; return the new end of the file. The view learns of
        them in ``_index_appended`` (which may run after the flock is released)."""
        self._before_writing()
        cur = self._cur
        assert cur is not None
        now = _utcnow()
        durable = self._synced  # the greater of it and cur.durable (max() costs more)
        if cur.durable > durable:
            durable = cur.durable
        seq = cur.next_seq
        head = b""
        if seq - cur.checkpoint_seq >= CHECKPOINT_EVERY:
            self._take_held()  # the view is complete here
            head = codec.encode_checkpoint(codec.Checkpoint(
                durable=durable, next_seq=seq, lines=self._lines, runs=self._live(),
                max_id=self._max_id, active=tuple(self._active_at.values()),
                boot=owner.boot_id()))
            if self._header is not None and durable > cur.vouched:
                # what the checkpoint says was synced: one pwrite per CHECKPOINT_EVERY
                # records, not synced (a lost one leaves an older, shorter vouch)
                with contextlib.suppress(OSError):
                    self._vouch(self._header.crc, durable, 0, "checkpoint", sync=False)
                    cur.vouched = durable
        lines = []
        for change, run in changes:
            made = self._made.pop(run.id, None)
            if made is not None and made[0] is run:
                fields = made[1]  # made, and checked, by ``checked_fields`` (``_write_step``)
            else:
                fields = codec.checked_fields(run, self._extras.get(run.id))
            lines.append(codec.encode_record(seq, change, now, durable, run, None, fields))
            seq += 1
        start = cur.end
        try:
            self._journal.append(head + b"".join(lines), start)
        except StoreIOError:
            self._stale = True
            raise
        if head:
            cur.checkpoint_seq = cur.next_seq
            start += len(head)
        end = start + sum(map(len, lines))
        cur.end, cur.next_seq = end, seq
        self._unmarked_writes = True
        self._appended = (changes, lines, start, now)
        return end

    def _index_appended(self) -> None:
        """Take the held records, then the lines ``_append`` wrote (which follow them) into
        the view (on failure: reload next time)."""
        appended, self._appended = self._appended, None
        self._take_held()
        if appended is None:
            return
        changes, lines, offset, now = appended
        try:
            for (change, run), line in zip(changes, lines, strict=True):
                self._recent.append(offset)
                self._index_version(offset, run.id, None if run.status.is_terminal else run,
                                    now, change.value)
                offset += len(line)
        except BaseException:
            self._stale = True
            raise

    def _compaction_due(self) -> bool:
        """Whether the lines that are not a run's latest version exceed what the file may
        hold beyond its live runs."""
        live = self._live()
        # the greater of the two, as max() gives it, without its call
        beyond = COMPACT_MIN_SUPERSEDED if live < COMPACT_MIN_SUPERSEDED else live
        return self._lines - live > RETAIN_CHANGES + beyond

    def _compact(self, retain: int = RETAIN_CHANGES, pruned: _Pruned | None = None) -> None:
        """Rewrite the file now, the lock held (``compact()``, and after a failed sync):
        see ``compaction.plan``. ``pruned``: runs to leave out, their ``run_pruned``
        changes written into the retained history of the new file (``prune()``: one
        rename, so that a failure leaves the file as it was)."""
        self._before_writing()
        plan = self._plan_compaction(retain, pruned)
        failpoints.hit("compact.before_rewrite")
        seq = plan.compacted_through + len(plan.history)
        try:
            self._journal.replace_with(plan.chunks(), lambda: self._vouch(
                zlib.crc32(plan.head[:-1]), plan.base_end, seq, "compaction"))
            self._header = self._journal.open()
        except BaseException:
            self._stale = True
            raise
        cur = self._cur
        assert cur is not None
        for run_id in pruned.ids if pruned is not None else ():
            self._extras.pop(run_id, None)
        cur.next_seq = plan.compacted_through + 1 + len(plan.history)
        self._adopt(plan, {}, plan.base_end)
        self._unmarked_writes = False  # all this process wrote is in the synced new file

    def _plan_compaction(self, retain: int = RETAIN_CHANGES,
                         pruned: _Pruned | None = None) -> compaction.Plan:
        """Lay out the compaction of the file as far as the view has read it, keeping the
        last ``retain`` changes verbatim for lagging watchers. ``pruned``: runs left out,
        laid out as if their ``run_pruned`` lines had been appended first
        (``compaction.with_tail``); the view is not changed. Only the lines the retained
        history can keep are encoded (``pruned.last``): the earlier ones take their seqs
        and are compacted away, so they are never read."""
        self._ensure_index()
        self._active.values()  # structure deferred records now: refuse a malformed one
        cur, header = self._cur, self._header
        assert cur is not None and header is not None
        j = self._journal
        read, index, next_seq = j.reader(), self._index, cur.next_seq
        recent = collections.deque(self._recent, maxlen=self._recent.maxlen)
        if pruned is not None and pruned.count:
            now, durable = _utcnow(), max(self._synced, cur.durable)
            gone = pruned.ids
            index = {run_id: at for run_id, at in index.items() if run_id not in gone}
            lines = []
            at = cur.end
            next_seq += pruned.count - len(pruned.last)
            for offset, data in pruned.last:
                line = codec.encode_record(next_seq, ChangeType.RUN_PRUNED, now, durable,
                                           self._run_of(data, offset),
                                           codec.extra_fields(data) or None)
                recent.append(at)
                at += len(line)
                next_seq += 1
                lines.append(line)
            read = compaction.with_tail(read, cur.end, b"".join(lines))
        history = list(recent)[len(recent) - retain:] if retain else []
        return compaction.plan(read, index, self._active, history,
                               store_id=header.store_id, created=header.created,
                               next_seq=next_seq, max_id=self._max_id, old_end=cur.end,
                               path=j.path)

    def _adopt(self, plan: compaction.Plan, tail: dict[int, int], end: int) -> None:
        """Point the view at the new file ``plan`` laid out (now in place, synced to
        ``end``); ``tail`` maps the lines copied after its base (old -> new offsets): the
        versions others wrote while it was being written, which the view has taken in."""
        index = plan.index
        if tail:
            old_end = plan.old_end
            for run_id, old in self._index.items():  # new runs go last, as in the view
                if old >= old_end:
                    index[run_id] = tail[old]
            if len(index) != len(self._index):  # runs pruned in those lines
                for run_id in [r for r in index if r not in self._index]:
                    del index[run_id]
        self._index = index
        self._active_at = {run_id: index[run_id] for run_id in self._active_at}
        self._recent = collections.deque([*plan.history, *tail.values()],
                                         maxlen=RETAIN_CHANGES)
        cur = self._cur
        assert cur is not None
        self._cur = Cursor(end=end, next_seq=cur.next_seq, durable=end,
                           latest_end=plan.latest_end, base_end=plan.base_end,
                           compacted_through=plan.compacted_through,
                           checkpoint_seq=plan.compacted_through + 1, vouched=end)
        self._synced = end
        self._lines = plan.lines + len(tail)

    def _compact_beside(self) -> None:
        """Automatic compaction without stopping other processes for it: with only the mutex
        held, write the compacted file as far as the view has read it to a temp file and
        sync it; then, under the flock again, copy what others appended meanwhile after it
        (``compaction.reseal_tail``) and rename it into place. Skipped when another process
        is doing it (its temp file is flocked), given up (a later write tries again) when the
        file was replaced meanwhile or the flock cannot be had in ``lock_timeout``, and on an
        I/O error (the caller logs it: the write that found compaction due was stored)."""
        j = self._journal
        if self._lines < self._compact_retry_at:
            return
        fd: int | None = j.claim_compaction_temp()
        if fd is None:  # another process is compacting: let it, and ask again later
            self._compact_retry_at = self._lines + _COMPACT_RETRY_LINES
            return
        installed: tuple[compaction.Plan, dict[int, int], int] | None = None
        try:
            plan = self._plan_compaction()
            failpoints.hit("compact.before_rewrite")
            j.write_temp(fd, plan.chunks())
            try:
                self._lock.acquire_file(self.lock_timeout)
            except LockTimeoutError:
                return
            try:
                st = os.fstat(j.fd) if j.fd is not None else None
                if st is None or st.st_nlink == 0 or st.st_size < plan.old_end:
                    return  # replaced or cut meanwhile: the next operation reloads
                self._catch_up()
                cur = self._cur
                if (self._stale or self._lazy or cur is None or cur.end < plan.old_end
                        or self._torn is not None):  # the next write cuts it, and logs it
                    return
                self._active.values()  # structure what the catch-up deferred, as _plan does
                appended = b"".join(chunk for _, chunk in j.read_lines(plan.old_end, cur.end))
                tail, moves = compaction.reseal_tail(appended, plan.old_end, plan.base_end,
                                                     plan.base_end, j.path, cur.legacy)
                installing, fd = fd, None
                self._stale = True  # until the view is adopted
                length, seq = plan.base_end + len(tail), cur.next_seq - 1
                j.install_temp(COMPACTING_NAME, installing, tail, lambda: self._vouch(
                    zlib.crc32(plan.head[:-1]), length, seq, "compaction"))
                self._header = j.open()
                installed = plan, moves, plan.base_end + len(tail)
            finally:
                self._lock.release_file()
        finally:
            if fd is not None:
                j.abandon_temp(COMPACTING_NAME, fd)
        if installed is not None:  # the view is this process's own: the mutex is enough
            self._adopt(*installed)
            self._stale = False

    # -- reading runs -------------------------------------------------------------------

    def _run_at(self, offset: int, line: bytes | None = None) -> Run:
        raw = self._journal.read_line(offset) if line is None else line
        try:
            data = codec.decode_line(raw)
            run = codec.run_from_dict(data)
        except codec.BadLine as exc:
            raise CorruptStoreError(self._journal.path, offset,
                                    f"a stored run is unreadable: {exc.reason}") from None
        extra = codec.extra_fields(data)
        if extra:  # a base opened from its summary learns unknown fields as runs are read
            self._extras[run.id] = extra
        return run

    def _lookup(self, run_id: str) -> Run:
        """The run with this id (already checked by ``_validate.run_id``)."""
        run = self._active.get(run_id)
        if run is not None:
            return run
        offset = self._index.get(run_id)
        if offset is None and self._lazy:
            self._ensure_index()
            offset = self._index.get(run_id)
        if offset is None:
            raise RunNotFoundError(run_id, self._journal.path)
        return self._run_at(offset)

    def _all_runs(self) -> Iterator[Run]:
        """Every run, in insertion order; the file is read in pieces, never whole."""
        self._ensure_index()
        j, index = self._journal, self._index
        lines = gather.lines(j.reader(), array.array("q", index.values()), j.path)
        for (run_id, offset), line in zip(index.items(), lines, strict=True):
            run = self._active.get(run_id)
            yield self._run_at(offset, line) if run is None else run

    # -- the public contract ------------------------------------------------------------

    def prepare_atomic(
        self, machine: str, test_dir_hash: str, make: Callable[[], Run], *, reap: bool = False
    ) -> tuple[Run, PrepareOutcome]:
        """In one critical section: return the machine's non-terminal run (REUSE when its
        hash matches, else BUSY), or call ``make()`` and store its run as pending (CREATED).
        With ``reap=True`` a non-terminal run whose owner process is provably gone is first
        interrupted (``error_code="owner_gone"``) in the same critical section."""
        _validate.prepare_atomic(machine, test_dir_hash, make, reap)

        def decide() -> _Decision[tuple[Run, PrepareOutcome]]:
            reaped: _Changes = []
            if reap:
                now = _utcnow()
                for run_id in list(self._machines.get(machine, ())):
                    dead = reaping.reaped(self._active[run_id], None, now, None)
                    if dead is not None:
                        reaped.append((ChangeType.RUN_REAPED, dead))
            if reaped:
                return self._create_after(reaped, machine, test_dir_hash, make)
            peers = self._machines.get(machine)
            if peers:
                active = self._active[peers[0]]
                same = active.test_dir_hash == test_dir_hash
                return (active, PrepareOutcome.REUSE if same else PrepareOutcome.BUSY), []
            return self._create_after([], machine, test_dir_hash, make)

        return self._transact(decide, about=machine)

    def _create_after(
        self, before: _Changes, machine: str, test_dir_hash: str,
        make: Callable[[], Run],
    ) -> _Decision[tuple[Run, PrepareOutcome]]:
        made = transitions.check_made(make(), machine, test_dir_hash)
        run = self._new(transitions.validate(transitions.as_pending(made)))
        return (run, PrepareOutcome.CREATED), [*before, (ChangeType.RUN_CREATED, run)]

    def _new(self, run: Run) -> Run:
        """The first stored version of a validated ``run``: a new id, revision 1 and, when
        non-terminal, this process as owner."""
        return transitions.fresh(run, ids.new_run_id(self._max_id), owner.current())

    def create(self, run: Run) -> Run:
        """Store ``run`` under a new unique id (any id it has is overwritten)."""
        run = transitions.validate(run)

        def decide() -> _Decision[Run]:
            if not run.status.is_terminal and run.machine in self._machines:
                occupant = self._active[self._machines[run.machine][0]]
                raise MachineBusyError(run.machine, occupant.id)
            new = self._new(run)
            return new, [(ChangeType.RUN_CREATED, new)]

        return self._transact(decide, about=run.machine)

    def get(self, run_id: str) -> Run:
        """The run with this id; ``RunNotFoundError`` if there is none."""
        _validate.run_id(run_id)
        return self._read(lambda: self._lookup(run_id), run_id)

    def _read(self, answer: Callable[[], T], about: str | None = None) -> T:
        """A read-only ``answer`` from the view: at once, without the flock, when the view
        is current for it (``_current_for``); otherwise after catching up under the flock
        (waiting at most ``_READ_LOCK_WAIT``), as a write would but changing nothing (a
        torn tail is left for the next write to cut). When no lock file can be taken (a
        read-only copy, a store no process has written to since it was opened) or a writer
        holds the lock longer (one may be stopped holding it), it catches up without the
        flock, from the complete lines written so far, so that a read never waits for a
        writer. After a failed sync it goes through ``_transact`` (which rewrites the file
        first). ``about``: the one run id or machine the answer depends on; None when it
        may depend on any run."""
        if self._closed:
            raise ValueError(f"the store at {self.state_dir} is closed")
        lock = self._lock
        lock.acquire_mutex(self.lock_timeout)
        try:
            if self._intact is not None and self._answer_intact():
                return answer()
            if self._current_for(about):
                self._make_visible()
                return answer()
            if self._resync:
                pass
            elif lock.descriptor() is None:
                return self._answer_unlocked(answer)
        finally:
            lock.release_mutex()
        if not self._resync:
            # under the flock when it comes soon: the lines of an append still being
            # written, or one that fails and is cut back, are never seen then
            try:
                return self._transact(lambda: (answer(), []), about=about,
                                      wait=min(self.lock_timeout, _READ_LOCK_WAIT))
            except LockTimeoutError:
                pass  # a writer holds the lock, and may be stopped: read on without it
            lock.acquire_mutex(self.lock_timeout)
            try:
                return self._answer_unlocked(answer)
            finally:
                lock.release_mutex()
        return self._transact(lambda: (answer(), []))

    def _answer_unlocked(self, answer: Callable[[], T]) -> T:
        """``answer`` after catching up without the flock (the mutex held): it neither
        waits for the writers' lock nor changes the file (a torn tail is left for the next
        write to cut)."""
        self._catch_up_reading()
        self._make_visible()
        return answer()

    def _make_visible(self) -> None:
        """In durable mode, with the mutex held: make the bytes the view holds durable
        before an answer from them leaves this call. Another process appends under the
        flock and syncs after releasing it (group commit), so the view may hold its lines
        before they are durable, and a caller could act on a change that a power loss
        then takes back. One ``fdatasync`` here (any descriptor of the file covers all of
        it) makes them durable; it is skipped when this process's own syncs, or the
        records' ``durable`` offsets written by others after theirs, already vouch for
        them. When the sync fails, nothing is shown (``IOKind.SYNC_READ``) and the next
        call rewrites the file first (through a synced temp file), as after a write's
        failed sync, so that whatever it shows then is durable."""
        cur, j = self._cur, self._journal
        if (not self.durable or cur is None or j.fd is None
                or cur.end <= self._synced or cur.end <= cur.durable):
            return
        try:
            j.sync()
        except StoreIOError as exc:
            self._stale = self._resync = True
            raise StoreIOError(j.path, "syncing what a read shows of", exc.cause,
                               IOKind.SYNC_READ) from None
        self._synced = cur.end

    def _keep_intact(self, start: int = -1, end: int = -1) -> None:
        """A sync of appended lines (this process's own at ``start:end``, when known)
        failed: Linux may have dropped the pages it could not write, and a retried sync
        that succeeds would not prove them written. Until the file is rewritten (the next
        write does it first), reads answer from the bytes of this journal that were known
        synced before the failure (``_answer_intact``); the view is rebuilt from them when
        first read."""
        self._stale = True
        j = self._journal
        if j.fd is None:
            return
        try:
            st = os.fstat(j.fd)
        except OSError:
            return
        if self._intact is None or self._intact[:2] != (st.st_dev, st.st_ino):
            self._intact = (st.st_dev, st.st_ino, self._synced, start, end)

    def _leave_out_unsynced(self) -> None:
        """Before the rewrite after a failed sync, under the flock: when the lines this
        process failed to sync are still the last of the file (no process wrote after
        them, so no change depends on them), rebuild the view up to where they begin, so
        that the rewrite leaves them out and the failed change is not in the store, as
        reads have shown since the failure. Otherwise the rewrite keeps them with what
        others wrote after them."""
        j, intact = self._journal, self._intact
        if intact is None or j.fd is None:
            return
        dev, ino, _synced, start, end = intact
        st = os.fstat(j.fd)
        if start >= 0 and (st.st_dev, st.st_ino, st.st_size) == (dev, ino, end):
            self._load_intact(start)

    def _answer_intact(self) -> bool:
        """After a failed sync, until the rewrite (``_intact``), with the mutex held: bring
        the view to the bytes known synced before the failure, which never change, and
        answer from it without the flock and without catching up, so that the lines whose
        sync failed are not shown. False (answer as usual) when this process forked or the
        journal open now is not that file."""
        j, intact = self._journal, self._intact
        if intact is None or j.fd is None or self._pid != owner.pid():
            return False
        dev, ino, limit, _start, _end = intact
        st = os.fstat(j.fd)
        if (st.st_dev, st.st_ino) != (dev, ino) or st.st_size < limit:
            return False
        cur = self._cur
        if self._stale or cur is None or cur.end != limit:
            self._load_intact(limit)
        return True

    def _load_intact(self, limit: int) -> None:
        """Rebuild the view from the first ``limit`` bytes of the journal open now (all of
        them synced: damage there is reported, never cut off), as ``_load`` does from the
        whole file, without reopening it or taking the flock."""
        j = self._journal
        assert j.fd is not None
        self._stale = True
        first = j.pread(j.fd, 65536, 0)
        nl = first.find(b"\n")
        if nl < 0:
            raise CorruptStoreError(j.path, 0, "the header line is truncated")
        header = parse_header(first[:nl], j.path)
        self._reset_view()
        self._header = header
        cur = self._cur = cursor_after_header(header, header.start)
        cur.durable = max(cur.durable, limit)
        start = header.start
        if self._load_checkpoint(header, limit):
            start = cur.end
        elif header.summary is not None and self._load_summarised_base(header):
            start = header.base_end
        self._ingest_from(start, limit)
        self._synced = limit
        self._stale = False

    def _current_for(self, about: str | None) -> bool:
        """True when the view answers for ``about`` as the journal would now: the file open
        is still the one at the journal's path (a compaction elsewhere replaces it; a
        deleted or renamed journal is refused under the lock) and none of the lines appended
        since the view was brought up to date (if any, and at most ``_UNREAD_LIMIT``
        bytes) mentions it (as a JSON string, quotes included: every line of that run or
        machine holds it so); with ``about`` None, when nothing was appended. Those lines
        are left for the next catch-up.

        Linearizable: a change completes its ``write`` before it is acknowledged, so a
        change acknowledged before this call shows, in full, in the bytes read here; one
        still being made is not acknowledged yet and may be ordered after this read."""
        j, cur = self._journal, self._cur
        if (self._stale or self._resync or cur is None or j.fd is None
                or self._pid != owner.pid()):
            return False
        st = j.stat_path()  # the path's: a renamed or deleted journal is not read from
        if st is None or (st.st_dev, st.st_ino) != j.identity:
            return False
        unread = st.st_size - cur.end
        if not 0 <= unread <= _UNREAD_LIMIT:
            return False
        return unread == 0 or (about is not None and codec.json_string(about)
                               not in j.fs.pread(j.fd, unread, cur.end))

    def update(self, run: Run) -> Run:
        """Replace the stored run with the same id; returns what was stored.

        Refuses a stale copy (``ConflictError``), a forbidden status change
        (``InvalidTransitionError``) and a change of machine or hash (``InvalidRunError``).
        An unchanged copy of a terminal run is an idempotent no-op.
        """
        run = _validate.updated_run(run)
        return self._write_step(run.id, lambda stored: transitions.updated(stored, run))

    def start(self, run_id: str) -> Run:
        """pending -> running: sets ``started_at`` and makes this process the owner."""
        _validate.run_id(run_id)
        return self._write_step(run_id, lambda stored: transitions.started(
            stored, _utcnow(), owner.current()))

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
        return self._write_step(run_id, lambda stored: transitions.finished(
            stored, target, _utcnow(), exit_code, error_code, error_msg))

    def heartbeat(self, run_id: str) -> Run:
        """Refresh ``heartbeat_at`` of a non-terminal run (as cheap as any update)."""
        _validate.run_id(run_id)
        return self._write_step(run_id, lambda stored: transitions.beat(stored, _utcnow()))

    def _write_step(self, run_id: str,
                    step_of: Callable[[Run], transitions.Step | None]) -> Run:
        """Store the run's next version by ``step_of`` (None: unchanged, nothing written).

        The next version and its line's run fields are first made from this process's view,
        with the mutex held but before the flock (where this process may wait for another
        one's critical section); under the flock they are used only if catching up brought
        no newer version of the run (the view still holds the very ``Run`` they were made
        from), else made again from the stored run. The critical section then holds only
        the checks and the append."""
        early: list[tuple[Run, transitions.Step | None, bytes]] = []

        def guess() -> None:
            stored = None if self._stale else self._active.get(run_id)
            if stored is None:
                return
            try:
                step = step_of(stored)
            except RunstoreError:
                return  # decided again under the flock, where it raises for real
            fields = b"" if step is None else codec.checked_fields(step[0],
                                                                   self._extras.get(run_id))
            early.append((stored, step, fields))

        def decide() -> _Decision[Run]:
            if early and self._active.get(run_id) is early[0][0]:
                stored, step, fields = early[0]
                if step is not None:
                    self._made[run_id] = (step[0], fields)
            else:
                stored = self._lookup(run_id)
                step = step_of(stored)
            if step is None:
                return stored, []
            new, change = step
            return new, [(change, new)]

        return self._transact(decide, guess, run_id)

    def list(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> _Runs:
        """Every run (the latest version of each) matching the filters, in insertion order."""
        _validate.list_filters(machine, batch_id)
        wanted = transitions.status_set(status)

        def answer() -> _Runs:
            return [
                run for run in self._all_runs()
                if (machine is None or run.machine == machine)
                and (wanted is None or run.status in wanted)
                and (batch_id is None or run.batch_id == batch_id)
            ]

        return self._read(answer)

    def iter_runs(
        self,
        *,
        machine: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        batch_id: str | None = None,
    ) -> Iterator[Run]:
        """The runs ``list()`` returns with the same filters, in the same (insertion) order,
        read from the file as the iteration goes: memory stays bounded however many runs
        the store holds (about a megabyte of the file at a time, plus the offsets of the
        versions written since the last compaction).

        The runs are those of the file as it was at the call (a descriptor of it is kept
        until the iteration ends or the iterator is dropped); changes made meanwhile are
        not seen. A damaged line raises ``CorruptStoreError`` when the iteration reaches
        it, and a compacted base that fails its header's checksum when the base has been
        read (each line is checked against its own checksum before it is yielded)."""
        return self._runs(machine=machine, status=status, batch_id=batch_id)

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
        """``codec.run_to_json`` of each run ``_runs`` yields with the same arguments,
        read the same way, made straight from each record's fields
        (``codec.exported_dict``) unless they are not as this library writes them (the
        CLI's ``list --json`` and ``--jsonl``)."""
        keep = _record_filter(machine, status, batch_id)
        for offset, data in self._selected(keep, limit):
            fields = codec.exported_dict(data, extras=False)
            yield (fields if fields is not None
                   else codec.run_to_json(self._run_of(data, offset)))

    def _selected(self, keep: Callable[[dict[str, Any]], bool],
                  limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, record) of the runs ``keep`` takes (``_stream_records``), or of the
        last ``limit`` of them."""
        if limit is None:
            return (item for item in self._stream_records() if keep(item[1]))
        records = self._stream_records()
        try:
            last = runscan.last_records(records.journal, records.fd, records.snap, limit,
                                        keep)
        finally:
            records.close()
        return iter(last)

    def _stream_records(self) -> _HeldRecords:
        """(offset, record) of every run's latest version, insertion order, read as the
        iteration goes from the file as it is now (``runscan``)."""

        def snapshot() -> tuple[int, runscan.Snapshot]:
            header, cur = self._header, self._cur
            assert header is not None and cur is not None
            if self._lazy:
                point = self._opened_at
                snap = runscan.Snapshot(
                    header, cur.end, dict(self._index), set(self._tail_pruned),
                    None if point is None else (point[0], point[1].next_seq))
            else:
                snap = runscan.Snapshot(header, cur.end, {}, set(),
                                        offsets=array.array("q", self._index.values()))
            return self._journal.hold(), snap

        fd, snap = self._read(snapshot)
        return _HeldRecords(self._journal, fd, snap)

    def _run_of(self, data: dict[str, Any], offset: int) -> Run:
        try:
            return codec.run_from_dict(data)
        except codec.BadLine as exc:
            raise CorruptStoreError(self._journal.path, offset,
                                    f"a stored run is unreadable: {exc.reason}") from None

    def active_by_machine(self, machine: str) -> Run | None:
        """The earliest-inserted non-terminal run of ``machine``, or None."""
        _validate.text("machine", machine)

        def answer() -> Run | None:
            peers = self._machines.get(machine)
            return self._active[peers[0]] if peers else None

        return self._read(answer, machine)

    def active(self) -> _Runs:
        """Every non-terminal run, in insertion order."""
        return self._read(lambda: self._active.values())  # the view's, after any reload

    def find_by_test_dir_hash_and_machine(self, test_dir_hash: str, machine: str) -> _Runs:
        """Every run of ``machine`` with this hash, in insertion order."""
        _validate.find(test_dir_hash, machine)
        return [r for r in self.list(machine=machine) if r.test_dir_hash == test_dir_hash]

    def compact(self) -> None:
        """Rewrite the file now, keeping only the latest version of each run."""

        def decide() -> _Decision[None]:
            self._compact()
            return None, []

        self._transact(decide)

    # -- owners and reaping -------------------------------------------------------------

    def reap(self, *, stale_after: _dt.timedelta, dry_run: bool = False) -> _Runs:
        """Interrupt every non-terminal run whose owner process on this host is gone
        (``error_code="owner_gone"``) or whose last heartbeat (or change) is older than
        ``stale_after`` (``"heartbeat_stale"``) and whose owner is not a process of this host
        that provably still runs (a step of the wall clock never reaps it); return the
        reaped runs."""
        _validate.reap(stale_after, dry_run)

        def decide() -> _Decision[_Runs]:
            now = _utcnow()
            reaped = [r for r in (reaping.reaped(run, self._changed_at.get(run.id), now,
                                                 stale_after)
                                  for run in self._active.values()) if r is not None]
            if dry_run:
                return reaped, []
            return reaped, [(ChangeType.RUN_REAPED, r) for r in reaped]

        return self._transact(decide)

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
        the pruned runs are first appended, durably, to that JSON-lines file. Returns the
        number of runs removed.

        One step: the journal is rewritten without them (their ``run_pruned`` changes in
        its retained history, for watchers) through a temp file renamed into place, so a
        failure (a full disk, a read-only directory) leaves the store as it was and raises
        ``StoreIOError`` saying that nothing was pruned; it needs no more free space than
        the smaller file. The archive is written (and synced) first; after a failure it is
        cut back to what it held before, and when even that fails the error says that it
        holds the runs, which a retry then appends again.

        An ``archive`` that is one of this store's own files (by device and inode: through
        a symlink or a hard link too), its state directory or a name inside it is refused
        with ``OutputTargetError`` before anything is opened or pruned."""
        _validate.prune(older_than, keep_last, archive, dry_run)
        if archive is not None:
            self._check_output(os.fspath(archive), "archive")

        def decide() -> _Decision[int]:
            chosen = self._doomed(older_than, keep_last)
            if dry_run:
                return sum(1 for _ in chosen), []
            first = next(chosen, None)
            if first is None:
                return 0, []
            chosen = itertools.chain((first,), chosen)
            pruned = _Pruned()

            def taken() -> Iterator[tuple[int, dict[str, Any]]]:
                for run_id, offset, data in chosen:
                    pruned.add(run_id, offset, data)
                    yield offset, data

            j = self._journal
            assert j.fd is not None
            st = os.fstat(j.fd)
            archived = -1  # the archive's size before, once the runs are in it
            try:
                if archive is not None:
                    archived = interchange.append_archive_items(os.fspath(archive), (
                        interchange.export_item(data, functools.partial(self._run_of, data,
                                                                        offset))
                        for offset, data in taken()))
                    failpoints.hit("prune.after_archive")
                else:
                    collections.deque(taken(), maxlen=0)
                self._compact(pruned=pruned)
            except StoreIOError as exc:
                raise self._prune_failed(exc, pruned.count, archive, archived,
                                         (st.st_dev, st.st_ino)) from None
            return pruned.count, []

        return self._transact(decide)

    def _doomed(self, older_than: _dt.timedelta | None,
                 keep_last: int | None) -> Iterator[tuple[str, int, dict[str, Any]]]:
        """(id, offset, record) of the runs ``prune()`` removes (``retention``'s rule), in
        insertion order, read from the file as the iteration goes: only the offsets of the
        candidates are held, never the runs. The terminal runs are the indexed ones that
        are not active, so ``keep_last`` picks its runs without reading any (a record is
        made a ``Run`` only to judge ``older_than``)."""
        self._ensure_index()
        active, index = self._active, self._index
        if keep_last is not None:
            count = max(len(index) - len(active) - keep_last, 0)
            now: _dt.datetime | None = None
        else:
            count = len(index)
            now = _utcnow()
        ids: _Ids = []
        offsets = array.array("q")
        for run_id, offset in index.items():
            if len(ids) >= count:
                break
            if run_id not in active:
                ids.append(run_id)
                offsets.append(offset)
        j = self._journal
        lines = gather.lines(j.reader(), offsets, j.path)
        for run_id, offset, line in zip(ids, offsets, lines, strict=True):
            data = self._decode_at(offset, line)
            if now is not None and older_than is not None:
                if not retention.ended_before(self._run_of(data, offset), now, older_than):
                    continue
            elif not codec.fields_sound(data):
                self._run_of(data, offset)  # refuses a malformed record, as listing does
            yield run_id, offset, data

    def _prune_failed(self, exc: StoreIOError, count: int,
                      archive: str | os.PathLike[str] | None, archived: int,
                      old: tuple[int, int]) -> StoreIOError:
        """``exc`` (a failed prune of ``count`` runs) saying what became of them: nothing
        was pruned unless the new file had been renamed over the journal ``old`` (device,
        inode); then the archive (its size before: ``archived``) is cut back."""
        runs = f"{count} run{'s' if count != 1 else ''}"
        replaced = False
        with contextlib.suppress(OSError):
            now = os.stat(DATA_NAME, dir_fd=self._journal.dir_fd, follow_symlinks=False)
            replaced = (now.st_dev, now.st_ino) != old
        if replaced and exc.kind is IOKind.SYNC_DIR:
            outcome = (f"the {runs} were pruned, but a power loss may bring them back (the "
                       "directory could not be synced); run `compact` once the disk is "
                       "healthy")
        elif replaced:
            outcome = (f"the {runs} were pruned (the rewritten journal is in place), but it "
                       "could not be reopened; the next call reopens it")
        else:
            outcome = f"nothing was pruned ({runs} were to be removed; the journal is as it was"
            if exc.kind is IOKind.ARCHIVE:
                outcome += "); fix the archive's path or free space, then retry"
            else:
                if archive is not None and archived >= 0:
                    if interchange.cut_archive(os.fspath(archive), archived):
                        outcome += ", and so is the archive"
                    else:
                        outcome += ", but the archive holds them too: a retry appends them again"
                outcome += "); free space or fix the directory's permissions, then retry"
        return StoreIOError(exc.path, exc.action, exc.cause, exc.kind, outcome)

    # -- batches ------------------------------------------------------------------------

    def batch_summary(self, batch_id: str) -> BatchSummary:
        """Counts by status and the latest run of each plan entry of a batch."""
        transitions.require_text("batch_id", batch_id)
        return BatchSummary.of(batch_id, self.list(batch_id=batch_id))

    # -- the change feed ----------------------------------------------------------------

    def changes(self, since_seq: int = 0) -> Iterator[Change]:
        """The retained changes after ``since_seq``, in order. ``HistoryTruncatedError`` when
        changes after ``since_seq`` were compacted away (resynchronise from ``list()``).
        They are read as the iteration goes, about a megabyte at a time, from the file as it
        was at the call (a descriptor of it is kept until the iteration ends)."""
        transitions.require_seq("since_seq", since_seq)

        def decide() -> _Decision[tuple[int, int, int, bool] | None]:
            cur = self._cur
            assert cur is not None
            if since_seq < cur.compacted_through:
                raise HistoryTruncatedError(since_seq, cur.compacted_through + 1)
            if since_seq >= cur.next_seq - 1:
                return None, []
            # from change since_seq + 1 when it is among the last ones the view knows the
            # offsets of (a watcher's usual case: not the whole retained history each poll)
            j, start = self._journal, cur.latest_end
            k = since_seq + 1 - (cur.next_seq - len(self._recent))
            if k >= 0:
                head = b'{"seq":%d,' % (since_seq + 1)
                if j.reader()(self._recent[k], len(head)) == head:
                    start = self._recent[k]
            return (j.hold(), start, cur.end, cur.legacy), []

        held = self._read(lambda: decide()[0])
        if held is None:
            return iter(())
        return _HeldChanges(self._journal, *held, since_seq)

    def last_seq(self) -> int:
        """The sequence number of the latest stored change (0 for an empty store)."""
        return self._read(lambda: self._cur.next_seq - 1 if self._cur else 0)

    def watch(
        self,
        since_seq: int | None = None,
        *,
        timeout: float | None = None,
        poll_interval: float = 0.005,
    ) -> Iterator[Change]:
        """Follow changes written by any process, live, until ``timeout`` seconds have
        passed (None: forever; ``inf`` is refused). ``since_seq=None`` starts from now. Polls
        the file's size and identity, and reads the new lines when they moved, all without
        the lock: it keeps following while a writer is stopped holding it. The arguments are
        checked when it is called, before the first change."""
        _validate.watch(since_seq, timeout, poll_interval)
        return self._watch(since_seq, timeout, poll_interval)

    def _watch(self, since_seq: int | None, timeout: float | None,
               poll_interval: float) -> Iterator[Change]:
        seq = self.last_seq() if since_seq is None else since_seq
        deadline = None if timeout is None else time.monotonic() + timeout
        journal = self._journal
        last_seen: tuple[int, int, int] | None = None
        while True:
            try:
                st = os.stat(journal.path, follow_symlinks=False)
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

    # -- export and import --------------------------------------------------------------

    def export(self, fp: IO[str] | IO[bytes] | str | os.PathLike[str]) -> int:
        """Write every run, in insertion order, as one JSON array (the seed's field names);
        returns the number of runs written. The runs are read and written as they go
        (``iter_runs``), about a megabyte at a time: memory does not grow with the store.

        ``fp`` is a file object, or a path: that file is then written through a temp file
        beside it, synced and renamed over it (replaced whole or not at all). A path that
        is one of this store's own files (by device and inode: through a symlink or a hard
        link too), its state directory or a name inside it is refused with
        ``OutputTargetError`` before anything is opened; so is a file object open on one of
        the store's files, before anything is written to it (open it by path here to keep
        it from being truncated first)."""
        _validate.export_target(fp, paths=True)
        if isinstance(fp, (str, os.PathLike)):
            path = os.fspath(fp)
            self._check_output(path, "export")
            return interchange.export_to_path(path, self._write_export)
        try:
            fd: int | None = fp.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: in memory
            fd = None
        if fd is not None:
            self._check_output(fd, "export", name=getattr(fp, "name", None))
        return self._write_export(fp)

    def _write_export(self, fp: IO[str] | IO[bytes]) -> int:
        return interchange.write_export_items(fp, self._export_items())

    def _export_items(self) -> Iterator[bytes]:
        """Every run as ``export`` writes it (``interchange.export_item``), read as
        ``_iter_export`` reads them; a record is made a ``Run`` only when its fields are not
        as this library writes them."""
        for offset, data in self._stream_records():
            yield interchange.export_item(data, functools.partial(self._run_of, data, offset))

    def _iter_export(self) -> Iterator[tuple[Run, dict[str, Any]]]:
        """Every run with its extra fields, as ``export`` writes them, read as it is
        iterated from the file as it was at the call (``iter_runs``'s reading)."""
        for offset, data in self._stream_records():
            yield self._run_of(data, offset), codec.extra_fields(data)

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

    def import_runs(self, source: IO[str] | IO[bytes] | Iterable[Run | dict[str, Any]]) -> int:
        """Add runs keeping their ids, from a JSON array document or JSON lines (a file), or
        from an iterable of ``Run``/dicts. All or nothing: a duplicate or invalid record is
        refused with ``InvalidRunError`` naming it, and then nothing is imported.

        The input is read as it is imported, in memory that does not grow with it (beyond
        the view's index of every id). Up to ``SMALL_IMPORT`` records are appended in one
        write, like any change; a larger import is staged: the journal's bytes and the new
        lines are written to a temp file beside it, which is synced and renamed over the
        journal under the lock, so that until then no reader sees any of it and a failure
        (a bad record at the end, a full disk, a crash) leaves the journal as it was. The
        lock is held while it is staged: other writers wait for it (``lock_timeout``)."""
        _validate.import_source(source)
        return self._import_runs(interchange.iter_import(source))

    def _import_runs(self, records: Iterable[tuple[int, Run, dict[str, Any]]],
                     on_conflict: Callable[[Run, Run], None] | None = None) -> int:
        """``import_runs`` of validated (record number, run, extra fields). With
        ``on_conflict`` a run already stored with identical content is skipped, and
        ``on_conflict(stored, new)`` is called for one stored with other content: it must
        raise (``migrate``). Without it, an id already stored is refused."""
        it = iter(records)
        head: list[tuple[int, Run, dict[str, Any]]] = []
        size = 0
        for record in it:
            head.append(record)
            size += len(codec.record_fields(record[1], record[2]))
            if len(head) > SMALL_IMPORT or size > SMALL_IMPORT_BYTES:
                return self._transact(lambda: self._stage_import(
                    itertools.chain(head, it), on_conflict))

        def decide() -> _Decision[int]:
            self._ensure_index()  # every id, to refuse duplicates
            busy = {machine: peers[0] for machine, peers in self._machines.items()}
            seen: set[str] = set()
            new: _Changes = []
            extras: dict[str, dict[str, Any]] = {}
            for n, run, extra in head:
                if run.id in seen:
                    raise InvalidRunError(f"record {n}: run {run.id!r} appears twice; "
                                          "nothing was imported")
                if self._skip_existing(n, run, on_conflict):
                    continue
                _refuse_busy(n, run, busy)
                seen.add(run.id)
                new.append((ChangeType.RUN_CREATED, run))
                if extra:
                    extras[run.id] = extra
            self._extras.update(extras)
            return len(new), new

        return self._transact(decide)

    def _skip_existing(self, n: int, run: Run,
                       on_conflict: Callable[[Run, Run], None] | None) -> bool:
        """For record ``n`` of an import: False when ``run``'s id is not stored; True when it
        is stored with identical content and ``on_conflict`` is given (skip it); otherwise
        refused (``InvalidRunError``, or what ``on_conflict`` raises)."""
        at = self._index.get(run.id)
        if at is None:
            return False
        if on_conflict is not None:
            stored = self._active.get(run.id) or self._run_at(at)
            if stored == run:
                return True
            on_conflict(stored, run)
        raise InvalidRunError(f"record {n}: run {run.id!r} already exists in "
                              f"{self._journal.path}; nothing was imported")

    def _stage_import(self, records: Iterable[tuple[int, Run, dict[str, Any]]],
                      on_conflict: Callable[[Run, Run], None] | None) -> _Decision[int]:
        """Under the lock: write the journal's bytes and a line per imported run to a temp
        file, a megabyte at a time, sync it and rename it over the journal. The view takes
        each run in as its line is laid out (so that a later record is checked against it:
        an id twice, a second non-terminal run on a machine); on any failure the temp file
        is removed, the journal is left as it was and the view is rebuilt from it by the
        next call."""
        self._before_writing()
        self._ensure_index()
        j, cur, header = self._journal, self._cur, self._header
        assert cur is not None and header is not None
        start = offset = cur.end
        now, durable, seq = _utcnow(), max(self._synced, cur.durable), cur.next_seq
        name, fd = j.new_temp()
        installing = False
        try:
            j.stage(fd, copy_to=start)
            lines: list[bytes] = []
            size = 0
            for n, run, extra in records:
                at = self._index.get(run.id)
                if at is not None and at >= start:
                    raise InvalidRunError(f"record {n}: run {run.id!r} appears twice; "
                                          "nothing was imported")
                if self._skip_existing(n, run, on_conflict):
                    continue
                peers = self._machines.get(run.machine)
                if not run.status.is_terminal and peers:
                    _refuse_busy(n, run, {run.machine: peers[0]})
                line = codec.encode_record(seq, ChangeType.RUN_CREATED, now, durable, run,
                                           extra or None)
                if extra:
                    self._extras[run.id] = extra
                self._recent.append(offset)
                self._index_version(offset, run.id, None if run.status.is_terminal else run,
                                    now, _CREATED)
                lines.append(line)
                size += len(line)
                offset += len(line)
                seq += 1
                if size >= _STAGE_CHUNK:
                    j.stage(fd, b"".join(lines))
                    lines, size = [], 0
            if seq == cur.next_seq:  # every run was already there: nothing to install
                j.abandon_temp(name, fd)
                return 0, []
            j.stage(fd, b"".join(lines), sync=True)
            installing = True
            j.install_temp(name, fd)
            self._header = j.open()
        except BaseException:
            self._stale = True  # the view took in runs that are not stored
            if not installing:
                j.abandon_temp(name, fd)
            raise
        count = seq - cur.next_seq
        cur.end, cur.next_seq = offset, seq
        self._synced = offset
        self._unmarked_writes = True
        # Recorded only now that the new file is in place: the header is the old one, so a
        # record of the new length made before the rename would speak of the old journal
        # too, which would then be refused as cut short if the rename failed. Until it is
        # written, the earlier record (a prefix of both files) still holds.
        try:
            self._vouch(header.crc, offset, seq - 1, "import")
            cur.vouched = offset
        except OSError as exc:
            log_warning("runstore: could not record in %s that %s is synced (%s); a later "
                        "cut of it will not be told from a torn write",
                        self._journal.lock_path, j.path, exc)
        return count, []

    # -- statistics ---------------------------------------------------------------------

    def stats(self) -> StoreStats:
        """Counts and sizes for operators (``python -m runstore stats``)."""

        def answer() -> StoreStats:
            by_status: dict[str, int] = {s.value: 0 for s in Status}
            by_machine: dict[str, int] = {}
            for run in self._all_runs():
                by_status[run.status.value] += 1
                by_machine[run.machine] = by_machine.get(run.machine, 0) + 1
            cur = self._cur
            assert cur is not None
            live = len(self._index)
            torn = self._torn
            return StoreStats(
                path=self._journal.path, file_size=cur.end, runs=live,
                runs_by_status=by_status, runs_by_machine=by_machine, live_lines=live,
                superseded_lines=self._lines - live, last_seq=cur.next_seq - 1,
                oldest_seq=cur.compacted_through + 1, durable=self.durable,
                torn_tail_offset=None if torn is None else torn[0].offset,
                torn_tail_bytes=0 if torn is None else torn[1] - torn[0].offset)

        return self._read(answer)

    # -- life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Sync what this process wrote, mark it durable in the file, release descriptors."""
        if self._closed:
            return
        try:
            if self._unmarked_writes and self._pid == os.getpid():
                self._transact(self._mark_clean, shows=False)
        finally:
            self._closed = True
            self._lock.close()
            self._journal.close()

    def _mark_clean(self) -> _Decision[None]:
        self._before_writing()
        cur = self._cur
        assert cur is not None
        j = self._journal
        j.sync()
        j.append(codec.encode_mark(cur.end), cur.end)
        j.sync()
        cur.end = os.fstat(j.fd).st_size if j.fd is not None else cur.end
        self._unmarked_writes = False
        header = self._header
        if header is not None and j.fd is not None:
            try:  # the journal is synced and marked whatever happens here
                self._vouch(header.crc, cur.end, cur.next_seq - 1, "clean close")
            except OSError as exc:
                log_warning("runstore: could not record in %s that %s is synced (%s); a "
                            "later cut of it will not be told from a torn write",
                            self._journal.lock_path, j.path, exc)
        return None, []

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.state_dir!r}, durable={self.durable})"


def _record_filter(machine: str | None, status: Status | str | Iterable[Status | str] | None,
                   batch_id: str | None) -> Callable[[dict[str, Any]], bool]:
    """Whether a stored record matches ``iter_runs``'s filters (checked here, before any
    lock is taken)."""
    _validate.list_filters(machine, batch_id)
    statuses = transitions.status_set(status)
    wanted = None if statuses is None else {s.value for s in statuses}

    def keep(data: dict[str, Any]) -> bool:
        return ((machine is None or data.get("machine") == machine)
                and (wanted is None or data["status"] in wanted)
                and (batch_id is None or data.get("batch_id", "") == batch_id))

    return keep


class _HeldRecords:
    """``runscan.records`` of the journal held open as ``fd``; ``fd`` is closed when the
    iteration ends or fails, or when the iterator is dropped unfinished."""

    def __init__(self, journal: Journal, fd: int, snap: runscan.Snapshot) -> None:
        self.journal, self.fd, self.snap = journal, fd, snap
        self._close = weakref.finalize(self, journal.close_held, fd)
        self._records = runscan.records(journal, fd, snap)

    def close(self) -> None:
        """Close the descriptor now (the iteration, if it goes on, fails)."""
        self._close()

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return self

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


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._forget_parent_calls()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
            data = codec.decode_line(line)
            if codec.is_mark(line, data, legacy) or data["seq"] <= since_seq:
                continue
            run = codec.run_from_dict(data)
            when = _dt.datetime.fromisoformat(data["time"])
        except (codec.BadLine, KeyError, TypeError, ValueError) as exc:
            raise CorruptStoreError(path, None,
                                    f"a retained change is unreadable ({exc})") from None
        yield Change(seq=data["seq"], time=when, type=ChangeType(data["change"]), run=run)
