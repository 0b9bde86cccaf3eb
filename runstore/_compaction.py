"""Compaction's layout: what a rewritten journal holds and where each kept line lands.

Pure functions over offsets and a ``Read`` callable for the old file's bytes (no file
handles, no locks; ``Store`` does those). ``plan`` lays out the new file: a header with the
base's summary, the latest version of every run in insertion order, then the retained history
verbatim. ``reseal_tail`` re-stamps the lines other processes appended while a compaction
beside the lock was being written, for their place at the end of the new file.

The old file is never held in memory whole (a million runs are ~550 MB of it): line lengths
are found in one forward pass, then the kept bytes are read twice in the new file's order,
once for the header's CRC-32 and once to write them (``runstore._gather``). A plan's own
bookkeeping is a few arrays of machine integers plus the new id index.
"""

from __future__ import annotations

import array
import itertools
import zlib
from collections.abc import Container, Iterator

import attrs

from . import _codec, _fields, _gather
from ._gather import Read
from .errors import CorruptStoreError

_MARK = b'{"mark":'  # how a clean-close mark line begins (``codec.encode_mark``)
#: about how much ``Plan.chunks`` hands to each write
_CHUNK = 1 << 20


@attrs.define
class Plan:
    """A compacted file: ``chunks()`` are its bytes; ``index`` is the new id index (the
    offset of every run's latest version in the new file, insertion order kept)."""

    head: bytes
    read: Read
    #: the byte ranges of the old file that make the new file's body, in its order
    starts: array.array[int]
    ends: array.array[int]
    index: dict[str, int]
    #: the new offsets of the retained history's lines, in order
    history: list[int]
    #: old offset -> new offset of the retained history's lines
    history_moves: dict[int, int]
    #: how far the old file had been read when the plan was made
    old_end: int
    latest_end: int
    base_end: int
    compacted_through: int
    lines: int
    path: str
    #: where each kept line lands, from the end of ``head`` (its last entry: the body's size)
    at: array.array[int] = attrs.field(factory=lambda: array.array("q"))

    def chunks(self) -> Iterator[bytes]:
        """The new file, in chunks of about a megabyte."""
        yield self.head
        parts: list[bytes | memoryview] = []
        total = 0
        for piece in _gather.ranges(self.read, self.starts, self.ends, self.path):
            parts.append(piece)
            total += len(piece)
            if total >= _CHUNK:
                yield b"".join(parts)
                parts, total = [], 0
        if parts:
            yield b"".join(parts)


def plan(read: Read, index: dict[str, int], active: Container[str], history: list[int], *,
         store_id: str, created: str, next_seq: int, max_id: str, old_end: int,
         path: str) -> Plan:
    """Lay out the compaction of the old file (``read``, validated up to ``old_end``):
    ``index`` maps each run id to the offset of its latest version (insertion order),
    ``active`` holds the non-terminal run ids, ``history`` the offsets of the retained
    changes. ``path`` names the old file in errors."""
    new = plan_lines(read, array.array("q", index.values()),
                     [i for i, run_id in enumerate(index) if run_id in active], history,
                     store_id=store_id, created=created, next_seq=next_seq, max_id=max_id,
                     old_end=old_end, path=path)
    # a run whose latest version is in the retained history points there (as a reader's)
    moves, start, at = new.history_moves, len(new.head), new.at
    new.index = {run_id: moves.get(old, start + at[i])
                 for i, (run_id, old) in enumerate(index.items())}
    return new


