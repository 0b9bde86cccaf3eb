"""Compaction's layout: what a rewritten journal holds and where each kept line lands.

Pure functions over bytes and offsets (no I/O, no locks; ``Store`` does those). ``plan`` lays
out the new file from the old file's bytes and the view's offsets: a header with the base's
summary, the latest version of every run in insertion order, then the retained history
verbatim. ``reseal_tail`` re-stamps the lines other processes appended while a compaction
beside the lock was being written, for their place at the end of the new file.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Container, Iterator

import attrs

from . import codec
from .errors import CorruptStoreError

_MARK = b'{"mark":'  # how a clean-close mark line begins (``codec.encode_mark``)


@attrs.define
class Plan:
    """A compacted file: ``chunks()`` are its bytes; ``moves`` maps the offset of every kept
    line in the old file to its offset in the new one."""

    head: bytes
    buf: bytes  # the old file's bytes from offset 0
    spans: list[tuple[int, int]]
    moves: dict[int, int]
    #: the new offsets of the retained history's lines, in order
    history: list[int]
    #: how far the old file had been read when the plan was made
    old_end: int
    latest_end: int
    base_end: int
    compacted_through: int
    lines: int

    def chunks(self) -> Iterator[bytes]:
        """The new file, in chunks of about a megabyte."""
        return _chunked(self.head, memoryview(self.buf), self.spans)


def plan(buf: bytes, index: dict[str, int], active: Container[str], history: list[int], *,
         store_id: str, created: str, next_seq: int, max_id: str, old_end: int) -> Plan:
    """Lay out the compaction of ``buf`` (the old file from offset 0, read to at least
    ``old_end``): ``index`` maps each run id to the offset of its latest version (insertion
    order), ``active`` holds the non-terminal run ids, ``history`` the offsets of the
    retained changes."""
    find = buf.index
    kept = [*index.values(), *history]
    lengths = [find(b"\n", offset) + 1 - offset for offset in kept]
    at = list(itertools.accumulate(lengths, initial=0))  # where each kept line will be
    latest_count = len(index)
    latest_bytes, size = at[latest_count], at[-1]
    summary_active = tuple(at[i] for i, run_id in enumerate(index) if run_id in active)
    spans = _spans(kept, lengths)
    view = memoryview(buf)
    crc = 0
    for a, b in spans:
        crc = zlib.crc32(view[a:b], crc)
    view.release()
    through = next_seq - 1 - len(history)
    summary = codec.BaseSummary(lines=latest_count, crc=crc, max_id=max_id,
                                active=summary_active)
    head = codec.encode_header(store_id, created, through, latest_bytes, size - latest_bytes,
                               summary)
    start = len(head)
    moves = {old: start + at[i] for i, old in enumerate(index.values())}
    # a run whose latest version is in the retained history points there (as a reader's)
    new_history = [start + at[latest_count + k] for k in range(len(history))]
    moves.update(zip(history, new_history, strict=True))
    return Plan(head=head, buf=buf, spans=spans, moves=moves, history=new_history,
                old_end=old_end,
                latest_end=start + latest_bytes, base_end=start + size,
                compacted_through=through, lines=len(kept))


def reseal_tail(lines: bytes, old_at: int, new_at: int, durable: int,
                path: str) -> tuple[bytes, dict[int, int]]:
    """The complete lines ``lines`` (old file bytes from ``old_at``, checked when they were
    read), re-sealed to follow a new file's synced base at ``new_at``: each record's durable
    mark becomes ``durable`` (its offsets in the old file mean nothing in the new one),
    clean-close marks are dropped. Returns the bytes and old offset -> new offset of each
    record."""
    out: list[bytes] = []
    moves: dict[int, int] = {}
    pos = 0
    while pos < len(lines):
        nl = lines.index(b"\n", pos)
        if not lines.startswith(_MARK, pos):
            try:
                line = codec.restamp(lines[pos:nl], durable)
            except codec.BadLine as exc:  # it passed its checks when read: the file changed
                raise CorruptStoreError(path, old_at + pos, f"a line changed while "
                                        f"compacting: {exc.reason}") from None
            moves[old_at + pos] = new_at
            new_at += len(line)
            out.append(line)
        pos = nl + 1
    return b"".join(out), moves


def _spans(offsets: list[int], lengths: list[int]) -> list[tuple[int, int]]:
    """The byte ranges of the lines at ``offsets`` (of ``lengths``), adjacent ones merged: a
    compaction's kept lines are mostly contiguous (the retained history always is)."""
    spans: list[tuple[int, int]] = []
    start = end = -1
    for offset, length in zip(offsets, lengths, strict=True):
        if offset != end:
            if end >= 0:
                spans.append((start, end))
            start = offset
        end = offset + length
    if end >= 0:
        spans.append((start, end))
    return spans


def _chunked(head: bytes, view: memoryview, spans: list[tuple[int, int]],
             size: int = 1 << 20) -> Iterator[bytes]:
    """``head`` then the bytes of ``view`` in ``spans``, joined into chunks of ~``size``."""
    parts: list[bytes | memoryview] = [head]
    total = len(head)
    for a, b in spans:
        while a < b:
            piece = view[a:min(b, a + size - total)]
            parts.append(piece)
            total += len(piece)
            a += len(piece)
            if total >= size:
                yield b"".join(parts)
                parts, total = [], 0
    if parts:
        yield b"".join(parts)
