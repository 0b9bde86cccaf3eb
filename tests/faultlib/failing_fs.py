"""File systems that count or fail: ``ReadLog`` counts what is read, ``FailingFS`` makes
the k-th write / fdatasync / fsync / replace / ftruncate / open fail, once or from then on."""

from __future__ import annotations

import errno
import os

from runstore._fsio import FileSystem

# -- a failing file system ------------------------------------------------------------------


class ReadLog(FileSystem):
    """Plain I/O that counts what is read: ``sizes`` asked for, ``read`` bytes returned."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.read = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = super().pread(fd, size, offset)
        self.sizes.append(size)
        self.read += len(data)
        return data


class FailingFS(FileSystem):
    """Fail the ``nth`` call (1-based) of ``kind`` ("write", "fdatasync", "fsync", "replace",
    "ftruncate", "open") with ``err``; ``persistent`` fails every later call of that kind
    too. ``partial`` makes a failing write first write half its bytes (a short write, then
    the error on the next call), as ENOSPC does."""

    def __init__(self, kind: str, nth: int, err: int = errno.EIO, *, persistent: bool = False,
                 partial: bool = False) -> None:
        self.kind, self.nth, self.err = kind, nth, err
        self.persistent, self.partial = persistent, partial
        self.calls: dict[str, int] = {}
        self.failed = 0
        self.armed = True
        self._short_done = False

    def _fail(self, kind: str) -> bool:
        if not self.armed or kind != self.kind:
            return False
        n = self.calls[kind] = self.calls.get(kind, 0) + 1
        if n == self.nth or (self.persistent and n > self.nth):
            self.failed += 1
            return True
        return False

    def _raise(self) -> None:
        raise OSError(self.err, os.strerror(self.err))

    def open(self, name: str, flags: int, mode: int, dir_fd: int) -> int:
        if self._fail("open"):
            self._raise()
        return super().open(name, flags, mode, dir_fd)

    def write(self, fd: int, data: bytes) -> int:
        if self.partial and self.kind == "write" and self.armed and not self._short_done:
            n = self.calls.get("write", 0) + 1
            if n == self.nth and len(data) > 1:
                self._short_done = True
                return super().write(fd, bytes(data[:len(data) // 2]))
        if self._fail("write"):
            self._raise()
        return super().write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if self._fail("fdatasync"):
            self._raise()
        super().fdatasync(fd)

    def fsync(self, fd: int) -> None:
        if self._fail("fsync"):
            self._raise()
        super().fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        if self._fail("ftruncate"):
            self._raise()
        super().ftruncate(fd, length)

    def replace(self, src: str, dst: str, dir_fd: int) -> None:
        if self._fail("replace"):
            self._raise()
        super().replace(src, dst, dir_fd)