def plan_lines(read: Read, latest: array.array[int], active: list[int], history: list[int],
               *, store_id: str, created: str, next_seq: int, max_id: str, old_end: int,
               path: str) -> Plan:
    """``plan`` from the offsets alone, for a caller that holds no id index (a prune of a
    million runs): ``latest`` are the offsets of the runs' latest versions in insertion
    order, ``active`` the positions in it of the non-terminal runs (ascending). The plan's
    ``index`` is left empty (``at`` gives where each line lands, from the body's start)."""
    kept = array.array("q", latest)
    kept.extend(history)
    lengths = _gather.line_lengths(read, kept, path)
    at = array.array("q", itertools.accumulate(lengths, initial=0))  # where each line lands
    latest_count = len(latest)
    latest_bytes, size = at[latest_count], at[-1]
    summary_active = tuple(at[i] for i in active)
    starts, ends = _spans(kept, lengths)
    del lengths, kept
    crc = 0
    for piece in _gather.ranges(read, starts, ends, path):
        crc = zlib.crc32(piece, crc)
    through = next_seq - 1 - len(history)
    summary = _codec.BaseSummary(lines=latest_count, crc=crc, max_id=max_id,
                                active=summary_active)
    head = _codec.encode_header(store_id, created, through, latest_bytes, size - latest_bytes,
                               summary)
    start = len(head)
    new_history = [start + at[latest_count + k] for k in range(len(history))]
    history_moves = dict(zip(history, new_history, strict=True))
    return Plan(head=head, read=read, starts=starts, ends=ends, index={},
                history=new_history, history_moves=history_moves, old_end=old_end,
                latest_end=start + latest_bytes, base_end=start + size,
                compacted_through=through, lines=latest_count + len(history), path=path,
                at=at)


def with_tail(read: Read, old_end: int, tail: bytes) -> Read:
    """``read`` of the old file up to ``old_end``, followed by ``tail``: the file as if
    ``tail`` had been appended at ``old_end``. A prune lays out its compaction over this, with
    its ``run_pruned`` lines in the retained history, without ever appending them to the old
    file (a failed prune then leaves it exactly as it was)."""

    def joined(offset: int, size: int) -> bytes:
        if offset >= old_end:
            return tail[offset - old_end:offset - old_end + size]
        want = min(size, old_end - offset)
        head = read(offset, want)
        if len(head) < want or want == size:
            return head
        return head + tail[:size - want]

    return joined


def reseal_tail(lines: bytes, old_at: int, new_at: int, durable: int,
                path: str, legacy: bool = False) -> tuple[bytes, dict[int, int]]:
    """The complete lines ``lines`` (old file bytes from ``old_at``, checked when they were
    read), re-sealed to follow a new file's synced base at ``new_at``: each record's durable
    mark becomes ``durable`` (its offsets in the old file mean nothing in the new one),
    clean-close marks are dropped. Returns the bytes and old offset -> new offset of each
    record. ``legacy``: the old file is of format version 1, where a record line carrying
    a ``mark`` key was read as a mark (``codec.is_mark``): it is dropped too, as the view
    never took it in (and its seq was handed out again)."""
    out: list[bytes] = []
    moves: dict[int, int] = {}
    pos = 0
    while pos < len(lines):
        nl = lines.index(b"\n", pos)
        if not lines.startswith(_MARK, pos) and not (legacy and _legacy_mark(lines[pos:nl])):
            try:
                line = _codec.restamp(lines[pos:nl], durable)
            except _fields.BadLine as exc:  # it passed its checks when read: the file changed
                raise CorruptStoreError(path, old_at + pos, f"a line changed while "
                                        f"compacting: {exc.reason}") from None
            moves[old_at + pos] = new_at
            new_at += len(line)
            out.append(line)
        pos = nl + 1
    return b"".join(out), moves


def _legacy_mark(line: bytes) -> bool:
    """Whether a line of a version 1 journal was read as a mark though it begins as a
    record (a ``mark`` key among its fields): looked for only when the key is there."""
    if b'"mark":' not in line or line.startswith(_MARK):
        return False
    try:
        return _codec.is_mark(line, _codec.decode_line(line), legacy=True)
    except _fields.BadLine:
        return False  # it passed its checks when read: restamp() reports the change


def _spans(offsets: array.array[int],
           lengths: array.array[int]) -> tuple[array.array[int], array.array[int]]:
    """The byte ranges (starts, ends) of the lines at ``offsets`` (of ``lengths``), adjacent
    ones merged: a compaction's kept lines are mostly contiguous (the retained history always
    is)."""
    starts: array.array[int] = array.array("q")
    ends: array.array[int] = array.array("q")
    end = -1
    for offset, length in zip(offsets, lengths, strict=True):
        if offset == end:
            end += length
            ends[-1] = end
        else:
            end = offset + length
            starts.append(offset)
            ends.append(end)
    return starts, ends
