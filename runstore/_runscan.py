"""Every run's latest version, read from the journal as the iteration goes, in bounded memory.

``Store.iter_runs`` and ``Store.export`` take a ``Snapshot`` of the view under the store's
mutex (a descriptor of the file open then, where its valid lines end, and the offsets of the
versions written after the compacted base) and hand it to ``records``, which reads the file
through that descriptor without any lock: bytes before the snapshot's end never change, and
a compaction elsewhere renames a new file over the path, never rewrites this one.

Order: insertion order, as ``list()``. A compaction writes the latest version of every run
in insertion order (the base), so the base is read front to back; a run that has a newer
version after the base is yielded at its base position in that newer version (read from its
offset), a run pruned after the base not at all. The runs created after the base follow, in
the order they were created. Memory: a megabyte of the file at a time plus the offsets of
the versions written after the base, which automatic compaction bounds (see ``Store``).

A store whose view indexes every run (``Snapshot.offsets``: a process that needed the whole
index already) is read at those offsets instead, in one forward pass (``gather.lines``).

``last_records`` gives the last N of that order that match a filter (``list --limit N``)
reading from the end: the runs created after the base (found among the lines after it),
then the base backwards, a megabyte at a time, until N are found. Each line it yields is
checked against its own checksum; the base as a whole is not (that needs all of it).
"""

from __future__ import annotations

import array
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from . import _codec, _fields, _gather, _sound
from ._journal import Journal
from ._scan import Cursor, Header, scan
from .errors import CorruptStoreError

_PRUNED = "run_pruned"
_CREATED = b'"run_created"'
#: how many offsets ``last_records`` reads at a time from an index of every run
_BACK_BLOCK = 512


@attrs.define
class Snapshot:
    """What ``records`` needs of the view, taken under the mutex."""

    header: Header
    #: where the valid lines the view took in end
    end: int
    #: id -> offset of its latest version, for the versions the view indexed after the base
    #: (insertion order); with ``offsets`` set, unused
    tail: dict[str, int]
    #: runs pruned after the base
    pruned: set[str]
    #: when the view was opened at a checkpoint: its offset and the seq it says comes next
    #: (the lines between the base and it are not indexed: ``records`` reads them)
    checkpoint: tuple[int, int] | None = None
    #: the offsets of every run's latest version in insertion order, when the view
    #: indexes them all
    offsets: array.array[int] | None = None


