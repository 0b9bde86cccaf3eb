"""The store's I/O seam: every write, sync, truncate and rename of the journal goes through here.

``FileSystem`` is a thin veneer over ``os``. Tests substitute a subclass to record writes and
syncs (simulated power loss) or to make the k-th call fail with EIO/ENOSPC, without patching
``os`` for the whole process.

``sync_data`` and ``sync_file`` are the only ways the package syncs a file. Where
``os.fdatasync`` does not exist (macOS), ``sync_data`` asks for ``fcntl(F_FULLFSYNC)``, which
also flushes the drive's write cache (a plain ``fsync`` there does not); ``sync_file`` does the
same wherever ``F_FULLFSYNC`` exists. A file system that refuses ``F_FULLFSYNC`` (EINVAL,
ENOTSUP, ENOTTY: SMB and other network mounts) gets ``os.fsync`` instead.
"""

from __future__ import annotations

import errno
import fcntl
import os

#: what F_FULLFSYNC fails with on a file system that does not support it (the file system's
#: ioctl handler answers EINVAL, ENOTSUP or ENOTTY for a command it does not know)
_NO_FULLFSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOTTY})


def _full_fsync(fd: int, command: int) -> None:
    """``fcntl(fd, F_FULLFSYNC)``, or ``os.fsync`` where the file system refuses it."""
    try:
        fcntl.fcntl(fd, command)
    except OSError as exc:
        if exc.errno not in _NO_FULLFSYNC:
            raise
        os.fsync(fd)


def sync_data(fd: int) -> None:
    """Make ``fd``'s data (and the metadata needed to read it back) durable: ``os.fdatasync``,
    or ``F_FULLFSYNC`` where there is no ``fdatasync`` (macOS)."""
    fdatasync = getattr(os, "fdatasync", None)
    if fdatasync is not None:
        fdatasync(fd)
        return
    command = getattr(fcntl, "F_FULLFSYNC", None)
    if command is None:
        os.fsync(fd)
    else:
        _full_fsync(fd, command)


def sync_file(fd: int) -> None:
    """Make ``fd``'s data and metadata durable (a directory's entries, a file about to be
    renamed): ``F_FULLFSYNC`` where it exists (macOS), else ``os.fsync``."""
    command = getattr(fcntl, "F_FULLFSYNC", None)
    if command is None:
        os.fsync(fd)
    else:
        _full_fsync(fd, command)


class FileSystem:
    """Plain ``os`` calls; one method per kind of operation the journal performs."""

    def open(self, name: str, flags: int, mode: int, dir_fd: int) -> int:
        return os.open(name, flags, mode, dir_fd=dir_fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def fdatasync(self, fd: int) -> None:
        sync_data(fd)

    def fsync(self, fd: int) -> None:
        sync_file(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def replace(self, src: str, dst: str, dir_fd: int) -> None:
        os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def unlink(self, name: str, dir_fd: int) -> None:
        os.unlink(name, dir_fd=dir_fd)

    def close(self, fd: int) -> None:
        os.close(fd)


DEFAULT = FileSystem()
