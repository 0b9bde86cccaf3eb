"""Opening a file store's journal and keeping up with it: the first of the file store's
layers (``FileStore`` is built as ``_Opening`` < ``_Compacting`` < ``_Writing`` <
``_Pruning`` < ``_Importing`` < ``FileStore``, each a module of one idea).

Opening reads the header, then the journal from its last checkpoint (or its compacted
base's summary), into the in-memory ``View``; catching up takes in what other processes
appended since, or reloads when the file was replaced (a compaction elsewhere), and refuses
a journal deleted, renamed or replaced by something else. Damage past what is known synced
is judged (``_scan.judge``): only a torn write is ever cut, and only by a writer
(``_before_writing``); a read leaves it in place.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import attrs

from . import (
    _fields,
    _forks,
    _limits,
    _owner,
)
from ._journal import Journal
from ._lock import StoreLock
from ._scan import Damage, Header, cursor_after_header, judge, scan
from ._view import View, decode_at, history_at
from ._vouch import Vouch, cut_error, missing_error, read_vouch, write_vouch
from .errors import (
    CorruptStoreError,
    ReadOnlyStoreError,
)
from .model import ChangeType, Run, Status

T = TypeVar("T")
#: the run versions a decision stores, with the change each one is
Changes = list[tuple[ChangeType, Run]]
#: what a decision returns: its answer and the versions to store
Decision = tuple[T, Changes]
_ACTIVE = frozenset({Status.PENDING.value, Status.RUNNING.value})


class _Opening:
    """Opening and catching up (see the module's documentation). The attributes below are
    set by ``FileStore.__init__``."""

    durable: bool
    lock_timeout: float
    state_dir: str
    _journal: Journal
    _lock: StoreLock
    #: set when the lock file cannot be opened for writing (a read-only copy or mount):
    #: the store then only reads, without the lock, and every write raises this
    _lock_error: ReadOnlyStoreError | None
    _pid: int
    _closed: bool
    _unmarked_writes: bool
    _resync: bool  # a sync failed: rewrite the file before going on
    #: after a failed sync of appended lines, until the rewrite: the journal open then
    #: (device, inode), how many of its bytes were known synced (reads answer from those
    #: bytes alone: ``_answer_intact``) and where the lines this process failed to sync
    #: begin and end (-1, -1 when not known)
    _intact: tuple[int, int, int, int, int] | None
    #: what ``_append`` wrote and the view has yet to take in (``_index_appended``)
    _appended: tuple[Changes, list[bytes], int, _dt.datetime] | None
    #: run id -> (its next version, that line's run fields), made by ``_step`` before the
    #: flock was taken and kept by its decision; ``_append`` takes it out and uses it for
    #: that very version only
    _made: dict[str, tuple[Run, bytes]]
    _reading: bool  # catching up for a read, without the flock

    def _read_only_error(self) -> ReadOnlyStoreError:
        """Why this store cannot be written: its lock file or its journal cannot be opened
        for writing."""
        exc, j = self._lock_error, self._journal
        if exc is not None:
            return ReadOnlyStoreError(exc.path, exc.problem, exc.remedy)
        return j.read_only_error(j.path, "journal file")

    def _reset_view(self) -> None:
        self._view = View(self._journal.path, _limits.RETAIN_CHANGES)
        self._synced = 0  # bytes of the current file this process knows to be synced
        self._stale = True
        self._compact_retry_at = 0  # lines: until then automatic compaction is not tried
        #: records other processes appended, read and checked under the flock but taken
        #: into the view only after it is released (``_catch_up`` with ``about``), in file
        #: order; always empty when the mutex is free
        self._held: list[tuple[int, dict[str, Any]]] = []
        #: a torn tail the last catch-up found past the valid lines, and where the file
        #: ended: left in place by reads, cut by the next write (``_before_writing``)
        self._torn: tuple[Damage, int] | None = None
        self._temps_checked = False  # stale temp files looked for since the last load

    def _ensure_index(self) -> None:
        """Index the part of the file opening did not read (``View.ensure_index``), after
        taking in the records held for after the flock, which follow it."""
        if self._view.lazy:
            self._take_held()
            self._view.ensure_index(self._journal)

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
        if self._pid != _forks.pid():  # forked: the parent's view and descriptors are not ours
            self._pid = _forks.pid()
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
        cur = self._view.cur
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
        self._view.header = header
        start = header.start
        self._view.cur = cursor_after_header(header, start)
        vouch = self._vouch_for(header)
        self._view.cur.vouched = vouch.length if vouch is not None else 0
        if self._load_checkpoint(header):
            start = self._view.cur.end
        elif header.summary is not None and self._load_summarised_base(header):
            start = header.base_end
        self._ingest_from(start)  # damage before the vouched length is refused there
        if vouch is not None and self._view.cur.end < vouch.length:
            self._stale = True
            raise cut_error(j.path, self._view.cur.end, vouch)
        self._synced = self._view.cur.durable
        self._stale = False

    def _create(self) -> Header:
        """Create the journal of a new store, after making sure there was none: a lock file
        that records synced bytes of a journal (``_vouch.Vouch``) proves one existed, and
        a store is never reset to empty without being asked. The new journal is recorded
        there at once, so that from now on its loss is noticed too."""
        fd = self._lock.record()
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
        fd = self._lock.record()
        vouch = read_vouch(fd) if fd is not None else self._journal.peek_vouch()
        return vouch if vouch is not None and vouch.applies_to(header) else None

    def _vouch(self, header_crc: int, length: int, seq: int, by: str, *,
               sync: bool = True) -> None:
        """Record in the lock file that the first ``length`` bytes of the journal whose
        header has CRC ``header_crc`` are synced (see ``_vouch.Vouch``): at a clean close,
        a checkpoint and a compaction only, never per operation."""
        fd = self._lock.record()
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
        j, cur = self._journal, self._view.cur
        assert j.fd is not None and cur is not None
        tail = header.base_end if header.summary is not None else header.start
        found = j.last_checkpoint(tail, os.fstat(j.fd).st_size if end is None else end)
        if found is None:
            return False
        at, end, point = found
        if point.next_seq < cur.next_seq:
            return False
        if ((not point.boot or point.boot != _owner.boot_id())
                and not j.lines_follow(max(tail, point.durable), at, point.next_seq)):
            return False
        try:
            if not self._take_active(point.active):
                return False
        except CorruptStoreError:
            return False  # opened line by line, which says what is wrong
        self._view.recent.clear()  # the offsets of the changes before it are found when indexing
        self._view.lines = point.lines
        self._view.max_id = max(self._view.max_id, point.max_id)
        self._view.base_count = point.runs
        self._view.lazy = True
        self._view.opened_at = at, point
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
            data = decode_at(self._journal.path, offset, j.read_line(offset))
            if data["status"] not in _ACTIVE:
                return False
            records.append((offset, data))
        for offset, data in records:
            self._view.ingest_record(offset, data)
        self._view.index.clear()
        return True

    def _load_summarised_base(self, header: Header) -> bool:
        """Take the base from the header's summary: read only its non-terminal runs and
        the offsets of its retained history; the rest is indexed, and its CRC-32 checked,
        when first needed. False (read it line by line instead) when the file is shorter
        than the base or the summary's runs are not non-terminal records."""
        summary, cur, j = header.summary, self._view.cur, self._journal
        assert summary is not None and cur is not None and j.fd is not None
        if os.fstat(j.fd).st_size < header.base_end:
            return False
        history = history_at(header, self._journal)
        if not self._take_active(header.start + rel for rel in summary.active):
            return False
        self._view.lazy = True
        self._view.base_count = summary.lines
        self._view.lines = summary.lines + len(history)
        self._view.recent.extend(history)
        self._view.max_id = max(self._view.max_id, summary.max_id)
        cur.end = header.base_end
        cur.next_seq = header.compacted_through + 1 + len(history)
        return True

    def _ingest_from(self, start: int, end: int | None = None, defer: bool = False,
                     about: str | None = None) -> None:
        """Take the file from ``start`` to its end into the view, about a megabyte at a
        time, so that a long history is never held in memory at once. With ``about``,
        records that are not about it are held instead (``_hold``)."""
        j = self._journal
        assert j.fd is not None
        if end is None:
            end = os.fstat(j.fd).st_size
        cur = self._view.cur
        assert cur is not None
        for chunk_at, chunk in j.read_lines(start, end):
            result = scan(chunk, chunk_at, cur)
            if about is not None and result.damage is None and self._hold(result.records,
                                                                          about):
                continue
            try:
                self._take_held()  # the records before these first
                for offset, data in result.records:
                    self._view.ingest_record(offset, data, defer)
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
        top = self._view.max_id
        for _offset, data in records:
            run_id, machine = data["id"], data.get("machine")
            if run_id == about or machine == about or type(machine) is not str:
                return False
            if run_id > top:
                top = run_id
        self._view.max_id = top
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
                self._view.ingest_record(offset, data, defer=True)
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
        cur, j = self._view.cur, self._journal
        assert cur is not None and j.fd is not None
        self._stale = True  # whatever happens next, do not trust this view without a reload
        end = os.fstat(j.fd).st_size
        again = scan(j.pread(j.fd, min(end - damage.offset, _limits.READ_AGAIN), damage.offset),
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

    def _run_of(self, data: dict[str, Any], offset: int) -> Run:
        try:
            return _fields.run_from_dict(data)
        except _fields.BadLine as exc:
            raise CorruptStoreError(self._journal.path, offset,
                                    f"a stored run is unreadable: {exc.reason}") from None
