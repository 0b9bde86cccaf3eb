"""Reading journal lines, with no I/O of its own: the header (``parse_header``), the lines
after it (``scan``, which validates each line and advances a ``Cursor``), and the verdict on
damage (``judge``): a torn tail that may be cut, or corruption. Bytes come from a buffer or
from a ``read(offset, size)`` callable, a megabyte at a time (``_chunks``).

Only a torn tail is ever cut: bytes past everything known synced, which no later line shows
synced and which were not written whole and then edited (``judge``). What is known synced
comes from the lines' durable marks and from the lock file, where a clean close, a
checkpoint and a compaction record how much of which journal was synced (``_vouch.Vouch``),
out of reach of a cut of the journal. A damaged tail is judged as it is read, a megabyte at
a time, so a huge one costs linear time and bounded memory.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from . import _codec, _fields
from ._statedir import LOCK_NAME
from .errors import CorruptStoreError

#: a damaged tail larger than this is not treated as a torn write but reported as corruption
TORN_TAIL_LIMIT = 64 * 1024 * 1024
#: the longest line read whole: a longer one is judged as it is streamed, never held in
#: memory (runstore writes none nearly this long, and a tail this long is never cut)
LINE_LIMIT = TORN_TAIL_LIMIT
_READ_CHUNK = 1 << 20


@attrs.frozen
class Header:
    """The first line. A compaction writes, after it, the latest version of every run in
    insertion order (ending at ``latest_end``), then the retained recent history (changes
    ``compacted_through + 1`` onwards, ending at ``base_end``); all of it synced."""

    store_id: str
    created: str
    version: int
    compacted_through: int
    latest_end: int
    base_end: int
    #: where the first record line starts (the header's length)
    start: int = 0
    #: written by compactions: lets a reader skip parsing the base (``codec.BaseSummary``)
    summary: _codec.BaseSummary | None = None
    #: CRC-32 of the header line: with the store id it names one journal file's content
    #: (every compaction writes a header of its own), which a ``Vouch`` is about
    crc: int = 0


@attrs.frozen
class Damage:
    offset: int
    reason: str
    #: False for a complete line that passes its checksum but is wrong (seq, status, ...):
    #: a crash cannot produce one, so it is never cut off as a torn write
    torn: bool = True


@attrs.define
class Cursor:
    """How far a reader has validated the file, and what it must expect next."""

    end: int
    next_seq: int
    durable: int
    latest_end: int
    base_end: int
    compacted_through: int
    #: the seq of the record after the last checkpoint line read (or after the base)
    checkpoint_seq: int = 0
    #: a version 1 journal: lines are told apart as version 1 did (``codec.is_mark``)
    legacy: bool = False
    #: how much of the file a clean close, checkpoint or compaction recorded as synced in
    #: the lock file (``Vouch``): never cut, whatever its lines look like
    vouched: int = 0


@attrs.define
class ScanResult:
    records: list[tuple[int, dict[str, Any]]]
    damage: Damage | None
    #: in a version 1 journal, record lines read as marks because they carry a field named
    #: ``mark`` (``codec.is_mark``): runs that version lost (``check`` reports them)
    shadowed: list[tuple[int, dict[str, Any]]] = attrs.Factory(list)


_INCOMPLETE = "incomplete last line (a torn write)"


def scan(buf: bytes, start: int, cur: Cursor) -> ScanResult:
    """Validate the complete lines of ``buf`` (file bytes from offset ``start``) and advance
    ``cur`` past the valid ones; stop at the first line that is not sound. A ``cur`` whose
    ``next_seq`` is 0 takes the first seq it meets as it is (a reader that starts in the
    middle of the records: ``Journal.lines_follow``)."""
    records: list[tuple[int, dict[str, Any]]] = []
    shadowed: list[tuple[int, dict[str, Any]]] = []
    pos = 0
    size = len(buf)
    decode, check, is_mark = _codec.decode_line, _codec.check_record, _codec.is_mark
    legacy = cur.legacy
    while pos < size:
        nl = buf.find(b"\n", pos)
        offset = start + pos
        if nl < 0:
            return ScanResult(records, Damage(offset, _INCOMPLETE), shadowed)
        try:
            line = buf[pos:nl]
            data = decode(line)
            if is_mark(line, data, legacy):
                if legacy and not line.startswith(_codec.MARK_START):
                    shadowed.append((offset, data))
                mark = data.get("durable")
                if type(mark) is not int or not 0 <= mark <= offset or offset < cur.base_end:
                    raise _fields.BadLine(f"bad durable mark {mark!r}")
                if data["mark"] == "checkpoint":
                    says = data.get("next_seq")
                    if cur.next_seq == 0 and type(says) is int:
                        cur.next_seq = says
                    if says != cur.next_seq:
                        raise _fields.BadLine(f"a checkpoint says the next seq is {says!r} "
                                            f"where it is {cur.next_seq}")
                    cur.checkpoint_seq = cur.next_seq
                # a mark that vouches for every byte before it vouches for itself too: it
                # shows no change, so a reader need not sync it (``Store._make_visible``)
                cur.durable = max(cur.durable, mark if mark < offset else start + nl + 1)
                pos = nl + 1
                cur.end = start + pos
                continue
            else:
                check(data)
                seq = data["seq"]
                if offset < cur.latest_end:
                    pass  # the compacted base: latest versions, in insertion order
                elif seq != cur.next_seq and cur.next_seq:
                    raise _fields.BadLine(f"seq {seq} where {cur.next_seq} was expected")
                elif offset < cur.base_end:
                    cur.next_seq = seq + 1  # retained history copied by compaction
                else:
                    durable = data["durable"]
                    if durable > offset:
                        raise _fields.BadLine("durable mark points past the line itself")
                    cur.next_seq = seq + 1
                    if durable > cur.durable:  # (max() costs several times more)
                        cur.durable = durable
                records.append((offset, data))
        except _fields.BadLine as exc:
            return ScanResult(records, Damage(offset, exc.reason, exc.torn), shadowed)
        pos = nl + 1
        cur.end = start + pos
    return ScanResult(records, None, shadowed)


#: how every line runstore writes after the header begins (a record, or a clean-close mark)
_LINE_START = re.compile(rb'\{"(?:seq|mark)":')
_CRC_TAIL = re.compile(rb',"crc":(\d{1,10})\}\r?$')

#: ``read(offset, size)``: bytes of the file being judged (a descriptor, or a buffer)
Read = Callable[[int, int], bytes]


def buffer_reader(buf: bytes, start: int) -> Read:
    """``read`` over ``buf``, the file's bytes from offset ``start``."""
    def read(offset: int, size: int) -> bytes:
        return buf[offset - start:offset - start + size]
    return read


