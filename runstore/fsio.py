"""The store's I/O seam: every write, sync, truncate and rename of the journal goes through here.

``FileSystem`` is a thin veneer over ``os``. Tests substitute a subclass to record writes and
syncs (simulated power loss) or to make the k-th call fail with EIO/ENOSPC, without patching
``os`` for the whole process.
"""

from __future__ import annotations

import os


class FileSystem:
    """Plain ``os`` calls; one method per kind of operation the journal performs."""

    def open(self, name: str, flags: int, mode: int, dir_fd: int) -> int:
        return os.open(name, flags, mode, dir_fd=dir_fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def replace(self, src: str, dst: str, dir_fd: int) -> None:
        os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def unlink(self, name: str, dir_fd: int) -> None:
        os.unlink(name, dir_fd=dir_fd)

    def close(self, fd: int) -> None:
        os.close(fd)


DEFAULT = FileSystem()
