"""The store's lock: an in-process mutex plus an exclusive flock on the state directory.

The only module that takes file locks. Why each piece:

* ``flock`` belongs to an open file description, so two threads sharing one descriptor do
  not exclude each other: the thread mutex is taken first.
* ``lockf`` (POSIX record locks) drops the lock when *any* descriptor of the file is closed
  and lets a second thread in, so ``flock`` is called directly (stdlib ``fcntl.flock``).
  runstore started on portalocker's ``FlockLocker``, which makes this same call; it was
  dropped because importing portalocker costs ~30 ms (it reads package
  metadata at import), a third of the budget of a fresh CLI process, and each lock/unlock
  through it ~3 us more than ``fcntl.flock``. runstore is POSIX-only
  (``O_NOFOLLOW``, ``dir_fd``), so portalocker's Windows layer bought nothing.
* The flock is taken on the state directory (a descriptor of its own), not on a file in
  it. A file can be deleted or replaced while a process holds its flock (a cleaner of /tmp
  removes files by mtime, which flock never touches): the next process then creates and
  locks a new file at the path while the holder is still inside, and both append to the
  journal. A directory that holds the journal cannot be removed, and one renamed away takes
  the journal with it (which every call notices). Nor is the journal locked: compaction
  replaces it by rename.
* The lock file (``runs.lock``) is kept open beside it for what it records (``_vouch``):
  before the record is read or written (``record``, with the lock held), one ``stat`` of
  its path checks that the descriptor is still the file there, and the file at the path is
  opened again if not, so that the record is where every process finds it. An operation
  that does not touch the record pays for no ``stat``.
* Fork: a child shares the parent's open file descriptions, so its unlock would release the
  parent's lock. After fork the child closes the inherited descriptors without unlocking,
  opens its own, and gets a fresh mutex (``os.register_at_fork``, plus a check on every
  acquire against ``_forks.pid()``, the pid another at-fork hook keeps without a system call).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from fcntl import LOCK_EX, LOCK_NB, LOCK_UN, flock

from . import _forks
from .errors import LockTimeoutError

_EXCLUSIVE_NOW = LOCK_EX | LOCK_NB
_SPIN_SECONDS = 0.002
_MAX_SLEEP = 0.001

_live: weakref.WeakSet[StoreLock] = weakref.WeakSet()


class StoreLock:
    """Mutex + flock. ``acquire(timeout)`` / ``release()``; not reentrant."""

    def __init__(self, open_lock_file: Callable[[], int], lock_path: str,
                 stat_lock_path: Callable[[], os.stat_result],
                 open_directory: Callable[[], int]) -> None:
        self._open_lock_file = open_lock_file
        #: the path named in ``LockTimeoutError`` (the lock file: ``fuser`` on it lists the
        #: processes that have the store open)
        self.lock_path = lock_path
        #: one ``stat`` of the lock file's path (not following a symlink), to check that
        #: the descriptor is still that file (``record``)
        self._stat_lock_path = stat_lock_path
        #: opens the state directory for its flock (a new open file description each time)
        self._open_directory = open_directory
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of ``_fd``
        #: the state directory's descriptor, the one flocked
        self._locked: int | None = None
        self._pid = _forks.pid()
        _live.add(self)

    def acquire(self, timeout: float, between: Callable[[], None] | None = None) -> None:
        """Take the mutex, then the directory's flock; ``LockTimeoutError`` after ``timeout``
        seconds. ``between`` runs with the mutex held, before the flock is taken."""
        deadline = time.monotonic() + timeout
        self.acquire_mutex(timeout)
        try:
            if between is not None:
                between()
            self._open()
            self._lock_file(deadline, timeout)
        except BaseException:
            self._mutex.release()
            raise

    def open_file(self) -> None:
        """Open the lock file (and the directory) now without locking (a store checks the
        lock file when it opens)."""
        self._open()

    def acquire_mutex(self, timeout: float) -> None:
        """Take the mutex alone (a read that may not need the file lock); release it with
        ``release_mutex``. ``LockTimeoutError`` after ``timeout`` seconds."""
        if self._pid != _forks.pid():
            self.after_fork()
        # (max(timeout, 0.0) without the call: builtin max costs several times more)
        if not self._mutex.acquire(timeout=0.0 if timeout < 0.0 else timeout):
            raise LockTimeoutError(self.lock_path, timeout)

    def _open(self) -> None:
        """Open what is not open yet: the lock file, and the directory to flock."""
        if self._fd is None:
            self._open_file()
        if self._locked is None:
            self._locked = self._open_directory()

    def _open_file(self) -> None:
        fd = self._open_lock_file()
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def _lock_file(self, deadline: float, timeout: float) -> None:
        assert self._locked is not None
        flock_until(self._locked, deadline, self.lock_path, timeout)

    def _still_at_path(self) -> bool:
        """Whether the descriptor is still the file at the lock file's path (one ``stat``)."""
        try:
            st = self._stat_lock_path()
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def _drop_fd(self) -> None:
        fd, self._fd, self._identity = self._fd, None, None
        if fd is not None:
            _close(fd)

    def descriptor(self) -> int | None:
        """The lock file's descriptor while it is open (None before the first acquire)."""
        return self._fd

    def record(self) -> int | None:
        """The descriptor of the lock file at its path, for the small record of what was
        synced it holds (``_vouch.Vouch``), which the store reads and writes with the lock
        held: when the file was deleted or replaced since it was opened, the file at the
        path is opened (created 0600 if missing) in its place. None before the first
        acquire."""
        if self._locked is None:
            return None
        if self._fd is None or not self._still_at_path():
            self._drop_fd()
            self._open_file()
        return self._fd

    def acquire_file(self, timeout: float) -> None:
        """Take the file lock again while still holding the mutex (after ``release_file``);
        ``LockTimeoutError`` after ``timeout`` seconds."""
        self._open()
        self._lock_file(time.monotonic() + timeout, timeout)

    def release(self) -> None:
        """Release the file lock, then the mutex."""
        try:
            self.release_file()
        finally:
            self._mutex.release()

    def release_file(self) -> None:
        """Release only the file lock: other processes may go on while this thread, still
        holding the mutex, finishes (the store syncs here: group commit)."""
        if self._locked is not None:
            flock(self._locked, LOCK_UN)

    def release_mutex(self) -> None:
        """Release the mutex after ``release_file``."""
        self._mutex.release()

    def after_fork(self) -> None:
        """In a forked child: forget the parent's lock without releasing it."""
        self._mutex = threading.Lock()
        # closing our copies never unlocks the parent's descriptions (each once: the two
        # may be one descriptor, as where a test flocks the lock file itself)
        for fd in dict.fromkeys((self._fd, self._locked)):
            if fd is not None:
                _close(fd)
        self._fd = self._locked = None
        self._identity = None
        self._pid = _forks.pid()

    def close(self) -> None:
        """Close the lock file and the directory (the lock file is never deleted)."""
        if self._pid == _forks.pid():
            for fd in dict.fromkeys((self._fd, self._locked)):
                if fd is not None:
                    os.close(fd)
        self._fd = self._locked = None
        self._identity = None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def flock_until(fd: int, deadline: float, lock_path: str, timeout: float) -> None:
    """Take an exclusive flock on ``fd`` by ``deadline`` (monotonic), else raise
    ``LockTimeoutError``. Polls with a non-blocking flock (a blocking one cannot be given a
    timeout): spins briefly first, as critical sections take tens of microseconds, then backs
    off."""
    try:
        flock(fd, _EXCLUSIVE_NOW)  # free: the usual case, without reading the clock
        return
    except BlockingIOError:
        pass
    spin_until = time.monotonic() + _SPIN_SECONDS
    delay = 0.00005
    while True:
        try:
            flock(fd, _EXCLUSIVE_NOW)
            return
        except BlockingIOError:  # EWOULDBLOCK: another process holds it
            pass
        now = time.monotonic()
        if now >= deadline:
            raise LockTimeoutError(lock_path, timeout)
        if now < spin_until:
            os.sched_yield()
        else:
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, _MAX_SLEEP)


def try_flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` if it is free now (a temp file in use)."""
    try:
        flock(fd, _EXCLUSIVE_NOW)
    except BlockingIOError:
        return False
    return True


@_forks.in_child
def _after_fork_in_child() -> None:
    for lock in list(_live):
        lock.after_fork()
