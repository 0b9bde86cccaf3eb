"""Broken locking, for the proofs that the race tests can fail: ``no_cross_process_lock``,
``lockf_without_mutex`` and ``lock_the_data_file`` patch ``runstore._lock.StoreLock`` (and
the store) in the process that calls them; ``break_stress_workers`` makes every worker
process of a stress run call one of them first; ``lock_held`` is another process holding
the store's lock."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import runstore._lock
import runstore.store
from runstore import _statedir, _stress_work
from runstore._stress_work import worker as _real_worker

# -- broken locking (the race test must catch each) -----------------------------------------


class _NoMutex:
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass


def no_cross_process_lock() -> None:
    """StoreLock takes only its thread mutex: processes do not exclude each other."""
    def lock_file(self: Any, deadline: float, timeout: float) -> None:
        return None

    runstore._lock.StoreLock._lock_file = lock_file  # type: ignore[method-assign]  # the bug
    runstore._lock.StoreLock.release_file = lambda self: None  # type: ignore[method-assign]


def lockf_without_mutex() -> None:
    """POSIX record locks (lockf) on the lock file and no thread mutex: threads of one
    process sharing a Store all get in (a process owns a record lock, not a thread)."""
    original_init = runstore._lock.StoreLock.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._mutex = _NoMutex()

    def lock_file(self: Any, deadline: float, timeout: float) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def release_file(self: Any) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    runstore._lock.StoreLock.__init__ = init  # type: ignore[method-assign]  # the bug
    runstore._lock.StoreLock._lock_file = lock_file  # type: ignore[method-assign]
    runstore._lock.StoreLock.release_file = release_file  # type: ignore[method-assign]


def lock_the_data_file() -> None:
    """flock the journal itself (opened afresh at each acquire) instead of the directory, and
    compact often: a process that waited on the replaced inode and one that opened the new
    file both hold "the" lock."""
    def lock_file(self: Any, deadline: float, timeout: float) -> None:
        path = os.path.join(os.path.dirname(self.lock_path), _statedir.DATA_NAME)
        data_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(data_fd, fcntl.LOCK_EX)
        self._data_fd = data_fd

    def release_file(self: Any) -> None:
        data_fd = getattr(self, "_data_fd", None)
        if data_fd is not None:
            self._data_fd = None
            os.close(data_fd)  # closing drops the flock

    original_append = runstore.store.Store._append
    rng = random.Random()

    def append(self: Any, changes: Any) -> int:
        end: int = original_append(self, changes)
        if rng.random() < 0.3:
            self._index_appended()  # compaction works on a complete view
            self._compact(retain=0)
        return end

    runstore._lock.StoreLock._lock_file = lock_file  # type: ignore[method-assign]  # the bug
    runstore._lock.StoreLock.release_file = release_file  # type: ignore[method-assign]
    runstore.store.Store._append = append  # type: ignore[method-assign]


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held(state_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Another process holding the store's lock: an exclusive flock on its directory."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, os.fspath(state_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def broken_worker(variant: str, *args: Any) -> None:
    """A stress worker process that first breaks its locking with ``variant`` (the name of a
    function of this module), then runs the real worker."""
    globals()[variant]()
    _real_worker(*args)


def break_stress_workers(monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    """Every worker process the stress runs of this test start breaks its locking with
    ``variant`` first (``runstore._stress_work.worker`` is looked up at each start and
    pickled by name, so a partial of ``broken_worker`` reaches the forked workers)."""
    monkeypatch.setattr(_stress_work, "worker", functools.partial(broken_worker, variant))
