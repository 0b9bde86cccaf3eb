"""Forks, in one place: this process's id without a system call, and what a forked child
must do before its first call, run by one ``os.register_at_fork`` hook.

Every object that holds something a forked child must not use as its own (a descriptor
that carries a flock, a mutex another thread may hold, a pooled connection, a call half
done) remembers the ``pid()`` it was made in and compares it on use, and registers with
``in_child`` what the child does instead. Only the forking thread goes on in a child, so
whatever the parent's other threads were doing never finishes there.
"""

from __future__ import annotations

import os
from collections.abc import Callable

_pid = os.getpid()
_in_child: list[Callable[[], None]] = []


def pid() -> int:
    """This process's id, without a system call: ``getpid`` costs ~1 us and the stores ask
    on every call, to notice that they run in a forked child. Kept by the at-fork hook,
    which every fork made through Python runs (``os.fork``, ``multiprocessing``,
    ``subprocess`` with ``preexec_fn``); a ``fork()`` made behind Python's back by a C
    extension is not seen."""
    return _pid


def in_child(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` in every child forked from now on, after ``pid()`` is the child's,
    in the order registered (usable as a decorator)."""
    _in_child.append(callback)
    return callback


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    for callback in _in_child:
        callback()


os.register_at_fork(after_in_child=_after_fork_in_child)
