"""A journal-like file in memory for the ``gather`` and ``compaction`` tests: lines of varied
lengths, and a ``read(offset, size)`` over them that can log the reads."""

from __future__ import annotations

import random

from runstore import _gather as gather


def lines_file(count: int, rng: random.Random, head: bytes = b"") -> tuple[bytes, list[int]]:
    """``head``, then ``count`` lines of varied lengths; the bytes and each line's offset."""
    parts, offsets, at = [head], [], len(head)
    for i in range(count):
        line = b'{"seq":%d,"pad":"%s"}\n' % (i + 1, b"x" * rng.randrange(0, 120))
        offsets.append(at)
        parts.append(line)
        at += len(line)
    return b"".join(parts), offsets


def reader(buf: bytes, log: list[tuple[int, int]] | None = None) -> gather.Read:
    """Reads of ``buf``, each (offset, size) appended to ``log`` when given."""

    def read(offset: int, size: int) -> bytes:
        if log is not None:
            log.append((offset, size))
        return buf[offset:offset + size]

    return read
