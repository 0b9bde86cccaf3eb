"""The read-modify-write path of a file store, and what a read may show.

Every call that may write runs ``_transact(decide)`` (the reads run ``_read``,
which catches up without the flock and never changes the file): take the lock (mutex, then
flock), bring the
in-memory view up to date with what other processes appended (or reload when the file was
replaced), let ``decide`` look at the view and return its result plus the new run versions to
store, append those as one write, release the flock, take the new lines into the view (it is
this process's own: the mutex guards it), and release the mutex. Methods that change one run
prepare its next version before the flock and keep it if the run did not change meanwhile
(``_step``). In durable mode the
``fdatasync`` happens after the flock is released and before the call returns (group commit:
one sync can cover the writes of several processes), so the view of another process may hold a
change a moment before it is durable; that process makes it durable before any answer from it
leaves the call (``_make_visible``), so what a call shows, like what it acknowledges, survives
a power loss. After a failed sync
this store reads from what was synced before it (``_answer_intact``), and its next write
first rewrites the file, leaving the unsynced lines out when nothing was written after them.
"""

from __future__ import annotations

import array
import contextlib
import os
from collections.abc import Callable, Iterator

from . import (
    _codec,
    _fields,
    _forks,
    _gather,
    _ids,
    _limits,
    _owner,
    _transitions,
)
from ._filecompact import _Compacting
from ._fileopen import Changes, Decision, T
from ._log import log_warning
from ._scan import cursor_after_header, parse_header
from .errors import (
    CorruptStoreError,
    IOKind,
    LockTimeoutError,
    ReadOnlyStoreError,
    RunNotFoundError,
    RunstoreError,
    StoreIOError,
)
from .model import Run


