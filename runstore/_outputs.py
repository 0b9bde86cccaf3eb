"""What is at the path of an output a caller names (``export(path)``, ``prune(archive=...)``,
``runstore export FILE``, ``runstore prune --archive FILE``), and so how it is written.

The path is resolved first: a symlink is followed, never replaced (the link stays, what it
points to is written, and a temp file goes beside that file). Then what is there decides:

- nothing yet, or a regular file: written as a file (an export through a temp file renamed
  over it, an archive appended to);
- a FIFO or a character device (a pipe, a terminal, ``/dev/null``, what ``/dev/stdout``
  points to): an export is written into it directly, as a stream, with no temp file and no
  rename; opening a FIFO waits for a reader, as a shell redirection does; a sync such a
  file cannot do (``fsync`` answering EINVAL or ENOTSUP) is no error. An archive is refused
  (``OutputTargetError``): prune removes the runs once their archive is synced, and such a
  file keeps nothing to restore them from (nor should a prune wait, holding the store's
  lock, for a FIFO's reader);
- a directory, a socket or a block device: refused with ``OutputTargetError`` naming the
  path and what it is, before anything is opened.

``_targets`` has refused a target that is one of the store's own files before this is asked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import NamedTuple

from .errors import OutputTargetError

#: what ``fsync`` answers for a file that cannot be synced (a pipe, a terminal, /dev/null)
_CANNOT_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
#: the kinds of file an output is never written to, with how messages call them
_REFUSED: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISBLK, "a block device"))


class Output(NamedTuple):
    """Where an output goes: ``path`` is what to open; ``stream`` is True for a FIFO or a
    character device (written into directly, opened by the name it was given, so that the
    kernel follows its links: ``/dev/stdout`` to ``/proc/self/fd/1`` to the pipe), False for
    a regular file or none yet (``path`` is then the target with its symlinks resolved).
    ``mode`` holds a regular file's permission bits (what a file renamed over it keeps)."""

    path: str
    stream: bool
    mode: int | None = None


def streamed(mode: int) -> bool:
    """True for the kinds of file an output is written into directly (``st_mode``)."""
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def resolve(target: str, archive: bool = False) -> Output:
    """Where writing ``target`` goes (see the module's documentation). ``OutputTargetError``
    for a directory, a socket or a block device, and with ``archive`` for a FIFO or a
    character device too; the ``OSError`` of ``stat`` other than a
    missing file (a symlink loop, a directory that cannot be searched) propagates, and so
    does one for a regular file whose resolved name is not that file (a link the kernel
    follows but whose text names no path, as ``/proc/self/fd/N`` of a deleted file)."""
    if target.endswith(os.sep):  # a file created at the name would drop the slash
        raise OutputTargetError(target, "", "it ends with a slash, so it names a directory, "
                                "which runstore never writes an output to", "name a file")
    try:
        st = os.stat(target)
    except FileNotFoundError:  # to be created (where a dangling symlink points)
        return Output(os.path.realpath(target), False)
    if streamed(st.st_mode):
        if archive:
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device"
            raise OutputTargetError(
                target, "", f"it is {kind}: an archive must be a regular file, since prune "
                "removes the runs once their archive is synced, and such a file keeps "
                "nothing to restore them from", "name a regular file (a new one is created)")
        return Output(target, True)
    if stat.S_ISREG(st.st_mode):
        path = os.path.realpath(target)
        there = os.stat(path)
        if (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino):
            raise OSError(errno.ENOENT, f"its symlinks lead to a file that is not at {path}")
        return Output(path, False, stat.S_IMODE(st.st_mode))
    what = next((name for test, name in _REFUSED if test(st.st_mode)),
                "neither a regular file, a FIFO nor a character device")
    raise OutputTargetError(target, "", f"it is {what}, which runstore never writes an "
                            "output to")


def check(target: str, archive: bool = False) -> None:
    """``resolve``'s refusal alone, before any work: a target ``stat`` cannot look at is
    left to the write, which reports it."""
    try:
        resolve(target, archive)
    except OSError:
        pass


def open_stream(path: str) -> int:
    """Open the FIFO or character device ``path`` for writing, as it is: never
    created nor truncated. A FIFO waits for a reader. ``OSError`` when ``path`` is no
    longer such a file (replaced since it was resolved; nothing was written to it)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not streamed(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "it is no longer a FIFO or a character device (it "
                          "was replaced while it was opened)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def sync_stream(fd: int, sync: Callable[[int], None]) -> None:
    """``sync(fd)`` for a FIFO or character device: where it cannot be synced (EINVAL,
    ENOTSUP), what was written is all there is to do."""
    try:
        sync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_SYNC:
            raise
