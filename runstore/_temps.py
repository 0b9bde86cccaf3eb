"""Replacing the journal whole: a new file is written as a temp file in the state directory,
fsynced, renamed over the journal, and the directory fsynced (a compaction, the first
journal, a staged import). ``TempFiles`` holds these steps for ``Journal``, its subclass,
and the cleanup of temp files a crash left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable

from . import _failpoints
from ._fsio import FileSystem
from ._lock import try_flock
from ._scan import _READ_CHUNK
from ._statedir import (
    _IO_ERRNOS,
    _OPEN,
    COMPACTING_NAME,
    DATA_NAME,
    TMP_PREFIX,
    TMP_SUFFIX,
    _unsafe,
    check_regular,
)
from .errors import IOKind, StoreIOError


class TempFiles:
    """The temp-file steps of ``Journal``, which sets these attributes. Installing a file
    and removing stale ones need the store lock; a compaction beside the lock claims and
    writes its temp file without it (``claim_compaction_temp``, ``write_temp``)."""

    state_dir: str
    #: the journal's path
    path: str
    fs: FileSystem
    #: a descriptor of the state directory
    dir_fd: int
    #: the journal open now (``stage`` copies from it)
    fd: int | None

    def replace_with(self, chunks: Iterable[bytes],
                     before_rename: Callable[[], None] | None = None) -> None:
        """Write a new file through a temp file and rename it over the journal (always
        fsynced: a replaced journal must never come back empty)."""
        name, fd = self.new_temp()
        try:
            self.write_temp(fd, chunks)
        except BaseException:
            self.abandon_temp(name, fd)
            raise
        self.install_temp(name, fd, before_rename=before_rename)

    def new_temp(self) -> tuple[str, int]:
        """Create a temp file (a random name, ``O_EXCL``, 0600) for a new journal."""
        name = f"{TMP_PREFIX}{os.urandom(8).hex()}{TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN
        try:
            fd = self.fs.open(name, flags, 0o600, self.dir_fd)
        except OSError as exc:
            raise StoreIOError(os.path.join(self.state_dir, name), "creating", exc,
                               IOKind.REWRITE) from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
        except OSError as exc:
            self.abandon_temp(name, fd)
            raise StoreIOError(os.path.join(self.state_dir, name), "creating", exc,
                               IOKind.REWRITE) from None
        return name, fd

    def claim_compaction_temp(self) -> int | None:
        """Open and flock the one temp file of a compaction that runs beside the store lock
        (``COMPACTING_NAME``), emptied; None when another process is writing it. Its flock
        tells ``remove_stale_temps`` that it is in use, and a crashed writer's is released."""
        path = os.path.join(self.state_dir, COMPACTING_NAME)
        try:
            fd = self.fs.open(COMPACTING_NAME, os.O_RDWR | os.O_CREAT | _OPEN, 0o600,
                              self.dir_fd)
        except OSError as exc:
            if exc.errno in _IO_ERRNOS:
                raise StoreIOError(path, "creating", exc, IOKind.REWRITE) from None
            raise _unsafe(path, exc, "compaction temp file") from None
        try:
            if not try_flock(fd):
                self.fs.close(fd)
                return None
            # removed between our open and our flock (by remove_stale_temps)? then the
            # name is not ours: leave the compaction to a later write
            st = os.fstat(fd)
            now = os.lstat(COMPACTING_NAME, dir_fd=self.dir_fd)
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
                self.fs.close(fd)
                return None
            check_regular(fd, path, "compaction temp file")
            self.fs.ftruncate(fd, 0)
        except FileNotFoundError:
            self.fs.close(fd)
            return None
        except OSError as exc:
            self.abandon_temp(COMPACTING_NAME, fd)
            raise StoreIOError(path, "preparing", exc, IOKind.REWRITE) from None
        return fd

    def write_temp(self, fd: int, chunks: Iterable[bytes]) -> None:
        """Write ``chunks`` to a temp file and fsync it."""
        try:
            for chunk in chunks:
                self._write_all(fd, chunk)
            _failpoints.hit("compact.after_tmp_write")
            self.fs.fsync(fd)
            _failpoints.hit("compact.after_tmp_sync")
        except OSError as exc:
            raise StoreIOError(self.path, "rewriting", exc, IOKind.REWRITE) from None

    def install_temp(self, name: str, fd: int, tail: bytes = b"",
                     before_rename: Callable[[], None] | None = None) -> None:
        """Append ``tail`` to a written temp file (fsynced when not empty), rename it over
        the journal, close it, then fsync the directory. Call with the lock held. The temp
        file is closed only once it is the journal: the temp file of a compaction beside the
        lock is flocked until it is closed, and another process that claimed it between a
        close and the rename would empty it (``claim_compaction_temp``), and the rename would
        then put an empty journal in place. ``before_rename`` runs once the temp file is
        synced, just before the rename (the store records the new file as synced there:
        ``Vouch``)."""
        try:
            if tail:
                self._write_all(fd, tail)
                self.fs.fsync(fd)
            if before_rename is not None:
                before_rename()
            self.fs.replace(name, DATA_NAME, self.dir_fd)
        except OSError as exc:
            self.abandon_temp(name, fd)
            raise StoreIOError(self.path, "rewriting", exc, IOKind.REWRITE) from None
        with contextlib.suppress(OSError):  # written, synced and in place: nothing to lose
            self.fs.close(fd)
        _failpoints.hit("compact.after_replace")
        try:
            self.fs.fsync(self.dir_fd)
        except OSError as exc:
            raise StoreIOError(self.state_dir, "syncing the directory", exc,
                               IOKind.SYNC_DIR) from None

    def stage(self, fd: int, data: bytes | None = None, *, copy_to: int = 0,
              sync: bool = False) -> None:
        """Write to the temp file of a staged import (``new_temp``): first the journal's
        first ``copy_to`` bytes (read a megabyte at a time), then ``data``; with ``sync``,
        fsync it. ``StoreIOError`` (``IOKind.REWRITE``) on failure: the journal itself is
        not touched."""
        assert self.fd is not None
        pos = 0
        try:
            while pos < copy_to:
                chunk = self.fs.pread(self.fd, min(_READ_CHUNK, copy_to - pos), pos)
                if not chunk:
                    raise OSError(errno.EIO, "the journal ended before the bytes this "
                                  f"process read ({pos} of {copy_to})")
                self._write_all(fd, chunk)
                pos += len(chunk)
            if data:
                self._write_all(fd, data)
            if sync:
                self.fs.fsync(fd)
        except OSError as exc:
            raise StoreIOError(self.path, "staging an import into", exc,
                               IOKind.REWRITE) from None

    def abandon_temp(self, name: str, fd: int | None) -> None:
        """Remove and close a temp file that will not be installed; removed first, while a
        compaction's temp file is still flocked, so that the name cannot be another
        process's claim by then."""
        with contextlib.suppress(OSError):
            self.fs.unlink(name, self.dir_fd)
        if fd is not None:
            with contextlib.suppress(OSError):
                self.fs.close(fd)

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.fs.write(fd, view):]

    def remove_stale_temps(self) -> None:
        """Remove temp files a crashed compaction left (call with the lock held)."""
        try:
            names = os.listdir(self.dir_fd)
        except OSError:
            return
        for name in names:
            if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    self._remove_stale_temp(name)

    def _remove_stale_temp(self, name: str) -> None:
        """Remove one temp file if it is a regular file of ours that nobody holds."""
        st = os.lstat(name, dir_fd=self.dir_fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _OPEN, dir_fd=self.dir_fd)
        try:  # one that a compaction beside the lock is writing is flocked: in use
            if os.fstat(fd).st_ino == st.st_ino and try_flock(fd):
                self.fs.unlink(name, self.dir_fd)
        finally:
            os.close(fd)

