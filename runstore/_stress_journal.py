"""The stress run's own journal checker (``check_journal``): it re-reads a journal file from
scratch, independently of the store's reader."""

from __future__ import annotations

from typing import BinaryIO

import attrs

from . import _codec, _fields


@attrs.define
class JournalCheck:
    """What ``check_journal`` found in a journal file."""

    records: int = 0
    base_records: int = 0
    marks: int = 0
    first_seq: int = 0
    last_seq: int = 0
    problems: list[str] = attrs.Factory(list)
    duplicate_ids: list[str] = attrs.Factory(list)
    #: the offset of an incomplete last line (a write a crash cut short, which the next
    #: write to the store cuts off; reads leave it), else None
    torn_tail: int | None = None


def check_journal(path: str) -> JournalCheck:
    """Re-check a journal file from scratch, independently of the store's reader: every line
    ends in a newline and passes its checksum; the compacted base (the latest version of each
    run) holds each run and each sequence number once; after it (retained history, then
    appends) sequence numbers run on from ``compacted_through + 1`` without a gap and no run
    has two ``run_created`` lines."""
    out = JournalCheck()
    with open(path, "rb") as f:  # read a line at a time: the file may be large
        first = f.readline()
        if not first:
            out.problems.append("empty file")
            return out
        if not first.endswith(b"\n"):
            out.problems.append("incomplete last line at byte 0")
            return out
        try:
            head = _codec.decode_line(first[:-1])
            through, base = int(head["compacted_through"]), int(head["base_bytes"])
            legacy = int(head["version"]) < _codec.KINDS_BY_FIRST_KEY
        except (_fields.BadLine, KeyError, TypeError, ValueError, IndexError) as exc:
            out.problems.append(f"bad header: {exc}")
            return out
        _check_journal_lines(f, len(first), through, base, legacy, out)
    return out


def _check_journal_lines(f: BinaryIO, offset: int, through: int, base: int, legacy: bool,
                         out: JournalCheck) -> None:
    base_end = offset + base
    expected = through + 1
    base_seqs: set[int] = set()
    base_ids: set[str] = set()
    created: set[str] = set()
    out.first_seq = expected
    for raw in f:
        if not raw.endswith(b"\n"):
            out.torn_tail = offset
            break
        line = raw[:-1]
        try:
            rec = _codec.decode_line(line)
            mark = _codec.is_mark(line, rec, legacy)
        except _fields.BadLine as exc:
            out.problems.append(f"byte {offset}: {exc.reason}")
            offset += len(line) + 1
            continue
        seq, rid = rec.get("seq"), str(rec.get("id"))
        if mark:
            out.marks += 1
        elif not isinstance(seq, int):
            out.problems.append(f"byte {offset}: no seq")
        elif offset < base_end:
            out.base_records += 1
            if seq in base_seqs or rid in base_ids:
                out.problems.append(f"byte {offset}: seq {seq} or run {rid} twice in the base")
                out.duplicate_ids.append(rid)
            base_seqs.add(seq)
            base_ids.add(rid)
        else:
            out.records += 1
            if seq != expected:
                kind = "gap" if seq > expected else "repeat"
                out.problems.append(f"byte {offset}: seq {seq} where {expected} expected ({kind})")
            expected = seq + 1
            out.last_seq = seq
            if rec.get("change") == "run_created":
                if rid in created:
                    out.duplicate_ids.append(rid)
                created.add(rid)
        offset += len(line) + 1