def records(journal: Journal, fd: int, snap: Snapshot) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset, decoded record) of the latest version of every run, in insertion order, read
    from ``fd`` (a held descriptor of the journal) as the iteration goes."""
    return _records(journal, fd, snap, None)


def exported(journal: Journal, fd: int,
             snap: Snapshot) -> Iterator[tuple[int, dict[str, Any] | bytes]]:
    """``records``, but a line of the compacted base that ``_sound.sound_export`` proves
    sound is not decoded: its run as ``export`` writes it (bytes) comes instead of the
    record."""
    return _records(journal, fd, snap, _sound.sound_export)


def listed(journal: Journal, fd: int,
           snap: Snapshot) -> Iterator[tuple[int, dict[str, Any] | _sound.SoundRow]]:
    """``records``, but for a line of the compacted base that ``_sound.sound_row`` proves
    sound, the fields ``list`` shows (a ``SoundRow``) instead of the record."""
    return _records(journal, fd, snap, _sound.sound_row)


def _records(journal: Journal, fd: int, snap: Snapshot,
             sound: Callable[[bytes], tuple[str, Any] | None] | None
             ) -> Iterator[tuple[int, Any]]:
    """``records``; with ``sound``, a base line it reads (run id, what it made of the
    line) comes as what it made (``exported``, ``listed``)."""
    path = journal.path

    def read(offset: int, size: int) -> bytes:
        return journal.pread(fd, size, offset)

    if snap.offsets is not None:
        yield from _at(read, snap.offsets, path)
        return
    header = snap.header
    tail, pruned = snap.tail, set(snap.pruned)
    if snap.checkpoint is not None:
        tail, pruned = _before_checkpoint(journal, fd, snap, pruned)
    seen: set[str] = set()  # base runs with a version after the base
    base_runs = 0
    crc = 0
    for chunk_at, chunk in journal.read_lines(header.start, header.latest_end, fd):
        crc = zlib.crc32(chunk, crc)
        if sound is not None and not tail and not pruned:  # no run changed since the base
            lines = chunk.split(b"\n")[:chunk.count(b"\n")]
            base_runs += len(lines)
            offset = chunk_at
            for line, proven in zip(lines, map(sound, lines), strict=True):
                yield offset, proven[1] if proven is not None else _decode(line, offset, path)
                offset += len(line) + 1
            continue
        batch: list[tuple[int, Any]] = []
        later = array.array("q")
        for offset, line in _lines(chunk, chunk_at):
            proven = sound(line) if sound is not None else None
            data: Any
            if proven is not None:
                run_id, data = proven
            else:
                data = _decode(line, offset, path)
                run_id = data["id"]
            base_runs += 1
            if run_id in pruned:
                continue
            newer = tail.get(run_id)
            if newer is None:
                batch.append((offset, data))
            else:
                seen.add(run_id)
                later.append(newer)
                batch.append((newer, None))
        newer_records = _at(read, later, path)
        for offset, found in batch:
            yield (offset, found) if found is not None else next(newer_records)
    _check_base(journal, fd, header, crc, base_runs)
    created = array.array("q", (o for run_id, o in tail.items() if run_id not in seen))
    del seen
    yield from _at(read, created, path)


def last_records(journal: Journal, fd: int, snap: Snapshot, n: int,
                 keep: Callable[[dict[str, Any]], bool]) -> list[tuple[int, dict[str, Any]]]:
    """The last ``n`` records ``records`` yields for which ``keep`` is true, in its order,
    read from the end (``n`` > 0); no more is held than those and what ``records`` holds."""
    path = journal.path
    found: list[tuple[int, dict[str, Any]]] = []  # newest first

    def read(offset: int, size: int) -> bytes:
        return journal.pread(fd, size, offset)

    def take(offsets: array.array[int]) -> bool:
        """Take the matching records at ``offsets`` newest first; True once ``n`` are."""
        for k in range(len(offsets), 0, -_BACK_BLOCK):
            block = offsets[max(k - _BACK_BLOCK, 0):k]
            for offset, data in reversed(list(_at(read, block, path))):
                if keep(data):
                    found.append((offset, data))
                    if len(found) >= n:
                        return True
        return False

    if snap.offsets is not None:
        take(snap.offsets)
        return found[::-1]
    header = snap.header
    tail, pruned = snap.tail, set(snap.pruned)
    if snap.checkpoint is not None:
        tail, pruned = _before_checkpoint(journal, fd, snap, pruned)
    created = _created_after_base(journal, fd, header.base_end, snap.end)
    # the runs ``records`` yields after the base: those not in it (or pruned from it)
    last = array.array("q", (o for run_id, o in tail.items()
                             if run_id in pruned or run_id in created))
    del created
    if take(last):
        return found[::-1]
    del last
    for line_at, line in _lines_backwards(journal, fd, header.start, header.latest_end):
        data = _decode(line, line_at, path)
        run_id = data["id"]
        if run_id in pruned:
            continue
        newer = tail.get(run_id)
        if newer is not None:
            line_at, data = next(_at(read, array.array("q", [newer]), path))
        if keep(data):
            found.append((line_at, data))
            if len(found) >= n:
                break
    return found[::-1]


def _created_after_base(journal: Journal, fd: int, start: int, end: int) -> set[str]:
    """The ids of the runs created in the lines from ``start`` to ``end`` (checked when
    the view took them in; a line that does not name the change is not decoded)."""
    ids: set[str] = set()
    for chunk_at, chunk in journal.read_lines(start, end, fd):
        if _CREATED not in chunk:
            continue
        for offset, line in _lines(chunk, chunk_at):
            if _CREATED in line and not line.startswith(_codec.MARK_START):
                data = _decode(line, offset, journal.path)
                if data["change"] == "run_created":
                    ids.add(data["id"])
    return ids


def _lines_backwards(journal: Journal, fd: int, start: int,
                     end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) of the complete lines from ``start`` to ``end``,
    last first, read a megabyte at a time from the end."""
    pos, carry = end, b""
    while pos > start:
        size = min(1 << 20, pos - start)
        pos -= size
        chunk = journal.pread(fd, size, pos)
        if len(chunk) != size:
            raise CorruptStoreError(journal.path, pos, "the file ends before its compacted "
                                    "base does (it was cut short)")
        chunk += carry
        cut = chunk.find(b"\n") + 1 if pos > start else 0
        carry, body = chunk[:cut], chunk[cut:]
        if pos > start and not cut:  # a line longer than this chunk: read on back
            carry, body = chunk, b""
        lines = list(_lines(body, pos + cut))
        yield from reversed(lines)