class _Writing(_Compacting):
    """The read-modify-write path and what a read may show (see the module's
    documentation)."""

    def _transact(self, decide: Callable[[], Decision[T]],
                  early: Callable[[], None] | None = None, about: str | None = None,
                  shows: bool = True, wait: float | None = None) -> T:
        """Run ``decide`` under the lock on an up-to-date view and store what it returns.
        ``early`` runs before, with only the mutex held (see ``_step``). ``about``:
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
            if isinstance(exc, StoreIOError) and exc.kind in _limits.RESYNC_KINDS:
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
                    self._compact_retry_at = self._view.lines + _limits.COMPACT_RETRY_LINES
                    log_warning("runstore: automatic compaction of %s failed (%s); the "
                                "change was stored; trying again after %d more lines",
                                self._journal.path, exc, _limits.COMPACT_RETRY_LINES)
        finally:
            lock.release_mutex()
        return result

    def _transact_unlocked(self, decide: Callable[[], Decision[T]]) -> T:
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

    def _append(self, changes: Changes) -> int:
        """Append one line per change; return the new end of the file. The view learns of
        them in ``_index_appended`` (which may run after the flock is released)."""
        self._before_writing()
        cur = self._view.cur
        assert cur is not None
        now = _ids.utcnow()
        durable = self._synced  # the greater of it and cur.durable (max() costs more)
        if cur.durable > durable:
            durable = cur.durable
        seq = cur.next_seq
        head = b""
        if seq - cur.checkpoint_seq >= _limits.CHECKPOINT_EVERY:
            self._take_held()  # the view is complete here
            head = _codec.encode_checkpoint(_codec.Checkpoint(
                durable=durable, next_seq=seq, lines=self._view.lines, runs=self._view.live(),
                max_id=self._view.max_id, active=tuple(self._view.active_at.values()),
                boot=_owner.boot_id()))
            if self._view.header is not None and durable > cur.vouched:
                # what the checkpoint says was synced: one pwrite per _limits.CHECKPOINT_EVERY
                # records, not synced (a lost one leaves an older, shorter vouch)
                with contextlib.suppress(OSError):
                    self._vouch(self._view.header.crc, durable, 0, "checkpoint", sync=False)
                    cur.vouched = durable
        lines = []
        for change, run in changes:
            made = self._made.pop(run.id, None)
            if made is not None and made[0] is run:
                fields = made[1]  # made, and checked, by ``checked_fields`` (``_step``)
            else:
                fields = _fields.checked_fields(run, self._view.extras.get(run.id))
            lines.append(_codec.encode_record(seq, change, now, durable, run, None, fields))
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
                self._view.recent.append(offset)
                self._view.index_version(offset, run.id, None if run.status.is_terminal else run,
                                    now, change.value)
                offset += len(line)
        except BaseException:
            self._stale = True
            raise

    def _run_at(self, offset: int, line: bytes | None = None) -> Run:
        raw = self._journal.read_line(offset) if line is None else line
        try:
            data = _codec.decode_line(raw)
            run = _fields.run_from_dict(data)
        except _fields.BadLine as exc:
            raise CorruptStoreError(self._journal.path, offset,
                                    f"a stored run is unreadable: {exc.reason}") from None
        extra = _fields.extra_fields(data)
        if extra:  # a base opened from its summary learns unknown fields as runs are read
            self._view.extras[run.id] = extra
        return run

    def _lookup(self, run_id: str) -> Run:
        """The run with this id (already checked by ``_validate.run_id``)."""
        run = self._view.active.get(run_id)
        if run is not None:
            return run
        offset = self._view.index.get(run_id)
        if offset is None and self._view.lazy:
            self._ensure_index()
            offset = self._view.index.get(run_id)
        if offset is None:
            raise RunNotFoundError(run_id, self._journal.path)
        return self._run_at(offset)

    def _all_runs(self) -> Iterator[Run]:
        """Every run, in insertion order; the file is read in pieces, never whole."""
        self._ensure_index()
        j, index = self._journal, self._view.index
        lines = _gather.lines(j.reader(), array.array("q", index.values()), j.path)
        for (run_id, offset), line in zip(index.items(), lines, strict=True):
            run = self._view.active.get(run_id)
            yield self._run_at(offset, line) if run is None else run

    def _new(self, run: Run) -> Run:
        """The first stored version of a validated ``run``: a new id, revision 1 and, when
        non-terminal, this process as owner."""
        return _transitions.fresh(run, _ids.new_run_id(self._view.max_id), _owner.current())

    def _read(self, answer: Callable[[], T], about: str | None = None) -> T:
        """A read-only ``answer`` from the view: at once, without the flock, when the view
        is current for it (``_current_for``); otherwise after catching up under the flock
        (waiting at most ``_limits.READ_LOCK_WAIT``), as a write would but changing nothing (a
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
                                      wait=min(self.lock_timeout, _limits.READ_LOCK_WAIT))
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
        cur, j = self._view.cur, self._journal
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
        if intact is None or j.fd is None or self._pid != _forks.pid():
            return False
        dev, ino, limit, _start, _end = intact
        st = os.fstat(j.fd)
        if (st.st_dev, st.st_ino) != (dev, ino) or st.st_size < limit:
            return False
        cur = self._view.cur
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
        self._view.header = header
        cur = self._view.cur = cursor_after_header(header, header.start)
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
        since the view was brought up to date (if any, and at most ``_limits.UNREAD_LIMIT``
        bytes) mentions it (as a JSON string, quotes included: every line of that run or
        machine holds it so); with ``about`` None, when nothing was appended. Those lines
        are left for the next catch-up.

        Linearizable: a change completes its ``write`` before it is acknowledged, so a
        change acknowledged before this call shows, in full, in the bytes read here; one
        still being made is not acknowledged yet and may be ordered after this read."""
        j, cur = self._journal, self._view.cur
        if (self._stale or self._resync or cur is None or j.fd is None
                or self._pid != _forks.pid()):
            return False
        st = j.stat_path()  # the path's: a renamed or deleted journal is not read from
        if st is None or (st.st_dev, st.st_ino) != j.identity:
            return False
        unread = st.st_size - cur.end
        if not 0 <= unread <= _limits.UNREAD_LIMIT:
            return False
        return unread == 0 or (about is not None and _fields.json_string(about)
                               not in j.fs.pread(j.fd, unread, cur.end))

    def _step(self, run_id: str, step_of: Callable[[Run], _transitions.Step | None],
              action: str = "") -> Run:
        """Store the run's next version by ``step_of`` (None: unchanged, nothing written).

        The next version and its line's run fields are first made from this process's view,
        with the mutex held but before the flock (where this process may wait for another
        one's critical section); under the flock they are used only if catching up brought
        no newer version of the run (the view still holds the very ``Run`` they were made
        from), else made again from the stored run. The critical section then holds only
        the checks and the append."""
        early: list[tuple[Run, _transitions.Step | None, bytes]] = []

        def guess() -> None:
            stored = None if self._stale else self._view.active.get(run_id)
            if stored is None:
                return
            try:
                step = step_of(stored)
            except RunstoreError:
                return  # decided again under the flock, where it raises for real
            fields = b"" if step is None else _fields.checked_fields(step[0],
                                                                   self._view.extras.get(run_id))
            early.append((stored, step, fields))

        def decide() -> Decision[Run]:
            if early and self._view.active.get(run_id) is early[0][0]:
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

    def _mark_clean(self) -> Decision[None]:
        self._before_writing()
        cur = self._view.cur
        assert cur is not None
        j = self._journal
        j.sync()
        j.append(_codec.encode_mark(cur.end), cur.end)
        j.sync()
        cur.end = os.fstat(j.fd).st_size if j.fd is not None else cur.end
        self._unmarked_writes = False
        header = self._view.header
        if header is not None and j.fd is not None:
            try:  # the journal is synced and marked whatever happens here
                self._vouch(header.crc, cur.end, cur.next_seq - 1, "clean close")
            except OSError as exc:
                log_warning("runstore: could not record in %s that %s is synced (%s); a "
                            "later cut of it will not be told from a torn write",
                            self._journal.lock_path, j.path, exc)
        return None, []
