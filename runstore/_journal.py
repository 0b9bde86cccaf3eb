"""The journal file: open or create it, read what was appended, recover a torn tail, append,
sync, and replace it whole (compaction: ``_temps``). The line format is in ``codec``; reading
lines is ``_scan``, which is pure.

Crash-safety recipe: appends are one ``write`` of complete lines under the store lock,
followed by ``fdatasync`` in durable mode; whole-file replacement writes a temp file created
``O_EXCL|O_NOFOLLOW`` 0600, fsyncs it, renames it over the journal and fsyncs the directory.
A compaction beside the lock uses one fixed temp name instead, flocked while it is written
and checked to still be the file at that name after the flock (a cleanup may have removed it
in between), so that stale-temp cleanup and other processes leave it alone; what is appended
to it under the lock is fsynced before the rename. Every open uses ``O_NOFOLLOW|O_CLOEXEC``
relative to a descriptor of the state directory, so a swapped path component cannot redirect
it.

The journal a process has open may be deleted or renamed under it (by hand, by a cleaner):
``Journal`` remembers the identity (st_dev, st_ino) and the store id of the file it opened,
the store compares that identity with the path's at every catch-up (``stat_path``), and
``check_replacement`` tells a compaction's rename (the same store at the path, the open file
unlinked) from everything else, which is refused: a store is never reset to empty, nor
switched to another file, without being asked, and once a journal was opened it is never
created again (``create``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import stat
import zlib
from collections.abc import Callable, Iterator

from . import _codec, _failpoints, _fields, _forks
from ._fsio import FileSystem
from ._log import log_warning
from ._scan import (
    _READ_CHUNK,
    Cursor,
    Header,
    _chunks,
    parse_header,
    scan,
)
from ._statedir import (
    _IO_ERRNOS,
    _NOT_WRITABLE,
    _OPEN,
    DATA_NAME,
    LOCK_NAME,
    _unsafe,
    check_regular,
    open_state_dir,
)
from ._temps import TempFiles
from ._vouch import Vouch, read_vouch
from .errors import CorruptStoreError, IOKind, ReadOnlyStoreError, StoreIOError

__all__ = ["CHECKPOINT_SEARCH", "READ_ONLY_REMEDY", "Journal"]

#: how far back from the end of the journal opening looks for the last checkpoint line
CHECKPOINT_SEARCH = 16 * 1024 * 1024
_BACK_CHUNK = 64 * 1024  # looking back for a checkpoint, which is usually near the end
_CHECKSUM_CHUNK = 4 << 20
#: what a ReadOnlyStoreError tells the caller to do
READ_ONLY_REMEDY = ("reads of this store work; to write, use a writable copy of the state "
                    "directory, remount it read-write, or give this user write access "
                    "(files 0600, directory 0700)")


class Journal(TempFiles):
    """One journal file in a state directory. Callers hold the store lock for every method
    but ``close``; the journal keeps no view of the runs, only descriptors and offsets.
    Replacing the file whole through a temp file is inherited (``_temps.TempFiles``)."""

    def __init__(self, state_dir: str, fs: FileSystem, *, create: bool = True) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, DATA_NAME)
        self.lock_path = os.path.join(state_dir, LOCK_NAME)
        self.fs = fs
        self.dir_fd = open_state_dir(state_dir, create=create)
        self.fd: int | None = None
        self._pid = _forks.pid()
        #: (st_dev, st_ino) of the file ``fd`` was opened on
        self.identity: tuple[int, int] | None = None
        #: the store id of the first journal opened: every later open must find the same
        #: store, and ``create`` is refused ("" until a journal was opened)
        self.store_id = ""
        #: the journal open is of format version 1 (``Cursor.legacy``)
        self.legacy = False
        #: why the journal open now could only be opened for reading ("" when writable)
        self.read_only = ""

    # -- descriptors --------------------------------------------------------------------

    def peek_vouch(self) -> Vouch | None:
        """The lock file's record of what was synced (``Vouch``), read without locking or
        creating the file (a store that only reads opens its lock file at its first
        write); None when there is no lock file or it cannot be read."""
        try:
            fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=self.dir_fd)
        except OSError:
            return None
        try:
            return read_vouch(fd)
        finally:
            os.close(fd)

    def open_lock_file(self) -> int:
        """Open (creating 0600) the lock file; it is never deleted. ``ReadOnlyStoreError``
        when it cannot be opened (or created) for writing: a read-only copy or mount."""
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | _OPEN, 0o600, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno in _NOT_WRITABLE:
                raise self.read_only_error(self.lock_path, "lock file", exc) from None
            raise _unsafe(self.lock_path, exc, "lock file") from None
        check_regular(fd, self.lock_path, "lock file")
        return fd

    def open_directory(self) -> int:
        """Open the state directory again (a descriptor of its own, for the store's flock:
        ``_lock``)."""
        try:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError as exc:
            raise _unsafe(self.state_dir, exc, "state directory") from None

    def read_only_error(self, path: str, what: str, exc: OSError | None = None
                        ) -> ReadOnlyStoreError:
        """The error of a write to a store this process can only read (``path``: the file
        that cannot be opened for writing)."""
        why = f" ({exc.strerror})" if exc is not None else ""
        if exc is None and self.read_only:
            why = f" ({self.read_only})"
        return ReadOnlyStoreError(path, f"the {what} cannot be opened for writing{why}, so "
                                  "this store is read-only here and nothing was written",
                                  READ_ONLY_REMEDY)

    def lock_file_exists(self) -> bool:
        """Whether anything is at the lock file's path (not following a symlink)."""
        try:
            self.stat_lock_file()
        except FileNotFoundError:
            return False
        return True

    def stat_lock_file(self) -> os.stat_result:
        """The lock file at its path, not following a symlink (``FileNotFoundError``)."""
        return os.lstat(LOCK_NAME, dir_fd=self.dir_fd)

    def stat_path(self) -> os.stat_result | None:
        """What is at the journal's path now (not following a symlink), None when nothing
        is: compared with ``identity``, it tells whether the open file is still the
        journal (one system call)."""
        try:
            return os.lstat(DATA_NAME, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return None

    def gone_error(self) -> CorruptStoreError:
        """The journal this process had open is no longer at its path and nothing is."""
        where = ""
        if self.fd is not None:
            where = f" (the file this process had open is {self._whereabouts()})"
        return CorruptStoreError(
            self.path, None,
            "the journal was deleted or renamed while this process had it open"
            f"{where}; runstore never recreates it",
            "move it back or restore it from a backup; to start a new store on purpose, "
            "stop every process that uses it and remove the files of the state directory")

    def check_replacement(self) -> None:
        """The journal's path names a file other than the one open (``identity``): return
        when a compaction replaced it (the path holds a journal of the same store and the
        open file is unlinked); otherwise raise, naming both files: the path holds another
        store's journal or something that is not a journal, or the open file was renamed
        away and another one put at its path."""
        assert self.fd is not None
        try:
            fd = os.open(DATA_NAME, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=self.dir_fd)
        except FileNotFoundError:
            raise self.gone_error() from None
        except OSError as exc:
            if exc.errno in _IO_ERRNOS:
                raise StoreIOError(self.path, "opening", exc) from None
            raise _unsafe(self.path, exc, "journal file") from None
        try:
            first = os.pread(fd, 65536, 0) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        except OSError as exc:
            raise StoreIOError(self.path, "reading", exc) from None
        finally:
            os.close(fd)
        nl = first.find(b"\n")
        found = ""
        if not first:
            found = "an empty file or one that is not a regular file"
        else:
            try:
                if nl < 0:
                    raise CorruptStoreError(self.path, 0, "the header line is truncated")
                store_id = parse_header(first[:nl], self.path).store_id
            except CorruptStoreError as exc:
                found = f"a file that is not a runstore journal ({exc.problem})"
            else:
                if store_id != self.store_id:
                    found = (f"the journal of another store (store id {store_id!r}, where "
                             f"this process opened store id {self.store_id!r})")
        renamed = os.fstat(self.fd).st_nlink > 0
        if not found and not renamed:
            return  # a compaction elsewhere renamed its new file over ours
        if not found:
            found = "another journal of the same store"
        raise CorruptStoreError(
            self.path, None,
            f"the journal was replaced by {found} while this process had it open; the file "
            f"this process has open is {self._whereabouts()}; runstore follows neither",
            "put the right journal back at this path (or restore it from a backup) and "
            "restart the processes that use the store; to start a new store on purpose, "
            "stop every process that uses it and remove the files of the state directory")

    def _whereabouts(self) -> str:
        """What became of the file open now: deleted, or its path now (for an error)."""
        if self.fd is None:
            return "closed"
        try:
            if os.fstat(self.fd).st_nlink == 0:
                return "deleted"
            return f"now {os.readlink(f'/proc/self/fd/{self.fd}')}"
        except OSError:
            return f"still linked somewhere (inode {self.identity[1] if self.identity else '?'})"

    def after_fork(self) -> None:
        """In a forked child: drop the parent's descriptors (they are reopened lazily)."""
        if self._pid == _forks.pid():
            return
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None
        self._pid = _forks.pid()

    def exists(self) -> bool:
        try:
            os.lstat(DATA_NAME, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return False
        return True

    def open(self, *, writable: bool = True, read_only_ok: bool = False) -> Header:
        """Open the journal at its path (closing a replaced one) and read its header. With
        ``read_only_ok`` (a read), a journal that cannot be opened for writing (a read-only
        copy or mount) is opened for reading, and ``read_only`` says why (its mode is then
        left as it is)."""
        self.close_data()
        self.read_only = ""
        flags = (os.O_RDWR | os.O_APPEND if writable else os.O_RDONLY) | _OPEN
        try:
            try:
                fd = self.fs.open(DATA_NAME, flags, 0o600, self.dir_fd)
            except OSError as exc:
                if not writable or not read_only_ok or exc.errno not in _NOT_WRITABLE:
                    raise
                fd = self.fs.open(DATA_NAME, os.O_RDONLY | _OPEN, 0o600, self.dir_fd)
                self.read_only = exc.strerror or "not writable"
        except OSError as exc:
            if exc.errno == errno.ENOENT and self.store_id:
                raise self.gone_error() from None
            if exc.errno in _IO_ERRNOS:  # the disk or the system failed, not the file's safety
                raise StoreIOError(self.path, "opening", exc, IOKind.OPEN) from None
            raise _unsafe(self.path, exc, "journal file") from None
        check_regular(fd, self.path, "journal file", fix_mode=not self.read_only)
        st = os.fstat(fd)
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        if st.st_size == 0:
            raise CorruptStoreError(
                self.path, 0, "the file is empty (runstore never leaves an empty journal)",
                "it was truncated or not written by runstore; move it away to start a new "
                "store, or restore it from a backup")
        first = self.pread(fd, 65536, 0)
        nl = first.find(b"\n")
        if nl < 0:
            raise CorruptStoreError(self.path, 0, "the header line is truncated")
        header = parse_header(first[:nl], self.path)
        self.legacy = header.version < _codec.KINDS_BY_FIRST_KEY
        if not self.store_id:
            self.store_id = header.store_id
        elif header.store_id != self.store_id:
            self.close_data()  # never written to: it is not this store's
            raise CorruptStoreError(
                self.path, 0,
                f"the journal was replaced by the journal of another store (store id "
                f"{header.store_id!r}, where this process opened store id "
                f"{self.store_id!r}) while this process had it open; runstore does not "
                "follow it",
                "put the right journal back at this path (or restore it from a backup) and "
                "restart the processes that use the store")
        return header

    def create(self) -> Header:
        """Create a new journal holding only a header, atomically (temp file, rename).
        Only the first open of a state directory creates one: once this ``Journal`` has
        opened a journal, a missing one is an error (``gone_error``), never a new store."""
        if self.store_id:
            raise self.gone_error()
        now = _dt.datetime.now(_dt.UTC).isoformat().replace("+00:00", "Z")
        header = _codec.encode_header(os.urandom(8).hex(), now, 0, 0, 0)
        self.replace_with([header])
        return self.open()

    def close_data(self) -> None:
        if self.fd is not None:
            self.fs.close(self.fd)
        self.fd = None

    def close(self) -> None:
        self.close_data()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    # -- reading ------------------------------------------------------------------------

    def read_from(self, offset: int) -> bytes:
        """Everything from ``offset`` to the current end of the file."""
        assert self.fd is not None
        chunks = []
        while True:
            chunk = self.pread(self.fd, _READ_CHUNK, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            if len(chunk) < _READ_CHUNK:
                break
        return b"".join(chunks)

    def checksum(self, start: int, end: int, crc: int = 0) -> tuple[int, int]:
        """(CRC-32 continuing ``crc``, length) of the bytes from ``start`` to ``end``, read
        in large chunks without keeping them (a short file gives a shorter length)."""
        assert self.fd is not None
        pos = start
        while pos < end:
            chunk = self.pread(self.fd, min(_CHECKSUM_CHUNK, end - pos), pos)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
        return crc, pos - start

    def read_lines(self, start: int, end: int,
                   fd: int | None = None) -> Iterator[tuple[int, bytes]]:
        """The bytes from ``start`` to ``end`` as (offset, chunk) pairs of whole lines, about
        ``_READ_CHUNK`` each, so a large region is never in memory at once. A short file
        ends the iteration early (the caller's checksum then tells). ``fd``: another
        descriptor of the file to read (``hold``) instead of the one open now."""
        fd = self.fd if fd is None else fd
        assert fd is not None
        if end - start <= _READ_CHUNK:  # the usual catch-up: a few lines, one read
            try:
                chunk = self.fs.pread(fd, end - start, start)
            except OSError as exc:
                raise StoreIOError(self.path, "reading", exc, IOKind.READ) from None
            if chunk:
                yield start, chunk
            return
        yield from _chunks(lambda offset, size: self.pread(fd, size, offset), start, end)

    def line_number(self, offset: int) -> int:
        """The 1-based number of the line at ``offset`` (newlines counted in chunks: for
        an error message, never on the way of an operation)."""
        assert self.fd is not None
        count, pos = 1, 0
        while pos < offset:
            chunk = self.pread(self.fd, min(_CHECKSUM_CHUNK, offset - pos), pos)
            if not chunk:
                break
            count += chunk.count(b"\n")
            pos += len(chunk)
        return count

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` of ``fd`` (a descriptor of the journal);
        ``StoreIOError`` (``IOKind.READ``) when the read fails."""
        try:
            return self.fs.pread(fd, size, offset)
        except OSError as exc:
            raise StoreIOError(self.path, "reading", exc, IOKind.READ) from None

    def hold(self) -> int:
        """A descriptor of the file open now, for a caller to read later and close
        (``close_held``): it stays this file even after a compaction replaces it."""
        assert self.fd is not None
        try:
            return os.dup(self.fd)
        except OSError as exc:
            raise StoreIOError(self.path, "opening", exc, IOKind.OPEN) from None

    def close_held(self, fd: int) -> None:
        self.fs.close(fd)

    def reader(self) -> Callable[[int, int], bytes]:
        """``read(offset, size)`` of the file open now (kept even after it is replaced):
        for a compaction, which reads it in pieces (``compaction.Read``)."""
        fd, pread, path = self.fd, self.fs.pread, self.path
        assert fd is not None

        def read(offset: int, size: int) -> bytes:
            try:
                return pread(fd, size, offset)
            except OSError as exc:
                raise StoreIOError(path, "reading", exc, IOKind.READ) from None

        return read

    def last_checkpoint(self, lo: int, hi: int) -> tuple[int, int, _codec.Checkpoint] | None:
        """The last sound checkpoint line that lies in ``lo:hi`` (``lo`` a line start),
        looked for backwards from ``hi`` over at most ``CHECKPOINT_SEARCH`` bytes: (its
        offset, the offset after it, what it says), or None."""
        assert self.fd is not None
        floor = max(lo, hi - CHECKPOINT_SEARCH)
        needle = b"\n" + _codec.CHECKPOINT_START  # found by the newline before it
        top = hi  # newlines at top or later were looked at
        while top > floor:
            at = max(floor - 1, top - _BACK_CHUNK)
            chunk = self.pread(self.fd, top - at + len(needle), at)
            pos = chunk.rfind(needle, 0, top - at - 1 + len(needle))
            while pos >= 0:
                found = self._checkpoint_at(at + pos + 1, lo, hi)
                if found is not None:
                    return found
                pos = chunk.rfind(needle, 0, pos - 1 + len(needle))
            top = at
        return None

    def _checkpoint_at(self, offset: int, lo: int,
                       hi: int) -> tuple[int, int, _codec.Checkpoint] | None:
        if not lo <= offset < hi:
            return None
        try:
            line = self.read_line(offset)
            point = _codec.Checkpoint.from_mark(_codec.decode_line(line))
        except (CorruptStoreError, _fields.BadLine):  # torn, or not one
            return None
        end = offset + len(line) + 1
        if (point is None or end > hi or point.durable > offset
                or any(a >= offset for a in point.active)):
            return None
        return offset, end, point

    def lines_follow(self, lo: int, hi: int, next_seq: int) -> bool:
        """Whether the lines in ``lo:hi`` are all sound, their records in seq order up to
        ``next_seq - 1`` (what a checkpoint at ``hi`` says comes next): the check that the
        unsynced lines before a checkpoint were not torn or lost in a power loss."""
        cur = Cursor(end=lo, next_seq=0, durable=0, latest_end=0, base_end=0,
                     compacted_through=0, legacy=self.legacy)
        for chunk_at, chunk in self.read_lines(lo, hi):
            if scan(chunk, chunk_at, cur).damage is not None:
                return False
        return cur.end == hi and cur.next_seq in (0, next_seq)

    def read_line(self, offset: int) -> bytes:
        """The line starting at ``offset``, without its newline."""
        assert self.fd is not None
        return self.read_line_at(self.fd, offset)

    def read_line_at(self, fd: int, offset: int) -> bytes:
        """``read_line`` from ``fd``, a descriptor of the journal (``hold``)."""
        size = 2048
        while True:
            data = self.pread(fd, size, offset)
            nl = data.find(b"\n")
            if nl >= 0:
                return data[:nl]
            if len(data) < size:
                raise CorruptStoreError(self.path, offset, "a record line has no end")
            size *= 4

    # -- writing ------------------------------------------------------------------------

    def append(self, data: bytes, start: int) -> None:
        """Write complete lines at the end (``start``); on failure cut back to ``start``."""
        assert self.fd is not None
        _failpoints.hit("append.before_write")
        try:
            written = self.fs.write(self.fd, data)  # all of it, unless the disk is full
            view = memoryview(data)[written:]
            while view:
                view = view[self.fs.write(self.fd, view):]
        except OSError as exc:
            try:
                self.fs.ftruncate(self.fd, start)
            except OSError:
                pass  # a torn tail: the next reader recovers it (it lies past the durable mark)
            raise StoreIOError(self.path, "appending to", exc, IOKind.WRITE) from None
        _failpoints.hit("append.after_write")

    def sync(self) -> None:
        assert self.fd is not None
        try:
            self.fs.fdatasync(self.fd)
        except OSError as exc:
            raise StoreIOError(self.path, "syncing", exc, IOKind.SYNC) from None
        _failpoints.hit("append.after_sync")

    def truncate(self, length: int, reason: str) -> None:
        """Cut a torn tail (recovery) and sync the cut."""
        assert self.fd is not None
        _failpoints.hit("recover.before_truncate")
        size = os.fstat(self.fd).st_size
        log_warning("runstore: recovering %s: dropping %d bytes from offset %d (%s)",
                    self.path, size - length, length, reason)
        try:
            self.fs.ftruncate(self.fd, length)
            self.fs.fdatasync(self.fd)
        except OSError as exc:
            raise StoreIOError(self.path, "truncating the torn tail of", exc,
                               IOKind.RECOVER) from None