def _newline_after(read: Read, end: int, offset: int) -> int:
    """The offset of the first newline at or after ``offset`` (-1: none before ``end``),
    found in chunks, keeping none of them."""
    pos = offset
    while pos < end:
        chunk = read(pos, min(_READ_CHUNK, end - pos))
        if not chunk:
            break
        nl = chunk.find(b"\n")
        if nl >= 0:
            return pos + nl
        pos += len(chunk)
    return -1


def first_line(read: Read, limit: int) -> bytes:
    """The file's first line with its newline; without a newline in the first ``limit``
    bytes, those bytes. The newline is found ``_READ_CHUNK`` at a time, so a header of a
    few hundred bytes never reads up to ``LINE_LIMIT`` of the file."""
    nl = _newline_after(read, limit, 0)
    return read(0, nl + 1 if nl >= 0 else limit)


def _line_at(read: Read, end: int, offset: int) -> tuple[bytes | None, int]:
    """(the line at ``offset`` without its newline, or None when it is longer than
    ``LINE_LIMIT`` or has no newline before ``end``; where its newline is, -1 if none)."""
    nl = _newline_after(read, end, offset)
    if nl < 0 or nl - offset > LINE_LIMIT:
        return None, nl
    return read(offset, nl - offset), nl


def _long_line_damage(read: Read, nl: int, damage: Damage) -> Damage:
    """``damage`` at a line too long to be read whole (``Journal.read_lines`` stops at it,
    so the scan saw it as incomplete), whose newline is at ``nl``: what is wrong with it,
    found by streaming it."""
    tail = read(max(damage.offset, nl - 24), nl - max(damage.offset, nl - 24))
    m = _CRC_TAIL.search(tail)
    if m is None:
        return Damage(damage.offset, "no checksum field (torn, truncated or not written by "
                      "runstore)")
    cut, crc, pos = nl - len(tail) + m.start(), 0, damage.offset
    while pos < cut:
        chunk = read(pos, min(_READ_CHUNK, cut - pos))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        pos += len(chunk)
    if crc != int(m.group(1)):
        return Damage(damage.offset, "checksum mismatch (the line was altered or torn)")
    return Damage(damage.offset, f"a line of {nl - damage.offset} bytes, longer than "
                  f"runstore reads ({LINE_LIMIT})", torn=False)