def _before_checkpoint(journal: Journal, fd: int, snap: Snapshot,
                       pruned: set[str]) -> tuple[dict[str, int], set[str]]:
    """The tail index and pruned runs of a view opened at a checkpoint: the lines between
    the base and the checkpoint (parsed and checked line by line and against the seq the
    checkpoint says comes next), then what the view indexed after it."""
    header, path = snap.header, journal.path
    assert snap.checkpoint is not None
    at, next_seq = snap.checkpoint
    cur = Cursor(end=header.base_end, next_seq=header.compacted_through + 1,
                 durable=header.base_end, latest_end=header.latest_end,
                 base_end=header.base_end, compacted_through=header.compacted_through)
    if header.base_end > header.latest_end:  # the retained history: its seqs come first
        cur.next_seq = 0
    tail: dict[str, int] = {}
    for chunk_at, chunk in journal.read_lines(header.base_end, at, fd):
        result = scan(chunk, chunk_at, cur)
        if result.damage is not None:
            raise CorruptStoreError(path, result.damage.offset,
                                    f"{result.damage.reason} (before the checkpoint at "
                                    f"byte {at})")
        for offset, data in result.records:
            if data["change"] == _PRUNED:
                tail.pop(data["id"], None)
                pruned.add(data["id"])
            else:
                tail[data["id"]] = offset
    if cur.end != at or (cur.next_seq and cur.next_seq != next_seq):
        raise CorruptStoreError(path, at, "a checkpoint does not match the lines before it "
                                f"(next seq {cur.next_seq})")
    for run_id, offset in snap.tail.items():  # keeps earlier positions, appends new ids
        tail[run_id] = offset
    for run_id in pruned:
        tail.pop(run_id, None)
    return tail, pruned


def _check_base(journal: Journal, fd: int, header: Header, crc: int, runs: int) -> None:
    """The base read, check it against the header's summary (its CRC-32, retained history
    included, and its run count)."""
    summary, path = header.summary, journal.path
    if summary is None:
        return
    pos = header.latest_end
    while pos < header.base_end:
        chunk = journal.pread(fd, min(1 << 20, header.base_end - pos), pos)
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        pos += len(chunk)
    if crc != summary.crc or pos != header.base_end:
        raise CorruptStoreError(path, header.start, "the compacted base does not match the "
                                "checksum in its header (lines were removed, reordered or "
                                "edited); run `python -m runstore check` to find where")
    if runs != summary.lines:
        raise CorruptStoreError(path, header.start, f"the compacted base holds {runs} runs "
                                f"where its header says {summary.lines}")


def _at(read: Callable[[int, int], bytes], offsets: array.array[int],
        path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The decoded records at ``offsets``, in that order."""
    for offset, line in zip(offsets, _gather.lines(read, offsets, path), strict=True):
        yield offset, _decode(line, offset, path)


def _lines(chunk: bytes, chunk_at: int) -> Iterator[tuple[int, bytes]]:
    pos = 0
    for line in chunk.split(b"\n")[:chunk.count(b"\n")]:
        yield chunk_at + pos, line
        pos += len(line) + 1


def _decode(line: bytes, offset: int, path: str) -> dict[str, Any]:
    try:
        data = _codec.decode_line(line)
        _codec.check_record(data)
    except _fields.BadLine as exc:
        raise CorruptStoreError(path, offset, f"a stored run is unreadable: {exc.reason}"
                                ) from None
    return data

