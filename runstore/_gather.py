"""Gathered reads: lines or byte ranges of the journal at given offsets, in any order,
without reading the file whole (a million runs are ~550 MB of it).

``line_lengths`` finds where the lines at a set of offsets end in one forward pass;
``ranges`` and ``lines`` then read them back in the order asked, through a window that reads
ahead only as far as the ranges asked for next go on forward: one read for a cluster of
nearby lines, and no more than the line itself for a lone jump. No read asks for more than
``READ_AHEAD`` bytes, except to find the end of a line longer than that. The file is read
through a ``Read`` callable, so that the callers decide about descriptors and errors
(``Journal.reader``) and tests can count the reads.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterator

from .errors import CorruptStoreError

#: the most a single read asks for
READ_AHEAD = 1 << 20

#: ``read(offset, size)``: up to ``size`` bytes of the file from ``offset`` (fewer only at
#: its end)
Read = Callable[[int, int], bytes]


def line_lengths(read: Read, offsets: array.array[int], path: str) -> array.array[int]:
    """The length (newline included) of the line at each of ``offsets``, found in one
    forward pass over the file (the offsets visited in sorted order)."""
    lengths = array.array("q", bytes(8 * len(offsets)))
    window = _Window(read, path)
    for i in sorted(range(len(offsets)), key=offsets.__getitem__):
        offset = offsets[i]
        lengths[i] = window.line_end(offset) + 1 - offset
    return lengths


def lines(read: Read, offsets: array.array[int], path: str) -> Iterator[bytes]:
    """The line at each of ``offsets`` (without its newline), in that order."""
    lengths = line_lengths(read, offsets, path)
    ends = array.array("q", (o + n - 1 for o, n in zip(offsets, lengths, strict=True)))
    del lengths
    window = _Window(read, path)
    for k, (a, b) in enumerate(zip(offsets, ends, strict=True)):
        if not window.holds(a, b):
            window.fill(a, _reach(offsets, ends, k) - a)
        yield b"".join(window.pieces(a, b))


def ranges(read: Read, starts: array.array[int], ends: array.array[int],
           path: str) -> Iterator[bytes | memoryview]:
    """The bytes of the file in the ranges ``starts[k]:ends[k]``, in that order (in pieces:
    a range is not joined)."""
    window = _Window(read, path)
    for k, (a, b) in enumerate(zip(starts, ends, strict=True)):
        if not window.holds(a, b):
            window.fill(a, _reach(starts, ends, k) - a)
            if not window.holds(a, b):  # longer than one read: in pieces
                yield from window.pieces(a, b)
                continue
        yield window.view[a - window.at:b - window.at]  # inside the window: one slice


def _reach(starts: array.array[int], ends: array.array[int], k: int) -> int:
    """Where a read for range ``k`` should end: as far as the ranges after it go on
    forward from its start within ``READ_AHEAD``."""
    a, reach = starts[k], ends[k]
    for j in range(k + 1, len(starts)):
        if starts[j] < a or ends[j] - a > READ_AHEAD:
            break
        reach = max(reach, ends[j])
    return reach


class _Window:
    """The bytes of the file last read (``fill``), and reads of lines or ranges that
    fall inside them without another read."""

    __slots__ = ("_path", "_read", "at", "buf", "end", "view")

    def __init__(self, read: Read, path: str) -> None:
        self._read = read
        self._path = path
        self._take(0, b"")

    def _take(self, offset: int, buf: bytes) -> None:
        #: the bytes read, from offset ``at`` to ``end``, and a view of them to slice
        self.at, self.buf, self.end, self.view = offset, buf, offset + len(buf), memoryview(buf)

    def holds(self, a: int, b: int) -> bool:
        return self.at <= a and b <= self.end

    def fill(self, offset: int, size: int) -> None:
        """Read ``size`` bytes from ``offset`` (at most ``READ_AHEAD`` at a time: a
        larger range is read by ``pieces`` as it goes)."""
        self._take(offset, self._read(offset, min(size, READ_AHEAD)))

    def pieces(self, a: int, b: int) -> Iterator[bytes | memoryview]:
        """The bytes ``a:b``, starting inside the window; read on past it as needed."""
        while a < b:
            if not self.at <= a < self.end:
                self.fill(a, b - a)
                if not self.buf:
                    raise CorruptStoreError(self._path, a, "the file ended before a line it "
                                            "had held (was it truncated meanwhile?)")
            piece = self.view[a - self.at:min(self.end, b) - self.at]
            yield piece
            a += len(piece)

    def line_end(self, offset: int) -> int:
        """The offset of the newline that ends the line at ``offset``."""
        rel = offset - self.at
        if 0 <= rel < len(self.buf):
            nl = self.buf.find(b"\n", rel)
            if nl >= 0:
                return self.at + nl
        size = READ_AHEAD
        while True:
            self._take(offset, self._read(offset, size))
            nl = self.buf.find(b"\n")
            if nl >= 0:
                return offset + nl
            if len(self.buf) < size:
                raise CorruptStoreError(self._path, offset, "a record line has no end")
            size *= 4