def _normalised(line: bytes) -> Iterator[tuple[bytes, str]]:
    """Versions of a damaged line with a whole-file edit undone, each with what the edit
    was: line endings converted to CRLF, text re-encoded between Latin-1 and UTF-8."""
    crlf = line.endswith(b"\r")
    base = line.rstrip(b"\r") if crlf else line
    if crlf:
        yield base, "its line ending was converted to CRLF"
    edited = "its line ending was converted to CRLF and " if crlf else ""
    if max(base, default=0) < 0x80:
        return
    for src, dst in (("utf-8", "latin-1"), ("utf-8", "cp1252"), ("latin-1", "utf-8"),
                     ("cp1252", "utf-8")):
        try:
            yield base.decode(src).encode(dst), f"{edited}it was re-encoded from {dst} to {src}"
        except (UnicodeDecodeError, UnicodeEncodeError):
            continue


def _decode_edited(line: bytes) -> tuple[dict[str, Any], str] | None:
    """(the line's content, how it was edited) when ``line`` fails its checksum only
    because of a whole-file edit (``_normalised``), else None."""
    for candidate, how in _normalised(line):
        try:
            return _codec.decode_line(candidate), how
        except _fields.BadLine:
            continue
    return None


def durable_beyond(read: Read, end: int, damage: Damage) -> int | None:
    """After damage at ``damage.offset``: the offset of a later valid line that proves the
    damaged bytes had been synced (its durable mark lies past them), else None. A line is
    looked for wherever one can begin, not only after a newline: a flipped newline merges
    the damaged line with the next, which must still count as proof. A line that fails its
    checksum only because the whole file was edited (``_normalised``) counts too. The
    bytes up to ``end`` are read a megabyte at a time, never held at once."""
    pos = damage.offset + 1
    overlap = len(b'{"mark":') - 1  # a line start cut by a chunk's end is seen in the next
    far_nl = -1  # the newline ending the last line found too long to read
    while pos < end:
        chunk = read(pos, min(_READ_CHUNK, end - pos))
        if not chunk:
            return None
        i = chunk.find(b'{"')
        while i >= 0:
            if _LINE_START.match(chunk, i) and pos + i + LINE_LIMIT >= far_nl:
                nl = chunk.find(b"\n", i)
                if nl >= 0:
                    line: bytes | None = chunk[i:nl]
                else:
                    line, at = _line_at(read, end, pos + i)
                    if at < 0:
                        return None  # no newline after it: nothing later is complete
                    far_nl = at if line is None else far_nl
                data = _decode_proof(line) if line is not None else None
                mark = data.get("durable") if data is not None else None
                if type(mark) is int and mark > damage.offset:
                    return pos + i
            i = chunk.find(b'{"', i + 1)
        pos += len(chunk) - overlap if len(chunk) > overlap and pos + len(chunk) < end \
            else len(chunk)
    return None


def _decode_proof(line: bytes) -> dict[str, Any] | None:
    try:
        return _codec.decode_line(line)
    except _fields.BadLine:
        edited = _decode_edited(line)
        return edited[0] if edited is not None else None


def cursor_after_header(header: Header, start: int) -> Cursor:
    """Where a reader stands after the header line (which ends at ``start``)."""
    return Cursor(end=start, next_seq=header.compacted_through + 1, durable=header.base_end,
                  latest_end=header.latest_end, base_end=header.base_end,
                  compacted_through=header.compacted_through,
                  checkpoint_seq=header.compacted_through + 1,
                  legacy=header.version < _codec.KINDS_BY_FIRST_KEY)


def judge(read: Read, end: int, cur: Cursor, damage: Damage) -> str | None:
    """Decide what damage at ``damage.offset`` of a file ``end`` bytes long is: None for a
    torn tail (unsynced writes a crash cut short, safe to truncate), else why it is
    corruption of durable data. A crash tears only appends that were not synced, so
    anything shown synced (a durable mark, a later line's mark, the lock file's vouch) or
    edited after it was complete is corruption. Linear in the tail, in bounded memory."""
    nl = _newline_after(read, end, damage.offset)
    if damage.reason == _INCOMPLETE and nl >= 0:
        damage = _long_line_damage(read, nl, damage)
    if damage.offset < cur.durable:
        return (f"{damage.reason}, inside the part of the file known to be synced "
                f"(the first {cur.durable} bytes)")
    if not damage.torn:
        return (f"{damage.reason}; the line is complete and passes its checksum, so it is "
                "not a torn write (was it written by a newer runstore or edited by hand?)")
    long = nl < 0 or nl - damage.offset > LINE_LIMIT
    edited = None if long else _decode_edited(read(damage.offset, nl - damage.offset))
    if edited is not None:
        return (f"{damage.reason}; the line passes its checksum once the edit is undone "
                f"({edited[1]}), so it was written whole and then the file was edited "
                "(not a torn write)")
    proof = durable_beyond(read, end, damage) if nl >= 0 else None  # none: no line ends
    if proof is not None:
        return f"{damage.reason}; a valid record at byte {proof} shows this part had been synced"
    if damage.offset < cur.vouched:
        return (f"{damage.reason}, inside the first {cur.vouched} bytes, which {LOCK_NAME} "
                "records as synced (at a clean close, checkpoint or compaction)")
    dropped = end - damage.offset
    if dropped > TORN_TAIL_LIMIT:
        return f"{damage.reason}, followed by {dropped} bytes: too much to be a torn write"
    return None


def parse_header(line: bytes, path: str) -> Header:
    """Decode and check the first line of a journal."""
    try:
        data = _codec.decode_line(line)
    except _fields.BadLine as exc:
        edited = _decode_edited(line) if exc.torn else None
        how = f"; it passes its checksum once the edit is undone ({edited[1]})" if edited else ""
        raise CorruptStoreError(path, 0,
                                f"the header line is damaged ({exc.reason}{how})") from None
    if data.get("format") != _codec.FORMAT_NAME:
        raise CorruptStoreError(
            path, 0, f"not a runstore journal (format {data.get('format')!r})",
            "point runstore at its own state directory; this file was left untouched")
    version = data.get("version")
    if type(version) is not int or version < 1:
        raise CorruptStoreError(path, 0, f"bad format version {version!r}")
    if version > _codec.FORMAT_VERSION:
        raise CorruptStoreError(
            path, 0,
            f"format version {version} is newer than this runstore understands "
            f"(version {_codec.FORMAT_VERSION})",
            "upgrade runstore to open this store; the file was left untouched")
    through = data.get("compacted_through")
    base, history = data.get("base_bytes"), data.get("history_bytes", 0)
    if not all(type(v) is int and v >= 0 for v in (through, base, history)):
        raise CorruptStoreError(path, 0, "the header's compaction fields are malformed")
    assert isinstance(through, int) and isinstance(base, int) and isinstance(history, int)
    return Header(
        store_id=str(data.get("store_id", "")),
        created=str(data.get("created", "")),
        version=version,
        compacted_through=through,
        latest_end=len(line) + 1 + base,
        base_end=len(line) + 1 + base + history,
        start=len(line) + 1,
        summary=_codec.BaseSummary.from_header(data),
        crc=zlib.crc32(line),
    )



def _chunks(read: Read, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """The bytes ``start:end`` as (offset, chunk) pairs of whole lines, about
    ``_READ_CHUNK`` each; a line longer than ``LINE_LIMIT`` ends it (its start is the last
    chunk, which a scan then finds incomplete), as does a line without its end."""
    pos, parts, pending = start, [], 0  # parts: a line begun and not yet ended
    while pos < end:
        chunk = read(pos, min(_READ_CHUNK, end - pos))
        if not chunk:
            break
        pos += len(chunk)
        cut = chunk.rfind(b"\n") + 1 if pos < end else len(chunk)
        if cut:
            parts.append(chunk[:cut] if cut < len(chunk) else chunk)
            yield pos - len(chunk) - pending, b"".join(parts)
            parts, pending = [chunk[cut:]] if cut < len(chunk) else [], len(chunk) - cut
        else:  # joined once its end is found: linear however long the line
            parts.append(chunk)
            pending += len(chunk)
            if pending > LINE_LIMIT:  # yield its start: the reader judges it streamed
                yield pos - pending, parts[0]
                return
    if parts:
        yield pos - pending, b"".join(parts)
